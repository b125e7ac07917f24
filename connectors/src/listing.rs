//! Opens a location as a DataFusion `ListingTable`.

use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::arrow::ArrowFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use futures::TryStreamExt;

use crate::error::{Error, Result};
use crate::spec::{Format, SourceSpec};

/// What a location names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One object, whatever its extension.
    File,
    /// Every file of the format's extension under a prefix (ending in `/`), hive partitions
    /// included.
    Directory,
    /// Files under a prefix whose name matches a glob in the last segment (`…/visits-*.csv`).
    Glob,
}

/// A parsed location.
struct Located {
    location: String,
    url: ListingTableUrl,
    kind: Kind,
}

fn has_glob(segment: &str) -> bool {
    segment.contains(['*', '?', '['])
}

/// Parses the location: a file, a directory/prefix, or a glob over file names in one prefix.
/// DataFusion only understands globs in scheme-less paths; we split any URL ourselves so that
/// `s3://bucket/exports/*.parquet` works like `/data/exports/*.parquet`.
fn locate(spec: &SourceSpec) -> Result<Located> {
    let location = spec.normalised_location()?;
    let invalid = |reason: String| Error::InvalidLocation {
        location: location.clone(),
        reason,
    };
    let (head, last) = location.rsplit_once('/').unwrap_or(("", location.as_str()));
    let path_start = location.find("://").map_or(0, |i| i + 3);
    if has_glob(&head[path_start.min(head.len())..]) {
        return Err(invalid(
            "a glob may only appear in the file name, e.g. s3://bucket/exports/*.parquet".into(),
        ));
    }
    let (url, kind) = if has_glob(last) {
        let base = url::Url::parse(&format!("{head}/")).map_err(|e| invalid(e.to_string()))?;
        let url = ListingTableUrl::try_new(base, None)
            .and_then(|u| u.with_glob(last))
            .map_err(|e| invalid(format!("bad glob `{last}`: {e}")))?;
        (url, Kind::Glob)
    } else {
        let url = ListingTableUrl::parse(&location).map_err(|e| invalid(e.to_string()))?;
        let kind = if location.ends_with('/') {
            Kind::Directory
        } else {
            Kind::File
        };
        (url, kind)
    };
    Ok(Located { location, url, kind })
}

/// Opens the source: lists its files, reads and unifies their schema (or takes the manifest's
/// explicit CSV schema), and returns a provider that scans only the projected columns.
pub async fn open(session: &dyn Session, spec: &SourceSpec) -> Result<Arc<dyn TableProvider>> {
    let Located { location, url, kind } = locate(spec)?;
    let (file_format, explicit) = file_format(session, spec)?;
    // A single file keeps whatever extension it has; a directory lists files of the format's
    // extension; a glob decides by itself.
    let extension = if kind == Kind::Directory {
        spec.format.extension()
    } else {
        ""
    };
    let options = ListingOptions::new(Arc::clone(&file_format)).with_file_extension(extension);
    // Hive-style directories (`member_state=FR/year=2024/`) become Utf8 columns, classified in
    // the manifest like any other.
    let partitions = if kind == Kind::Directory {
        options.infer_partitions(session, &url).await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let options = options.with_table_partition_cols(partitions.into_iter().map(|p| (p, DataType::Utf8)).collect());
    let no_files = || Error::NoFiles {
        location: location.clone(),
        format: spec.format.as_str(),
    };
    let schema = match explicit {
        Some(schema) => {
            // Inference is skipped, so check here that something matches.
            let store = session
                .runtime_env()
                .object_store(&url)
                .map_err(|e| read_error(&location, e))?;
            let mut files = url
                .list_all_files(session, store.as_ref(), extension)
                .await
                .map_err(|e| read_error(&location, e))?;
            if files.try_next().await.map_err(|e| read_error(&location, e))?.is_none() {
                return Err(no_files());
            }
            schema
        }
        None => options
            .infer_schema(session, &url)
            .await
            .map_err(|e| read_error(&location, e))?,
    };
    if schema.fields().is_empty() {
        return Err(no_files());
    }
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(schema);
    let table = ListingTable::try_new(config).map_err(|e| Error::ReadSchema {
        location,
        source: Box::new(e),
    })?;
    Ok(Arc::new(table))
}

/// Most files whose schemas registration compares one by one.
const MAX_VERIFIED_FILES: usize = 10_000;

/// Registration-time check that every file under the location has the same schema (DataFusion
/// would otherwise merge them, filling missing columns with nulls), naming the first file that
/// differs and how. With an explicit CSV schema, every file must have its number of columns.
pub async fn verify(session: &dyn Session, spec: &SourceSpec) -> Result<()> {
    let Located { location, url, kind } = locate(spec)?;
    let (format, explicit) = file_format(session, spec)?;
    if kind == Kind::File && explicit.is_none() {
        return Ok(());
    }
    let extension = if kind == Kind::Directory {
        spec.format.extension()
    } else {
        ""
    };
    let read = |e| read_error(&location, e);
    let store = session.runtime_env().object_store(&url).map_err(read)?;
    let files: Vec<_> = url
        .list_all_files(session, store.as_ref(), extension)
        .await
        .map_err(read)?
        .try_collect()
        .await
        .map_err(read)?;
    let mut first: Option<(String, arrow::datatypes::SchemaRef)> = None;
    for meta in files.iter().filter(|m| m.size > 0).take(MAX_VERIFIED_FILES) {
        let schema = format
            .infer_schema(session, &store, std::slice::from_ref(meta))
            .await
            .map_err(read)?;
        if let Some(expected) = &explicit {
            if schema.fields().len() != expected.fields().len() {
                return Err(Error::SchemaMismatch {
                    location: location.clone(),
                    reason: format!(
                        "`{}` has {} columns but the manifest's csv schema names {}",
                        meta.location,
                        schema.fields().len(),
                        expected.fields().len()
                    ),
                });
            }
            continue;
        }
        match &first {
            None => first = Some((meta.location.to_string(), schema)),
            Some((name, reference)) => {
                if let Some(reason) = schema_difference(reference, &schema) {
                    return Err(Error::SchemaMismatch {
                        location: location.clone(),
                        reason: format!("in `{}`, {reason} (compared with `{name}`)", meta.location),
                    });
                }
            }
        }
    }
    Ok(())
}

fn schema_difference(a: &arrow::datatypes::Schema, b: &arrow::datatypes::Schema) -> Option<String> {
    for f in a.fields() {
        match b.field_with_name(f.name()) {
            Err(_) => return Some(format!("column `{}` is missing", f.name())),
            Ok(g) if g.data_type() != f.data_type() => {
                return Some(format!(
                    "column `{}` is {} instead of {}",
                    f.name(),
                    g.data_type(),
                    f.data_type()
                ));
            }
            Ok(_) => {}
        }
    }
    b.fields()
        .iter()
        .find(|g| a.field_with_name(g.name()).is_err())
        .map(|g| format!("column `{}` is extra", g.name()))
}

/// The file format with the manifest's options, and the explicit schema if the manifest gives
/// one.
fn file_format(
    session: &dyn Session,
    spec: &SourceSpec,
) -> Result<(Arc<dyn FileFormat>, Option<arrow::datatypes::SchemaRef>)> {
    if spec.csv.is_some() && spec.format != Format::Csv {
        return Err(Error::InvalidCsvOptions {
            reason: format!(
                "they apply to format = \"csv\" only, and this dataset is {}",
                spec.format
            ),
        });
    }
    Ok(match spec.format {
        // Honour the session's Parquet settings (view types, filter pushdown) rather than the
        // format's own defaults.
        Format::Parquet => (
            Arc::new(ParquetFormat::default().with_options(session.default_table_options().parquet)),
            None,
        ),
        Format::Csv => {
            let o = spec.csv.clone().unwrap_or_default();
            let schema = o.validate()?;
            // `validate` checked that each character is one ASCII byte.
            let byte = |c: char| c as u8;
            let format = CsvFormat::default()
                .with_has_header(o.header)
                .with_delimiter(byte(o.delimiter))
                .with_quote(byte(o.quote))
                .with_escape(o.escape.map(byte))
                .with_comment(o.comment.map(byte))
                .with_schema_infer_max_rec(o.infer_rows);
            (Arc::new(format), schema)
        }
        Format::Ndjson => (Arc::new(JsonFormat::default()), None),
        Format::Arrow => (Arc::new(ArrowFormat), None),
    })
}

/// A failure to list or read the location: in a few words for store failures, with the
/// DataFusion error otherwise.
fn read_error(location: &str, e: datafusion::error::DataFusionError) -> Error {
    match store_failure(&e) {
        Some(reason) => Error::StoreAccess {
            location: location.to_string(),
            reason,
        },
        None => Error::ReadSchema {
            location: location.to_string(),
            source: Box::new(e),
        },
    }
}

/// Says in a few words what went wrong talking to an object store (the raw error is an XML
/// document with request ids), or `None` for other failures.
fn store_failure(e: &datafusion::error::DataFusionError) -> Option<String> {
    let text = e.to_string();
    if !text.contains("Object Store error")
        && !matches!(e.find_root(), datafusion::error::DataFusionError::ObjectStore(_))
    {
        return None;
    }
    let has = |needle: &str| text.contains(needle);
    Some(
        if has("NoSuchBucket") || has("ContainerNotFound") || has("404 Not Found") || has("Object at location") {
            "the bucket, container or file does not exist; check the location and the store's endpoint and region"
                .into()
        } else if has("InvalidAccessKeyId")
            || has("SignatureDoesNotMatch")
            || has("AccessDenied")
            || has("403 Forbidden")
            || has("401 Unauthorized")
        {
            "the store refused access; check the store's credentials and their permissions on this location".into()
        } else if has("error trying to connect")
            || has("error sending request")
            || has("Connection refused")
            || has("dns error")
            || has("timed out")
        {
            "the store's endpoint cannot be reached; check `endpoint` and the network".into()
        } else if has("PermanentRedirect") || has("301 Moved") || has("AuthorizationHeaderMalformed") {
            "the store answered for another region or endpoint; check `region` and `endpoint`".into()
        } else {
            "the store could not list or read the location; the node's log has the details".into()
        },
    )
    .inspect(|_| tracing::warn!(error = %text, "object store failure"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn opens_a_parquet_directory_and_refuses_bad_locations() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(Int64Array::from(vec![1, 2, 3]))]).unwrap();
        let file = std::fs::File::create(dir.path().join("a.parquet")).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();

        let ctx = SessionContext::new();
        let state = ctx.state();
        let spec = SourceSpec {
            location: format!("{}/", dir.path().display()),
            format: Format::Parquet,
            store: None,
            csv: None,
        };
        let table = open(&state, &spec).await.unwrap();
        assert_eq!(table.schema().field(0).name(), "id");

        let empty = tempfile::tempdir().unwrap();
        let spec = SourceSpec {
            location: format!("{}/", empty.path().display()),
            format: Format::Parquet,
            store: None,
            csv: None,
        };
        let err = open(&state, &spec).await.unwrap_err().to_string();
        assert!(
            err.contains("has no parquet files") || err.contains("cannot read"),
            "{err}"
        );

        let spec = SourceSpec {
            location: "relative/dir".into(),
            format: Format::Parquet,
            store: None,
            csv: None,
        };
        assert!(open(&state, &spec).await.unwrap_err().to_string().contains("absolute"));
    }

    async fn rows(state: &dyn Session, spec: &SourceSpec) -> Vec<RecordBatch> {
        let table = open(state, spec).await.unwrap();
        let plan = table.scan(state, None, &[], None).await.unwrap();
        datafusion::physical_plan::collect(plan, state.task_ctx())
            .await
            .unwrap()
    }

    fn csv_spec(location: String, csv: Option<crate::spec::CsvOptions>) -> SourceSpec {
        SourceSpec {
            location,
            format: Format::Csv,
            store: None,
            csv,
        }
    }

    #[tokio::test]
    async fn csv_dialects_explicit_schemas_and_globs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.csv"), "id;code\n1;'007'\n2;'0;12'\n").unwrap();
        std::fs::write(dir.path().join("b.csv"), "id;code\n3;'100'\n").unwrap();
        std::fs::write(dir.path().join("c.txt"), "id;code\n4;'200'\n").unwrap();
        let ctx = SessionContext::new();
        let state = ctx.state();
        let semicolon = crate::spec::CsvOptions {
            delimiter: ';',
            quote: '\'',
            schema: vec![
                crate::spec::CsvColumn {
                    name: "id".into(),
                    data_type: "Int64".into(),
                },
                crate::spec::CsvColumn {
                    name: "code".into(),
                    data_type: "Utf8".into(),
                },
            ],
            ..Default::default()
        };
        // The explicit schema keeps leading zeros that inference would have turned into integers.
        let spec = csv_spec(format!("{}/", dir.path().display()), Some(semicolon.clone()));
        verify(&state, &spec).await.unwrap();
        let batches = rows(&state, &spec).await;
        let text = arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        assert!(text.contains("| 007 ") && text.contains("| 0;12 "), "{text}");
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 3);

        // A glob in the file name selects files whatever their extension.
        let spec = csv_spec(
            format!("file://{}/*.txt", dir.path().display()),
            Some(semicolon.clone()),
        );
        assert_eq!(rows(&state, &spec).await.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
        let spec = csv_spec(format!("{}/[ab].csv", dir.path().display()), Some(semicolon.clone()));
        assert_eq!(rows(&state, &spec).await.iter().map(|b| b.num_rows()).sum::<usize>(), 3);
        let spec = csv_spec(format!("{}/*.nothing", dir.path().display()), Some(semicolon.clone()));
        assert!(matches!(open(&state, &spec).await.unwrap_err(), Error::NoFiles { .. }));
        let spec = csv_spec(format!("{}/*/x.csv", dir.path().display()), None);
        assert!(
            open(&state, &spec)
                .await
                .unwrap_err()
                .to_string()
                .contains("only appear in the file name")
        );

        // A file with another number of columns is named at registration.
        std::fs::write(dir.path().join("z.csv"), "id;code;extra\n5;'1';x\n").unwrap();
        let spec = csv_spec(format!("{}/", dir.path().display()), Some(semicolon.clone()));
        // (A new session: DataFusion caches listings per runtime.)
        let err = verify(&SessionContext::new().state(), &spec)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("z.csv") && err.contains("has 3 columns"), "{err}");

        // Bad options are refused with what to fix.
        for (options, needle) in [
            (
                crate::spec::CsvOptions {
                    delimiter: '€',
                    ..Default::default()
                },
                "one ASCII character",
            ),
            (
                crate::spec::CsvOptions {
                    quote: ',',
                    ..Default::default()
                },
                "must differ",
            ),
            (
                crate::spec::CsvOptions {
                    schema: vec![crate::spec::CsvColumn {
                        name: "id".into(),
                        data_type: "integer".into(),
                    }],
                    ..Default::default()
                },
                "not an Arrow type",
            ),
        ] {
            let spec = csv_spec(format!("{}/", dir.path().display()), Some(options));
            let err = open(&state, &spec).await.unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let mut parquet = csv_spec(format!("{}/", dir.path().display()), Some(Default::default()));
        parquet.format = Format::Parquet;
        assert!(
            open(&state, &parquet)
                .await
                .unwrap_err()
                .to_string()
                .contains("format = \"csv\" only")
        );

        // Without a header the columns are named by the schema.
        let headless = tempfile::tempdir().unwrap();
        std::fs::write(headless.path().join("h.csv"), "1|x\n2|y\n").unwrap();
        let spec = csv_spec(
            format!("{}/h.csv", headless.path().display()),
            Some(crate::spec::CsvOptions {
                header: false,
                delimiter: '|',
                schema: vec![
                    crate::spec::CsvColumn {
                        name: "n".into(),
                        data_type: "Int32".into(),
                    },
                    crate::spec::CsvColumn {
                        name: "s".into(),
                        data_type: "Utf8".into(),
                    },
                ],
                ..Default::default()
            }),
        );
        verify(&state, &spec).await.unwrap();
        let batches = rows(&state, &spec).await;
        assert_eq!(batches[0].schema().field(0).name(), "n");
        assert_eq!(batches[0].schema().field(0).data_type(), &DataType::Int32);
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    }
}
