//! Opens a location as a DataFusion `ListingTable`.

use std::sync::Arc;

use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::arrow::ArrowFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};

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
    let file_format: Arc<dyn FileFormat> = match spec.format {
        // Honour the session's Parquet settings (view types, filter pushdown) rather than the
        // format's own defaults.
        Format::Parquet => Arc::new(ParquetFormat::default().with_options(session.default_table_options().parquet)),
        Format::Csv => Arc::new(CsvFormat::default().with_has_header(true)),
        Format::Ndjson => Arc::new(JsonFormat::default()),
        Format::Arrow => Arc::new(ArrowFormat),
    };
    // A single file keeps whatever extension it has; a directory lists files of the format's extension.
    let extension = if location.ends_with('/') {
        spec.format.extension()
    } else {
        ""
    };
    let options = ListingOptions::new(file_format).with_file_extension(extension);
    let schema = options
        .infer_schema(session, &url)
        .await
        .map_err(|e| Error::ReadSchema {
            location: location.clone(),
            source: Box::new(e),
        })?;
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
        };
        let table = open(&state, &spec).await.unwrap();
        assert_eq!(table.schema().field(0).name(), "id");

        let empty = tempfile::tempdir().unwrap();
        let spec = SourceSpec {
            location: format!("{}/", empty.path().display()),
            format: Format::Parquet,
        };
        let err = open(&state, &spec).await.unwrap_err().to_string();
        assert!(
            err.contains("has no parquet files") || err.contains("cannot read"),
            "{err}"
        );

        let spec = SourceSpec {
            location: "relative/dir".into(),
            format: Format::Parquet,
        };
        assert!(open(&state, &spec).await.unwrap_err().to_string().contains("absolute"));
    }
}
