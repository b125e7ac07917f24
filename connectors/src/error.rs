//! Errors of the connectors crate. Messages name the location and say what to fix; they never
//! contain credentials.

use datafusion::error::DataFusionError;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Failures opening or reading a source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The location is not a URL or absolute path we can read.
    #[error("location `{location}` is not usable: {reason}")]
    InvalidLocation { location: String, reason: String },
    /// No file matched the location.
    #[error("location `{location}` has no {format} files; check the path and the format")]
    NoFiles { location: String, format: &'static str },
    /// The schema could not be read.
    #[error("cannot read the schema of `{location}`: {source}")]
    ReadSchema {
        location: String,
        #[source]
        source: Box<DataFusionError>,
    },
    /// The object store could not be listed or read (bucket missing, access refused, endpoint
    /// unreachable); the reason is short and never quotes credentials.
    #[error("cannot read `{location}`: {reason}")]
    StoreAccess { location: String, reason: String },
    /// Files under one location disagree on their schema.
    #[error("files under `{location}` differ: {reason}; keep one schema per dataset")]
    SchemaMismatch { location: String, reason: String },
    /// A `[stores.<name>]` section is missing, of the wrong kind, or incomplete.
    #[error("store `{store}`: {reason}")]
    StoreConfig { store: String, reason: String },
    /// The `csv` options of a manifest are not usable.
    #[error("csv options: {reason}")]
    InvalidCsvOptions { reason: String },
    /// The format is unknown.
    #[error("unknown format `{format}`; use parquet, csv, ndjson or arrow")]
    UnknownFormat { format: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_send_sync_and_small() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Error>();
        assert!(size_of::<Error>() <= 64);
    }
}
