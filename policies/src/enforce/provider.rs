//! `GuardedTable`: the only `TableProvider` the gateway registers. It wraps a raw source and
//! plans every scan as `EnforceExec` over the raw scan.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;

use crate::enforce::exec::EnforceExec;
use crate::enforce::grant::Grant;

/// A dataset as one caller may see it for one purpose.
#[derive(Debug)]
pub struct GuardedTable {
    raw: Arc<dyn TableProvider>,
    grant: Arc<Grant>,
}

impl GuardedTable {
    /// Wraps a raw source (from connectors) with a grant. This is the only consumer of raw
    /// sources on the request path.
    pub fn new(raw: Arc<dyn TableProvider>, grant: Grant) -> Self {
        Self {
            raw,
            grant: Arc::new(grant),
        }
    }

    /// The grant (for counters and audit).
    pub fn grant(&self) -> &Arc<Grant> {
        &self.grant
    }
}

#[async_trait]
impl TableProvider for GuardedTable {
    fn schema(&self) -> SchemaRef {
        self.grant.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Every user filter stays above the gate: evaluating one below it would run user expressions
    /// on rows the caller may not see (an error or timing side channel).
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Unsupported; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        // Output columns requested (indices into the post-policy schema).
        let wanted: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.grant.columns.len()).collect(),
        };
        // Raw columns to read: the wanted ones plus the subject column, each once.
        let mut raw_projection: Vec<usize> = Vec::with_capacity(wanted.len() + 1);
        let position = |raw: usize, rp: &mut Vec<usize>| match rp.iter().position(|r| *r == raw) {
            Some(p) => p,
            None => {
                rp.push(raw);
                rp.len() - 1
            }
        };
        let mut outputs = Vec::with_capacity(wanted.len());
        for out in &wanted {
            let (raw, action) = self.grant.columns.get(*out).copied().ok_or_else(|| {
                datafusion::error::DataFusionError::Plan(format!(
                    "column index {out} is out of range for the guarded table"
                ))
            })?;
            outputs.push((position(raw, &mut raw_projection), action));
        }
        let subject = position(self.grant.subject_index, &mut raw_projection);
        // No filters and no limit reach the raw scan: the gate drops rows, so a limit below it
        // would under-fill, and filters below it would see hidden rows.
        let input = self.raw.scan(state, Some(&raw_projection), &[], None).await?;
        let schema = Arc::new(self.grant.schema.project(&wanted)?);
        Ok(Arc::new(EnforceExec::new(
            input,
            Arc::clone(&self.grant),
            outputs,
            subject,
            schema,
        )))
    }
}
