//! Where a dataset lives and in which format.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File formats a dataset can be stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Apache Parquet.
    Parquet,
    /// Comma-separated values with a header row.
    Csv,
    /// JSON Lines (one object per line).
    Ndjson,
    /// Arrow IPC files.
    Arrow,
}

impl Format {
    /// Parses the manifest spelling.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "parquet" => Ok(Self::Parquet),
            "csv" => Ok(Self::Csv),
            "ndjson" | "json" | "jsonl" => Ok(Self::Ndjson),
            "arrow" | "ipc" => Ok(Self::Arrow),
            _ => Err(Error::UnknownFormat { format: s.to_string() }),
        }
    }
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Parquet => "parquet",
            Self::Csv => "csv",
            Self::Ndjson => "ndjson",
            Self::Arrow => "arrow",
        }
    }
    /// The file extension files of this format carry.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Parquet => ".parquet",
            Self::Csv => ".csv",
            Self::Ndjson => ".json",
            Self::Arrow => ".arrow",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A dataset's storage half: a location (file, directory or prefix URL) and a format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSpec {
    /// `file:///abs/dir/`, `/abs/file.parquet`, or an object-store URL.
    pub location: String,
    /// The files' format.
    pub format: Format,
    /// The `[stores.<name>]` section holding the credentials of an object-store location.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// URL schemes read through a configured object store.
const STORE_SCHEMES: &[&str] = &[
    "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "http", "https",
];

impl SourceSpec {
    /// Normalises the location to a URL: absolute paths become `file://` URLs; relative paths are
    /// refused because they would depend on the server's working directory.
    pub fn normalised_location(&self) -> Result<String> {
        let loc = self.location.trim();
        if loc.starts_with('/') {
            return Ok(format!("file://{loc}"));
        }
        match loc.split_once("://") {
            Some(("file", rest)) if rest.starts_with('/') => Ok(loc.to_string()),
            Some(("file", _)) => Err(Error::InvalidLocation {
                location: loc.to_string(),
                reason: "file URLs must be absolute: file:///abs/path".into(),
            }),
            Some((scheme, rest)) if STORE_SCHEMES.contains(&scheme) => {
                if rest.is_empty() || rest.starts_with('/') {
                    return Err(Error::InvalidLocation {
                        location: loc.to_string(),
                        reason: format!("name the bucket or host: {scheme}://<bucket>/<prefix>/"),
                    });
                }
                Ok(loc.to_string())
            }
            Some((scheme, _)) => Err(Error::InvalidLocation {
                location: loc.to_string(),
                reason: format!(
                    "scheme `{scheme}` is not supported; use file://, s3://, gs://, az:// (or abfs://) or https://"
                ),
            }),
            None => Err(Error::InvalidLocation {
                location: loc.to_string(),
                reason: "use an absolute path or a file:// URL".into(),
            }),
        }
    }
}
