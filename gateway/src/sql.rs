//! Governed SQL: one DataFusion session per request whose catalog resolves dataset names to
//! `GuardedTable`s for that caller and purpose, and nothing else.
//!
//! - Only queries (and `EXPLAIN` of one) are accepted; DDL, DML, `COPY`, `SET`, `CREATE EXTERNAL
//!   TABLE` are refused before planning. There are no table functions, no URL tables and no
//!   `information_schema`.
//! - After planning, every table scan is checked to be a `GuardedTable` (defence in depth), and
//!   the aggregates-only rule of `passerelle_policies` rewrites the plan.
//! - Per query: a memory pool of `sql.memory_limit_mb` (no spilling: nothing of the data is
//!   written to local disk), a `sql.timeout_secs` deadline and at most `sql.max_rows` rows;
//!   exceeding one gives `RESOURCE_EXHAUSTED` naming the limit.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arrow::array::{Array, RecordBatch, StringArray};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, MemoryCatalogProvider, SchemaProvider, TableProvider};
use datafusion::common::ParamValues;
use datafusion::common::config::Dialect;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::source_as_provider;
use datafusion::error::DataFusionError;
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::RecordBatchStream;
use datafusion::prelude::DataFrame;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use futures::{Stream, StreamExt};
use passerelle_policies::enforce::{EnforceCounters, GuardedTable, check_fallible, enforce_release, k_floor_scans};
use passerelle_policies::{Principal, Purpose, Role};
use serde::{Deserialize, Serialize};

use crate::audit_table::{AUDIT_TABLE, AuditTable};
use crate::catalog::{self, Guarded};
use crate::error::{Error, Result};
use crate::federated_sql::FederatedTable;
use crate::node::Node;

/// The catalog name clients see.
pub const CATALOG: &str = "passerelle";
/// The schema name clients see.
pub const SCHEMA: &str = "public";

/// Limits on governed SQL (`[sql]` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqlOptions {
    /// Memory one query may use (joins, aggregates, sorts), in MiB.
    pub memory_limit_mb: u64,
    /// Longest a query may run, planning and streaming included, in seconds.
    pub timeout_secs: u64,
    /// Most rows one query may return.
    pub max_rows: u64,
    /// Longest SQL text accepted, in bytes.
    pub max_statement_bytes: usize,
}

impl Default for SqlOptions {
    fn default() -> Self {
        Self {
            memory_limit_mb: 1024,
            timeout_secs: 600,
            max_rows: 100_000_000,
            max_statement_bytes: 64 * 1024,
        }
    }
}

impl SqlOptions {
    /// Range checks.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| {
            Err(Error::invalid(
                format!("sql.{what} must be at least 1"),
                "see deploy/config/node.example.toml",
            ))
        };
        if self.memory_limit_mb == 0 {
            return bad("memory_limit_mb");
        }
        if self.timeout_secs == 0 {
            return bad("timeout_secs");
        }
        if self.max_rows == 0 {
            return bad("max_rows");
        }
        if self.max_statement_bytes == 0 {
            return bad("max_statement_bytes");
        }
        Ok(())
    }

    /// The query deadline.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// A dataset a statement read, for the audit.
#[derive(Debug, Clone)]
pub struct Touched {
    /// Dataset name.
    pub dataset: String,
    /// The gate's counters for this table.
    pub counters: Arc<EnforceCounters>,
    /// Consent version at planning time.
    pub consent_version: u64,
    /// Why access was allowed.
    pub reason: String,
}

/// The schema of one request: resolves names through the policy engine, lazily, so that a
/// statement opens only the datasets it names.
#[derive(Debug)]
struct GovernedSchema {
    node: Arc<Node>,
    principal: Principal,
    purpose: Purpose,
    touched: Arc<Mutex<Vec<Touched>>>,
}

impl GovernedSchema {
    /// A federated dataset's name at this principal's home node (not a local dataset; a local
    /// part of it, or peers to ask). Peers' principals never fan out further.
    fn is_federation(&self, name: &str) -> bool {
        let snap = self.node.snapshot();
        !snap.datasets.contains_key(name)
            && !self.principal.name.contains('@')
            && name != AUDIT_TABLE
            && (snap.federated_dataset(name).is_some() || !self.node.peers.is_empty())
    }

    /// Auditors (and admins) see the audit log as the table `audit`, read-only.
    fn reads_audit(&self) -> bool {
        matches!(self.principal.role, Role::Auditor | Role::Admin)
    }
}

#[async_trait]
impl SchemaProvider for GovernedSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names = catalog::allowed_datasets(&self.node, &self.principal, &self.purpose);
        if self.reads_audit() {
            names.push(AUDIT_TABLE.to_string());
        }
        names
    }

    async fn table(&self, name: &str) -> std::result::Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        if self.is_federation(name) {
            let table = FederatedTable::open(&self.node, &self.principal, &self.purpose, name)
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
            if let Ok(mut touched) = self.touched.lock() {
                touched.push(Touched {
                    dataset: name.to_string(),
                    counters: Arc::default(),
                    consent_version: self.node.consent.applied_seq(),
                    reason: "federated: each node's part under its own policy".into(),
                });
            }
            return Ok(Some(Arc::new(table)));
        }
        if name == AUDIT_TABLE && self.reads_audit() {
            if let Ok(mut touched) = self.touched.lock() {
                touched.push(Touched {
                    dataset: AUDIT_TABLE.to_string(),
                    counters: Arc::default(),
                    consent_version: self.node.consent.applied_seq(),
                    reason: format!("role `{}` reads the audit log", self.principal.role.as_str()),
                });
            }
            return Ok(Some(Arc::new(AuditTable::new(self.node.audit.clone())?)));
        }
        // Hidden and missing datasets fail alike (NOT_FOUND with the same text).
        let Guarded {
            table,
            counters,
            consent_version,
            reason,
            ..
        } = catalog::guard(&self.node, &self.principal, &self.purpose, name)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        if let Ok(mut touched) = self.touched.lock() {
            touched.push(Touched {
                dataset: name.to_string(),
                counters,
                consent_version,
                reason,
            });
        }
        Ok(Some(Arc::new(table)))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.table_names().iter().any(|n| n == name)
    }
}

/// A planned, allowed statement.
#[derive(Debug)]
pub struct PlannedSql {
    /// The plan, ready to execute.
    pub df: DataFrame,
    /// The schema the client receives.
    pub schema: SchemaRef,
    /// Datasets read.
    pub touched: Vec<Touched>,
    /// `EXPLAIN`: the output is redacted of storage paths.
    pub explain: bool,
    /// The statement's parameters (`$1`...) and their inferred types, read before aggregates are
    /// pushed to federated nodes (which turns them into command text).
    pub parameters: HashMap<String, Option<arrow::datatypes::FieldRef>>,
}

impl PlannedSql {
    /// Comma-separated dataset names, for the audit.
    pub fn datasets(&self) -> String {
        let mut names: Vec<&str> = self.touched.iter().map(|t| t.dataset.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.join(",")
    }

    /// Highest consent version among the datasets read.
    pub fn consent_version(&self) -> u64 {
        self.touched.iter().map(|t| t.consent_version).max().unwrap_or(0)
    }

    /// The reasons access was allowed, one per dataset.
    pub fn reason(&self) -> String {
        if self.touched.is_empty() {
            return "statement reads no dataset".into();
        }
        self.touched
            .iter()
            .map(|t| format!("{}: {}", t.dataset, t.reason))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn governed_state(
    opts: &SqlOptions,
    stores: &passerelle_connectors::Stores,
    schema: Arc<GovernedSchema>,
) -> Result<SessionState> {
    let config = catalog::session_config()
        .with_default_catalog_and_schema(CATALOG, SCHEMA)
        .with_create_default_catalog_and_schema(false);
    let runtime = catalog::limited_runtime(stores, opts.memory_limit_mb)?;
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        // No table functions: none reads data, and each would be a scan outside the gate.
        .with_table_functions(HashMap::new())
        // Plans the barrier floors put between suppressed rows and the statement's expressions.
        .with_query_planner(passerelle_policies::enforce::query_planner())
        .build();
    let catalog = MemoryCatalogProvider::new();
    catalog.register_schema(SCHEMA, schema)?;
    state.catalog_list().register_catalog(CATALOG.into(), Arc::new(catalog));
    Ok(state)
}

fn refused(what: &str) -> Error {
    Error::PermissionDenied {
        reason: format!(
            "only SELECT queries (and EXPLAIN of one) are allowed; {what} is refused: the gateway is read-only and every read goes through the policy gate"
        ),
    }
}

/// The first keyword of a statement, for error messages.
fn keyword(stmt: &SqlStatement) -> String {
    let text = stmt.to_string();
    let word = text.split_whitespace().next().unwrap_or("this statement");
    format!("`{}`", word.to_uppercase())
}

/// Refuses every statement that is not a query before it is planned.
fn check_statement(stmt: &DfStatement) -> Result<()> {
    match stmt {
        DfStatement::Statement(s) => match s.as_ref() {
            SqlStatement::Query(_) => Ok(()),
            other => Err(refused(&keyword(other))),
        },
        DfStatement::Explain(e) => {
            if e.options.analyze {
                return Err(Error::PermissionDenied {
                    reason: "EXPLAIN ANALYZE is refused: its metrics count rows below the policy gate; use EXPLAIN"
                        .into(),
                });
            }
            if e.options.verbose || e.options.show_statistics == Some(true) {
                return Err(Error::PermissionDenied {
                    reason: "EXPLAIN VERBOSE and plan statistics are refused: they show row counts and value ranges of the raw sources below the policy gate; use EXPLAIN"
                        .into(),
                });
            }
            check_statement(&e.statement)
        }
        DfStatement::CreateExternalTable(_) => Err(refused("`CREATE EXTERNAL TABLE`")),
        DfStatement::CopyTo(_) => Err(refused("`COPY`")),
        DfStatement::Reset(_) => Err(refused("`RESET`")),
    }
}

/// Every scan of the plan (subqueries included) must read a `GuardedTable` (or, for auditors, the
/// audit log).
fn check_guarded(plan: &LogicalPlan) -> Result<()> {
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let guarded = source_as_provider(&scan.source).ok().is_some_and(|p| {
                p.downcast_ref::<GuardedTable>().is_some()
                    || p.downcast_ref::<AuditTable>().is_some()
                    || crate::federated_sql::is_federated(p.as_ref())
            });
            if !guarded {
                // Only recursive CTEs' work tables get here; anything else would be our bug,
                // and the statement is refused either way.
                return Err(DataFusionError::External(Box::new(Error::invalid(
                    format!(
                        "`{}` is not a governed dataset: recursive queries are not supported",
                        scan.table_name
                    ),
                    "rewrite the query without WITH RECURSIVE",
                ))));
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(())
}

/// Parses, checks and plans a statement for one caller and purpose. `params` binds `$1`, `$2`…
pub async fn plan_sql(
    node: &Arc<Node>,
    principal: &Principal,
    purpose: &Purpose,
    sql: &str,
    params: Option<ParamValues>,
) -> Result<PlannedSql> {
    let opts = &node.sql;
    if sql.len() > opts.max_statement_bytes {
        return Err(Error::invalid(
            format!(
                "statement is {} bytes, longer than sql.max_statement_bytes = {}",
                sql.len(),
                opts.max_statement_bytes
            ),
            "shorten the statement",
        ));
    }
    crate::nesting::check(sql, "statement")?;
    let touched = Arc::new(Mutex::new(Vec::new()));
    let schema = Arc::new(GovernedSchema {
        node: Arc::clone(node),
        principal: principal.clone(),
        purpose: purpose.clone(),
        touched: Arc::clone(&touched),
    });
    let state = governed_state(opts, &node.stores, schema)?;
    let stmt = state.sql_to_statement(sql, &Dialect::Generic).map_err(|e| {
        Error::invalid(
            format!("statement does not parse: {}", e.strip_backtrace()),
            "send one SQL query (DataFusion dialect, parameters as $1, $2, ...)",
        )
    })?;
    check_statement(&stmt)?;
    let explain = matches!(stmt, DfStatement::Explain(_));
    let plan = state.statement_to_plan(stmt).await?;
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)
        .map_err(|_| refused("this statement"))?;
    let plan = match params {
        Some(p) => plan.with_param_values(p)?,
        None => plan,
    };
    check_guarded(&plan)?;
    let parameters = plan.get_parameter_fields()?;
    let plan = crate::federated_sql::push_aggregates(plan)?;
    let plan = k_floor_scans(enforce_release(plan)?)?;
    check_fallible(&state, &plan)?;
    let df = DataFrame::new(state, plan);
    let schema = Arc::new(df.schema().as_arrow().clone());
    let touched = touched.lock().map(|t| t.clone()).unwrap_or_default();
    Ok(PlannedSql {
        df,
        schema,
        touched,
        explain,
        parameters,
    })
}

/// Hides what physical plans print about raw sources — storage locations (`file_groups={..}`)
/// and statistics (`statistics=[..]`) — in plans and in error messages that quote plans: the plan
/// shape is the caller's to see, the steward's file layout and raw row counts are not.
pub fn redact_plan_text(text: &str) -> String {
    let mut out = text.to_string();
    for (key, open, close) in [("file_groups=", '{', '}'), ("statistics=", '[', ']')] {
        out = redact_balanced(&out, key, open, close);
    }
    out
}

/// Replaces every `key<open>...<close>` (brackets balanced) with `key<redacted>`.
fn redact_balanced(text: &str, key: &str, open: char, close: char) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let pattern = format!("{key}{open}");
    while let Some(at) = rest.find(&pattern) {
        out.push_str(&rest[..at]);
        out.push_str(key);
        out.push_str("<redacted>");
        let after = &rest[at + pattern.len()..];
        let mut depth = 1usize;
        let mut end = after.len();
        for (i, ch) in after.char_indices() {
            if ch == open {
                depth += 1;
            } else if ch == close {
                depth -= 1;
                if depth == 0 {
                    end = i + ch.len_utf8();
                    break;
                }
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn redact_batch(batch: RecordBatch) -> datafusion::error::Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .map(|c| match c.as_any().downcast_ref::<StringArray>() {
            Some(s) => Arc::new(s.iter().map(|v| v.map(redact_plan_text)).collect::<StringArray>()) as Arc<dyn Array>,
            None => Arc::clone(c),
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

/// Threads that run SQL plans, apart from the runtime serving gRPC and REST (the dedicated
/// executor of InfluxDB IOx): an operator that computes for long without yielding cannot delay
/// deadlines, other requests or the audit.
pub struct QueryExecutor {
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for QueryExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueryExecutor { .. }")
    }
}

impl QueryExecutor {
    /// A pool of `threads` worker threads.
    pub fn new(threads: usize) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_stack_size(crate::nesting::THREAD_STACK_BYTES)
            .thread_name("passerelle-query")
            .enable_all()
            .build()
            .map_err(|source| Error::Io {
                op: "start query threads",
                path: String::new(),
                source,
            })?;
        Ok(Self { rt: Some(rt) })
    }

    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.rt.as_ref().map(tokio::runtime::Runtime::handle)
    }
}

impl Drop for QueryExecutor {
    fn drop(&mut self) {
        // Dropping a runtime from async code would block; let its threads wind down alone.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Enforces the deadline and the row limit on a result stream, names the memory limit when the
/// pool refuses, and redacts `EXPLAIN` output.
///
/// The plan runs on the [`QueryExecutor`] and hands batches over a channel, so the deadline
/// fires on time even while an operator computes for long without yielding; dropping the
/// stream aborts the plan at its next yield point.
pub struct LimitedStream {
    rx: tokio::sync::mpsc::Receiver<datafusion::error::Result<RecordBatch>>,
    task: tokio::task::AbortHandle,
    schema: SchemaRef,
    deadline: Pin<Box<tokio::time::Sleep>>,
    opts: SqlOptions,
    rows: u64,
    explain: bool,
    done: bool,
}

impl LimitedStream {
    /// Starts the plan on `executor` (or the current runtime); the deadline runs from `started`.
    pub fn new(
        planned: PlannedSql,
        executor: &QueryExecutor,
        opts: &SqlOptions,
        started: tokio::time::Instant,
    ) -> Self {
        let (schema, explain) = (Arc::clone(&planned.schema), planned.explain);
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let run = async move {
            // Executing inside the task puts the plan's own tasks on the same threads.
            let mut inner = match planned.df.execute_stream().await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            while let Some(item) = inner.next().await {
                if tx.send(item).await.is_err() {
                    break;
                }
            }
        };
        let task = match executor.handle() {
            Some(h) => h.spawn(run).abort_handle(),
            None => tokio::spawn(run).abort_handle(),
        };
        Self {
            rx,
            task,
            schema,
            deadline: Box::pin(tokio::time::sleep_until(started + opts.timeout())),
            opts: opts.clone(),
            rows: 0,
            explain,
            done: false,
        }
    }

    fn fail(&mut self, message: String) -> Poll<Option<datafusion::error::Result<RecordBatch>>> {
        self.done = true;
        self.task.abort();
        Poll::Ready(Some(Err(DataFusionError::ResourcesExhausted(message))))
    }
}

impl Drop for LimitedStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stream for LimitedStream {
    type Item = datafusion::error::Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let secs = self.opts.timeout_secs;
            return self.fail(format!(
                "query ran longer than sql.timeout_secs = {secs}; add a filter, a LIMIT or aggregate"
            ));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(batch))) => {
                self.rows += batch.num_rows() as u64;
                if self.rows > self.opts.max_rows {
                    let max = self.opts.max_rows;
                    return self.fail(format!(
                        "query returns more than sql.max_rows = {max} rows; add a filter, a LIMIT or aggregate"
                    ));
                }
                if self.explain {
                    Poll::Ready(Some(redact_batch(batch)))
                } else {
                    Poll::Ready(Some(Ok(batch)))
                }
            }
            Poll::Ready(Some(Err(e))) if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)) => {
                let mb = self.opts.memory_limit_mb;
                self.fail(format!(
                    "query needs more than sql.memory_limit_mb = {mb} MiB; add a filter or aggregate less finely ({})",
                    e.find_root()
                ))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

impl RecordBatchStream for LimitedStream {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_file_groups_only() {
        let text = "DataSourceExec: file_groups={1 group: [[tmp/a/{x}.parquet]]}, projection=[a], file_type=parquet";
        assert_eq!(
            redact_plan_text(text),
            "DataSourceExec: file_groups=<redacted>, projection=[a], file_type=parquet"
        );
        assert_eq!(redact_plan_text("EnforceExec: x"), "EnforceExec: x");
        assert_eq!(
            redact_plan_text("DataSourceExec: x, statistics=[Rows=Exact(20000), [(Col[0]: Min=Exact(1))]]"),
            "DataSourceExec: x, statistics=<redacted>"
        );
        assert_eq!(redact_plan_text("file_groups={unclosed"), "file_groups=<redacted>");
    }

    #[test]
    fn options_validate() {
        SqlOptions::default().validate().unwrap();
        let o = SqlOptions {
            max_rows: 0,
            ..Default::default()
        };
        assert!(o.validate().unwrap_err().to_string().contains("sql.max_rows"));
    }
}
