//! SQL behaviour through the Flight SQL interface: every `tests/slt/*.slt` file runs, in order,
//! against one in-process gateway holding the demo (`demo_patients`) and the SQL fixtures
//! (`demo_visits`, `visits_agg`; see `passerelle_tests::sql`).
//!
//! Each connection starts as `trainer-de` declaring `research/ai-training`. The runner interprets
//! one extra record, sent as a statement: `AS <principal> <purpose>` switches the identity and
//! purpose of the connection (demo principals and `outsider`).
//!
//! Run: `cargo test -p passerelle-tests --test slt`. To rewrite expected output after a deliberate
//! change: `cargo test -p passerelle-tests --test slt -- --complete`, then review the diff.

// Test code: panicking on unexpected results is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use arrow::util::display::{ArrayFormatter, FormatOptions};
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use passerelle_tests::TestGateway;
use passerelle_tests::sql::{OUTSIDER, add_sql_fixtures, query, sql_client};
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType, Runner};
use tonic::transport::Channel;

/// Demo rows: small enough to be quick, large enough for every group to be populated.
const ROWS: usize = 4_000;

#[derive(Debug)]
struct SltError(String);

impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SltError {}

fn describe(e: FlightError) -> SltError {
    match e {
        FlightError::Tonic(s) => SltError(format!("{:?}: {}", s.code(), s.message())),
        other => SltError(other.to_string()),
    }
}

struct FlightSqlDb {
    gw: std::sync::Arc<TestGateway>,
    keys: HashMap<String, String>,
    client: FlightSqlServiceClient<Channel>,
}

impl FlightSqlDb {
    async fn connect(gw: std::sync::Arc<TestGateway>, keys: HashMap<String, String>) -> Result<Self, SltError> {
        let key = keys.get("trainer-de").cloned().unwrap_or_default();
        let client = sql_client(&gw, &key, "research/ai-training")
            .await
            .map_err(|e| SltError(e.to_string()))?;
        Ok(Self { gw, keys, client })
    }
}

#[async_trait::async_trait]
impl AsyncDB for FlightSqlDb {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        if let Some(rest) = sql.trim().strip_prefix("AS ") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            let [principal, purpose] = parts.as_slice() else {
                return Err(SltError("usage: AS <principal> <purpose>".into()));
            };
            let key = self
                .keys
                .get(*principal)
                .ok_or_else(|| SltError(format!("no key for `{principal}`")))?;
            self.client = sql_client(&self.gw, key, purpose)
                .await
                .map_err(|e| SltError(e.to_string()))?;
            return Ok(DBOutput::StatementComplete(0));
        }
        let batches = query(&mut self.client, sql).await.map_err(describe)?;
        let options = FormatOptions::default().with_null("NULL");
        let mut types = Vec::new();
        let mut rows = Vec::new();
        for batch in &batches {
            if types.is_empty() {
                types = batch
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| {
                        if f.data_type().is_integer() {
                            DefaultColumnType::Integer
                        } else if f.data_type().is_floating() {
                            DefaultColumnType::FloatingPoint
                        } else {
                            DefaultColumnType::Text
                        }
                    })
                    .collect();
            }
            let formatters = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| SltError(e.to_string()))?;
            for row in 0..batch.num_rows() {
                let values: Vec<String> = formatters
                    .iter()
                    .map(|f| {
                        // Plans end with a newline; trailing whitespace is not part of the result.
                        let v = f.value(row).to_string().trim_end().to_string();
                        if v.is_empty() { "(empty)".to_string() } else { v }
                    })
                    .collect();
                // Multi-line values (plans) become one result line per text line, as the
                // runner compares line by line.
                let joined = values.join(" ");
                if joined.contains('\n') {
                    rows.extend(joined.lines().map(|l| vec![l.to_string()]));
                } else {
                    rows.push(values);
                }
            }
        }
        Ok(DBOutput::Rows { types, rows })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "passerelle"
    }
}

async fn run(complete: bool) -> anyhow::Result<usize> {
    let gw = TestGateway::start(ROWS).await?;
    let outsider = add_sql_fixtures(&gw, passerelle::demo::subjects_for(ROWS)).await?;
    let mut keys = gw.keys.clone();
    keys.insert(OUTSIDER.to_string(), outsider);
    let gw = std::sync::Arc::new(gw);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no .slt files in {}", dir.display());
    let mut failures = 0;
    for file in &files {
        let (gw, keys) = (std::sync::Arc::clone(&gw), keys.clone());
        let mut runner = Runner::new(move || FlightSqlDb::connect(std::sync::Arc::clone(&gw), keys.clone()));
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let outcome = if complete {
            runner
                .update_test_file(
                    file,
                    " ",
                    sqllogictest::default_validator,
                    sqllogictest::default_normalizer,
                    sqllogictest::default_column_validator,
                )
                .await
                .map_err(|e| e.to_string())
        } else {
            runner
                .run_file_async(file)
                .await
                .map_err(|e| e.display(true).to_string())
        };
        match outcome {
            Ok(()) => println!("slt {name} ... ok"),
            Err(e) => {
                failures += 1;
                println!("slt {name} ... FAILED\n{e}");
            }
        }
    }
    Ok(failures)
}

fn main() -> ExitCode {
    let complete = std::env::args().any(|a| a == "--complete");
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(complete)) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!("{n} slt file(s) failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("slt setup failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
