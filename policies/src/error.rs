//! Errors of the policy crate. Messages say what to fix.

use datafusion::error::DataFusionError;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in policy evaluation, consent storage and enforcement.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A purpose string is malformed.
    #[error("invalid purpose `{purpose}`: {reason}")]
    InvalidPurpose { purpose: String, reason: String },
    /// A name (dataset, member state, role, policy value) is malformed.
    #[error("invalid {what} `{name}`: {rule}")]
    InvalidName {
        what: &'static str,
        name: String,
        rule: &'static str,
    },
    /// A generalisation rule is malformed.
    #[error("invalid generalisation `{rule}`: use year, month, prefix:N (1 ≤ N ≤ 32) or bucket:N (N ≥ 2)")]
    InvalidGeneralisation { rule: String },
    /// A manifest does not match its source or is incomplete.
    #[error("dataset `{dataset}`: {reason}")]
    InvalidManifest { dataset: String, reason: String },
    /// A consent event is malformed.
    #[error("invalid consent event: {reason}")]
    InvalidConsentEvent { reason: String },
    /// A policy file line is malformed.
    #[error("{file}, line {line}: {reason}")]
    InvalidPolicyLine { file: String, line: usize, reason: String },
    /// The request is not allowed.
    #[error("access denied: {reason}")]
    AccessDenied { reason: String },
    /// An expression evaluated before an aggregates-only dataset's groups are suppressed could
    /// fail on a single row, and its failure would tell that the row exists.
    #[error(
        "dataset `{dataset}` is released as aggregates only, and {part} in this query could fail on a single row before small groups are suppressed (the failure would reveal that row); use comparisons, AND/OR/NOT, CASE, IN, LIKE, COALESCE, +, -, *, floating-point division and TRY_CAST in WHERE and GROUP BY"
    )]
    FallibleExpression { dataset: String, part: String },
    /// The raw source failed while streaming. The cause is logged, never sent: it may quote raw
    /// rows the caller may not see.
    #[error("reading dataset `{dataset}` failed; the operator can find the cause in the server log")]
    SourceRead { dataset: String },
    /// A type or feature the gate cannot handle.
    #[error("unsupported: {what}")]
    Unsupported { what: String },
    /// The metadata store failed.
    #[error("metadata store: {op} failed: {source}")]
    Store {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// The model loads but cannot decide a request.
    #[error("model: {reason}")]
    InvalidModel { reason: String },
    /// casbin failed to load or evaluate the model.
    #[error("policy engine: {op} failed: {source}")]
    Casbin {
        op: &'static str,
        #[source]
        source: Box<casbin::Error>,
    },
    /// An Arrow kernel failed.
    #[error("arrow: {0}")]
    Arrow(#[from] Box<arrow::error::ArrowError>),
}

impl From<arrow::error::ArrowError> for Error {
    fn from(e: arrow::error::ArrowError) -> Self {
        Error::Arrow(Box::new(e))
    }
}

impl From<Error> for DataFusionError {
    fn from(e: Error) -> Self {
        DataFusionError::External(Box::new(e))
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
}
