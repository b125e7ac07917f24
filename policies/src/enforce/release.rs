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
//!
//! The k-anonymity floor (`k_anonymity = k`) is the row-level counterpart: rows whose
//! combination of released quasi-identifier values occurs fewer than k times are suppressed.

use std::sync::Arc;

use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::dataframe::DataFrame;
use datafusion::datasource::source_as_provider;
use datafusion::error::{DataFusionError, Result};
use datafusion::functions_aggregate::count::{count_all, count_all_window};
use datafusion::logical_expr::{
    Aggregate, Expr, ExprFunctionExt, Filter, LogicalPlan, LogicalPlanBuilder, Projection, TableScan, col, lit,
};

use crate::enforce::{GuardedTable, ReleaseBarrier};
use crate::{ColumnClass, DatasetPolicy, Release};

/// Name of the hidden per-combination row count of the k-anonymity floor.
pub const QI_ROWS: &str = "__passerelle_qi_rows";

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
            "dataset `{dataset}` is released as aggregates only: query it with GROUP BY and summaries (count, sum, avg, stddev...) directly over the dataset; groups with fewer than {min} rows are suppressed"
        ),
    }))
}

/// The strictest aggregates-only scan below `input`, refusing it unless it sits at the end of
/// a plain chain: filters, aliases and projections of bare columns, no subquery anywhere.
fn restricted_below(input: &LogicalPlan) -> Result<Option<(String, u32)>> {
    let mut found: Option<(String, u32)> = None;
    let mut plain = true;
    input.apply_with_subqueries(|node| {
        match node {
            LogicalPlan::Aggregate(a) if is_protected(a) => return Ok(TreeNodeRecursion::Jump),
            LogicalPlan::TableScan(scan) => {
                if let Some((name, min)) = restricted(scan)
                    && found.as_ref().is_none_or(|(_, m)| min > *m)
                {
                    found = Some((name, min));
                }
            }
            LogicalPlan::Filter(f) => plain &= !has_subquery(&f.predicate),
            LogicalPlan::Projection(p) => {
                // Computed columns below the aggregate could single out a row for it; a null
                // (a column a federated part does not send) cannot.
                plain &= p.expr.iter().all(|e| {
                    let mut inner = e;
                    while let Expr::Alias(a) = inner {
                        inner = &a.expr;
                    }
                    matches!(inner, Expr::Column(_)) || matches!(inner, Expr::Literal(v, _) if v.is_null())
                });
            }
            LogicalPlan::SubqueryAlias(_) => {}
            _ => plain = false,
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    match found {
        Some((name, _)) if !plain => Err(refuse(
            &name,
            "aggregate it directly: no joins, unions, subqueries or computed columns below the aggregate".into(),
        )),
        other => Ok(other),
    }
}

/// Aggregate functions that summarise a group. Functions that return the group's rows or
/// single chosen rows (`array_agg`, `string_agg`, `first_value`, `nth_value`...) would release
/// rows verbatim, and order statistics (`min`, `max`, `median`, percentiles) release one
/// person's exact value: both are refused.
const SUMMARIES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "mean",
    "approx_distinct",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "var",
    "var_pop",
    "var_samp",
    "var_population",
    "var_sample",
    "corr",
    "covar",
    "covar_pop",
    "covar_samp",
    "regr_slope",
    "regr_intercept",
    "regr_count",
    "regr_r2",
    "regr_avgx",
    "regr_avgy",
    "regr_sxx",
    "regr_syy",
    "regr_sxy",
    "bool_and",
    "bool_or",
    "grouping",
];

fn refuse(dataset: &str, why: String) -> DataFusionError {
    DataFusionError::External(Box::new(crate::Error::AccessDenied {
        reason: format!("dataset `{dataset}` is released as aggregates only: {why}"),
    }))
}

fn has_subquery(e: &Expr) -> bool {
    e.exists(|e| {
        Ok(matches!(
            e,
            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_)
        ))
    })
    .unwrap_or(true)
}

/// Each aggregate must summarise every row of its group: a summary function over bare columns,
/// with no `FILTER` (which could pick one row of a large group: `max(x) FILTER (WHERE id = 7)`)
/// and no subquery anywhere in the aggregate.
fn check_summaries(agg: &Aggregate, dataset: &str) -> Result<()> {
    if agg.group_expr.iter().any(has_subquery) {
        return Err(refuse(dataset, "subqueries in GROUP BY are not allowed".into()));
    }
    for e in &agg.aggr_expr {
        let mut inner = e;
        while let Expr::Alias(a) = inner {
            inner = &a.expr;
        }
        let Expr::AggregateFunction(f) = inner else {
            return Err(refuse(
                dataset,
                format!("`{}` is not an aggregate function", inner.schema_name()),
            ));
        };
        let name = f.func.name().to_ascii_lowercase();
        if !SUMMARIES.contains(&name.as_str()) {
            return Err(refuse(
                dataset,
                format!(
                    "`{name}` returns rows or single values of a group, not a summary; use count, sum, avg, stddev, var or another summary"
                ),
            ));
        }
        if f.params.filter.is_some() {
            return Err(refuse(
                dataset,
                format!("`{name}(...) FILTER (...)` could summarise a single row; filter with WHERE instead"),
            ));
        }
        for arg in &f.params.args {
            if !matches!(arg, Expr::Column(_) | Expr::Literal(..)) {
                return Err(refuse(
                    dataset,
                    format!(
                        "the arguments of `{name}` must be plain columns (an expression such as CASE could single out one row)"
                    ),
                ));
            }
        }
    }
    Ok(())
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
    // HAVING and everything else above sees only the groups that are released.
    Ok(ReleaseBarrier::wrap(LogicalPlan::Projection(Projection::try_new(
        columns,
        Arc::new(LogicalPlan::Filter(kept)),
    )?)))
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
                && let Some((dataset, min)) = restricted_below(&agg.input)?
            {
                check_summaries(agg, &dataset)?;
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

/// The floor's window: rows per combination of the quasi-identifiers present in `schema`.
fn qi_count(policy: &DatasetPolicy, present: impl Fn(&str) -> bool) -> Result<Option<(Expr, u32)>> {
    let Some(k) = policy.k_anonymity else {
        return Ok(None);
    };
    let qi: Vec<Expr> = policy
        .columns
        .iter()
        .filter(|(name, c)| c.class == ColumnClass::QuasiIdentifier && present(name))
        .map(|(name, _)| Expr::Column(Column::from_name(name)))
        .collect();
    if qi.is_empty() {
        return Ok(None);
    }
    Ok(Some((count_all_window().partition_by(qi).build()?.alias(QI_ROWS), k)))
}

/// Applies a dataset's k-anonymity floor to its released rows after the caller's filter (plain
/// Flight streams): the whole stream is counted before its first row leaves.
pub fn k_floor(df: DataFrame, policy: &DatasetPolicy) -> Result<DataFrame> {
    let schema = df.schema().clone();
    let Some((window, k)) = qi_count(policy, |n| schema.has_column_with_unqualified_name(n))? else {
        return Ok(df);
    };
    df.window(vec![window])?
        .filter(col(QI_ROWS).gt_eq(lit(i64::from(k))))?
        .drop_columns(&[QI_ROWS])
}

/// Applies the k-anonymity floor at every scan of a dataset that has one (SQL, and plain Flight
/// before a caller's filter). The floor then counts the dataset as released, before the
/// statement's own filters, behind a [`ReleaseBarrier`] so that those filters are never
/// evaluated on a suppressed row; stewards who need a floor on every result use
/// `release = "aggregates"`.
pub fn k_floor_scans(plan: LogicalPlan) -> Result<LogicalPlan> {
    Ok(plan
        .transform_up_with_subqueries(|node| {
            let LogicalPlan::TableScan(scan) = &node else {
                return Ok(Transformed::no(node));
            };
            let Some(table) = source_as_provider(&scan.source)
                .ok()
                .and_then(|p| p.downcast_ref::<GuardedTable>().map(|t| Arc::clone(t.grant())))
            else {
                return Ok(Transformed::no(node));
            };
            let schema = Arc::clone(&scan.projected_schema);
            let Some((window, k)) = qi_count(table.policy(), |n| schema.has_column_with_unqualified_name(n))? else {
                return Ok(Transformed::no(node));
            };
            let columns: Vec<Expr> = schema.columns().into_iter().map(Expr::Column).collect();
            let floored = LogicalPlanBuilder::from(node)
                .window(vec![window])?
                .filter(col(QI_ROWS).gt_eq(lit(i64::from(k))))?
                .project(columns)?
                .build()?;
            // The statement's own expressions see only rows above the floor.
            Ok(Transformed::yes(ReleaseBarrier::wrap(floored)))
        })?
        .data)
}
