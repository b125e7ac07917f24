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
use crate::catalog::{self, DataCommand, PlannedQuery};
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
}

pub(crate) fn header<'a>(md: &'a MetadataMap, name: &str) -> Option<&'a str> {
    md.get(name).and_then(|v| v.to_str().ok())
}

/// Authenticates the caller and reads the declared purpose.
pub(crate) fn caller(node: &Node, md: &MetadataMap) -> Result<Caller> {
    let principal = node.authenticate(header(md, "authorization"))?;
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
    Ok(Caller { principal, purpose })
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
        reason: match outcome {
            Ok(r) => r.to_string(),
            Err(e) if suppressed > 0 => format!(
                "{} (and {suppressed} failed authentications refused unaudited before this one)",
                e.public_message()
            ),
            Err(e) => e.public_message(),
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
        let target = Target {
            dataset: cmd.map(|c| c.dataset.clone()).unwrap_or_default(),
            columns: cmd.and_then(|c| c.columns.clone()),
            filter: cmd.and_then(|c| c.filter.clone()),
            ..Default::default()
        };
        record(&self.node, md, caller, action, &target, outcome, final_entry).await
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
        let cmd = match cmd {
            Ok(c) => c,
            Err(e) => {
                self.audit(md, Some(&caller), action, None, Err(&e), true).await?;
                return Err(e);
            }
        };
        match catalog::plan(&self.node, &caller.principal, &caller.purpose, &cmd).await {
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
            let claims = TicketClaims {
                principal: caller.principal.name.clone(),
                purpose: caller.purpose.to_string(),
                dataset: cmd.dataset.clone(),
                columns: cmd.columns.clone(),
                filter: cmd.filter.clone(),
                limit: cmd.limit,
                exp: chrono::Utc::now().timestamp() + self.node.ticket_ttl.as_secs() as i64,
                nonce: rand::random(),
                sql: None,
                ..self.node.claims_for(&caller.principal)
            };
            info = info.with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(self.node.tickets.sign(&claims)?)));
        }
        Ok(info)
    }
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
        let caller = match self.caller(&md) {
            Ok(c) => c,
            Err(e) => {
                self.audit(&md, None, audit::Action::ListFlights, None, Err(&e), true)
                    .await?;
                return Err(e.into());
            }
        };
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
        let reason = format!("listed {} dataset(s)", infos.len());
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
        if let Some(name) = ticket.ticket.strip_prefix(crate::bench_support::UNGUARDED_PREFIX) {
            return crate::bench_support::unguarded_do_get(&self.node, name).await;
        }
        let caller = match self.caller(&md) {
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
        let cmd = DataCommand {
            dataset: claims.dataset.clone(),
            columns: claims.columns.clone(),
            filter: claims.filter.clone(),
            limit: claims.limit,
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
        FlightService::do_action(self.sql.as_ref(), request).await
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> std::result::Result<Response<Self::ListActionsStream>, Status> {
        Ok(Response::new(
            futures::stream::iter(crate::flight_sql::action_types().into_iter().map(Ok)).boxed(),
        ))
    }
}
