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
    /// How CSV files are written (header, delimiter, quote, explicit schema); `None` for the
    /// defaults and for other formats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csv: Option<CsvOptions>,
}

/// CSV dialect and schema. Files exported by national registries rarely agree on a dialect, and
/// inference over a sample can guess a type wrong (postal codes read as integers): stewards can
/// state both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    /// Whether the first line names the columns (default true).
    #[serde(default = "yes")]
    pub header: bool,
    /// Field delimiter, one ASCII character (default `,`).
    #[serde(default = "comma")]
    pub delimiter: char,
    /// Quote character, one ASCII character (default `"`).
    #[serde(default = "double_quote")]
    pub quote: char,
    /// Escape character inside quoted fields (default: quotes are doubled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escape: Option<char>,
    /// Lines starting with this character are skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<char>,
    /// The columns in file order, with Arrow types (`Int64`, `Utf8`, `Float64`, `Date32`,
    /// `Timestamp(Microsecond, None)`…). Empty: inferred from the first `infer_rows` rows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schema: Vec<CsvColumn>,
    /// Rows read per file to infer the schema when none is given (default 1000).
    #[serde(default = "default_infer_rows")]
    pub infer_rows: usize,
}

/// One column of an explicit CSV schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvColumn {
    /// Column name (used instead of the header's).
    pub name: String,
    /// Arrow type, as Arrow prints it (`Int64`, `Utf8`, `Date32`…).
    #[serde(rename = "type")]
    pub data_type: String,
}

fn yes() -> bool {
    true
}
fn comma() -> char {
    ','
}
fn double_quote() -> char {
    '"'
}
fn default_infer_rows() -> usize {
    1000
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            header: true,
            delimiter: comma(),
            quote: double_quote(),
            escape: None,
            comment: None,
            schema: Vec::new(),
            infer_rows: default_infer_rows(),
        }
    }
}

impl CsvOptions {
    /// Checks the dialect and parses the explicit schema, if any.
    pub fn validate(&self) -> Result<Option<arrow::datatypes::SchemaRef>> {
        let invalid = |reason: String| Error::InvalidCsvOptions { reason };
        let byte = |what: &str, c: char| -> Result<u8> {
            if c.is_ascii() && c != '\n' && c != '\r' {
                Ok(c as u8)
            } else {
                Err(invalid(format!(
                    "`{what}` must be one ASCII character other than a line break, not {c:?}"
                )))
            }
        };
        let delimiter = byte("delimiter", self.delimiter)?;
        let quote = byte("quote", self.quote)?;
        if delimiter == quote {
            return Err(invalid("`delimiter` and `quote` must differ".into()));
        }
        if let Some(c) = self.escape {
            byte("escape", c)?;
        }
        if let Some(c) = self.comment {
            byte("comment", c)?;
        }
        if self.infer_rows == 0 {
            return Err(invalid("`infer_rows` must be at least 1".into()));
        }
        if self.schema.is_empty() {
            return Ok(None);
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut fields = Vec::with_capacity(self.schema.len());
        for c in &self.schema {
            if !seen.insert(c.name.as_str()) {
                return Err(invalid(format!("column `{}` appears twice in `schema`", c.name)));
            }
            let data_type: arrow::datatypes::DataType = c.data_type.parse().map_err(|_| {
                invalid(format!(
                    "column `{}`: `{}` is not an Arrow type; write e.g. Int64, Float64, Utf8, Boolean, Date32 or \
                     Timestamp(Microsecond, None)",
                    c.name, c.data_type
                ))
            })?;
            fields.push(arrow::datatypes::Field::new(&c.name, data_type, true));
        }
        Ok(Some(std::sync::Arc::new(arrow::datatypes::Schema::new(fields))))
    }
}

/// URL schemes read through a configured object store.
const STORE_SCHEMES: &[&str] = &[
    "s3", "s3a", "gs", "gcs", "az", "azure", "abfs", "abfss", "adl", "http", "https",
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
