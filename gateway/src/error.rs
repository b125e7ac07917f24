//! The gateway's error type and its single mapping to gRPC and HTTP statuses.
//!
//! Internal errors are logged in full and masked to the caller. For a dataset the caller may not
//! see, the error is the same `NotFound` a missing dataset gets, so existence does not leak.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use datafusion::error::DataFusionError;

/// Result alias for the gateway.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The classes of failure a caller can act on; each maps to one gRPC code and one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// The request is malformed; fix it.
    InvalidArgument,
    /// No or bad credentials.
    Unauthenticated,
    /// Authenticated, but not allowed.
    PermissionDenied,
    /// No such thing (or not visible to the caller).
    NotFound,
    /// It exists already.
    AlreadyExists,
    /// A dependency (storage, source) is unavailable; retry later.
    Unavailable,
    /// A limit was hit.
    ResourceExhausted,
    /// The request itself is larger than accepted.
    TooLarge,
    /// Our fault; details are in the server log.
    Internal,
}

impl StatusClass {
    /// The gRPC code.
    pub fn to_tonic_code(self) -> tonic::Code {
        match self {
            StatusClass::InvalidArgument => tonic::Code::InvalidArgument,
            StatusClass::Unauthenticated => tonic::Code::Unauthenticated,
            StatusClass::PermissionDenied => tonic::Code::PermissionDenied,
            StatusClass::NotFound => tonic::Code::NotFound,
            StatusClass::AlreadyExists => tonic::Code::AlreadyExists,
            StatusClass::Unavailable => tonic::Code::Unavailable,
            StatusClass::ResourceExhausted | StatusClass::TooLarge => tonic::Code::ResourceExhausted,
            StatusClass::Internal => tonic::Code::Internal,
        }
    }
    /// The HTTP status.
    pub fn to_http_status(self) -> StatusCode {
        match self {
            StatusClass::InvalidArgument => StatusCode::BAD_REQUEST,
            StatusClass::Unauthenticated => StatusCode::UNAUTHORIZED,
            StatusClass::PermissionDenied => StatusCode::FORBIDDEN,
            StatusClass::NotFound => StatusCode::NOT_FOUND,
            StatusClass::AlreadyExists => StatusCode::CONFLICT,
            StatusClass::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            StatusClass::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            StatusClass::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            StatusClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Gateway errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Missing or wrong credentials.
    #[error("{reason}")]
    Unauthenticated { reason: std::borrow::Cow<'static, str> },
    /// The dataset does not exist or the caller may not see it (same message for both).
    #[error("dataset `{name}` not found")]
    DatasetNotFound { name: String },
    /// The caller may see the thing but not do this.
    #[error("{reason}")]
    PermissionDenied { reason: String },
    /// The request is malformed.
    #[error("{message}")]
    InvalidArgument { message: String, hint: &'static str },
    /// Something already exists.
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    /// A policy-layer error.
    #[error(transparent)]
    Policy(#[from] passerelle_policies::Error),
    /// A source could not be opened.
    #[error(transparent)]
    Connector(#[from] passerelle_connectors::Error),
    /// Planning or execution failed.
    #[error(transparent)]
    DataFusion(Box<DataFusionError>),
    /// The metadata store failed.
    #[error("metadata store: {op} failed: {source}")]
    Store {
        op: &'static str,
        #[source]
        source: Box<sqlx::Error>,
    },
    /// A local file could not be read or written.
    #[error("{op} `{path}`: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Another `passerelle serve` holds the data directory's serve lock.
    #[error(
        "data directory `{path}` is already being served by {holder}; stop that server first, or give this one another --data-dir (CLI commands work while it runs)"
    )]
    DataDirInUse { path: String, holder: String },
    /// A dataset's source cannot be read right now. The cause (which may name storage paths) is
    /// logged, not sent.
    #[error("dataset `{name}` is unavailable right now; try again later or contact its steward")]
    SourceUnavailable { name: String },
    /// A request body over the endpoint's limit.
    #[error("{message}")]
    TooLarge { message: String },
    /// A federated request cannot complete because peers did not answer.
    #[error("{message}")]
    PeerUnavailable { message: String },
    /// A consent registry that does not exist for the caller's organisation.
    #[error("consent registry `{name}` not found among your organisation's registries")]
    RegistryNotFound { name: String },
    /// Policy files (or stored lines) that do not load; the previous policy stays in force.
    #[error("policy refused, the previous policy stays in force: {message}")]
    PolicyRefused { message: String },
    /// No REST endpoint at this path.
    #[error("no such endpoint")]
    NoSuchEndpoint,
    /// Storage failed while a plan was being executed (a file vanished, the store is down); the
    /// cause, which may name storage paths, is logged.
    #[error(
        "a dataset's storage could not be read right now; retry later (the operator can see the cause in the server log)"
    )]
    SourceFailed,
    /// A per-query limit was hit; the message names it.
    #[error("{message}")]
    ResourceExhausted { message: String },
    /// Anything else that is our fault.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for an invalid-argument error with a hint.
    pub fn invalid(message: impl Into<String>, hint: &'static str) -> Self {
        Error::InvalidArgument {
            message: message.into(),
            hint,
        }
    }

    /// Wraps a sqlx error with the operation that failed.
    pub fn store(op: &'static str) -> impl Fn(sqlx::Error) -> Self + Copy {
        move |source| Error::Store {
            op,
            source: Box::new(source),
        }
    }

    /// The status class, decided once here.
    pub fn status(&self) -> StatusClass {
        match self {
            Error::Unauthenticated { .. } => StatusClass::Unauthenticated,
            Error::DatasetNotFound { .. } | Error::NoSuchEndpoint | Error::RegistryNotFound { .. } => {
                StatusClass::NotFound
            }
            Error::PermissionDenied { .. } => StatusClass::PermissionDenied,
            Error::InvalidArgument { .. } => StatusClass::InvalidArgument,
            Error::AlreadyExists { .. } => StatusClass::AlreadyExists,
            Error::PolicyRefused { .. } => StatusClass::InvalidArgument,
            Error::Policy(p) => policy_status(p),
            Error::Connector(_) => StatusClass::InvalidArgument,
            Error::SourceUnavailable { .. } | Error::PeerUnavailable { .. } => StatusClass::Unavailable,
            Error::TooLarge { .. } => StatusClass::TooLarge,
            Error::ResourceExhausted { .. } => StatusClass::ResourceExhausted,
            Error::SourceFailed => StatusClass::Unavailable,
            Error::DataFusion(e) => classify_datafusion(e),
            Error::Store { .. } | Error::Io { .. } | Error::DataDirInUse { .. } | Error::Internal(_) => {
                StatusClass::Internal
            }
        }
    }

    /// A hint for the caller, where one helps.
    pub fn hint(&self) -> &'static str {
        match self {
            Error::Unauthenticated { .. } => "send `authorization: Bearer <key>` or perform a basic-auth handshake",
            Error::DatasetNotFound { .. } => "list the datasets you may use with ListFlights or GET /api/v1/datasets",
            Error::InvalidArgument { hint, .. } => hint,
            Error::PermissionDenied { .. } => "ask the dataset's steward for a permit covering this purpose",
            Error::Policy(p) => match p {
                passerelle_policies::Error::InvalidPurpose { .. } => {
                    "purposes are slash-separated lowercase paths, e.g. research/ai-training"
                }
                passerelle_policies::Error::InvalidConsentEvent { .. } => {
                    "events have subject_id, purpose, status (granted|withdrawn) and an RFC 3339 timestamp"
                }
                passerelle_policies::Error::InvalidManifest { .. }
                | passerelle_policies::Error::InvalidGeneralisation { .. } => {
                    "fix the manifest as the message says and register it again"
                }
                passerelle_policies::Error::InvalidPolicyLine { .. } => {
                    "policy lines are `p, sub, dom, obj, act, expiry, allow|deny`"
                }
                passerelle_policies::Error::AccessDenied { .. } => {
                    "ask the dataset's steward for a permit covering this purpose"
                }
                _ => "check the request against the README",
            },
            Error::Connector(passerelle_connectors::Error::StoreConfig { .. }) => {
                "name a store of the right kind from the node's [stores] configuration"
            }
            Error::Connector(_) => "check the location, its format and that the node can read it",
            Error::AlreadyExists { .. } => "choose another name",
            Error::RegistryNotFound { .. } => "post consent to a registry your organisation owns",
            Error::NoSuchEndpoint => "see the README for the REST API",
            Error::PolicyRefused { .. } => "fix the policy file at the line named; the previous policy stays in force",
            Error::TooLarge { .. } => "send less per request (bulk consent loads: `passerelle consent import`)",
            Error::PeerUnavailable { .. } => {
                "retry later, or pass \"on_partial\": \"skip\" to proceed without the nodes named"
            }
            Error::SourceUnavailable { .. } | Error::SourceFailed => {
                "retry later; the operator can see the cause in the server log"
            }
            Error::ResourceExhausted { .. } => {
                "narrow the query (filter, LIMIT, aggregate) or ask the operator to raise the limit"
            }
            _ => "",
        }
    }

    /// The message shown to the caller: internal details are masked and logged.
    pub fn public_message(&self) -> String {
        if self.status() == StatusClass::Internal {
            let id = rand::random::<u64>();
            tracing::error!(error = %self, error_id = format!("{id:016x}"), "internal error");
            format!("internal error (id {id:016x}); the operator can find the details in the server log")
        } else if let Error::DataFusion(_) = self {
            // Planner errors can quote whole physical plans, storage paths included.
            crate::sql::redact_plan_text(&self.to_string())
        } else {
            self.to_string()
        }
    }
}

fn policy_status(p: &passerelle_policies::Error) -> StatusClass {
    use passerelle_policies::Error as P;
    match p {
        P::InvalidPurpose { .. }
        | P::InvalidName { .. }
        | P::InvalidGeneralisation { .. }
        | P::InvalidManifest { .. }
        | P::InvalidConsentEvent { .. }
        | P::InvalidPolicyLine { .. }
        | P::InvalidModel { .. }
        | P::Unsupported { .. }
        | P::FallibleExpression { .. } => StatusClass::InvalidArgument,
        P::AccessDenied { .. } => StatusClass::PermissionDenied,
        P::SourceRead { .. } => StatusClass::Unavailable,
        P::Store { .. } | P::Casbin { .. } | P::Arrow(_) => StatusClass::Internal,
    }
}

/// User-expression and planning errors are the caller's to fix; everything else is ours.
fn classify_datafusion(e: &DataFusionError) -> StatusClass {
    match e.find_root() {
        DataFusionError::External(inner) => {
            if let Some(p) = inner.downcast_ref::<passerelle_policies::Error>() {
                return policy_status(p);
            }
            if let Some(g) = inner.downcast_ref::<Error>() {
                return g.status();
            }
            StatusClass::Internal
        }
        // Raw-source failures are wrapped by the gate (`SourceRead`), so execution errors that
        // reach here come from the caller's own expressions above the gate.
        DataFusionError::Execution(_)
        | DataFusionError::Plan(_)
        | DataFusionError::SQL(_, _)
        | DataFusionError::SchemaError(_, _)
        | DataFusionError::NotImplemented(_) => StatusClass::InvalidArgument,
        DataFusionError::ArrowError(a, _) => match a.as_ref() {
            arrow::error::ArrowError::DivideByZero
            | arrow::error::ArrowError::CastError(_)
            | arrow::error::ArrowError::ParseError(_)
            | arrow::error::ArrowError::ComputeError(_)
            | arrow::error::ArrowError::ArithmeticOverflow(_)
            | arrow::error::ArrowError::InvalidArgumentError(_) => StatusClass::InvalidArgument,
            _ => StatusClass::Internal,
        },
        DataFusionError::ResourcesExhausted(_) => StatusClass::ResourceExhausted,
        _ => StatusClass::Internal,
    }
}

/// Takes our own errors (and the policy layer's) back out of DataFusion's wrappers, so that the
/// caller sees `dataset `x` not found`, not `External error: ...`.
fn unwrap_ours(e: DataFusionError) -> std::result::Result<Error, DataFusionError> {
    match e {
        DataFusionError::External(inner) => match inner.downcast::<Error>() {
            Ok(ours) => Ok(*ours),
            Err(inner) => match inner.downcast::<passerelle_policies::Error>() {
                Ok(p) => Ok(Error::Policy(*p)),
                Err(inner) => Err(DataFusionError::External(inner)),
            },
        },
        DataFusionError::Context(msg, inner) => {
            unwrap_ours(*inner).map_err(|i| DataFusionError::Context(msg, Box::new(i)))
        }
        DataFusionError::Diagnostic(d, inner) => {
            unwrap_ours(*inner).map_err(|i| DataFusionError::Diagnostic(d, Box::new(i)))
        }
        other => Err(other),
    }
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        match unwrap_ours(e) {
            Ok(ours) => ours,
            Err(e) if matches!(e.find_root(), DataFusionError::ObjectStore(_)) => {
                tracing::error!(error = %e, "dataset storage failed");
                Error::SourceFailed
            }
            Err(e) => Error::DataFusion(Box::new(e)),
        }
    }
}

impl From<arrow::error::ArrowError> for Error {
    fn from(e: arrow::error::ArrowError) -> Self {
        Error::Policy(passerelle_policies::Error::from(e))
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.status().to_tonic_code(), e.public_message())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status().to_http_status();
        let body = serde_json::json!({ "error": self.public_message(), "hint": self.hint() });
        (status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_send_sync_and_small() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Error>();
        assert!(size_of::<Error>() <= 64, "{}", size_of::<Error>());
    }

    #[test]
    fn classes_map_once() {
        let e = Error::DatasetNotFound { name: "x".into() };
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::NotFound);
        let e: Error = DataFusionError::External(Box::new(passerelle_policies::Error::AccessDenied {
            reason: "r".into(),
        }))
        .into();
        assert_eq!(e.status(), StatusClass::PermissionDenied);
        let e: Error = DataFusionError::ArrowError(Box::new(arrow::error::ArrowError::DivideByZero), None).into();
        assert_eq!(e.status(), StatusClass::InvalidArgument);
        let e = Error::Internal("secret detail".into());
        let s = tonic::Status::from(e);
        assert_eq!(s.code(), tonic::Code::Internal);
        assert!(!s.message().contains("secret"));
    }
}
