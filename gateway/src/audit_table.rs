//! The audit log as a read-only SQL table for auditors (`SELECT … FROM audit` over Flight SQL):
//! rows are read from the store page by page as the query pulls them, so a long log is
//! streamed, not loaded.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Builder, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};

use crate::audit::{AuditLog, AuditRecord};

/// The table's name in `passerelle.public`, reserved: no dataset may take it.
pub const AUDIT_TABLE: &str = "audit";

/// Rows fetched from the store per batch.
const PAGE: u32 = 8192;

/// The audit log as a table.
#[derive(Debug)]
pub struct AuditTable {
    inner: StreamingTable,
}

fn schema() -> SchemaRef {
    let text = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
    let int = |n: &str, null: bool| Field::new(n, DataType::Int64, null);
    Arc::new(Schema::new(vec![
        int("id", false),
        text("time", false),
        text("principal", false),
        text("organisation", false),
        text("member_state", false),
        text("purpose", false),
        text("dataset", false),
        text("columns", true),
        text("filter", true),
        text("statement", true),
        text("action", false),
        text("decision", false),
        text("reason", false),
        int("consent_version", false),
        int("consent_version_last", true),
        text("policy_version", false),
        int("rows_sent", false),
        int("rows_withheld", false),
        text("status", false),
        text("completed_at", true),
    ]))
}

impl AuditTable {
    /// The table over `log`.
    pub fn new(log: AuditLog) -> DfResult<Self> {
        let schema = schema();
        let part: Arc<dyn PartitionStream> = Arc::new(AuditPartition {
            log,
            schema: Arc::clone(&schema),
        });
        Ok(Self {
            inner: StreamingTable::try_new(schema, vec![part])?,
        })
    }
}

#[async_trait]
impl TableProvider for AuditTable {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
    fn table_type(&self) -> TableType {
        TableType::View
    }
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        self.inner.scan(state, projection, filters, limit).await
    }
}

#[derive(Debug)]
struct AuditPartition {
    log: AuditLog,
    schema: SchemaRef,
}

impl PartitionStream for AuditPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let log = self.log.clone();
        let schema = Arc::clone(&self.schema);
        let pages = futures::stream::try_unfold(Some(0i64), move |after| {
            let log = log.clone();
            let schema = Arc::clone(&schema);
            async move {
                let Some(after) = after else {
                    return Ok(None);
                };
                let rows = log
                    .page_after(after, PAGE)
                    .await
                    .map_err(|e| DataFusionError::External(Box::new(e)))?;
                if rows.is_empty() {
                    return Ok(None);
                }
                let next = (rows.len() == PAGE as usize).then(|| rows.last().map_or(after, |r| r.id));
                Ok(Some((to_batch(&schema, &rows)?, next)))
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(Arc::clone(&self.schema), pages))
    }
}

fn to_batch(schema: &SchemaRef, rows: &[AuditRecord]) -> DfResult<RecordBatch> {
    let ints = |f: &dyn Fn(&AuditRecord) -> Option<i64>| -> ArrayRef {
        let mut b = Int64Builder::with_capacity(rows.len());
        rows.iter().for_each(|r| b.append_option(f(r)));
        Arc::new(b.finish())
    };
    let texts = |f: &dyn Fn(&AuditRecord) -> Option<String>| -> ArrayRef {
        let mut b = StringBuilder::new();
        rows.iter().for_each(|r| b.append_option(f(r)));
        Arc::new(b.finish())
    };
    let columns = vec![
        ints(&|r| Some(r.id)),
        texts(&|r| Some(r.time.clone())),
        texts(&|r| Some(r.principal.clone())),
        texts(&|r| Some(r.organisation.clone())),
        texts(&|r| Some(r.member_state.clone())),
        texts(&|r| Some(r.purpose.clone())),
        texts(&|r| Some(r.dataset.clone())),
        texts(&|r| r.columns.as_ref().map(|c| c.join(","))),
        texts(&|r| r.filter.clone()),
        texts(&|r| r.statement.clone()),
        texts(&|r| Some(r.action.clone())),
        texts(&|r| Some(r.decision.clone())),
        texts(&|r| Some(r.reason.clone())),
        ints(&|r| Some(r.consent_version)),
        ints(&|r| r.consent_version_last),
        texts(&|r| Some(r.policy_version.clone())),
        ints(&|r| Some(r.rows_sent)),
        ints(&|r| Some(r.rows_withheld)),
        texts(&|r| Some(r.status.clone())),
        texts(&|r| r.completed_at.clone()),
    ];
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}
