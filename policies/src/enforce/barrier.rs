//! The release barrier: a plan node that user expressions may not cross.
//!
//! A k-anonymity floor and an aggregates-only group floor suppress rows *above* the gate, with
//! ordinary plan nodes (a window count and a filter, an aggregate and a filter). DataFusion's
//! optimiser would otherwise merge a user's `WHERE` into the floor's filter or push it below the
//! window or aggregate (a predicate on partition or group keys commutes with them), and evaluate
//! it on rows the floor is about to suppress: `1/(CASE WHEN <rare combination> THEN 0 ELSE 1
//! END) = 1` would then fail exactly when a suppressed row exists. Above a [`ReleaseBarrier`],
//! user expressions see released rows only:
//!
//! ```text
//!  user Filter / Projection / Sort ...   evaluated on released rows only
//!        │
//!  ReleaseBarrier ─► ReleaseBarrierExec   no predicate, sort, limit or projection passes it
//!        │
//!  floor: Filter(count >= k) ─► Window / Aggregate ─► EnforceExec ─► raw scan
//! ```
//!
//! The physical node passes batches through unchanged; it exists so that physical filter,
//! sort and limit push-down (which act on `ExecutionPlan`s) stop at it too. Sessions plan it
//! through [`query_planner`]; a session without it fails to plan (closed, not open).

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::DFSchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::execution::context::QueryPlanner;
use datafusion::logical_expr::{Expr, Extension, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, SendableRecordBatchStream,
};
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};

/// Logical barrier above a floor: its output rows are released rows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReleaseBarrier {
    input: Arc<LogicalPlan>,
    schema: DFSchemaRef,
}

/// By input only: the schema is the input's.
impl PartialOrd for ReleaseBarrier {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.input.partial_cmp(&other.input)
    }
}

impl ReleaseBarrier {
    /// `input` wrapped in a barrier.
    pub fn wrap(input: LogicalPlan) -> LogicalPlan {
        let schema = Arc::clone(input.schema());
        LogicalPlan::Extension(Extension {
            node: Arc::new(Self {
                input: Arc::new(input),
                schema,
            }),
        })
    }

    /// Whether `node` is a barrier.
    pub fn is(node: &dyn UserDefinedLogicalNode) -> bool {
        node.as_any().downcast_ref::<Self>().is_some()
    }
}

impl UserDefinedLogicalNodeCore for ReleaseBarrier {
    fn name(&self) -> &str {
        "ReleaseBarrier"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        Vec::new()
    }

    /// Every column: no predicate is evaluated below the barrier.
    fn prevent_predicate_push_down_columns(&self) -> HashSet<String> {
        self.schema.columns().into_iter().map(|c| c.name).collect()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ReleaseBarrier")
    }

    fn with_exprs_and_inputs(&self, _exprs: Vec<Expr>, mut inputs: Vec<LogicalPlan>) -> Result<Self> {
        let Some(input) = inputs.pop().filter(|_| inputs.is_empty()) else {
            return Err(DataFusionError::Internal("ReleaseBarrier takes one input".into()));
        };
        Ok(Self {
            schema: Arc::clone(input.schema()),
            input: Arc::new(input),
        })
    }

    /// The barrier computes nothing: unused columns may still be pruned below it.
    fn necessary_children_exprs(&self, output_columns: &[usize]) -> Option<Vec<Vec<usize>>> {
        Some(vec![output_columns.to_vec()])
    }
}

/// Physical barrier: passes its input through, and refuses every push-down.
#[derive(Debug)]
pub struct ReleaseBarrierExec {
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

impl ReleaseBarrierExec {
    /// Wraps `input`.
    pub fn new(input: Arc<dyn ExecutionPlan>) -> Self {
        let properties = Arc::clone(input.properties());
        Self { input, properties }
    }
}

impl DisplayAs for ReleaseBarrierExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ReleaseBarrierExec")
    }
}

impl ExecutionPlan for ReleaseBarrierExec {
    fn name(&self) -> &str {
        "ReleaseBarrierExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    /// `false`, as for `EnforceExec`: a sort pushed below would order suppressed rows by a user
    /// expression.
    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false]
    }

    fn with_new_children(self: Arc<Self>, mut children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        match (children.pop(), children.is_empty()) {
            (Some(child), true) => Ok(Arc::new(Self::new(child))),
            _ => Err(DataFusionError::Internal("ReleaseBarrierExec takes one child".into())),
        }
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        self.input.execute(partition, context)
    }
}

/// Plans [`ReleaseBarrier`] as [`ReleaseBarrierExec`].
#[derive(Debug)]
struct BarrierPlanner;

#[async_trait]
impl ExtensionPlanner for BarrierPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn datafusion::catalog::Session,
        _planning_ctx: &datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        if !ReleaseBarrier::is(node) {
            return Ok(None);
        }
        match physical_inputs {
            [input] => Ok(Some(Arc::new(ReleaseBarrierExec::new(Arc::clone(input))))),
            _ => Err(DataFusionError::Internal("ReleaseBarrier takes one input".into())),
        }
    }
}

/// The query planner of every governed session: DataFusion's, plus the barrier.
#[derive(Debug)]
struct GovernedQueryPlanner;

#[async_trait]
impl QueryPlanner for GovernedQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn datafusion::catalog::Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        DefaultPhysicalPlanner::with_extension_planners(vec![Arc::new(BarrierPlanner)])
            .create_physical_plan(logical_plan, session)
            .await
    }
}

/// The planner sessions that may hold floors must use.
pub fn query_planner() -> Arc<dyn QueryPlanner + Send + Sync> {
    Arc::new(GovernedQueryPlanner)
}
