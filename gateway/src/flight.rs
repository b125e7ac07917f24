//! Plain Arrow Flight: Handshake, ListFlights, GetFlightInfo, GetSchema, DoGet.
//!
//! Every data call authenticates, requires `x-passerelle-purpose`, decides through the policy
//! engine, writes an audit entry before any batch leaves, and streams through the gate.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_descriptor::DescriptorType;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest,
    HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use datafusion::error::DataFusionError;
use datafusion::physical_plan::SendableRecordBatchStream;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use passerelle_policies::enforce::EnforceCounters;
use passerelle_policies::{Principal, Purpose};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::audit::{self, AuditEntry, AuditLog, Completion};
use crate::catalog::{self, AggregateSpec, DataCommand, PlannedQuery};
use crate::error::{Error, Result};
use crate::flight_sql::{SqlService, is_sql_command};
use crate::node::Node;
use crate::ticket::TicketClaims;

/// The header carrying the declared purpose.
pub const PURPOSE_HEADER: &str = "x-passerelle-purpose";

/// The Flight service of one node: plain Flight here, Flight SQL commands handed to
/// [`SqlService`] on the same port.
#[derive(Debug, Clone)]
pub struct FlightHandler {
    node: Arc<Node>,
    sql: Arc<SqlService>,
}

/// An authenticated caller and the purpose it declared.
pub(crate) struct Caller {
    pub principal: Principal,
    pub purpose: Purpose,
    /// For a peer node's principal: the assertion its home node signed.
    pub federated: Option<crate::federation::Assertion>,
}

pub(crate) fn header<'a>(md: &'a MetadataMap, name: &str) -> Option<&'a str> {
    md.get(name).and_then(|v| v.to_str().ok())
}

/// Authenticates the caller and reads the declared purpose.
pub(crate) fn caller(node: &Node, md: &MetadataMap) -> Result<Caller> {
    let (principal, federated) = match header(md, crate::federation::ASSERTION_HEADER) {
        Some(a) => {
            let (p, a) =
                node.federated_principal(a, header(md, "authorization"), header(md, PURPOSE_HEADER).unwrap_or(""))?;
            (p, Some(a))
        }
        None => (node.authenticate(header(md, "authorization"))?, None),
    };
    let purpose = header(md, PURPOSE_HEADER).ok_or_else(|| {
        Error::invalid(
            format!("missing `{PURPOSE_HEADER}` header"),
            "declare the purpose of this access, e.g. x-passerelle-purpose: research/ai-training",
        )
    })?;
    let purpose = Purpose::parse(purpose).map_err(|e| {
        Error::invalid(
            format!("`{PURPOSE_HEADER}`: {e}"),
            "purposes are slash-separated lowercase paths",
        )
    })?;
    Ok(Caller {
        principal,
        purpose,
        federated,
    })
}

/// What an audit entry is about.
#[derive(Debug, Default)]
pub(crate) struct Target<'a> {
    /// Dataset names, comma-separated.
    pub dataset: String,
    pub columns: Option<Vec<String>>,
    pub filter: Option<String>,
    pub statement: Option<&'a str>,
    /// Consent version used; looked up from the dataset's registry when `None`.
    pub consent_version: Option<u64>,
}

/// Appends an audit entry; failures to audit fail the request (no unaudited access).
pub(crate) async fn record(
    node: &Node,
    md: &MetadataMap,
    caller: Option<&Caller>,
    action: audit::Action,
    target: &Target<'_>,
    outcome: std::result::Result<&str, &Error>,
    final_entry: bool,
) -> Result<i64> {
    let (principal, organisation, member_state) = match caller {
        Some(c) => (
            c.principal.name.clone(),
            c.principal.org.clone(),
            c.principal.member_state.clone(),
        ),
        None => ("(unauthenticated)".to_string(), String::new(), String::new()),
    };
    let purpose = caller
        .map(|c| c.purpose.to_string())
        .or_else(|| header(md, PURPOSE_HEADER).map(str::to_string))
        .unwrap_or_default();
    // Failed authentications are audited one by one up to a node-wide rate; beyond it they are
    // refused unaudited and counted in the next one, so a flood cannot fill the log.
    let mut suppressed = 0;
    if caller.is_none() && matches!(outcome, Err(Error::Unauthenticated { .. })) {
        match node.limits.failed_auth() {
            Some(n) => suppressed = n,
            None => {
                return Err(Error::ResourceExhausted {
                    message: "too many failed authentications on this node; retry later".into(),
                });
            }
        }
    }
    let snap = node.snapshot();
    let consent_version = target.consent_version.unwrap_or_else(|| {
        snap.datasets
            .get(&target.dataset)
            .map(|m| m.policy().consent_registry)
            .map_or(0, |r| node.consent.registry_version(&r))
    });
    let entry = AuditEntry {
        principal,
        organisation,
        member_state,
        purpose,
        dataset: target.dataset.clone(),
        columns: target.columns.clone(),
        filter: target.filter.clone(),
        statement: target.statement.map(str::to_string),
        action,
        allow: outcome.is_ok(),
        reason: match (outcome, caller.and_then(|c| c.federated.as_ref())) {
            (Ok(r), Some(a)) => format!("{r} (for {}'s principal, assertion {})", a.iss, a.jti),
            (Err(e), Some(a)) => format!(
                "{} (for {}'s principal, assertion {})",
                e.public_message(),
                a.iss,
                a.jti
            ),
            (Ok(r), None) => r.to_string(),
            (Err(e), None) if suppressed > 0 => format!(
                "{} (and {suppressed} failed authentications refused unaudited before this one)",
                e.public_message()
            ),
            (Err(e), None) => e.public_message(),
        },
        consent_version,
        policy_version: snap.authorizer.version().to_string(),
    };
    node.audit.append(&entry, final_entry).await
}

fn is_sql_descriptor(desc: &FlightDescriptor) -> bool {
    DescriptorType::try_from(desc.r#type) == Ok(DescriptorType::Cmd) && is_sql_command(&desc.cmd)
}

fn command_from_descriptor(desc: &FlightDescriptor) -> Result<DataCommand> {
    match DescriptorType::try_from(desc.r#type) {
        Ok(DescriptorType::Path) => match desc.path.as_slice() {
            [name] => Ok(DataCommand {
                dataset: name.clone(),
                ..Default::default()
            }),
            _ => Err(Error::invalid(
                "a path descriptor must have exactly one element, the dataset name",
                "use FlightDescriptor.for_path(\"dataset\")",
            )),
        },
        Ok(DescriptorType::Cmd) => DataCommand::from_json(&desc.cmd),
        _ => Err(Error::invalid(
            "unknown descriptor type",
            "use a path or a JSON command descriptor",
        )),
    }
}

impl FlightHandler {
    /// A handler over a node.
    pub fn new(node: Arc<Node>) -> Self {
        let sql = Arc::new(SqlService::new(Arc::clone(&node)));
        Self { node, sql }
    }

    fn caller(&self, md: &MetadataMap) -> Result<Caller> {
        caller(&self.node, md)
    }

    /// The authenticated caller; a failed authentication is audited as `action`.
    async fn caller_audited(&self, md: &MetadataMap, action: audit::Action) -> Result<Caller> {
        match self.caller(md) {
            Ok(c) => Ok(c),
            Err(e) => {
                self.audit(md, None, action, None, Err(&e), true).await?;
                Err(e)
            }
        }
    }

    /// Appends an audit entry for a plain Flight request.
    async fn audit(
        &self,
        md: &MetadataMap,
        caller: Option<&Caller>,
        action: audit::Action,
        cmd: Option<&DataCommand>,
        outcome: std::result::Result<&str, &Error>,
        final_entry: bool,
    ) -> Result<i64> {
        let aggregate = cmd.and_then(|c| c.aggregate.as_ref());
        let statement = aggregate.map(AggregateSpec::describe);
        let target = Target {
            dataset: cmd.map(|c| c.dataset.clone()).unwrap_or_default(),
            columns: aggregate.map_or_else(|| cmd.and_then(|c| c.columns.clone()), |a| Some(a.columns())),
            filter: cmd.and_then(|c| c.filter.clone()),
            statement: statement.as_deref(),
            ..Default::default()
        };
        record(&self.node, md, caller, action, &target, outcome, final_entry).await
    }

    /// A federated request at the principal's home node: this node's part and each peer's,
    /// asked for concurrently on the principal's behalf; `None` when the descriptor names a
    /// local dataset (or comes from a peer: peers never fan out further).
    async fn federated_request(&self, md: &MetadataMap, desc: &FlightDescriptor) -> Result<Option<FlightInfo>> {
        use crate::catalog::OnPartial;
        use crate::federation::{NodeStatus, ask_peer};
        let Ok(cmd) = command_from_descriptor(desc) else {
            return Ok(None);
        };
        let snap = self.node.snapshot();
        let local_part = snap.federated_dataset(&cmd.dataset).filter(|n| *n != cmd.dataset);
        if snap.datasets.contains_key(&cmd.dataset)
            || header(md, crate::federation::ASSERTION_HEADER).is_some()
            || (local_part.is_none() && self.node.peers.is_empty())
        {
            return Ok(None);
        }
        let action = audit::Action::GetFlightInfo;
        let caller = match self.caller(md) {
            Ok(c) => c,
            Err(e) => {
                self.audit(md, None, action, Some(&cmd), Err(&e), true).await?;
                return Err(e);
            }
        };
        // A role this node does not vouch for to its peers gets no assertion: say so here, once,
        // rather than as every peer's failure.
        if !self.node.peers.is_empty()
            && let Err(e) = self.node.may_reach_peers(&caller.principal)
        {
            self.audit(md, Some(&caller), action, Some(&cmd), Err(&e), true).await?;
            return Err(e);
        }
        let rank = cmd.shard.map(|s| s.rank as usize);
        // Every node is asked for the same columns in the same order, answering those it does not
        // send as typed nulls: each endpoint then streams the FlightInfo's schema, and readers
        // concatenate the parts as they come.
        let described = describe_parts(&self.node, &caller, &cmd.dataset, local_part.as_deref()).await;
        let (columns, fill_nulls) = match &described.schema {
            Some(schema) => aligned(&cmd, schema),
            None => (cmd.columns.clone(), cmd.fill_nulls.clone()),
        };
        let part_cmd = DataCommand {
            // An aggregate is one small stream per node.
            parts: cmd.aggregate.is_none().then(|| cmd.shard.map_or(1, |s| s.world_size)),
            shard: None,
            // The home node applies the seed (peers deal their parts as usual).
            seed: None,
            on_partial: None,
            columns,
            fill_nulls,
            ..cmd.clone()
        };
        // Rank r reads part (r + offset) mod w of every node: disjoint and complete across ranks;
        // the seed moves the offset per node (a new share of rows per epoch).
        let pick = |node: &str, mut endpoints: Vec<FlightEndpoint>| -> Vec<FlightEndpoint> {
            let n = endpoints.len();
            match rank {
                Some(r) if r < n => {
                    let offset = cmd.seed.map_or(0, |s| catalog::seeded(s, node, 0) % n as u64) as usize;
                    vec![endpoints.swap_remove((r + offset) % n)]
                }
                Some(_) => Vec::new(),
                None => endpoints,
            }
        };
        let mut nodes = Vec::new();
        let mut endpoints = Vec::new();
        let mut schemas = Vec::new();
        if let Some(local) = local_part {
            let local_cmd = DataCommand {
                dataset: local.clone(),
                limit: described.share(cmd.limit, self.node.node_id()),
                ..part_cmd.clone()
            };
            let member_state = snap
                .datasets
                .get(&local)
                .map(|m| m.member_state.to_string())
                .unwrap_or_default();
            let mut status = NodeStatus {
                node: self.node.node_id().to_string(),
                member_state,
                status: "ok".into(),
                reason: None,
                endpoints: 0,
                location: self.node.advertise_url.get().cloned(),
                assertion: None,
            };
            match catalog::plan(&self.node, &caller.principal, &caller.purpose, &local_cmd).await {
                Ok(planned) => {
                    let info = self.flight_info(&caller, &local_cmd, &planned, desc.clone(), true)?;
                    // Every endpoint of a federated answer names its node (an aggregate has no parts).
                    let here = self.node.advertise_url.get().map_or("", String::as_str);
                    let located = info.endpoint.into_iter().map(|ep| match ep.location.is_empty() {
                        true => ep.with_location(here),
                        false => ep,
                    });
                    let mine = pick(self.node.node_id(), located.collect());
                    status.endpoints = mine.len();
                    endpoints.extend(mine);
                    schemas.push(planned.schema.as_ref().clone());
                }
                Err(e) => {
                    status.status = match e.status() {
                        crate::error::StatusClass::InvalidArgument => "refused",
                        _ => "denied",
                    }
                    .into();
                    status.reason = Some(e.public_message());
                }
            }
            nodes.push(status);
        }
        let timeout = std::time::Duration::from_secs(self.node.federation.peer_timeout_secs.max(1));
        let purpose = caller.purpose.to_string();
        let asks = self.node.peers.iter().map(|peer| {
            let assertion = self
                .node
                .assert_for(peer, &caller.principal, &purpose, Some(&cmd.dataset));
            let peer_cmd = serde_json::to_value(DataCommand {
                limit: described.share(cmd.limit, &peer.node_id),
                ..part_cmd.clone()
            });
            let (purpose, tls) = (&purpose, self.node.client_tls.as_ref());
            // A peer that was unreachable or holds no part: asked again it would time out twice,
            // or say the same. One that refused is asked (and audits the data request it refuses).
            let described = described
                .failed
                .get(&peer.node_id)
                .filter(|(status, _)| status == "unavailable" || status == "absent")
                .cloned();
            async move {
                let answer = match (&assertion, described, peer_cmd) {
                    (_, Some(failed), _) => Err(failed),
                    (Ok(a), None, Ok(body)) => ask_peer(peer, tls, timeout, &body, purpose, a).await,
                    (Err(e), None, _) => Err(("unavailable".to_string(), e.to_string())),
                    (_, None, Err(e)) => Err(("unavailable".to_string(), e.to_string())),
                };
                (peer, assertion.ok(), answer)
            }
        });
        for (peer, assertion, answer) in futures::future::join_all(asks).await {
            let mut status = NodeStatus {
                node: peer.node_id.clone(),
                member_state: peer.member_state.clone(),
                status: "ok".into(),
                reason: None,
                endpoints: 0,
                location: None,
                assertion: None,
            };
            match answer {
                Ok(info) => match info.clone().try_decode_schema() {
                    Ok(schema) => {
                        let theirs = pick(&peer.node_id, info.endpoint);
                        status.location = theirs.first().and_then(|e| e.location.first()).map(|l| l.uri.clone());
                        status.endpoints = theirs.len();
                        status.assertion = assertion;
                        endpoints.extend(theirs);
                        schemas.push(schema);
                    }
                    Err(e) => {
                        status.status = "unavailable".into();
                        status.reason = Some(format!("unreadable answer: {e}"));
                    }
                },
                Err((kind, _)) if kind == "absent" => continue,
                Err((kind, reason)) => {
                    status.status = kind;
                    status.reason = Some(reason);
                }
            }
            nodes.push(status);
        }
        if nodes.is_empty() {
            let e = Error::DatasetNotFound {
                name: cmd.dataset.clone(),
            };
            self.audit(md, Some(&caller), action, Some(&cmd), Err(&e), true).await?;
            return Err(e);
        }
        let summary = nodes
            .iter()
            .map(|n| match &n.reason {
                Some(r) => format!("{} ({}) {}: {r}", n.node, n.member_state, n.status),
                None => format!("{} ({}) {}", n.node, n.member_state, n.status),
            })
            .collect::<Vec<_>>()
            .join("; ");
        let failed: Vec<&NodeStatus> = nodes.iter().filter(|n| n.status != "ok").collect();
        if (!failed.is_empty() && cmd.on_partial.unwrap_or_default() == OnPartial::Fail) || failed.len() == nodes.len()
        {
            let message = format!(
                "federated dataset `{}`: {}",
                cmd.dataset,
                failed
                    .iter()
                    .map(|n| format!(
                        "{} ({}) {}: {}",
                        n.node,
                        n.member_state,
                        n.status,
                        n.reason.as_deref().unwrap_or("")
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            let e = if failed.iter().all(|n| n.status == "refused") {
                Error::invalid(message, "correct the request (each node names what it could not use)")
            } else if failed.iter().any(|n| n.status == "denied" || n.status == "refused") {
                Error::PermissionDenied {
                    reason: format!("{message}; pass \"on_partial\": \"skip\" to proceed without them"),
                }
            } else {
                Error::PeerUnavailable { message }
            };
            self.audit(md, Some(&caller), action, Some(&cmd), Err(&e), true).await?;
            return Err(e);
        }
        let schema = arrow::datatypes::Schema::try_merge(schemas).map_err(|e| {
            Error::invalid(
                format!("the nodes' parts of `{}` disagree on column types: {e}", cmd.dataset),
                "ask the stewards to align the column types of their parts",
            )
        })?;
        let metadata = serde_json::json!({ "federation": cmd.dataset, "nodes": nodes });
        let mut info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Error::Internal(format!("encode schema: {e}")))?
            .with_descriptor(desc.clone())
            .with_total_records(-1)
            .with_ordered(false)
            .with_app_metadata(metadata.to_string().into_bytes());
        for e in seeded_order(cmd.seed, endpoints) {
            info = info.with_endpoint(e);
        }
        let reason = format!("federated: {summary}");
        self.audit(md, Some(&caller), action, Some(&cmd), Ok(&reason), true)
            .await?;
        Ok(Some(info))
    }

    /// Re-issues the ticket of a part so that it skips the batches the reader already has.
    async fn resume(&self, md: &MetadataMap, body: &[u8]) -> Result<Vec<u8>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Resume {
            ticket: String,
            batches: u64,
        }
        let r: Resume = serde_json::from_slice(body).map_err(|e| {
            Error::invalid(
                format!("resume body: {e}"),
                "send {\"ticket\": \"<the part's ticket>\", \"batches\": <batches already read>}",
            )
        })?;
        let caller = match self.certificate_holder_of(md, r.ticket.as_bytes()) {
            Some(c) => c,
            None => self.caller(md)?,
        };
        let now = chrono::Utc::now().timestamp();
        let claims = self.node.tickets.verify(r.ticket.as_bytes(), now)?;
        if claims.principal != caller.principal.name || claims.purpose != caller.purpose.as_str() {
            return Err(Error::PermissionDenied {
                reason: "ticket was issued to another principal or for another purpose".into(),
            });
        }
        if let Some(a) = &caller.federated {
            self.check_bound(a, &claims.dataset)?;
        }
        if claims.part.is_none() {
            return Err(Error::invalid(
                "only tickets of parts can be resumed",
                "ask for the stream with `parts` (or a federated `shard`)",
            ));
        }
        self.node.tickets.sign(&TicketClaims {
            skip: claims.skip.saturating_add(r.batches),
            nonce: rand::random(),
            exp: now + self.node.ticket_ttl.as_secs() as i64,
            ..claims
        })
    }

    /// An assertion is good for the federated dataset it names only: `local` (this node's part)
    /// must belong to that federation.
    fn check_bound(&self, assertion: &crate::federation::Assertion, local: &str) -> Result<()> {
        let snap = self.node.snapshot();
        let federation = snap.datasets.get(local).and_then(|m| m.federation.as_deref());
        assertion.check_dataset(federation)
    }

    /// A peer node's principal reading its part with only its own certificate (no assertion):
    /// the ticket this node issued names `name@home`, and the certificate — issued by the
    /// authority of the ticket's member state, which must be the home peer's — names the same
    /// principal, organisation and member state. `None` when that is not the case (the caller
    /// is then authenticated as usual).
    fn certificate_holder_of(&self, md: &MetadataMap, ticket: &[u8]) -> Option<Caller> {
        if header(md, crate::federation::ASSERTION_HEADER).is_some() || header(md, "authorization").is_some() {
            return None;
        }
        let cert = crate::tls::current_peer_cert()?;
        let claims = self.node.tickets.verify(ticket, chrono::Utc::now().timestamp()).ok()?;
        let (name, home) = claims.principal.split_once('@')?;
        let peer = self.node.peers.get(home)?;
        let matches = cert.common_name == name
            && cert.organisation.as_deref() == Some(claims.org.as_str())
            && cert.country.as_deref() == Some(claims.member_state.as_str())
            && cert.member_state.as_deref() == Some(claims.member_state.as_str())
            && peer.member_state == claims.member_state;
        if !matches {
            return None;
        }
        let purpose = Purpose::parse(header(md, PURPOSE_HEADER)?).ok()?;
        self.node.limits.admit(&claims.principal).ok()?;
        Some(Caller {
            principal: Principal {
                name: claims.principal.clone(),
                org: claims.org.clone(),
                member_state: claims.member_state.clone(),
                // The role its home node asserted when this node issued the ticket.
                role: claims.role?,
            },
            purpose,
            federated: None,
        })
    }

    /// A peer's principal names federated datasets, and reaches only this node's part of them.
    fn resolve(&self, caller: &Caller, mut cmd: DataCommand) -> Result<DataCommand> {
        if let Some(a) = &caller.federated {
            cmd.dataset =
                self.node
                    .snapshot()
                    .federated_dataset(&cmd.dataset)
                    .ok_or_else(|| Error::DatasetNotFound {
                        name: cmd.dataset.clone(),
                    })?;
            self.check_bound(a, &cmd.dataset)?;
        }
        if cmd.shard.is_some() || cmd.on_partial.is_some() {
            return Err(Error::invalid(
                format!(
                    "`shard` and `on_partial` apply to federated datasets, and `{}` is a dataset of this node",
                    cmd.dataset
                ),
                "use `parts` to split a local stream",
            ));
        }
        Ok(cmd)
    }

    /// Authenticates, parses and plans; audits denials. Returns the caller and the plan.
    async fn decide(
        &self,
        md: &MetadataMap,
        action: audit::Action,
        cmd: std::result::Result<DataCommand, Error>,
    ) -> Result<(Caller, DataCommand, PlannedQuery)> {
        let caller = match self.caller(md) {
            Ok(c) => c,
            Err(e) => {
                self.audit(md, None, action, cmd.as_ref().ok(), Err(&e), true).await?;
                return Err(e);
            }
        };
        let cmd = match cmd.and_then(|c| self.resolve(&caller, c)) {
            Ok(c) => c,
            Err(e) => {
                self.audit(md, Some(&caller), action, None, Err(&e), true).await?;
                return Err(e);
            }
        };
        let describe = action == audit::Action::GetSchema;
        let planned = catalog::plan_for(&self.node, &caller.principal, &caller.purpose, &cmd, describe)
            .await
            .map_err(|e| match e {
                // A peer's principal already knows the federation, and that this node holds a
                // part: say it is refused, rather than missing.
                Error::DatasetNotFound { .. } if caller.federated.is_some() => Error::PermissionDenied {
                    reason: format!(
                        "node `{}` does not release its part to organisation `{}` for purpose `{}`",
                        self.node.node_id(),
                        caller.principal.org,
                        caller.purpose
                    ),
                },
                e => e,
            });
        match planned {
            Ok(p) => Ok((caller, cmd, p)),
            Err(e) => {
                self.audit(md, Some(&caller), action, Some(&cmd), Err(&e), true).await?;
                Err(e)
            }
        }
    }

    fn flight_info(
        &self,
        caller: &Caller,
        cmd: &DataCommand,
        planned: &PlannedQuery,
        desc: FlightDescriptor,
        with_ticket: bool,
    ) -> Result<FlightInfo> {
        let mut info = FlightInfo::new()
            .try_with_schema(&planned.schema)
            .map_err(|e| Error::Internal(format!("encode schema: {e}")))?
            .with_descriptor(desc)
            .with_total_records(-1)
            .with_ordered(false);
        if with_ticket {
            let mut endpoints = Vec::new();
            for ticket in self.tickets(caller, cmd)? {
                let mut endpoint = FlightEndpoint::new().with_ticket(Ticket::new(ticket));
                // Parts and peers' callers read from this node by URL; a plain request reads on
                // the connection it came on.
                if cmd.parts.is_some() || caller.federated.is_some() {
                    endpoint = endpoint.with_location(self.node.advertise_url.get().map_or("", String::as_str));
                }
                endpoints.push(endpoint);
            }
            for endpoint in seeded_order(cmd.seed, endpoints) {
                info = info.with_endpoint(endpoint);
            }
        }
        Ok(info)
    }

    /// The federated datasets the caller may use, as ListFlights entries: `app_metadata` names
    /// the nodes that showed each dataset.
    async fn federated_listing(&self, caller: &Caller) -> Result<Vec<FlightInfo>> {
        let mut infos = Vec::new();
        for listed in federated_datasets(&self.node, caller).await {
            let metadata = serde_json::json!({ "federation": listed.name, "nodes": listed.nodes });
            infos.push(
                FlightInfo::new()
                    .try_with_schema(&listed.schema)
                    .map_err(|e| Error::Internal(format!("encode schema: {e}")))?
                    .with_descriptor(FlightDescriptor::new_path(vec![listed.name]))
                    .with_total_records(-1)
                    .with_ordered(false)
                    .with_app_metadata(metadata.to_string().into_bytes()),
            );
        }
        Ok(infos)
    }

    /// One signed ticket per part of the request.
    fn tickets(&self, caller: &Caller, cmd: &DataCommand) -> Result<Vec<Vec<u8>>> {
        let n = cmd.parts.unwrap_or(1);
        (0..n)
            .map(|k| {
                self.node.tickets.sign(&TicketClaims {
                    principal: caller.principal.name.clone(),
                    purpose: caller.purpose.to_string(),
                    dataset: cmd.dataset.clone(),
                    columns: cmd.columns.clone(),
                    filter: cmd.filter.clone(),
                    limit: cmd.limit,
                    exp: chrono::Utc::now().timestamp() + self.node.ticket_ttl.as_secs() as i64,
                    nonce: rand::random(),
                    sql: None,
                    part: cmd.parts.map(|n| (k, n)),
                    skip: 0,
                    aggregate: cmd.aggregate.clone(),
                    fill_nulls: cmd.fill_nulls.clone(),
                    ..self.node.claims_for(&caller.principal)
                })
            })
            .collect()
    }
}

/// This node's parts of federated datasets that the caller may use for its purpose, each
/// with the part's post-policy schema.
async fn local_federations(node: &Arc<Node>, caller: &Caller) -> Vec<(String, arrow::datatypes::Schema)> {
    let snap = node.snapshot();
    let mut out = Vec::new();
    for m in snap.datasets.values() {
        let Some(federation) = m.federation.clone() else {
            continue;
        };
        let cmd = DataCommand {
            dataset: m.name.to_string(),
            ..Default::default()
        };
        if let Ok(p) = catalog::plan_for(node, &caller.principal, &caller.purpose, &cmd, true).await {
            out.push((federation, p.schema.as_ref().clone()));
        }
    }
    out
}

/// What the parts of a federated dataset say of themselves to one principal (GetSchema).
struct Described {
    /// The union of the parts' post-policy schemas; `None` when no part described itself or the
    /// parts disagree on a column's type (the data round then reports it).
    schema: Option<arrow::datatypes::Schema>,
    /// The peers that did not describe a part, with (status, reason) as `ask_peer` gives them.
    failed: std::collections::HashMap<String, (String, String)>,
    /// The nodes that described a part, this one first when it holds one.
    shown: Vec<String>,
}

impl Described {
    /// `node`'s share of a request's `limit` (rows across all endpoints, so across all nodes):
    /// the limit dealt evenly over the nodes that showed a part, nothing to the others. Rows flow
    /// from each node straight to the reader, so no node can give another its unused share; an
    /// exact `LIMIT` over the whole table is federated SQL's.
    fn share(&self, limit: Option<u64>, node: &str) -> Option<u64> {
        let limit = limit?;
        let n = self.shown.len() as u64;
        Some(match self.shown.iter().position(|s| s == node) {
            Some(i) => limit / n + u64::from((i as u64) < limit % n),
            None => 0,
        })
    }
}

/// Asks every node holding a part of `dataset` for its post-policy schema, concurrently.
async fn describe_parts(node: &Arc<Node>, caller: &Caller, dataset: &str, local_part: Option<&str>) -> Described {
    let mut schemas = Vec::new();
    let mut shown = Vec::new();
    if let Some(local) = local_part {
        let cmd = DataCommand {
            dataset: local.to_string(),
            ..Default::default()
        };
        if let Ok(p) = catalog::plan_for(node, &caller.principal, &caller.purpose, &cmd, true).await {
            schemas.push(p.schema.as_ref().clone());
            shown.push(node.node_id().to_string());
        }
    }
    let timeout = std::time::Duration::from_secs(node.federation.peer_timeout_secs.max(1));
    let purpose = caller.purpose.to_string();
    let body = serde_json::json!({ "dataset": dataset });
    let asks = node.peers.iter().map(|peer| {
        let assertion = node.assert_for(peer, &caller.principal, &purpose, Some(dataset));
        let (purpose, body, tls) = (&purpose, &body, node.client_tls.as_ref());
        async move {
            let answer = match assertion {
                Ok(a) => crate::federation::peer_schema(peer, tls, timeout, body, purpose, &a).await,
                Err(e) => Err(("unavailable".to_string(), e.to_string())),
            };
            (peer, answer)
        }
    });
    let mut failed = std::collections::HashMap::new();
    for (peer, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(schema) => {
                schemas.push(schema);
                shown.push(peer.node_id.clone());
            }
            Err(why) => {
                failed.insert(peer.node_id.clone(), why);
            }
        }
    }
    let schema = match schemas.is_empty() {
        true => None,
        false => arrow::datatypes::Schema::try_merge(schemas).ok(),
    };
    Described { schema, failed, shown }
}

/// The columns and `fill_nulls` of a federated request's part command over the federated
/// table `schema`: rows keep the caller's columns, or take every column of the table in its
/// order; `fill_nulls` types the columns the request uses (output, filter, groups, measures), so
/// a node that does not send one answers it as nulls, never its values.
fn aligned(
    cmd: &DataCommand,
    schema: &arrow::datatypes::Schema,
) -> (Option<Vec<String>>, Option<std::collections::BTreeMap<String, String>>) {
    let all = || schema.fields().iter().map(|f| f.name().clone()).collect::<Vec<_>>();
    let columns = match (&cmd.aggregate, &cmd.columns) {
        (Some(_), c) | (None, c @ Some(_)) => c.clone(),
        (None, None) => Some(all()),
    };
    let mut used: Vec<String> = columns.clone().unwrap_or_default();
    if let Some(agg) = &cmd.aggregate {
        used.extend(agg.group_by.iter().cloned());
        used.extend(agg.measures.iter().filter_map(|m| m.column.clone()));
    }
    if let Some(filter) = &cmd.filter {
        // Parsed, never evaluated, here: only to name the columns it uses. A filter that does
        // not parse over the table fills nothing; each node then says what is wrong with it.
        let parsed = datafusion::common::DFSchema::try_from(schema.clone())
            .ok()
            .and_then(|s| {
                datafusion::prelude::SessionContext::new_with_config(catalog::session_config())
                    .parse_sql_expr(filter, &s)
                    .ok()
            });
        used.extend(parsed.iter().flat_map(|e| e.column_refs()).map(|c| c.name.clone()));
    }
    // A dictionary column is filled as its value type, which would not match the parts that
    // send the dictionary: such requests keep each part's own columns.
    let dictionary = |name: &String| {
        schema
            .field_with_name(name)
            .is_ok_and(|f| matches!(f.data_type(), arrow::datatypes::DataType::Dictionary(_, _)))
    };
    if used.iter().any(dictionary) {
        return (cmd.columns.clone(), cmd.fill_nulls.clone());
    }
    let mut fill = cmd.fill_nulls.clone().unwrap_or_default();
    fill.extend(crate::federated_sql::fill_nulls(schema, used));
    if fill.len() > catalog::MAX_COLUMNS || columns.as_ref().is_some_and(|c| c.len() > catalog::MAX_COLUMNS) {
        // Wider than a request may be: the parts answer with their own columns.
        return (cmd.columns.clone(), cmd.fill_nulls.clone());
    }
    (columns, (!fill.is_empty()).then_some(fill))
}

/// A federated dataset as the home node lists it.
pub(crate) struct FederatedListing {
    pub name: String,
    /// The union of the schemas the nodes showed (every column nullable: a part may lack it).
    pub schema: arrow::datatypes::Schema,
    /// The nodes that showed it, this one first when it holds a part.
    pub nodes: Vec<String>,
}

/// The federated datasets the caller may use for its purpose: this node's parts and what each
/// peer shows (each peer decides on its own, for that principal). A peer that does not answer
/// is left out; a name that is also a local dataset is not listed (the local one wins).
/// ListFlights and Flight SQL's GetTables both list from here.
pub(crate) async fn federated_datasets(node: &Arc<Node>, caller: &Caller) -> Vec<FederatedListing> {
    use std::collections::BTreeMap;
    let mut found: BTreeMap<String, (Vec<arrow::datatypes::Schema>, Vec<String>)> = BTreeMap::new();
    let snap = node.snapshot();
    for (federation, schema) in local_federations(node, caller).await {
        let entry = found.entry(federation).or_default();
        entry.0.push(schema);
        entry.1.push(node.node_id().to_string());
    }
    let timeout = std::time::Duration::from_secs(node.federation.peer_timeout_secs.max(1));
    let purpose = caller.purpose.to_string();
    let asks = node.peers.iter().map(|peer| {
        let assertion = node.assert_for(peer, &caller.principal, &purpose, None);
        let (purpose, tls) = (&purpose, node.client_tls.as_ref());
        async move {
            match assertion {
                Ok(a) => (
                    peer,
                    crate::federation::peer_federations(peer, tls, timeout, purpose, &a).await,
                ),
                Err(e) => (peer, Err(("unavailable".to_string(), e.to_string()))),
            }
        }
    });
    for (peer, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(parts) => {
                for part in parts {
                    match part.decode_schema() {
                        Ok(schema) => {
                            let entry = found.entry(part.federation).or_default();
                            entry.0.push(schema);
                            entry.1.push(peer.node_id.clone());
                        }
                        Err(e) => tracing::warn!(peer = %peer.node_id, error = %e, "unreadable federated schema"),
                    }
                }
            }
            Err((status, reason)) => {
                tracing::debug!(peer = %peer.node_id, %status, %reason, "peer left out of the listing")
            }
        }
    }
    let mut out = Vec::new();
    for (name, (schemas, nodes)) in found {
        if snap.datasets.contains_key(&name) {
            continue;
        }
        let Ok(merged) = arrow::datatypes::Schema::try_merge(schemas) else {
            tracing::warn!(federation = %name, "parts disagree on column types; not listed");
            continue;
        };
        let fields: Vec<arrow::datatypes::Field> = merged
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        out.push(FederatedListing {
            name,
            schema: arrow::datatypes::Schema::new(fields),
            nodes,
        });
    }
    out
}

/// Endpoints in the order `seed` gives (by their location and position), or as they are.
fn seeded_order(seed: Option<u64>, endpoints: Vec<FlightEndpoint>) -> Vec<FlightEndpoint> {
    let Some(seed) = seed else {
        return endpoints;
    };
    let mut keyed: Vec<(u64, FlightEndpoint)> = endpoints
        .into_iter()
        .enumerate()
        .map(|(k, e)| {
            let at = e.location.first().map_or("", |l| l.uri.as_str());
            (catalog::seeded(seed, at, k as u64), e)
        })
        .collect();
    keyed.sort_by_key(|(key, _)| *key);
    keyed.into_iter().map(|(_, e)| e).collect()
}

/// Maps an error from the Flight encoder (which wraps DataFusion's) to a status, once.
fn flight_error_to_status(e: FlightError) -> Status {
    match e {
        FlightError::Tonic(s) => *s,
        FlightError::ExternalError(inner) => match inner.downcast::<DataFusionError>() {
            Ok(df) => Error::from(*df).into(),
            Err(other) => Error::Internal(other.to_string()).into(),
        },
        other => Error::Internal(other.to_string()).into(),
    }
}

/// Counts rows sent and completes the audit entry when the stream ends, fails or is dropped.
pub(crate) struct AuditedStream {
    inner: SendableRecordBatchStream,
    audit: AuditLog,
    id: i64,
    /// One per guarded table the plan reads.
    counters: Vec<Arc<EnforceCounters>>,
    sent: u64,
    start_version: u64,
    done: bool,
    /// The principal's stream slot, released with the stream.
    _slot: Option<crate::limits::StreamSlot>,
}

impl AuditedStream {
    /// Wraps a stream whose audit entry `id` is `requested`.
    pub(crate) fn new(
        inner: SendableRecordBatchStream,
        audit: AuditLog,
        id: i64,
        counters: Vec<Arc<EnforceCounters>>,
        start_version: u64,
    ) -> Self {
        Self {
            inner,
            audit,
            id,
            counters,
            sent: 0,
            start_version,
            done: false,
            _slot: None,
        }
    }

    /// Holds `slot` for as long as the stream lives.
    pub(crate) fn with_slot(mut self, slot: crate::limits::StreamSlot) -> Self {
        self._slot = Some(slot);
        self
    }

    /// The Flight encoding of this stream.
    pub(crate) fn encode(
        self,
        schema: arrow::datatypes::SchemaRef,
    ) -> BoxStream<'static, std::result::Result<FlightData, Status>> {
        FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(self.map_err(|e| FlightError::ExternalError(Box::new(e))))
            .map_err(flight_error_to_status)
            .boxed()
    }

    fn finish(&mut self, ok: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let dropped: u64 = self.counters.iter().map(|c| c.rows().2).sum();
        let last = self
            .counters
            .iter()
            .map(|c| c.last_consent_version.load(Ordering::Relaxed))
            .fold(self.start_version, u64::max);
        let completion = Completion {
            rows_sent: self.sent,
            rows_withheld: dropped,
            consent_version_last: last,
            ok,
        };
        let (audit, id) = (self.audit.clone(), self.id);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = audit.complete(id, completion).await {
                    tracing::error!(error = %e, audit_id = id, "could not complete audit entry");
                }
            });
        }
    }
}

impl Stream for AuditedStream {
    type Item = datafusion::error::Result<arrow::array::RecordBatch>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.inner.poll_next_unpin(cx);
        match &polled {
            Poll::Ready(Some(Ok(b))) => {
                let n = b.num_rows() as u64;
                self.sent += n;
            }
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Ready(None) => self.finish(true),
            Poll::Pending => {}
        }
        polled
    }
}

impl Drop for AuditedStream {
    fn drop(&mut self) {
        // A client that hangs up mid-stream leaves a `failed` entry with the rows it received.
        self.finish(false);
    }
}

#[tonic::async_trait]
impl FlightService for FlightHandler {
    type HandshakeStream = BoxStream<'static, std::result::Result<HandshakeResponse, Status>>;
    type ListFlightsStream = BoxStream<'static, std::result::Result<FlightInfo, Status>>;
    type DoGetStream = BoxStream<'static, std::result::Result<FlightData, Status>>;
    type DoPutStream = BoxStream<'static, std::result::Result<PutResult, Status>>;
    type DoActionStream = BoxStream<'static, std::result::Result<arrow_flight::Result, Status>>;
    type ListActionsStream = BoxStream<'static, std::result::Result<ActionType, Status>>;
    type DoExchangeStream = BoxStream<'static, std::result::Result<FlightData, Status>>;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<Response<Self::HandshakeStream>, Status> {
        let md = request.metadata().clone();
        let login = || -> Result<(Principal, String)> {
            let value = header(&md, "authorization").ok_or(Error::Unauthenticated {
                reason: "missing authorization header".into(),
            })?;
            let principal = self.node.authenticate(Some(value))?;
            let key = match crate::auth::parse_authorization(value)? {
                crate::auth::Credentials::Bearer(k) => k,
                crate::auth::Credentials::Basic { key, .. } => key,
            };
            Ok((principal, key))
        };
        // Failed logins are audited; successful ones are logged (each later call is audited).
        let (principal, key) = match login() {
            Ok(ok) => ok,
            Err(e) => {
                let target = Target::default();
                record(&self.node, &md, None, audit::Action::Handshake, &target, Err(&e), true).await?;
                return Err(e.into());
            }
        };
        tracing::info!(principal = %principal.name, "handshake");
        let bearer = format!("Bearer {key}")
            .parse()
            .map_err(|_| Status::invalid_argument("key contains characters not allowed in a header"))?;
        let out = futures::stream::iter([Ok(HandshakeResponse {
            protocol_version: 0,
            payload: Default::default(),
        })]);
        let mut resp = Response::new(out.boxed());
        resp.metadata_mut().insert("authorization", bearer);
        Ok(resp)
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> std::result::Result<Response<Self::ListFlightsStream>, Status> {
        let md = request.metadata().clone();
        let caller = self.caller_audited(&md, audit::Action::ListFlights).await?;
        if caller.federated.is_some() {
            let e = Error::PermissionDenied {
                reason: "a peer's principal asks its home node for the federated datasets it may use".into(),
            };
            self.audit(&md, Some(&caller), audit::Action::ListFlights, None, Err(&e), true)
                .await?;
            return Err(e.into());
        }
        let mut infos = Vec::new();
        for name in self.node.snapshot().datasets.keys() {
            let cmd = DataCommand {
                dataset: name.clone(),
                ..Default::default()
            };
            // Only datasets the caller may pull for this purpose are listed; a dataset whose
            // source is broken is skipped here and reported when asked for by name.
            if let Ok(planned) = catalog::plan(&self.node, &caller.principal, &caller.purpose, &cmd).await {
                infos.push(Ok(self.flight_info(
                    &caller,
                    &cmd,
                    &planned,
                    FlightDescriptor::new_path(vec![name.clone()]),
                    false,
                )?));
            }
        }
        let local = infos.len();
        for info in self.federated_listing(&caller).await? {
            infos.push(Ok(info));
        }
        let reason = format!(
            "listed {local} dataset(s) and {} federated dataset(s)",
            infos.len() - local
        );
        self.audit(&md, Some(&caller), audit::Action::ListFlights, None, Ok(&reason), true)
            .await?;
        Ok(Response::new(futures::stream::iter(infos).boxed()))
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        if is_sql_descriptor(request.get_ref()) {
            return FlightService::get_flight_info(self.sql.as_ref(), request).await;
        }
        let md = request.metadata().clone();
        let desc = request.into_inner();
        if let Some(info) = self.federated_request(&md, &desc).await? {
            return Ok(Response::new(info));
        }
        let (caller, cmd, planned) = self
            .decide(&md, audit::Action::GetFlightInfo, command_from_descriptor(&desc))
            .await?;
        let info = self.flight_info(&caller, &cmd, &planned, desc, true)?;
        self.audit(
            &md,
            Some(&caller),
            audit::Action::GetFlightInfo,
            Some(&cmd),
            Ok(&planned.reason),
            true,
        )
        .await?;
        Ok(Response::new(info))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented(
            "PollFlightInfo is not supported; use GetFlightInfo",
        ))
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<SchemaResult>, Status> {
        if is_sql_descriptor(request.get_ref()) {
            let info = FlightService::get_flight_info(self.sql.as_ref(), request).await?;
            return Ok(Response::new(SchemaResult {
                schema: info.into_inner().schema,
            }));
        }
        let md = request.metadata().clone();
        let desc = request.into_inner();
        let (caller, cmd, planned) = self
            .decide(&md, audit::Action::GetSchema, command_from_descriptor(&desc))
            .await?;
        let result: SchemaResult = SchemaAsIpc::new(&planned.schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e| Error::Internal(format!("encode schema: {e}")))?;
        self.audit(
            &md,
            Some(&caller),
            audit::Action::GetSchema,
            Some(&cmd),
            Ok(&planned.reason),
            true,
        )
        .await?;
        Ok(Response::new(result))
    }

    async fn do_get(&self, request: Request<Ticket>) -> std::result::Result<Response<Self::DoGetStream>, Status> {
        if is_sql_command(&request.get_ref().ticket) {
            return FlightService::do_get(self.sql.as_ref(), request).await;
        }
        let md = request.metadata().clone();
        let ticket = request.into_inner();
        #[cfg(feature = "bench")]
        if self.node.bench_unguarded.load(Ordering::Relaxed)
            && let Some(name) = ticket.ticket.strip_prefix(crate::bench_support::UNGUARDED_PREFIX)
        {
            return crate::bench_support::unguarded_do_get(&self.node, name).await;
        }
        let caller = match self
            .certificate_holder_of(&md, &ticket.ticket)
            .map_or_else(|| self.caller(&md), Ok)
        {
            Ok(c) => c,
            Err(e) => {
                self.audit(&md, None, audit::Action::DoGet, None, Err(&e), true).await?;
                return Err(e.into());
            }
        };
        let claims = match self.node.tickets.verify(&ticket.ticket, chrono::Utc::now().timestamp()) {
            Ok(c) => c,
            Err(e) => {
                self.audit(&md, Some(&caller), audit::Action::DoGet, None, Err(&e), true)
                    .await?;
                return Err(e.into());
            }
        };
        if claims.sql.is_some() {
            let e = Error::invalid(
                "this is a Flight SQL statement handle, not a plain Flight ticket",
                "send the ticket of the FlightInfo you received, unchanged",
            );
            self.audit(&md, Some(&caller), audit::Action::DoGet, None, Err(&e), true)
                .await?;
            return Err(e.into());
        }
        if let Some(Err(e)) = caller.federated.as_ref().map(|a| self.check_bound(a, &claims.dataset)) {
            self.audit(&md, Some(&caller), audit::Action::DoGet, None, Err(&e), true)
                .await?;
            return Err(e.into());
        }
        let cmd = DataCommand {
            dataset: claims.dataset.clone(),
            columns: claims.columns.clone(),
            filter: claims.filter.clone(),
            limit: claims.limit,
            parts: claims.part.map(|(_, n)| n),
            aggregate: claims.aggregate.clone(),
            fill_nulls: claims.fill_nulls.clone(),
            ..Default::default()
        };
        let mismatch = if claims.principal != caller.principal.name {
            Some("ticket was issued to another principal".to_string())
        } else if claims.purpose != caller.purpose.as_str() {
            Some(format!(
                "ticket was issued for purpose `{}`; declare the same purpose to use it",
                claims.purpose
            ))
        } else {
            None
        };
        if let Some(reason) = mismatch {
            let e = Error::PermissionDenied { reason };
            self.audit(&md, Some(&caller), audit::Action::DoGet, Some(&cmd), Err(&e), true)
                .await?;
            return Err(e.into());
        }
        let slot = match self.node.limits.open_stream(&caller.principal.name) {
            Ok(s) => s,
            Err(e) => {
                self.audit(&md, Some(&caller), audit::Action::DoGet, Some(&cmd), Err(&e), true)
                    .await?;
                return Err(e.into());
            }
        };
        // Decide again at stream time: permits, consent and the dataset may have changed.
        let planned = match catalog::plan(&self.node, &caller.principal, &caller.purpose, &cmd).await {
            Ok(p) => p,
            Err(e) => {
                self.audit(&md, Some(&caller), audit::Action::DoGet, Some(&cmd), Err(&e), true)
                    .await?;
                return Err(e.into());
            }
        };
        let id = self
            .audit(
                &md,
                Some(&caller),
                audit::Action::DoGet,
                Some(&cmd),
                Ok(&planned.reason),
                false,
            )
            .await?;
        let schema = Arc::clone(&planned.schema);
        let stream = match planned.df.execute_stream().await {
            Ok(s) => s,
            Err(e) => {
                let _ = self
                    .node
                    .audit
                    .complete(
                        id,
                        Completion {
                            rows_sent: 0,
                            rows_withheld: 0,
                            consent_version_last: planned.consent_version,
                            ok: false,
                        },
                    )
                    .await;
                return Err(Error::from(e).into());
            }
        };
        let stream = match claims.part {
            Some((k, n)) => crate::federation::deal(stream, k, n, claims.skip),
            None => stream,
        };
        let audited = AuditedStream::new(
            stream,
            self.node.audit.clone(),
            id,
            vec![planned.counters],
            planned.consent_version,
        )
        .with_slot(slot);
        Ok(Response::new(audited.encode(schema)))
    }

    /// Only Flight SQL uses DoPut (to bind prepared-statement parameters); everything else is
    /// refused there: the gateway is read-only.
    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoPutStream>, Status> {
        FlightService::do_put(self.sql.as_ref(), request).await
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("DoExchange is not supported"))
    }

    /// The only actions are Flight SQL's (prepared statements).
    async fn do_action(&self, request: Request<Action>) -> std::result::Result<Response<Self::DoActionStream>, Status> {
        match request.get_ref().r#type.as_str() {
            crate::federation::RESUME_ACTION => {
                let md = request.metadata().clone();
                let ticket = self.resume(&md, &request.get_ref().body).await?;
                let out = arrow_flight::Result { body: ticket.into() };
                Ok(Response::new(futures::stream::iter([Ok(out)]).boxed()))
            }
            crate::federation::FEDERATIONS_ACTION => {
                let md = request.metadata().clone();
                let caller = self.caller_audited(&md, audit::Action::ListFlights).await?;
                if let Some(d) = caller.federated.as_ref().and_then(|a| a.dataset.as_ref()) {
                    let e = Error::Unauthenticated {
                        reason: format!(
                            "federation assertion refused: it was issued for reading federated dataset `{d}`, not for listing federated datasets"
                        )
                        .into(),
                    };
                    self.audit(&md, Some(&caller), audit::Action::ListFlights, None, Err(&e), true)
                        .await?;
                    return Err(e.into());
                }
                let parts = local_federations(&self.node, &caller)
                    .await
                    .into_iter()
                    .map(|(f, schema)| crate::federation::FederationPart::new(f, &schema))
                    .collect::<Result<Vec<_>>>()?;
                let reason = format!("showed {} federated part(s)", parts.len());
                self.audit(&md, Some(&caller), audit::Action::ListFlights, None, Ok(&reason), true)
                    .await?;
                let body = serde_json::to_vec(&parts).map_err(|e| Error::Internal(e.to_string()))?;
                let out = arrow_flight::Result { body: body.into() };
                Ok(Response::new(futures::stream::iter([Ok(out)]).boxed()))
            }
            crate::federation::NODE_KEY_ACTION => {
                let body = serde_json::json!({ "node_id": self.node.node_id(), "keys": [self.node.node_key.jwk()] });
                let out = arrow_flight::Result {
                    body: body.to_string().into_bytes().into(),
                };
                Ok(Response::new(futures::stream::iter([Ok(out)]).boxed()))
            }
            _ => FlightService::do_action(self.sql.as_ref(), request).await,
        }
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> std::result::Result<Response<Self::ListActionsStream>, Status> {
        Ok(Response::new(
            futures::stream::iter(
                crate::flight_sql::action_types()
                    .into_iter()
                    .chain(crate::federation::action_types())
                    .map(Ok),
            )
            .boxed(),
        ))
    }
}
