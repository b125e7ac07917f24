//! Federation: one request, many member-state nodes, each the only judge of its own data.
//!
//! ```text
//!  trainer ──GetFlightInfo(eu_diabetes)──► home node (DE)
//!                                            │ signs an assertion per peer: {sub, org, member state,
//!                                            │ purpose, aud = peer, exp}  (Ed25519, node key)
//!                                            ├──GetFlightInfo + assertion──► FR: verifies with DE's key,
//!                                            │                               decides with ITS permits/consent,
//!                                            │                               returns tickets bound to trainer@DE
//!                                            └──GetFlightInfo + assertion──► IT: may deny
//!  trainer ◄── FlightInfo: endpoints {location, ticket} per node + per-node status (app_metadata)
//!  trainer ──DoGet(ticket) + assertion──► FR, DE, IT directly (the home node moves no rows)
//! ```
//!
//! A peer trusts the home node for one thing only: who its principal is (name, organisation,
//! member state — the home node's own member state). Permits, consent and column policy are
//! always the peer's own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{FlightDescriptor, FlightInfo};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataValue;

use crate::error::{Error, Result};
use crate::signing::{Context, NodeKey};

/// Header carrying an assertion, from the home node to a peer and from the client to a peer.
pub const ASSERTION_HEADER: &str = "x-passerelle-assertion";

/// Longest lifetime of an assertion, in seconds: the most `[federation] assertion_ttl_secs` may
/// say, and the most a peer accepts (`exp - iat`) whatever the issuing node's configuration.
pub const MAX_ASSERTION_TTL_SECS: u64 = 300;
/// How far in the future an assertion's `iat` may lie on a peer's clock (clocks differ).
pub const MAX_CLOCK_SKEW_SECS: i64 = 60;
/// Assertion format version: v2 names the role and the dataset, and is signed under
/// [`crate::signing::Context::Assertion`].
pub const ASSERTION_VERSION: u8 = 2;

/// `[federation]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationOptions {
    /// The Flight URL clients reach this node at, written into its endpoints (default: from the
    /// bound address, `grpc+tls://` with `[tls]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_flight_url: Option<String>,
    /// Lifetime of assertions this node signs, in seconds (at most [`MAX_ASSERTION_TTL_SECS`]).
    pub assertion_ttl_secs: u64,
    /// Time allowed to each peer to answer a federated request, in seconds.
    pub peer_timeout_secs: u64,
    /// Roles whose principals this node vouches for to its peers. A principal of another role
    /// gets no assertion (its federated requests are refused here), so a steward's or auditor's
    /// standing never travels to a node that did not grant it. Each peer still decides with the
    /// asserted role through its own policy.
    pub roles: Vec<passerelle_policies::Role>,
}

impl Default for FederationOptions {
    fn default() -> Self {
        Self {
            advertise_flight_url: None,
            assertion_ttl_secs: MAX_ASSERTION_TTL_SECS,
            peer_timeout_secs: 10,
            roles: vec![passerelle_policies::Role::Trainer],
        }
    }
}

impl FederationOptions {
    /// Checks the section.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_ASSERTION_TTL_SECS).contains(&self.assertion_ttl_secs) {
            return Err(Error::invalid(
                format!(
                    "federation.assertion_ttl_secs = {} is outside 1..={MAX_ASSERTION_TTL_SECS}",
                    self.assertion_ttl_secs
                ),
                "assertions are short-lived by design; peers refuse longer ones (the default is 300)",
            ));
        }
        Ok(())
    }

    /// Whether this node vouches to its peers for principals of `role`.
    pub fn asserts_for(&self, role: passerelle_policies::Role) -> bool {
        self.roles.contains(&role)
    }
}

/// `[peers.<node id>]`: another member state's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerOptions {
    /// The member state it serves; it may only vouch for principals of that state.
    pub member_state: String,
    /// Its Flight URL (`grpc://` or `grpc+tls://`).
    pub flight_url: String,
    /// Its Ed25519 verification key: the `x` of its `GET /api/v1/keys` (base64url).
    pub key: String,
    /// Trust anchors for its TLS certificate (`grpc+tls://`); this node then presents its own
    /// `[tls]` certificate as client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

impl PeerOptions {
    /// The raw verification key.
    pub fn public_key(&self, name: &str) -> Result<Vec<u8>> {
        URL_SAFE_NO_PAD
            .decode(self.key.trim())
            .ok()
            .filter(|k| k.len() == 32)
            .ok_or_else(|| {
                Error::invalid(
                    format!("peers.{name}.key is not a base64url Ed25519 public key"),
                    "copy the `x` of the peer's GET /api/v1/keys (or `passerelle keys` on the peer)",
                )
            })
    }

    /// Checks the section (key format, member state, URL scheme).
    pub fn validate(&self, name: &str) -> Result<()> {
        self.public_key(name)?;
        // A peer vouches for its member state only: it names whose pseudonyms and permits its
        // principals get, so a malformed one is refused at start, not at the first pull.
        if passerelle_policies::MemberState::parse(&self.member_state).is_err() {
            return Err(Error::invalid(
                format!(
                    "peers.{name}.member_state `{}` is not a member state code",
                    self.member_state
                ),
                "write the two-letter code, e.g. FR or DE",
            ));
        }
        if !(self.flight_url.starts_with("grpc://") || self.flight_url.starts_with("grpc+tls://")) {
            return Err(Error::invalid(
                format!(
                    "peers.{name}.flight_url `{}` is not a grpc:// or grpc+tls:// URL",
                    self.flight_url
                ),
                "write e.g. grpc+tls://gw-fr.example.eu:50051",
            ));
        }
        Ok(())
    }
}

/// What a home node vouches for when it asks a peer on a principal's behalf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assertion {
    /// Format version ([`ASSERTION_VERSION`]).
    pub v: u8,
    /// The home node.
    pub iss: String,
    /// The peer it is for: no other node accepts it.
    pub aud: String,
    /// The principal's name on its home node.
    pub sub: String,
    /// Its organisation.
    pub org: String,
    /// Its member state (the home node's).
    pub member_state: String,
    /// Its role on its home node: the peer decides with this role through its own policy.
    pub role: passerelle_policies::Role,
    /// The purpose it declared.
    pub purpose: String,
    /// The federated dataset it was issued for; `None` for the `federations` listing only.
    pub dataset: Option<String>,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expiry (at most [`MAX_ASSERTION_TTL_SECS`] after `iat`).
    pub exp: i64,
    /// Unique id, recorded in the peers' audit.
    pub jti: String,
}

const ASSERTION_HINT: &str = "ask your home node for a new FlightInfo; it signs a fresh assertion per node";

impl Assertion {
    /// `base64url(JSON).base64url(signature)`, the signature over
    /// `passerelle-assertion-v2\n` followed by the JSON.
    pub fn sign(&self, key: &NodeKey) -> Result<String> {
        let body = serde_json::to_vec(self).map_err(|e| Error::Internal(format!("serialise assertion: {e}")))?;
        let sig = key.sign_for(Context::Assertion, &body)?;
        Ok(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&body),
            URL_SAFE_NO_PAD.encode(sig)
        ))
    }

    /// Verifies an assertion addressed to `me`, signed by a configured peer whose member state
    /// it names, within its (capped) lifetime at `now`.
    pub fn verify(text: &str, me: &str, peers: &Peers, now: i64) -> Result<Self> {
        let bad = |why: &str| Error::Unauthenticated {
            reason: format!("federation assertion refused: {why}").into(),
        };
        if text.len() > 8192 {
            return Err(bad("too long"));
        }
        let (body, sig) = text.split_once('.').ok_or_else(|| bad("malformed"))?;
        let body = URL_SAFE_NO_PAD.decode(body).map_err(|_| bad("malformed"))?;
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| bad("malformed"))?;
        // Read the version and issuer first, then check the signature with that issuer's key
        // only, then read the claims.
        #[derive(Deserialize)]
        struct Head {
            v: u8,
            iss: String,
        }
        let head: Head = serde_json::from_slice(&body).map_err(|_| bad("malformed"))?;
        let peer = peers
            .get(&head.iss)
            .ok_or_else(|| bad("issued by a node that is not a peer of this one"))?;
        if head.v != ASSERTION_VERSION {
            return Err(bad(&format!(
                "format v{} from node `{}` is not accepted (this node reads v{ASSERTION_VERSION}, which names the role and dataset); upgrade that node",
                head.v, head.iss
            )));
        }
        if !crate::signing::verify_for(&peer.key, Context::Assertion, &body, &sig) {
            return Err(bad("the signature is not the issuing node's"));
        }
        let claims: Assertion = serde_json::from_slice(&body).map_err(|_| bad("malformed"))?;
        if claims.aud != me {
            return Err(bad("addressed to another node"));
        }
        if claims.member_state != peer.member_state {
            return Err(bad("the issuing node vouches for another member state than its own"));
        }
        let lifetime = claims.exp.saturating_sub(claims.iat);
        if lifetime <= 0 || lifetime > MAX_ASSERTION_TTL_SECS as i64 {
            return Err(bad(&format!(
                "its lifetime ({lifetime} s from iat to exp) is not within 1..={MAX_ASSERTION_TTL_SECS} s"
            )));
        }
        if claims.iat > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(bad(&format!(
                "issued {} s in the future; the nodes' clocks differ by more than {MAX_CLOCK_SKEW_SECS} s (synchronise them with NTP)",
                claims.iat - now
            )));
        }
        if claims.exp <= now {
            return Err(Error::Unauthenticated {
                reason: format!("federation assertion refused: expired; {ASSERTION_HINT}").into(),
            });
        }
        Ok(claims)
    }

    /// Whether this assertion may be used on `dataset`'s part, given the federation that part
    /// belongs to (`None`: not a federated part).
    pub fn check_dataset(&self, federation: Option<&str>) -> Result<()> {
        if self.dataset.is_some() && self.dataset.as_deref() == federation {
            return Ok(());
        }
        Err(Error::Unauthenticated {
            reason: match &self.dataset {
                Some(d) => format!(
                    "federation assertion refused: it was issued for federated dataset `{d}`, not for this request; {ASSERTION_HINT}"
                ),
                None => format!(
                    "federation assertion refused: it was issued for listing federated datasets, not for reading one; {ASSERTION_HINT}"
                ),
            }
            .into(),
        })
    }
}

/// A configured peer, its key decoded.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Node id.
    pub node_id: String,
    /// Member state.
    pub member_state: String,
    /// Flight URL.
    pub flight_url: String,
    /// Raw Ed25519 key.
    pub key: Vec<u8>,
    /// CA bundle for TLS.
    pub ca: Option<PathBuf>,
}

/// The node's peers by node id.
#[derive(Debug, Clone, Default)]
pub struct Peers(Arc<BTreeMap<String, Peer>>);

impl Peers {
    /// From the configuration.
    pub fn new(configs: &BTreeMap<String, PeerOptions>) -> Result<Self> {
        let mut out = BTreeMap::new();
        for (name, p) in configs {
            p.validate(name)?;
            out.insert(
                name.clone(),
                Peer {
                    node_id: name.clone(),
                    member_state: p.member_state.clone(),
                    flight_url: p.flight_url.clone(),
                    key: p.public_key(name)?,
                    ca: p.ca.clone(),
                },
            );
        }
        Ok(Self(Arc::new(out)))
    }

    /// A peer by node id.
    pub fn get(&self, node_id: &str) -> Option<&Peer> {
        self.0.get(node_id)
    }

    /// All peers, by node id.
    pub fn iter(&self) -> impl Iterator<Item = &Peer> {
        self.0.values()
    }

    /// Whether there are any.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// TLS material for calling `grpc+tls://` peers: this node's certificate as client certificate.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM key.
    pub key: PathBuf,
}

/// A Flight client to a peer (plain, or TLS through OpenSSL with this node's certificate).
pub async fn connect(
    peer: &Peer,
    tls: Option<&ClientTls>,
    timeout: Duration,
) -> std::result::Result<FlightServiceClient<tonic::transport::Channel>, String> {
    let (tls_on, rest) = if let Some(rest) = peer.flight_url.strip_prefix("grpc+tls://") {
        (true, rest)
    } else if let Some(rest) = peer.flight_url.strip_prefix("grpc://") {
        (false, rest)
    } else {
        return Err(format!("unsupported URL {}", peer.flight_url));
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{rest}"))
        .map_err(|e| format!("bad URL: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = if tls_on {
        let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h).to_string();
        let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())
            .map_err(|e| format!("openssl: {e}"))?;
        if let Some(ca) = &peer.ca {
            b.set_ca_file(ca)
                .map_err(|e| format!("peer CA {}: {e}", ca.display()))?;
        }
        if let Some(t) = tls {
            b.set_certificate_chain_file(&t.cert)
                .map_err(|e| format!("client certificate: {e}"))?;
            b.set_private_key_file(&t.key, openssl::ssl::SslFiletype::PEM)
                .map_err(|e| format!("client key: {e}"))?;
        }
        b.set_alpn_protos(b"\x02h2").map_err(|e| format!("openssl: {e}"))?;
        let connector = Arc::new(b.build());
        let addr = rest.to_string();
        endpoint
            .connect_with_connector(tower::service_fn(move |_uri: tonic::transport::Uri| {
                let connector = Arc::clone(&connector);
                let (addr, host) = (addr.clone(), host.clone());
                async move {
                    let tcp = tokio::net::TcpStream::connect(&addr).await?;
                    let ssl = connector
                        .configure()
                        .and_then(|c| c.into_ssl(&host))
                        .map_err(std::io::Error::other)?;
                    let mut stream = tokio_openssl::SslStream::new(ssl, tcp).map_err(std::io::Error::other)?;
                    std::pin::Pin::new(&mut stream)
                        .connect()
                        .await
                        .map_err(std::io::Error::other)?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
    } else {
        endpoint.connect().await
    };
    channel
        .map(FlightServiceClient::new)
        .map_err(|e| format!("cannot connect to {}: {}", peer.flight_url, root_cause(&e)))
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// How one node answered a federated request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    /// Node id.
    pub node: String,
    /// Its member state.
    pub member_state: String,
    /// `ok`, `denied` or `unavailable`.
    pub status: String,
    /// Why not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Endpoints it contributed.
    pub endpoints: usize,
    /// Where its endpoints are read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The assertion the client presents to this node with each ticket (peers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assertion: Option<String>,
}

/// Asks one peer for its part: GetFlightInfo with the command and the assertion.
pub async fn ask_peer(
    peer: &Peer,
    tls: Option<&ClientTls>,
    timeout: Duration,
    command: &serde_json::Value,
    purpose: &str,
    assertion: &str,
) -> std::result::Result<FlightInfo, (String, String)> {
    let mut client = connect(peer, tls, timeout).await.map_err(unavailable)?;
    let req = on_behalf(FlightDescriptor::new_cmd(command.to_string()), purpose, assertion)?;
    client
        .get_flight_info(req)
        .await
        .map(tonic::Response::into_inner)
        .map_err(peer_refusal)
}

/// The post-policy schema of `peer`'s part (GetSchema): what a federated SQL table needs to plan,
/// without asking for rows (an aggregates-only part describes itself but releases no rows).
pub async fn peer_schema(
    peer: &Peer,
    tls: Option<&ClientTls>,
    timeout: Duration,
    command: &serde_json::Value,
    purpose: &str,
    assertion: &str,
) -> std::result::Result<arrow::datatypes::Schema, (String, String)> {
    let mut client = connect(peer, tls, timeout).await.map_err(unavailable)?;
    let req = on_behalf(FlightDescriptor::new_cmd(command.to_string()), purpose, assertion)?;
    let result = client.get_schema(req).await.map_err(peer_refusal)?.into_inner();
    arrow::datatypes::Schema::try_from(&result).map_err(|e| unavailable(format!("unreadable schema: {e}")))
}

fn unavailable(why: String) -> (String, String) {
    ("unavailable".to_string(), why)
}

/// `message` for a peer, on the principal's behalf: the declared purpose and the assertion.
pub fn on_behalf<T>(
    message: T,
    purpose: &str,
    assertion: &str,
) -> std::result::Result<tonic::Request<T>, (String, String)> {
    let mut req = tonic::Request::new(message);
    let md = req.metadata_mut();
    md.insert(
        crate::flight::PURPOSE_HEADER,
        MetadataValue::try_from(purpose).map_err(|_| unavailable("bad purpose".into()))?,
    );
    md.insert(
        ASSERTION_HEADER,
        MetadataValue::try_from(assertion).map_err(|_| unavailable("bad assertion".into()))?,
    );
    Ok(req)
}

/// A peer's refusal as (status, reason) for `app_metadata` and error messages.
fn peer_refusal(s: tonic::Status) -> (String, String) {
    let status = match s.code() {
        // The peer holds no part of this federated dataset (or will not say it does).
        tonic::Code::NotFound => "absent",
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => "denied",
        tonic::Code::InvalidArgument => "refused",
        _ => "unavailable",
    };
    (status.to_string(), s.message().to_string())
}

/// DoAction type that re-issues a part's ticket skipping the batches a reader already has.
pub const RESUME_ACTION: &str = "resume";
/// DoAction type answering this node's id and verification key (peer health checks).
pub const NODE_KEY_ACTION: &str = "node-key";
/// DoAction type answering the federated datasets this node holds a part of that the caller may
/// use for the declared purpose, each with the part's post-policy schema.
pub const FEDERATIONS_ACTION: &str = "federations";

/// One federated dataset as a node shows it to a caller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FederationPart {
    /// The federated dataset's name.
    pub federation: String,
    /// The part's post-policy schema, as a Flight `SchemaResult` message, base64url.
    pub schema: String,
}

impl FederationPart {
    /// Encodes `schema` for the answer.
    pub fn new(federation: String, schema: &arrow::datatypes::Schema) -> Result<Self> {
        let result: arrow_flight::SchemaResult =
            arrow_flight::SchemaAsIpc::new(schema, &arrow::ipc::writer::IpcWriteOptions::default())
                .try_into()
                .map_err(|e| Error::Internal(format!("encode schema: {e}")))?;
        Ok(Self {
            federation,
            schema: URL_SAFE_NO_PAD.encode(&result.schema),
        })
    }

    /// The schema, decoded.
    pub fn decode_schema(&self) -> std::result::Result<arrow::datatypes::Schema, String> {
        let bytes = URL_SAFE_NO_PAD.decode(&self.schema).map_err(|e| e.to_string())?;
        let result = arrow_flight::SchemaResult { schema: bytes.into() };
        arrow::datatypes::Schema::try_from(&result).map_err(|e| e.to_string())
    }
}

/// The federated datasets `peer` shows to the principal of `assertion` for `purpose`.
pub async fn peer_federations(
    peer: &Peer,
    tls: Option<&ClientTls>,
    timeout: Duration,
    purpose: &str,
    assertion: &str,
) -> std::result::Result<Vec<FederationPart>, (String, String)> {
    let ask = async {
        let mut client = connect(peer, tls, timeout).await.map_err(unavailable)?;
        let action = arrow_flight::Action {
            r#type: FEDERATIONS_ACTION.into(),
            body: Default::default(),
        };
        let req = on_behalf(action, purpose, assertion)?;
        let mut stream = client.do_action(req).await.map_err(peer_refusal)?.into_inner();
        let first = futures::StreamExt::next(&mut stream)
            .await
            .ok_or_else(|| unavailable("no answer".into()))?
            .map_err(peer_refusal)?;
        serde_json::from_slice::<Vec<FederationPart>>(&first.body)
            .map_err(|e| unavailable(format!("unreadable answer: {e}")))
    };
    tokio::time::timeout(timeout, ask)
        .await
        .unwrap_or_else(|_| Err(unavailable("no answer in time".into())))
}

/// The federation actions, for ListActions.
pub fn action_types() -> Vec<arrow_flight::ActionType> {
    vec![
        arrow_flight::ActionType {
            r#type: RESUME_ACTION.into(),
            description:
                "{\"ticket\": \"<ticket>\", \"batches\": m}: a ticket for the same part that skips its first m batches"
                    .into(),
        },
        arrow_flight::ActionType {
            r#type: NODE_KEY_ACTION.into(),
            description: "this node's id and Ed25519 verification key".into(),
        },
        arrow_flight::ActionType {
            r#type: FEDERATIONS_ACTION.into(),
            description: "the federated datasets this node holds a part of that the caller may use for the declared purpose, with their schemas".into(),
        },
    ]
}

/// Part `k` of `n` of a stream: row i of the stream goes to part i mod n, so parts are
/// disjoint, together complete and balanced to a row; the first `skip` (non-empty) batches of
/// the part are left out for a resumed reader. The plan runs in one partition, so the row
/// sequence is the same at every DoGet while data and consent are unchanged. Errors reach every
/// part.
pub fn deal(
    stream: datafusion::physical_plan::SendableRecordBatchStream,
    k: u32,
    n: u32,
    skip: u64,
) -> datafusion::physical_plan::SendableRecordBatchStream {
    use futures::StreamExt as _;
    let schema = stream.schema();
    let (k, n) = (u64::from(k), u64::from(n.max(1)));
    let mut offset = 0u64;
    let dealt = stream
        .filter_map(move |b| {
            let out = match b {
                Err(e) => Some(Err(e)),
                Ok(batch) => {
                    let rows = batch.num_rows() as u64;
                    let mask: arrow::array::BooleanArray = (offset..offset + rows).map(|i| Some(i % n == k)).collect();
                    offset += rows;
                    match arrow::compute::filter_record_batch(&batch, &mask) {
                        Ok(b) if b.num_rows() == 0 => None,
                        Ok(b) => Some(Ok(b)),
                        Err(e) => Some(Err(e.into())),
                    }
                }
            };
            std::future::ready(out)
        })
        .skip(usize::try_from(skip).unwrap_or(usize::MAX));
    Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
        schema, dealt,
    ))
}

/// A peer's health: reachable over Flight, and answering with the key configured for it.
pub async fn peer_health(peer: &Peer, tls: Option<&ClientTls>) -> serde_json::Value {
    let base = serde_json::json!({
        "node": peer.node_id,
        "member_state": peer.member_state,
        "flight_url": peer.flight_url,
    });
    let probe = async {
        let mut client = connect(peer, tls, Duration::from_secs(3)).await?;
        let action = arrow_flight::Action {
            r#type: NODE_KEY_ACTION.into(),
            body: Default::default(),
        };
        let mut stream = client
            .do_action(action)
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let first = futures::StreamExt::next(&mut stream)
            .await
            .ok_or("no answer")?
            .map_err(|s| s.message().to_string())?;
        let v: serde_json::Value = serde_json::from_slice(&first.body).map_err(|e| e.to_string())?;
        Ok::<_, String>(v)
    };
    let mut out = base;
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(v)) => {
            let x = v["keys"][0]["x"].as_str().unwrap_or_default();
            let matches = URL_SAFE_NO_PAD.decode(x).is_ok_and(|k| k == peer.key);
            out["status"] = "ok".into();
            out["key_matches"] = matches.into();
            out["node_id"] = v["node_id"].clone();
        }
        Ok(Err(e)) => {
            out["status"] = "unavailable".into();
            out["key_matches"] = false.into();
            out["reason"] = e.into();
        }
        Err(_) => {
            out["status"] = "unavailable".into();
            out["key_matches"] = false.into();
            out["reason"] = "timed out".into();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assertions_bind_issuer_audience_state_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let de = NodeKey::load_or_create(&dir.path().join("de")).unwrap();
        let it = NodeKey::load_or_create(&dir.path().join("it")).unwrap();
        let peers_of_fr = Peers::new(&BTreeMap::from([
            (
                "gw-de".to_string(),
                PeerOptions {
                    member_state: "DE".into(),
                    flight_url: "grpc://127.0.0.1:1".into(),
                    key: de.jwk().x,
                    ca: None,
                },
            ),
            (
                "gw-it".to_string(),
                PeerOptions {
                    member_state: "IT".into(),
                    flight_url: "grpc://127.0.0.1:2".into(),
                    key: it.jwk().x,
                    ca: None,
                },
            ),
        ]))
        .unwrap();
        let a = Assertion {
            v: ASSERTION_VERSION,
            iss: "gw-de".into(),
            aud: "gw-fr".into(),
            sub: "trainer-de".into(),
            org: "dkfz".into(),
            member_state: "DE".into(),
            role: passerelle_policies::Role::Trainer,
            purpose: "research/ai-training".into(),
            dataset: Some("eu".into()),
            iat: 100,
            exp: 200,
            jti: "j".into(),
        };
        let text = a.sign(&de).unwrap();
        assert_eq!(Assertion::verify(&text, "gw-fr", &peers_of_fr, 150).unwrap(), a);
        let refused =
            |t: &str, me: &str, now: i64| Assertion::verify(t, me, &peers_of_fr, now).unwrap_err().to_string();
        assert!(refused(&text, "gw-it", 150).contains("another node"));
        assert!(refused(&text, "gw-fr", 200).contains("expired"));
        // Signed by IT but claiming to be DE; IT vouching for a German principal.
        assert!(refused(&a.sign(&it).unwrap(), "gw-fr", 150).contains("signature"));
        let it_for_de = Assertion {
            iss: "gw-it".into(),
            ..a.clone()
        };
        assert!(refused(&it_for_de.sign(&it).unwrap(), "gw-fr", 150).contains("member state"));
        let stranger = Assertion {
            iss: "gw-xx".into(),
            ..a.clone()
        };
        assert!(refused(&stranger.sign(&de).unwrap(), "gw-fr", 150).contains("not a peer"));
        let mut bytes = text.clone().into_bytes();
        bytes[10] ^= 1;
        assert!(Assertion::verify(&String::from_utf8_lossy(&bytes), "gw-fr", &peers_of_fr, 150).is_err());
        // Lifetime capped whatever the issuer says; iat in the future beyond the skew.
        let long = Assertion {
            exp: 100 + MAX_ASSERTION_TTL_SECS as i64 + 1,
            ..a.clone()
        };
        assert!(refused(&long.sign(&de).unwrap(), "gw-fr", 150).contains("lifetime"));
        let backwards = Assertion { exp: 99, ..a.clone() };
        assert!(refused(&backwards.sign(&de).unwrap(), "gw-fr", 50).contains("lifetime"));
        let future = Assertion {
            iat: 150 + MAX_CLOCK_SKEW_SECS + 1,
            exp: 150 + MAX_CLOCK_SKEW_SECS + 100,
            ..a.clone()
        };
        assert!(refused(&future.sign(&de).unwrap(), "gw-fr", 150).contains("future"));
        let skewed = Assertion {
            iat: 150 + MAX_CLOCK_SKEW_SECS,
            exp: 150 + MAX_CLOCK_SKEW_SECS + 100,
            ..a.clone()
        };
        assert!(Assertion::verify(&skewed.sign(&de).unwrap(), "gw-fr", &peers_of_fr, 150).is_ok());
        // Signed without the assertion context (as a ticket would be): refused.
        let (body, _) = text.split_once('.').unwrap();
        let raw = URL_SAFE_NO_PAD.decode(body).unwrap();
        for sig in [de.sign(&raw).unwrap(), de.sign_for(Context::Ticket, &raw).unwrap()] {
            let t = format!("{body}.{}", URL_SAFE_NO_PAD.encode(sig));
            assert!(refused(&t, "gw-fr", 150).contains("signature"));
        }
        // A v1 assertion (no role, no dataset) is refused by version, naming the issuer.
        let v1 = serde_json::json!({"v": 1, "iss": "gw-de", "aud": "gw-fr", "sub": "t", "org": "o",
            "member_state": "DE", "purpose": "p", "iat": 100, "exp": 200, "jti": "j"});
        let v1 = serde_json::to_vec(&v1).unwrap();
        let t = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&v1),
            URL_SAFE_NO_PAD.encode(de.sign(&v1).unwrap())
        );
        assert!(refused(&t, "gw-fr", 150).contains("format v1"));
        // Bound to its dataset.
        assert!(a.check_dataset(Some("eu")).is_ok());
        assert!(a.check_dataset(Some("other")).is_err());
        assert!(a.check_dataset(None).is_err());
        let listing = Assertion { dataset: None, ..a };
        assert!(listing.check_dataset(None).is_err());
        assert!(listing.check_dataset(Some("eu")).is_err());
    }
}
