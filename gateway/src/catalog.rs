//! Plans data requests. The per-request `SessionContext` holds only `GuardedTable`s: there is no
//! function here that registers a bare provider, so every plan reads through the gate.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use chrono::Utc;
use datafusion::common::DFSchema;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use passerelle_connectors::Stores;
use passerelle_policies::enforce::{EnforceCounters, Grant, GuardedTable};
use passerelle_policies::{ColumnClass, DatasetPolicy, Principal, Purpose, Release};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::node::Node;

/// What a client asks for: a dataset, optionally some columns, a filter over the post-policy
/// rows and a row limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataCommand {
    /// Dataset name.
    pub dataset: String,
    /// Columns to send (default: every column the policy sends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// SQL boolean expression, evaluated only on rows the gate lets through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Maximum rows across all endpoints of the request (a federated one deals it over its nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Split the stream into this many endpoints, disjoint and together complete (1 to 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<u32>,
    /// Federated requests: this rank's share of every node's part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
    /// Federated requests: `fail` (default) when a node denies or is down, or `skip` it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_partial: Option<OnPartial>,
    /// Reshuffles a split stream per training epoch: with `shard`, which share of each node's rows
    /// a rank reads (still disjoint and complete across ranks); with `shard` or `parts`, the
    /// endpoint order. The same seed gives the same assignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Summaries per group instead of rows (the only way an aggregates-only dataset leaves over
    /// plain Flight, and how federated SQL pushes `GROUP BY` to each node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<AggregateSpec>,
    /// Federated SQL: the columns of the federated dataset the request uses (name to flat Arrow
    /// type, as `DataType` prints it). Those this node does not send are added as typed nulls,
    /// never its raw values, so one request (columns, filter, groups) fits every part, as a raw
    /// scan's missing columns are null at the home node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill_nulls: Option<std::collections::BTreeMap<String, String>>,
}

/// Longest column name or type string `fill_nulls` accepts.
const MAX_FILL_TEXT: usize = 256;

/// The type `fill_nulls` gives `name`: a flat Arrow type only (no nesting, no fixed-size or
/// dictionary layout), so that neither parsing it nor building its null column can exhaust the
/// stack or memory, whatever a caller sends.
pub fn fill_type(name: &str, ty: &str) -> Result<arrow::datatypes::DataType> {
    use arrow::datatypes::DataType as T;
    let hint = "name each column by its flat Arrow type as arrow prints it, e.g. Utf8, Int64, Date32";
    if name.is_empty() || name.len() > MAX_FILL_TEXT || name.starts_with("__passerelle") {
        return Err(Error::invalid(
            format!(
                "`fill_nulls` names a column `{}` that cannot be filled",
                name.chars().take(64).collect::<String>()
            ),
            hint,
        ));
    }
    let bad = |why: String| Error::invalid(format!("`fill_nulls` gives column `{name}` {why}"), hint);
    if ty.len() > MAX_FILL_TEXT {
        return Err(bad(format!("a type longer than {MAX_FILL_TEXT} bytes")));
    }
    let parsed: T = ty.parse().map_err(|e| bad(format!("the unknown type `{ty}`: {e}")))?;
    let flat = matches!(
        parsed,
        T::Null
            | T::Boolean
            | T::Int8
            | T::Int16
            | T::Int32
            | T::Int64
            | T::UInt8
            | T::UInt16
            | T::UInt32
            | T::UInt64
            | T::Float16
            | T::Float32
            | T::Float64
            | T::Utf8
            | T::LargeUtf8
            | T::Utf8View
            | T::Binary
            | T::LargeBinary
            | T::BinaryView
            | T::Date32
            | T::Date64
            | T::Time32(_)
            | T::Time64(_)
            | T::Timestamp(_, _)
            | T::Duration(_)
            | T::Interval(_)
            | T::Decimal32(_, _)
            | T::Decimal64(_, _)
            | T::Decimal128(_, _)
            | T::Decimal256(_, _)
    );
    if flat {
        Ok(parsed)
    } else {
        Err(bad(format!("the type `{ty}`, which is not a flat type")))
    }
}

/// `GROUP BY group_by` with `measures`, over the rows the gate and the filter let through.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateSpec {
    /// Columns to group by (none: one group of every row).
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Summaries, each a result column named like its SQL form: `count(*)`, `sum(hba1c)`.
    pub measures: Vec<Measure>,
}

impl AggregateSpec {
    /// The columns the aggregate reads, for the audit.
    pub fn columns(&self) -> Vec<String> {
        let mut cols: Vec<String> = self.group_by.clone();
        for c in self.measures.iter().filter_map(|m| m.column.as_ref()) {
            if !cols.contains(c) {
                cols.push(c.clone());
            }
        }
        cols
    }

    /// `GROUP BY a, b: count(*), sum(x)`, for the audit.
    pub fn describe(&self) -> String {
        let measures: Vec<String> = self.measures.iter().map(Measure::name).collect();
        match self.group_by.is_empty() {
            true => format!("aggregate: {}", measures.join(", ")),
            false => format!("GROUP BY {}: {}", self.group_by.join(", "), measures.join(", ")),
        }
    }
}

/// One summary of a group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measure {
    /// The summary function.
    pub func: MeasureFn,
    /// Its column; none for `count` means every row (`count(*)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
}

/// Summary functions whose per-node results combine exactly (`avg` as `sum` and `count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeasureFn {
    /// Rows, or non-null values of the column.
    Count,
    /// Sum of the column.
    Sum,
    /// Mean of the column.
    Avg,
    /// Smallest value (refused by aggregates-only datasets: it is one person's value).
    Min,
    /// Largest value (refused by aggregates-only datasets).
    Max,
}

impl MeasureFn {
    /// The SQL name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Sum => "sum",
            Self::Avg => "avg",
            Self::Min => "min",
            Self::Max => "max",
        }
    }
}

impl Measure {
    /// The result column's name, as SQL would print it: `count(*)`, `sum(hba1c)`.
    pub fn name(&self) -> String {
        format!("{}({})", self.func.as_str(), self.column.as_deref().unwrap_or("*"))
    }

    /// The DataFusion expression, aliased to [`Measure::name`].
    pub(crate) fn expr(&self) -> Result<datafusion::logical_expr::Expr> {
        use datafusion::functions_aggregate::expr_fn::{avg, count, max, min, sum};
        use datafusion::logical_expr::Expr;
        let column = self
            .column
            .as_ref()
            .map(|c| Expr::Column(datafusion::common::Column::from_name(c)));
        let e = match (self.func, column) {
            (MeasureFn::Count, None) => datafusion::functions_aggregate::count::count_all(),
            (MeasureFn::Count, Some(c)) => count(c),
            (MeasureFn::Sum, Some(c)) => sum(c),
            (MeasureFn::Avg, Some(c)) => avg(c),
            (MeasureFn::Min, Some(c)) => min(c),
            (MeasureFn::Max, Some(c)) => max(c),
            (f, None) => {
                return Err(Error::invalid(
                    format!("`{}` needs a column", f.as_str()),
                    "send {\"func\": \"sum\", \"column\": \"name\"}",
                ));
            }
        };
        Ok(e.alias(self.name()))
    }
}

/// Most group columns or measures an aggregate may name.
const MAX_AGGREGATE_TERMS: usize = 64;

/// One training rank of `world_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    /// 0-based rank.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
}

/// What a federated request does about nodes that deny or do not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPartial {
    /// The request fails, naming the nodes.
    #[default]
    Fail,
    /// The request proceeds without them; `app_metadata` reports them.
    Skip,
}

/// A stable pseudo-random number for `seed`, a node and one of its parts (the same in every
/// process and release, unlike `std`'s hashers): orders endpoints and offsets shards.
pub fn seeded(seed: u64, node: &str, k: u64) -> u64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(seed.to_be_bytes());
    h.update(node.as_bytes());
    h.update(k.to_be_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first)
}

/// Most parts a stream may be split into.
pub const MAX_PARTS: u32 = 64;

/// Longest filter accepted (it travels inside the ticket).
const MAX_FILTER_BYTES: usize = 4096;
/// Most columns a command may name.
pub(crate) const MAX_COLUMNS: usize = 1024;

const AGGREGATE_HINT: &str = "send \"aggregate\": {\"group_by\": [\"diagnosis\"], \"measures\": [{\"func\": \"count\"}, {\"func\": \"avg\", \"column\": \"hba1c\"}]}";

const COMMAND_HINT: &str =
    "send {\"dataset\": \"name\", \"columns\": [..], \"filter\": \"sql expression\", \"limit\": n}";

impl DataCommand {
    /// Parses the JSON form used in Flight descriptors.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let cmd: Self = serde_json::from_slice(bytes).map_err(|e| {
            Error::invalid(
                format!("command is not valid JSON for a data request: {e}"),
                COMMAND_HINT,
            )
        })?;
        if cmd.filter.as_ref().is_some_and(|f| f.len() > MAX_FILTER_BYTES) {
            return Err(Error::invalid(
                format!("filter is longer than {MAX_FILTER_BYTES} bytes"),
                "simplify the filter",
            ));
        }
        if let Some(filter) = &cmd.filter {
            crate::nesting::check(filter, "filter")?;
        }
        if cmd.parts.is_some_and(|n| n == 0 || n > MAX_PARTS) {
            return Err(Error::invalid(
                format!("`parts` must be between 1 and {MAX_PARTS}"),
                "ask for as many parts as you have readers",
            ));
        }
        if let Some(s) = cmd.shard
            && (s.world_size == 0 || s.world_size > MAX_PARTS || s.rank >= s.world_size)
        {
            return Err(Error::invalid(
                format!("`shard` needs 0 <= rank < world_size <= {MAX_PARTS}"),
                "send {\"rank\": r, \"world_size\": w}",
            ));
        }
        if let Some(fill) = &cmd.fill_nulls {
            if fill.len() > MAX_COLUMNS {
                return Err(Error::invalid(
                    format!("more than {MAX_COLUMNS} columns in `fill_nulls`"),
                    COMMAND_HINT,
                ));
            }
            for (name, ty) in fill {
                fill_type(name, ty)?;
            }
        }
        if cmd.columns.as_ref().is_some_and(|c| c.len() > MAX_COLUMNS) {
            return Err(Error::invalid(
                format!("more than {MAX_COLUMNS} columns requested"),
                COMMAND_HINT,
            ));
        }
        if let Some(agg) = &cmd.aggregate {
            if agg.measures.is_empty() || agg.measures.len() > MAX_AGGREGATE_TERMS {
                return Err(Error::invalid(
                    format!("`aggregate.measures` needs 1 to {MAX_AGGREGATE_TERMS} summaries"),
                    AGGREGATE_HINT,
                ));
            }
            if agg.group_by.len() > MAX_AGGREGATE_TERMS {
                return Err(Error::invalid(
                    format!("`aggregate.group_by` names more than {MAX_AGGREGATE_TERMS} columns"),
                    AGGREGATE_HINT,
                ));
            }
            if cmd.columns.is_some() || cmd.parts.is_some() || cmd.shard.is_some() {
                return Err(Error::invalid(
                    "`columns`, `parts` and `shard` do not apply to an aggregate: its result is the group columns and the measures, in one stream per node",
                    AGGREGATE_HINT,
                ));
            }
        }
        Ok(cmd)
    }
}

/// A planned, allowed request.
#[derive(Debug)]
pub struct PlannedQuery {
    /// The plan, ready to execute.
    pub df: DataFrame,
    /// The schema the client receives.
    pub schema: SchemaRef,
    /// Counters the gate fills while streaming.
    pub counters: Arc<EnforceCounters>,
    /// Why access was allowed.
    pub reason: String,
    /// Consent version at planning time.
    pub consent_version: u64,
}

/// The session settings every request uses. Guarded scans must not evaluate predicates inside
/// the Parquet reader (row-filter pushdown), and strings stay `Utf8` rather than `Utf8View` so
/// that every Flight client (JDBC, older pyarrow) can read them.
pub fn session_config() -> SessionConfig {
    SessionConfig::new()
        .with_information_schema(false)
        .with_batch_size(8192)
        .set_bool("datafusion.execution.parquet.pushdown_filters", false)
        .set_bool("datafusion.execution.parquet.schema_force_view_types", false)
}

/// The runtime of every session: the node's object stores, no per-process globals.
pub fn runtime(stores: &Stores) -> Result<Arc<RuntimeEnv>> {
    Ok(RuntimeEnvBuilder::new()
        .with_object_store_registry(stores.registry())
        .build_arc()?)
}

/// The runtime of a session that holds rows (SQL, a plain-Flight floor or aggregate): a memory
/// pool of `limit_mb`, and no disk manager, so nothing of the data spills to disk and a plan
/// that needs more fails with `ResourcesExhausted`.
pub fn limited_runtime(stores: &Stores, limit_mb: u64) -> Result<Arc<RuntimeEnv>> {
    use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
    let bytes = usize::try_from(limit_mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX);
    Ok(RuntimeEnvBuilder::new()
        .with_memory_limit(bytes, 1.0)
        .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled))
        .with_object_store_registry(stores.registry())
        .build_arc()?)
}

/// A session with no tables, for opening raw sources.
pub fn source_context(stores: &Stores) -> Result<SessionContext> {
    Ok(SessionContext::new_with_config_rt(session_config(), runtime(stores)?))
}

/// A session for governed plans: [`session_config`], `runtime`, and the planner that knows the
/// release barrier (`passerelle_policies::enforce::ReleaseBarrier`) that floors put between
/// suppressed rows and user expressions.
pub fn governed_session(runtime: Arc<RuntimeEnv>) -> SessionContext {
    datafusion::execution::SessionStateBuilder::new()
        .with_config(session_config())
        .with_runtime_env(runtime)
        .with_default_features()
        .with_query_planner(passerelle_policies::enforce::query_planner())
        .build()
        .into()
}

/// A session whose catalog holds exactly the given guarded tables.
pub fn guarded_context(stores: &Stores, tables: Vec<(String, GuardedTable)>) -> Result<SessionContext> {
    let ctx = governed_session(runtime(stores)?);
    for (name, table) in tables {
        ctx.register_table(name.as_str(), Arc::new(table))?;
    }
    Ok(ctx)
}

/// A dataset opened through the gate for one caller and purpose.
#[derive(Debug)]
pub struct Guarded {
    /// The table to register.
    pub table: GuardedTable,
    /// The dataset's policy.
    pub policy: Arc<DatasetPolicy>,
    /// The raw source's schema (to name hidden columns in errors).
    pub raw_schema: SchemaRef,
    /// Counters the gate fills while streaming.
    pub counters: Arc<EnforceCounters>,
    /// Consent version at planning time.
    pub consent_version: u64,
    /// Why access was allowed.
    pub reason: String,
}

/// Decides access to one dataset and opens it behind the gate. Errors: `DatasetNotFound`
/// (missing or invisible), `PermissionDenied`, `SourceUnavailable`.
pub async fn guard(node: &Node, principal: &Principal, purpose: &Purpose, dataset: &str) -> Result<Guarded> {
    let snap = node.snapshot();
    let manifest = snap.visible_dataset(principal, dataset)?;
    let policy = Arc::new(manifest.policy());
    let decision = snap.authorizer.decide(principal, &policy, purpose, Utc::now())?;
    if !decision.allow {
        return Err(Error::PermissionDenied {
            reason: decision.reason,
        });
    }
    // Source failures are the operator's to fix and may name storage paths: log, do not send.
    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::error!(dataset, error = %e, "dataset source unavailable");
        Error::SourceUnavailable {
            name: dataset.to_string(),
        }
    };
    let raw = node
        .open_source(&manifest, snap.meta_version)
        .await
        .map_err(|e| unavailable(&e))?;
    let raw_schema = raw.schema();
    let grant = Grant::new(
        &decision,
        Arc::clone(&policy),
        Arc::clone(&raw_schema),
        purpose.clone(),
        node.pseudonymiser(&principal.member_state, &principal.org)?,
        Arc::clone(&node.consent),
    )
    .map_err(|e| match e {
        // The source drifted from its registration (a column vanished or changed type).
        passerelle_policies::Error::InvalidManifest { .. } | passerelle_policies::Error::Unsupported { .. } => {
            unavailable(&e)
        }
        other => Error::Policy(other),
    })?;
    Ok(Guarded {
        counters: grant.counters(),
        consent_version: grant.consent_version(),
        table: GuardedTable::new(raw, grant),
        policy,
        raw_schema,
        reason: decision.reason,
    })
}

/// Decides and plans a data request. Errors: `DatasetNotFound` (missing or invisible),
/// `PermissionDenied` (purpose, role, direct identifier, aggregates-only dataset),
/// `InvalidArgument` (unknown column, bad filter).
pub async fn plan(node: &Node, principal: &Principal, purpose: &Purpose, cmd: &DataCommand) -> Result<PlannedQuery> {
    plan_for(node, principal, purpose, cmd, false).await
}

/// [`plan`], or with `describe` only the schema's use (GetSchema): an aggregates-only dataset
/// then plans as rows too, since its post-policy schema is no secret and federated SQL needs it
/// to plan a `GROUP BY` over the node's part. The plan of such a describe is never executed.
pub async fn plan_for(
    node: &Node,
    principal: &Principal,
    purpose: &Purpose,
    cmd: &DataCommand,
    describe: bool,
) -> Result<PlannedQuery> {
    let Guarded {
        table,
        policy,
        raw_schema,
        counters,
        consent_version,
        reason,
    } = guard(node, principal, purpose, &cmd.dataset).await?;
    if policy.release == Release::Aggregates && cmd.aggregate.is_none() && !describe {
        return Err(Error::PermissionDenied {
            reason: format!(
                "dataset `{}` is released as aggregates only; query it over Flight SQL with GROUP BY, or send an `aggregate` in the command (groups under {} rows are suppressed)",
                cmd.dataset, policy.min_group_size
            ),
        });
    }
    // Columns of the federated dataset this node does not send: typed nulls (see `fill_nulls`).
    // A name equal to a released column's qualified name would stand for that column in
    // DataFusion's rewrites: never filled.
    let released = datafusion::catalog::TableProvider::schema(&table);
    let shadows = |name: &str| {
        name.strip_prefix(cmd.dataset.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|c| released.field_with_name(c).is_ok())
    };
    let mut filled: Vec<(String, arrow::datatypes::DataType)> = Vec::new();
    for (name, ty) in cmd.fill_nulls.iter().flatten() {
        if released.field_with_name(name).is_err() && !shadows(name) {
            filled.push((name.clone(), fill_type(name, ty)?));
        }
    }
    let is_filled = |name: &str| filled.iter().any(|(n, _)| n == name);
    let check_column = |name: &str| -> Result<()> {
        // Filled, or released (a nullified direct identifier is released, as nulls).
        if is_filled(name) || released.field_with_name(name).is_ok() {
            return Ok(());
        }
        match policy.columns.get(name).map(|c| c.class) {
            None => Err(Error::invalid(
                format!("dataset `{}` has no column `{name}`", cmd.dataset),
                "use GetSchema to list the columns you may request",
            )),
            Some(ColumnClass::DirectIdentifier) => Err(Error::PermissionDenied {
                reason: format!("column `{name}` is a direct identifier and is never sent"),
            }),
            Some(_) => Ok(()),
        }
    };
    if let Some(cols) = &cmd.columns {
        if cols.is_empty() {
            return Err(Error::invalid(
                "`columns` is empty",
                "omit `columns` to receive every column you may see",
            ));
        }
        cols.iter().try_for_each(|c| check_column(c))?;
    }
    if let Some(agg) = &cmd.aggregate {
        for c in agg
            .group_by
            .iter()
            .chain(agg.measures.iter().filter_map(|m| m.column.as_ref()))
        {
            check_column(c)?;
        }
    }
    if let Some(filter) = &cmd.filter {
        // Name the hidden columns a filter refers to before planning it against the guarded table.
        // Filled names take their filled type here too: how the filter parses must not depend
        // on the type of a raw column the caller may not see.
        let mut raw_fields: Vec<arrow::datatypes::FieldRef> = raw_schema
            .fields()
            .iter()
            .filter(|f| !is_filled(f.name()))
            .cloned()
            .collect();
        for (name, ty) in &filled {
            raw_fields.push(Arc::new(arrow::datatypes::Field::new(name, ty.clone(), true)));
        }
        let raw_df_schema = DFSchema::try_from(arrow::datatypes::Schema::new(raw_fields))?;
        let expr = SessionContext::new_with_config(session_config())
            .parse_sql_expr(filter, &raw_df_schema)
            .map_err(|e| {
                // DataFusion's message lists the schema's columns: say it over the columns the
                // caller may see, never the raw ones.
                let visible = DFSchema::try_from(datafusion::catalog::TableProvider::schema(&table).as_ref().clone());
                let why = match visible
                    .map(|v| SessionContext::new_with_config(session_config()).parse_sql_expr(filter, &v))
                {
                    Ok(Err(visible_err)) => visible_err.strip_backtrace(),
                    _ => e
                        .strip_backtrace()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .split(". Valid fields")
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                };
                Error::invalid(
                    format!("filter does not parse: {why}"),
                    "write a SQL boolean expression over the columns you may see",
                )
            })?;
        for c in expr.column_refs() {
            check_column(&c.name)?;
        }
    }
    // A k-anonymity floor holds the whole stream before its first row leaves, and an aggregate
    // holds its groups: both get the SQL memory pool (`sql.memory_limit_mb`), so that a large
    // stream fails with RESOURCE_EXHAUSTED instead of exhausting the node. Plain scans stream.
    let holds_rows = cmd.aggregate.is_some() || policy.k_anonymity.is_some();
    let ctx = match holds_rows {
        true => {
            let ctx = governed_session(limited_runtime(&node.stores, node.sql.memory_limit_mb)?);
            ctx.register_table(cmd.dataset.as_str(), Arc::new(table))?;
            ctx
        }
        false => guarded_context(&node.stores, vec![(cmd.dataset.clone(), table)])?,
    };
    if cmd.parts.is_some() {
        // Parts deal rows round-robin: one partition makes the row sequence the same at
        // every DoGet (and for resumed tickets).
        ctx.state_ref()
            .write()
            .config_mut()
            .options_mut()
            .execution
            .target_partitions = 1;
    }
    let mut df = ctx.table(cmd.dataset.as_str()).await?;
    if !filled.is_empty() {
        use datafusion::common::{Column, ScalarValue};
        use datafusion::prelude::{Expr, lit};
        let mut exprs: Vec<Expr> = released
            .fields()
            .iter()
            .map(|f| Expr::Column(Column::from_name(f.name())))
            .collect();
        for (name, ty) in &filled {
            exprs.push(lit(ScalarValue::try_from(ty)?).alias(name));
        }
        df = df.select(exprs)?;
    }
    if cmd.filter.is_some() && cmd.aggregate.is_none() && policy.k_anonymity.is_some() {
        // The filter sees only rows the unfiltered stream releases (behind a barrier it cannot
        // cross): a filter that fails on a row the floor suppresses would otherwise tell that
        // the row exists. The floor after the filter (below) then counts the filtered stream,
        // as before: rows the first floor removes are rare in any filtered stream too.
        let state = ctx.state();
        df = DataFrame::new(
            state,
            passerelle_policies::enforce::k_floor_scans(df.into_unoptimized_plan())?,
        );
    }
    if let Some(filter) = &cmd.filter {
        let expr = df.parse_sql_expr(filter).map_err(|e| {
            Error::invalid(
                format!("filter is not valid here: {}", e.strip_backtrace()),
                "write a SQL boolean expression over the columns you may see",
            )
        })?;
        df = df.filter(expr).map_err(|e| {
            Error::invalid(
                format!("filter is not valid here: {}", e.strip_backtrace()),
                "the filter must be a boolean expression",
            )
        })?;
    }
    if let Some(agg) = &cmd.aggregate {
        df = aggregate(ctx.state(), df, agg)?;
    } else {
        // The floor counts what this stream releases: after the caller's filter, before the
        // column selection (quasi-identifiers count even when not requested).
        df = passerelle_policies::enforce::k_floor(df, &policy)?;
    }
    if let Some(cols) = &cmd.columns {
        let names: Vec<&str> = cols.iter().map(String::as_str).collect();
        df = df.select_columns(&names)?;
    }
    if let Some(limit) = cmd.limit {
        df = df.limit(0, Some(usize::try_from(limit).unwrap_or(usize::MAX)))?;
    }
    let schema = Arc::new(df.schema().as_arrow().clone());
    Ok(PlannedQuery {
        df,
        schema,
        counters,
        reason: if filled.is_empty() {
            reason
        } else {
            let names: Vec<&str> = filled.iter().map(|(n, _)| n.as_str()).take(8).collect();
            let more = filled.len() - names.len();
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            format!(
                "{reason}; not sent by this node, answered as nulls: {}{more}",
                names.join(", ")
            )
        },
        consent_version,
    })
}

/// Groups `df` as `agg` asks, under the same release rules as SQL: an aggregates-only dataset
/// gets its group floor (and refuses `min`/`max`), a k-anonymity floor counts the scan.
fn aggregate(state: datafusion::execution::SessionState, df: DataFrame, agg: &AggregateSpec) -> Result<DataFrame> {
    let groups = agg
        .group_by
        .iter()
        .map(|c| datafusion::logical_expr::Expr::Column(datafusion::common::Column::from_name(c)))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let measures = agg
        .measures
        .iter()
        .filter(|m| seen.insert(m.name()))
        .map(Measure::expr)
        .collect::<Result<Vec<_>>>()?;
    let plan = df
        .aggregate(groups, measures)
        .map_err(|e| {
            Error::invalid(
                format!("aggregate is not valid here: {}", e.strip_backtrace()),
                AGGREGATE_HINT,
            )
        })?
        .into_unoptimized_plan();
    let plan = passerelle_policies::enforce::k_floor_scans(passerelle_policies::enforce::enforce_release(plan)?)?;
    passerelle_policies::enforce::check_fallible(&state, &plan)?;
    Ok(DataFrame::new(state, plan))
}

/// Datasets the caller may see and use for the purpose, by name, decided without opening their
/// sources (a broken source is reported when the dataset is asked for).
pub fn allowed_datasets(node: &Node, principal: &Principal, purpose: &Purpose) -> Vec<String> {
    let snap = node.snapshot();
    let now = Utc::now();
    snap.datasets
        .keys()
        .filter(|name| {
            snap.visible_dataset(principal, name)
                .ok()
                .and_then(|m| snap.authorizer.decide(principal, &m.policy(), purpose, now).ok())
                .is_some_and(|d| d.allow)
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_commands_parse_and_are_checked() {
        let cmd = DataCommand::from_json(
            br#"{"dataset": "d", "filter": "x > 1", "aggregate": {"group_by": ["g"],
                "measures": [{"func": "count"}, {"func": "avg", "column": "x"}]}}"#,
        )
        .unwrap();
        let agg = cmd.aggregate.unwrap();
        assert_eq!(agg.columns(), vec!["g", "x"]);
        assert_eq!(agg.describe(), "GROUP BY g: count(*), avg(x)");
        for bad in [
            r#"{"dataset": "d", "aggregate": {"measures": []}}"#,
            r#"{"dataset": "d", "columns": ["x"], "aggregate": {"measures": [{"func": "count"}]}}"#,
            r#"{"dataset": "d", "parts": 2, "aggregate": {"measures": [{"func": "count"}]}}"#,
            r#"{"dataset": "d", "aggregate": {"measures": [{"func": "median", "column": "x"}]}}"#,
            r#"{"dataset": "d", "aggregate": {"measures": [{"func": "count", "col": "x"}]}}"#,
        ] {
            assert!(DataCommand::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
        let needs_column = Measure {
            func: MeasureFn::Sum,
            column: None,
        };
        assert!(needs_column.expr().is_err());
    }
}
