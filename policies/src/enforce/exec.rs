//! `EnforceExec`: the physical node that applies a grant to every batch of its input.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning, PlanProperties,
    SendableRecordBatchStream,
};

use crate::enforce::grant::{ColumnAction, Grant};
use crate::enforce::stream::EnforceStream;

/// Applies consent filtering and column actions to its input. Its schema is the post-policy
/// projection; its input reads only the raw columns it needs.
#[derive(Debug)]
pub struct EnforceExec {
    input: Arc<dyn ExecutionPlan>,
    grant: Arc<Grant>,
    /// For each output column: position in the input batch and action.
    outputs: Vec<(usize, ColumnAction)>,
    /// Position of the subject column in the input batch.
    subject: usize,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl EnforceExec {
    /// Builds the node. `outputs` and `subject` index the input's columns.
    pub fn new(
        input: Arc<dyn ExecutionPlan>,
        grant: Arc<Grant>,
        outputs: Vec<(usize, ColumnAction)>,
        subject: usize,
        schema: SchemaRef,
    ) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            // Partition count is kept; hash expressions of the input do not survive the rewrite.
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count()),
            input.pipeline_behavior(),
            input.boundedness(),
        ));
        Self {
            input,
            grant,
            outputs,
            subject,
            schema,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The grant this node enforces.
    pub fn grant(&self) -> &Arc<Grant> {
        &self.grant
    }
}

impl DisplayAs for EnforceExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let names = |want: fn(&ColumnAction) -> bool| {
            self.outputs
                .iter()
                .enumerate()
                .filter(|(_, (_, a))| want(a))
                .map(|(i, _)| self.schema.field(i).name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "EnforceExec: dataset={}, purpose={}, basis={}, subject={}, pseudonymised=[{}], generalised=[{}], nullified=[{}]",
            self.grant.policy.name,
            self.grant.purpose,
            self.grant.policy.legal_basis.as_str(),
            self.grant.policy.subject_column,
            names(|a| matches!(a, ColumnAction::Pseudonymise)),
            names(|a| matches!(a, ColumnAction::Generalise(_))),
            names(|a| matches!(a, ColumnAction::Nullify)),
        )
    }
}

impl ExecutionPlan for EnforceExec {
    fn name(&self) -> &str {
        "EnforceExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    /// `false` although the gate keeps row order: a sort the optimiser may push below an
    /// order-preserving node would evaluate user expressions (`ORDER BY 1/(x - 7)`) on rows the
    /// caller may not see. Sorts stay above the gate.
    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(format!(
                "EnforceExec takes one child, got {}",
                children.len()
            )));
        }
        Ok(Arc::new(EnforceExec::new(
            children.swap_remove(0),
            Arc::clone(&self.grant),
            self.outputs.clone(),
            self.subject,
            Arc::clone(&self.schema),
        )))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        Ok(Box::pin(EnforceStream::new(
            input,
            Arc::clone(&self.grant),
            self.outputs.clone(),
            self.subject,
            Arc::clone(&self.schema),
            &self.metrics,
            partition,
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}
