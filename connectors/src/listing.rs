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

/// Opens the source: lists its files, reads and unifies their schema, and returns a provider
/// that scans only the projected columns.
pub async fn open(session: &dyn Session, spec: &SourceSpec) -> Result<Arc<dyn TableProvider>> {
    let location = spec.normalised_location()?;
    let url = ListingTableUrl::parse(&location).map_err(|e| Error::InvalidLocation {
        location: location.clone(),
        reason: e.to_string(),
    })?;
    let file_format = file_format(session, spec.format);
    // A single file keeps whatever extension it has; a directory lists files of the format's extension.
    let extension = if location.ends_with('/') {
        spec.format.extension()
    } else {
        ""
    };
    let options = ListingOptions::new(Arc::clone(&file_format)).with_file_extension(extension);
    // Hive-style directories (`member_state=FR/year=2024/`) become Utf8 columns, classified in
    // the manifest like any other.
    let partitions = if location.ends_with('/') {
        options.infer_partitions(session, &url).await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let options = options.with_table_partition_cols(partitions.into_iter().map(|p| (p, DataType::Utf8)).collect());
    let schema = options
        .infer_schema(session, &url)
        .await
        .map_err(|e| read_error(&location, e))?;
    if schema.fields().is_empty() {
        return Err(Error::NoFiles {
            location,
            format: spec.format.as_str(),
        });
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
/// differs and how.
pub async fn verify(session: &dyn Session, spec: &SourceSpec) -> Result<()> {
    let location = spec.normalised_location()?;
    if !location.ends_with('/') {
        return Ok(());
    }
    let url = ListingTableUrl::parse(&location).map_err(|e| Error::InvalidLocation {
        location: location.clone(),
        reason: e.to_string(),
    })?;
    let format = file_format(session, spec.format);
    let read = |e| read_error(&location, e);
    let store = session.runtime_env().object_store(&url).map_err(read)?;
    let files: Vec<_> = url
        .list_all_files(session, store.as_ref(), spec.format.extension())
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

fn file_format(session: &dyn Session, format: Format) -> Arc<dyn FileFormat> {
    match format {
        // Honour the session's Parquet settings (view types, filter pushdown) rather than the
        // format's own defaults.
        Format::Parquet => Arc::new(ParquetFormat::default().with_options(session.default_table_options().parquet)),
        Format::Csv => Arc::new(CsvFormat::default().with_has_header(true)),
        Format::Ndjson => Arc::new(JsonFormat::default()),
        Format::Arrow => Arc::new(ArrowFormat),
    }
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
        };
        let table = open(&state, &spec).await.unwrap();
        assert_eq!(table.schema().field(0).name(), "id");

        let empty = tempfile::tempdir().unwrap();
        let spec = SourceSpec {
            location: format!("{}/", empty.path().display()),
            format: Format::Parquet,
            store: None,
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
        };
        assert!(open(&state, &spec).await.unwrap_err().to_string().contains("absolute"));
    }
}
