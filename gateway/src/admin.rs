//! The REST admin API (axum): datasets, permits, consent events, audit, health.
//! Same API keys as Flight, as `authorization: Bearer <key>`. Errors are JSON
//! `{"error": "...", "hint": "..."}` with the status from [`crate::error::StatusClass`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use passerelle_policies::{DatasetId, Permit, Principal, Purpose, Role};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::audit::AuditQuery;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::node::Node;

/// Largest consent upload over REST (bulk loads of millions go through `consent import`).
const CONSENT_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// The admin router.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/datasets", get(list_datasets).post(register_dataset))
        .route("/api/v1/datasets/{name}", get(show_dataset))
        .route("/api/v1/datasets/{name}/permits", post(add_permit))
        .route(
            "/api/v1/consent/{registry}/events",
            post(consent_events).layer(DefaultBodyLimit::max(CONSENT_BODY_LIMIT)),
        )
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/audit/verify", get(audit_verify))
        .route("/api/v1/audit/checkpoint", get(audit_checkpoint))
        .route("/api/v1/keys", get(keys))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/peers", get(peers))
        .route("/api/v1/policy/explain", get(explain))
        .route("/api/v1/datasets/{name}/rules", post(add_rule))
        .fallback(|| async { Error::NoSuchEndpoint })
        .method_not_allowed_fallback(|| async {
            Error::invalid("method not allowed on this endpoint", "see the README for the REST API")
        })
        .with_state(node)
}

fn caller(node: &Node, headers: &HeaderMap) -> Result<Principal> {
    node.authenticate(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()))
}

/// The caller, who must be the steward of `name`'s controller (or an admin), and the dataset.
fn steward_of_dataset(node: &Node, headers: &HeaderMap, name: &str) -> Result<(Principal, Arc<Manifest>)> {
    let who = caller(node, headers)?;
    let m = node.snapshot().visible_dataset(&who, name)?;
    node.require_steward_of(&who, &m.controller)?;
    Ok((who, m))
}

/// A path segment; a malformed one (not UTF-8) is a JSON 400 like every other error.
struct Segment(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Segment {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(s)| Segment(s))
            .map_err(|e| Error::invalid(format!("bad path: {}", e.body_text()), "names are UTF-8 identifiers"))
    }
}

/// A request body; over the endpoint's limit it is a JSON 413.
struct Body(Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = Error;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self> {
        Bytes::from_request(req, state).await.map(Body).map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::TooLarge {
                    message: "request body is larger than this endpoint accepts".into(),
                }
            } else {
                Error::invalid(
                    format!("cannot read the request body: {}", e.body_text()),
                    "send a JSON body",
                )
            }
        })
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &Bytes, hint: &'static str) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::invalid(format!("request body is not valid: {e}"), hint))
}

/// A dataset as shown to one caller: the location only to its steward and admins.
fn dataset_view(m: &Manifest, caller: &Principal) -> Value {
    let mut v = serde_json::to_value(m).unwrap_or(Value::Null);
    let owner = caller.role == Role::Admin || (caller.role == Role::Steward && caller.org == m.controller);
    if !owner && let Some(o) = v.as_object_mut() {
        o.remove("location");
    }
    v
}

async fn healthz(State(node): State<Arc<Node>>) -> Result<Json<Value>> {
    let version = node.meta.version().await?;
    Ok(Json(
        json!({ "status": "ok", "metadata_version": version, "consent_version": node.consent.applied_seq() }),
    ))
}

async fn list_datasets(State(node): State<Arc<Node>>, headers: HeaderMap) -> Result<Json<Value>> {
    let who = caller(&node, &headers)?;
    let snap = node.snapshot();
    let visible: Vec<Value> = snap
        .datasets
        .keys()
        .filter_map(|n| snap.visible_dataset(&who, n).ok())
        .map(|m| dataset_view(&m, &who))
        .collect();
    Ok(Json(Value::Array(visible)))
}

async fn show_dataset(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Segment(name): Segment,
) -> Result<Json<Value>> {
    let who = caller(&node, &headers)?;
    let m = node.snapshot().visible_dataset(&who, &name)?;
    Ok(Json(dataset_view(&m, &who)))
}

async fn register_dataset(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>)> {
    let who = caller(&node, &headers)?;
    let value: Value = parse_json(&body, "send the manifest as a JSON object")?;
    let manifest = Manifest::from_json(value)?;
    // Shown as stored: the location in its canonical spelling.
    let manifest = node.register_dataset_as(&manifest, &who).await?;
    node.refresh_after_write().await?;
    tracing::info!(dataset = %manifest.name, by = %who.name, "dataset registered");
    Ok((StatusCode::CREATED, Json(dataset_view(&manifest, &who))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PermitBody {
    org: String,
    purpose: String,
    expires: Option<String>,
    #[serde(default)]
    special_category: bool,
}

async fn add_permit(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Segment(name): Segment,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>)> {
    let (_, m) = steward_of_dataset(&node, &headers, &name)?;
    let b: PermitBody = parse_json(
        &body,
        "send {\"org\": \"...\", \"purpose\": \"...\", \"expires\": \"RFC 3339, optional\"}",
    )?;
    let purpose = Purpose::parse(&b.purpose)?;
    if !m.policy().accepts_permit_for(&purpose) {
        return Err(Error::invalid(
            format!("dataset `{name}` is not registered for purpose `{purpose}`"),
            "permit a purpose listed in the dataset's manifest, one of its sub-purposes or an ancestor of it",
        ));
    }
    let expires = b
        .expires
        .as_deref()
        .map(|e| DateTime::parse_from_rfc3339(e).map(|t| t.with_timezone(&Utc)))
        .transpose()
        .map_err(|e| {
            Error::invalid(
                format!("`expires` is not RFC 3339: {e}"),
                "write e.g. 2027-01-01T00:00:00Z",
            )
        })?;
    let permit = Permit {
        dataset: DatasetId::parse(&name)?,
        org: b.org,
        purpose,
        expires,
        special_category: b.special_category,
    };
    node.add_permit(&permit).await?;
    node.refresh_after_write().await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "dataset": name, "org": permit.org, "purpose": permit.purpose.to_string(), "expires": b.expires }),
        ),
    ))
}

/// Stewards write only to registries their organisation owns (claiming a new one on first use).
/// A registry owned by another organisation is reported as not found.
pub(crate) async fn check_registry_owner(node: &Node, who: &Principal, registry: &str) -> Result<()> {
    if who.role == Role::Admin {
        return Ok(());
    }
    node.require_steward_of(who, &who.org)?;
    passerelle_policies::authz::check_policy_value(registry)?;
    let owner = node.meta.claim_registry(registry, &who.org).await?;
    if owner != who.org {
        return Err(Error::RegistryNotFound {
            name: registry.to_string(),
        });
    }
    Ok(())
}

async fn consent_events(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Segment(registry): Segment,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>)> {
    let who = caller(&node, &headers)?;
    check_registry_owner(&node, &who, &registry).await?;
    let hint = "send a JSON array of {\"subject_id\", \"purpose\", \"status\": \"granted|withdrawn\", \"timestamp\": RFC 3339, \"expires_at\"?: RFC 3339}";
    let raw: Vec<Value> = parse_json(&body, hint)?;
    if raw.is_empty() {
        return Err(Error::invalid("no events in the request", hint));
    }
    let mut events = Vec::with_capacity(raw.len());
    for (i, v) in raw.into_iter().enumerate() {
        events.push(
            crate::consent_file::parse_json_value(v).map_err(|e| Error::invalid(format!("event {i}: {e}"), hint))?,
        );
    }
    let version = node.append_consent(&registry, &events).await?;
    node.refresh_after_write().await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "accepted": events.len(), "consent_version": version })),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainQuery {
    principal: String,
    dataset: String,
    purpose: String,
}

async fn explain(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    query: std::result::Result<Query<ExplainQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>> {
    let who = caller(&node, &headers)?;
    let Query(q) = query.map_err(|e| {
        Error::invalid(
            format!("bad query string: {e}"),
            "use ?principal=NAME&dataset=NAME&purpose=PURPOSE",
        )
    })?;
    let purpose = Purpose::parse(&q.purpose)?;
    let e = crate::explain::explain(&node, Some(&who), &q.principal, &q.dataset, &purpose).await?;
    Ok(Json(serde_json::to_value(e).unwrap_or(Value::Null)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleBody {
    /// Only `deny` for now: stewards restrict, permits allow.
    effect: String,
    purpose: String,
    #[serde(default = "star")]
    domain: String,
    expires: Option<String>,
}

fn star() -> String {
    "*".into()
}

async fn add_rule(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Segment(name): Segment,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>)> {
    let (who, _) = steward_of_dataset(&node, &headers, &name)?;
    let b: RuleBody = parse_json(
        &body,
        "send {\"effect\": \"deny\", \"purpose\": \"...\", \"domain\": \"*|DE/*|org\"}",
    )?;
    if b.effect != "deny" {
        return Err(Error::invalid(
            "only `deny` rules can be added per dataset",
            "grant access with a permit",
        ));
    }
    let line = crate::node::deny_line(&name, &b.purpose, &b.domain, b.expires.as_deref())?;
    let id = node.meta.add_rule(&line, &who.name).await?;
    node.refresh_after_write().await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id, "line": line }))))
}

fn require_auditor(node: &Node, headers: &HeaderMap) -> Result<Principal> {
    let who = caller(node, headers)?;
    if !matches!(who.role, Role::Auditor | Role::Admin) {
        return Err(Error::PermissionDenied {
            reason: format!("role `{}` may not read the audit log; auditors may", who.role.as_str()),
        });
    }
    Ok(who)
}

async fn audit(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    query: std::result::Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>> {
    require_auditor(&node, &headers)?;
    let Query(q) = query.map_err(|e| {
        Error::invalid(
            format!("bad query string: {e}"),
            "use ?dataset=&principal=&decision=allow|deny&since=&until=(RFC 3339)&before_id=&limit=",
        )
    })?;
    q.validate()?;
    let rows = node.audit.list(&q).await?;
    Ok(Json(serde_json::to_value(rows).unwrap_or(Value::Null)))
}

/// Recomputes the hash chain (auditors).
async fn audit_verify(State(node): State<Arc<Node>>, headers: HeaderMap) -> Result<Json<Value>> {
    require_auditor(&node, &headers)?;
    let v = node.audit.verify().await?;
    Ok(Json(serde_json::to_value(v).unwrap_or(Value::Null)))
}

/// A signed checkpoint of the chain (auditors), to keep outside the node.
async fn audit_checkpoint(State(node): State<Arc<Node>>, headers: HeaderMap) -> Result<Json<Value>> {
    require_auditor(&node, &headers)?;
    let cp = node.audit.checkpoint(node.node_id(), &node.node_key).await?;
    Ok(Json(serde_json::to_value(cp).unwrap_or(Value::Null)))
}

/// The node's verification keys: public, so peers and notaries need no account.
async fn keys(State(node): State<Arc<Node>>) -> Json<Value> {
    Json(json!({ "node_id": node.node_id(), "keys": [node.node_key.jwk()] }))
}

/// The OpenAPI 3 description of this API (hand-written, and checked against the running server
/// by schemathesis in the test suite).
async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}

/// The configured peers and their health, checked now.
async fn peers(State(node): State<Arc<Node>>, headers: HeaderMap) -> Result<Json<Value>> {
    caller(&node, &headers)?;
    let checks = node
        .peers
        .iter()
        .map(|p| crate::federation::peer_health(p, node.client_tls.as_ref()));
    Ok(Json(Value::Array(futures::future::join_all(checks).await)))
}
