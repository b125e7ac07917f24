//! Expressions that may run before an aggregates-only dataset's groups are suppressed.
//!
//! A `WHERE` or `GROUP BY` expression over an aggregates-only dataset is evaluated on every row
//! the gate releases, before small groups are suppressed: no row of such a dataset is ever
//! released on its own, so there is no smaller set to evaluate it on. If it can *fail* on a
//! row, the failure is an oracle: `WHERE 1/(CASE WHEN <one person's values> THEN 0 ELSE 1 END)
//! = 1` fails exactly when that person is in the dataset. Such expressions are refused (with
//! `INVALID_ARGUMENT`) unless every part of them cannot fail on any row: comparisons, `AND`,
//! `OR`, `NOT`, `IS [NOT] NULL`, `IN` lists, `BETWEEN`, `LIKE`, `CASE`, `COALESCE`, integer `+`,
//! `-`, `*` (wrapping, as DataFusion computes them), floating-point arithmetic, division by a
//! constant other than 0 and -1, `TRY_CAST`, widening casts and a list of string and math
//! functions. Everything else (integer division by a column, `CAST` of text to a number, date
//! functions, regular expressions...) is refused, with the part named.
//!
//! The check runs on the *optimised* plan, where type coercion has made every implicit cast
//! explicit and constants are folded (a constant that fails to fold stays, and is refused like
//! any other failing part), and it covers every node between an aggregate and the
//! aggregates-only scans below it.

use arrow::datatypes::DataType;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::datasource::source_as_provider;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{BinaryExpr, Cast, Expr, ExprSchemable, LogicalPlan, Operator};

use crate::enforce::GuardedTable;
use crate::{Error, Release};

/// Scalar functions that return a value (possibly null) for every input of the types they accept.
const INFALLIBLE_FUNCTIONS: &[&str] = &[
    "coalesce",
    "nullif",
    "nvl",
    "nvl2",
    "greatest",
    "least",
    "isnan",
    "iszero",
    "lower",
    "upper",
    "btrim",
    "ltrim",
    "rtrim",
    "trim",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "starts_with",
    "ends_with",
    "strpos",
    "instr",
    "concat",
    "concat_ws",
];

/// Math functions that cannot fail on floating-point arguments (NaN and infinities instead).
const FLOAT_FUNCTIONS: &[&str] = &[
    "abs", "floor", "ceil", "round", "trunc", "signum", "sqrt", "cbrt", "exp", "ln", "log2", "log10",
];

/// The aggregates-only dataset a node reads, if any.
fn restricted_scan(node: &LogicalPlan) -> Option<String> {
    let LogicalPlan::TableScan(scan) = node else {
        return None;
    };
    let provider = source_as_provider(&scan.source).ok()?;
    let table = provider.downcast_ref::<GuardedTable>()?;
    let policy = table.grant().policy();
    (policy.release == Release::Aggregates).then(|| policy.name.to_string())
}

/// Refuses a statement whose plan, once `state` has optimised it, evaluates an expression able
/// to fail on a row of an aggregates-only dataset before its groups are suppressed. Plans that
/// read no such dataset are not optimised here. A plan that does not optimise is let through:
/// it fails the same way when it runs, before reading a row.
pub fn check_fallible(state: &SessionState, plan: &LogicalPlan) -> Result<()> {
    let mut restricted = false;
    plan.apply_with_subqueries(|node| {
        restricted |= restricted_scan(node).is_some();
        Ok(match restricted {
            true => TreeNodeRecursion::Stop,
            false => TreeNodeRecursion::Continue,
        })
    })?;
    if !restricted {
        return Ok(());
    }
    let Ok(optimised) = state.optimize(plan) else {
        return Ok(());
    };
    check_optimised(&optimised)
}

/// [`check_fallible`] on a plan already optimised.
fn check_optimised(plan: &LogicalPlan) -> Result<()> {
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::Aggregate(_) = node {
            check_below(node)?;
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(())
}

/// `aggregate` and the nodes down to the scans that feed it (not into nested aggregates): if an
/// aggregates-only scan is among them, every expression they evaluate must be infallible.
fn check_below(aggregate: &LogicalPlan) -> Result<()> {
    let mut nodes: Vec<&LogicalPlan> = Vec::new();
    let mut dataset = None;
    let mut stack = vec![aggregate];
    while let Some(node) = stack.pop() {
        if let Some(name) = restricted_scan(node) {
            dataset = Some(name);
        }
        nodes.push(node);
        for input in node.inputs() {
            if !matches!(input, LogicalPlan::Aggregate(_)) {
                stack.push(input);
            }
        }
    }
    let Some(dataset) = dataset else {
        return Ok(());
    };
    for node in nodes {
        // Expressions are typed against the node's input (a scan's filters: its own schema).
        let schema = match node.inputs().first() {
            Some(input) => std::sync::Arc::clone(input.schema()),
            None => std::sync::Arc::clone(node.schema()),
        };
        node.apply_expressions(|e| {
            if let Some(why) = fallible(e, &schema) {
                return Err(DataFusionError::External(Box::new(Error::FallibleExpression {
                    dataset: dataset.clone(),
                    part: why,
                })));
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
    }
    Ok(())
}

fn is_float(t: &DataType) -> bool {
    matches!(t, DataType::Float16 | DataType::Float32 | DataType::Float64)
}

fn is_int_or_float(t: &DataType) -> bool {
    t.is_integer() || is_float(t)
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// Casts that succeed for every value of `from`.
fn infallible_cast(from: &DataType, to: &DataType) -> bool {
    use DataType as T;
    if from == to || *from == T::Null {
        return true;
    }
    if let T::Dictionary(_, value) = from {
        return infallible_cast(value, to);
    }
    let width = |t: &DataType| t.primitive_width().unwrap_or(usize::MAX);
    match (from, to) {
        (f, t) if is_string(f) && is_string(t) => true,
        (f, t) if is_string(t) => {
            f.is_primitive() || matches!(f, T::Boolean) || (f.is_temporal() && !matches!(f, T::Interval(_)))
        }
        (f, T::Float64) => is_int_or_float(f),
        (f, T::Float32) => matches!(f, T::Int8 | T::Int16 | T::UInt8 | T::UInt16 | T::Float16),
        (f, t) if f.is_signed_integer() && t.is_signed_integer() => width(f) <= width(t),
        (f, t) if f.is_unsigned_integer() && t.is_unsigned_integer() => width(f) <= width(t),
        (f, t) if f.is_unsigned_integer() && t.is_signed_integer() => width(f) < width(t),
        (T::Date32, T::Date64) => true,
        (T::Timestamp(a, _), T::Timestamp(b, _)) => a == b,
        _ => false,
    }
}

/// A constant divisor that cannot fail: not null-typed, not 0, not -1 (`MIN / -1` overflows).
fn safe_divisor(e: &Expr) -> bool {
    let Expr::Literal(v, _) = e else {
        return false;
    };
    if v.is_null() {
        return true;
    }
    let zero = ScalarValue::new_zero(&v.data_type()).is_ok_and(|z| &z == v);
    let minus_one = ScalarValue::new_negative_one(&v.data_type()).is_ok_and(|m| &m == v);
    (v.data_type().is_integer()) && !zero && !minus_one
}

/// The first part of `expr` that can fail on some row, described without its literals (so the
/// message does not depend on the values a caller typed), or `None`.
pub fn fallible(expr: &Expr, schema: &DFSchema) -> Option<String> {
    let mut found = None;
    let _ = expr.apply(|e| {
        let why = match e {
            Expr::Column(_)
            | Expr::Literal(..)
            | Expr::Placeholder(_)
            | Expr::ScalarVariable(..)
            | Expr::Alias(_)
            | Expr::Not(_)
            | Expr::IsNull(_)
            | Expr::IsNotNull(_)
            | Expr::IsTrue(_)
            | Expr::IsFalse(_)
            | Expr::IsUnknown(_)
            | Expr::IsNotTrue(_)
            | Expr::IsNotFalse(_)
            | Expr::IsNotUnknown(_)
            | Expr::Negative(_)
            | Expr::Between(_)
            | Expr::InList(_)
            | Expr::Case(_)
            | Expr::TryCast(_) => None,
            Expr::Like(like) => (like.escape_char.is_some() || !matches!(*like.pattern, Expr::Literal(..)))
                .then(|| "LIKE with an escape character or a pattern that is not a constant".to_string()),
            Expr::BinaryExpr(b) => binary(b, schema),
            Expr::Cast(Cast { expr, field }) => match (expr.get_type(schema), field.data_type()) {
                (Ok(from), to) if infallible_cast(&from, to) => None,
                (Ok(from), to) => Some(format!("CAST from {from} to {to} (use TRY_CAST)")),
                (Err(_), to) => Some(format!("CAST to {to}")),
            },
            Expr::ScalarFunction(f) => {
                let name = f.name().to_ascii_lowercase();
                let args_float = f
                    .args
                    .iter()
                    .all(|a| a.get_type(schema).is_ok_and(|t| is_float(&t) || t == DataType::Null));
                if INFALLIBLE_FUNCTIONS.contains(&name.as_str())
                    || (FLOAT_FUNCTIONS.contains(&name.as_str()) && args_float)
                {
                    None
                } else {
                    Some(format!("the function `{name}`"))
                }
            }
            // Summaries are checked by the release rule (plain columns as arguments); their
            // arithmetic wraps rather than fails.
            Expr::AggregateFunction(_) => None,
            other => Some(format!("`{}`", other.variant_name())),
        };
        match why {
            Some(w) => {
                found = Some(w);
                Ok(TreeNodeRecursion::Stop)
            }
            None => Ok(TreeNodeRecursion::Continue),
        }
    });
    found
}

fn binary(b: &BinaryExpr, schema: &DFSchema) -> Option<String> {
    use Operator as O;
    if always_safe(b.op) {
        return None;
    }
    let types = (b.left.get_type(schema), b.right.get_type(schema));
    let (Ok(lt), Ok(rt)) = types else {
        return Some(format!("`{}`", b.op));
    };
    match b.op {
        O::Plus | O::Minus | O::Multiply if is_int_or_float(&lt) && is_int_or_float(&rt) => None,
        O::Divide | O::Modulo if is_float(&lt) || is_float(&rt) => None,
        O::Divide | O::Modulo if lt.is_integer() && safe_divisor(&b.right) => None,
        O::Divide | O::Modulo => Some(format!(
            "`{}` on {lt} and {rt} (divide floating-point numbers instead: CAST(x AS DOUBLE) {} y)",
            b.op, b.op
        )),
        op => Some(format!("`{op}` on {lt} and {rt}")),
    }
}

/// Operators that compare or combine values without ever failing.
fn always_safe(op: Operator) -> bool {
    use Operator as O;
    matches!(
        op,
        O::Eq
            | O::NotEq
            | O::Lt
            | O::LtEq
            | O::Gt
            | O::GtEq
            | O::IsDistinctFrom
            | O::IsNotDistinctFrom
            | O::And
            | O::Or
            | O::LikeMatch
            | O::ILikeMatch
            | O::NotLikeMatch
            | O::NotILikeMatch
            | O::StringConcat
            | O::BitwiseAnd
            | O::BitwiseOr
            | O::BitwiseXor
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema};
    use datafusion::prelude::{SessionContext, lit};

    fn schema() -> DFSchema {
        DFSchema::try_from(Schema::new(vec![
            Field::new("i", DataType::Int64, true),
            Field::new("f", DataType::Float64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("d", DataType::Date32, true),
        ]))
        .unwrap()
    }

    fn parse(sql: &str) -> Expr {
        SessionContext::new().parse_sql_expr(sql, &schema()).unwrap()
    }

    #[test]
    fn infallible_expressions_pass() {
        for sql in [
            "i > 3 AND (s = 'x' OR f < 2.5)",
            "i + 1 - i * 2 > 0",
            "f / f > 1",
            "i / 2 = 1",
            "i % 7 = 1",
            "CASE WHEN s LIKE 'a%' THEN i ELSE 0 END IN (1, 2)",
            "coalesce(s, '') || lower(s) = 'x'",
            "TRY_CAST(s AS BIGINT) = 1",
            "i BETWEEN 1 AND 5 AND s IS NOT NULL",
            "sqrt(f) > 1",
            "f > $1 AND s = $2",
        ] {
            assert_eq!(fallible(&parse(sql), &schema()), None, "{sql}");
        }
        let widen = Expr::Cast(Cast::new(Box::new(Expr::Column("i".into())), DataType::Float64));
        assert_eq!(fallible(&widen, &schema()), None);
    }

    #[test]
    fn fallible_expressions_are_named_without_their_literals() {
        for (sql, part) in [
            (
                "1/(CASE WHEN s = 'secret' THEN 0 ELSE 1 END) = 1",
                "`/` on Int64 and Int64",
            ),
            ("i / 0 = 1", "`/`"),
            ("i / -1 = 1", "`/`"),
            ("i % i = 0", "`%`"),
            ("abs(i) > 1", "`abs`"),
            ("date_trunc('month', d) IS NULL", "`date_trunc`"),
            ("s ~ 'x(' ", "`~`"),
        ] {
            let why = fallible(&parse(sql), &schema()).unwrap_or_else(|| panic!("{sql} passed"));
            assert!(why.contains(part), "{sql}: {why}");
            assert!(!why.contains("secret"), "{why}");
        }
        let narrow = Expr::Cast(Cast::new(Box::new(Expr::Column("s".into())), DataType::Int64));
        assert!(fallible(&narrow, &schema()).unwrap().contains("TRY_CAST"));
        let bad_literal = Expr::Cast(Cast::new(Box::new(lit("x")), DataType::Int64));
        assert!(fallible(&bad_literal, &schema()).is_some());
    }

    #[test]
    fn casts() {
        use DataType as T;
        assert!(infallible_cast(&T::Int32, &T::Int64));
        assert!(infallible_cast(&T::UInt32, &T::Int64));
        assert!(!infallible_cast(&T::Int64, &T::Int32));
        assert!(!infallible_cast(&T::UInt64, &T::Int64));
        assert!(infallible_cast(&T::Int64, &T::Utf8));
        assert!(!infallible_cast(&T::Utf8, &T::Int64));
        assert!(!infallible_cast(&T::Binary, &T::Utf8));
        assert!(!infallible_cast(
            &T::Date32,
            &T::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None)
        ));
    }
}
