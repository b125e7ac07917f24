//! Aggregates-only release: a dataset whose manifest says `release = "aggregates"` leaves the
//! node only as `GROUP BY` results, and groups with fewer than `min_group_size` rows are
//! suppressed.
//!
//! The rule is applied to the logical plan of a SQL statement, before optimisation:
//! 1. every `Aggregate` whose input is a plain chain (`Filter`, `Projection`, `SubqueryAlias`)
//!    down to an aggregates-only scan gets a hidden row count, and its output is filtered to
//!    groups of at least `min_group_size` rows (the largest of the datasets involved);
//! 2. any other way such a scan reaches the output (no aggregate, or an aggregate over a join
//!    or union, which could duplicate rows and inflate the counts) is refused.
//!
//! Counts are in rows, not distinct subjects: a subject with many rows can fill a group alone.
//! Stewards who need subject-level thresholds register one row per subject.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::source_as_provider;
use datafusion::error::{DataFusionError, Result};
use datafusion::functions_aggregate::count::count_all;
use datafusion::logical_expr::{Aggregate, Expr, Filter, LogicalPlan, Projection, TableScan, col, lit};

use crate::Release;
use crate::enforce::GuardedTable;

/// Name of the hidden per-group row count.
pub const GROUP_ROWS: &str = "__passerelle_group_rows";

/// The dataset name and minimum group size of an aggregates-only scan.
fn restricted(scan: &TableScan) -> Option<(String, u32)> {
    let provider = source_as_provider(&scan.source).ok()?;
    let table = provider.downcast_ref::<GuardedTable>()?;
    let policy = table.grant().policy();
    (policy.release == Release::Aggregates).then(|| (policy.name.to_string(), policy.min_group_size))
}

fn is_protected(agg: &Aggregate) -> bool {
    agg.aggr_expr
        .iter()
        .any(|e| matches!(e, Expr::Alias(a) if a.name == GROUP_ROWS))
}

fn denied(dataset: &str, min: u32) -> DataFusionError {
    DataFusionError::External(Box::new(crate::Error::AccessDenied {
        reason: format!(
            "dataset `{dataset}` is released as aggregates only: query it with GROUP BY directly over the dataset (no joins or unions below the aggregate); groups with fewer than {min} rows are suppressed"
        ),
    }))
}

/// The strictest aggregates-only scan below `input`, refusing it if it does not sit at the end
/// of a plain chain.
fn restricted_below(input: &LogicalPlan) -> Result<Option<(String, u32)>> {
    let mut found: Option<(String, u32)> = None;
    let mut plain = true;
    input.apply(|node| {
        match node {
            LogicalPlan::Aggregate(a) if is_protected(a) => return Ok(TreeNodeRecursion::Jump),
            LogicalPlan::TableScan(scan) => {
                if let Some((name, min)) = restricted(scan)
                    && found.as_ref().is_none_or(|(_, m)| min > *m)
                {
                    found = Some((name, min));
                }
            }
            LogicalPlan::Filter(_) | LogicalPlan::Projection(_) | LogicalPlan::SubqueryAlias(_) => {}
            _ => plain = false,
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    match found {
        Some((name, min)) if !plain => Err(denied(&name, min)),
        other => Ok(other),
    }
}

/// `agg` with a hidden row count, keeping only groups of at least `min` rows.
fn protect(agg: &Aggregate, min: u32) -> Result<LogicalPlan> {
    let mut aggr_expr = agg.aggr_expr.clone();
    aggr_expr.push(count_all().alias(GROUP_ROWS));
    let counted = Aggregate::try_new(Arc::clone(&agg.input), agg.group_expr.clone(), aggr_expr)?;
    let kept = Filter::try_new(
        col(GROUP_ROWS).gt_eq(lit(i64::from(min))),
        Arc::new(LogicalPlan::Aggregate(counted)),
    )?;
    let columns: Vec<Expr> = agg.schema.columns().into_iter().map(Expr::Column).collect();
    Ok(LogicalPlan::Projection(Projection::try_new(
        columns,
        Arc::new(LogicalPlan::Filter(kept)),
    )?))
}

/// Applies the aggregates-only rule to a statement's logical plan. Plans that touch no
/// aggregates-only dataset come back unchanged.
pub fn enforce_release(plan: LogicalPlan) -> Result<LogicalPlan> {
    let mut any = false;
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && restricted(scan).is_some()
        {
            any = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if !any {
        return Ok(plan);
    }
    let plan = plan
        .transform_up_with_subqueries(|node| {
            if let LogicalPlan::Aggregate(agg) = &node
                && !is_protected(agg)
                && let Some((_, min)) = restricted_below(&agg.input)?
            {
                return Ok(Transformed::yes(protect(agg, min)?));
            }
            Ok(Transformed::no(node))
        })?
        .data;
    // Nothing of an aggregates-only dataset may reach the output other than through a
    // protected aggregate.
    plan.apply_with_subqueries(|node| match node {
        LogicalPlan::Aggregate(a) if is_protected(a) => Ok(TreeNodeRecursion::Jump),
        LogicalPlan::TableScan(scan) => match restricted(scan) {
            Some((name, min)) => Err(denied(&name, min)),
            None => Ok(TreeNodeRecursion::Continue),
        },
        _ => Ok(TreeNodeRecursion::Continue),
    })?;
    Ok(plan)
}
