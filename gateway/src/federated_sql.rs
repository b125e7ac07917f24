//! Federated datasets as SQL tables at the home node: `SELECT … FROM eu_diabetes` scans this
//! node's part through its own gate and each peer's part through the peer's gate (a governed
//! Flight stream requested on the principal's behalf with an assertion). Columns and filters are
//! pushed to every node, so each sends only the columns used and the rows that pass the
//! filter; joins, aggregates and sorts then run here on governed rows only.
//!
//! An `Aggregate` directly over a federated table (through filters, plain projections and
//! aliases) with `count`, `sum`, `avg`, `min` and `max` is pushed down instead
//! ([`push_aggregates`]): every node groups its own governed rows (applying its own group floor
//! when it releases aggregates only) and sends one row per group; the home node combines the
//! partial results (sums of counts and sums, `avg` as sum over count, min of mins). So an
//! aggregates-only part answers a federated `GROUP BY` and no row of it leaves its node, while
//! a raw scan of it is refused, naming the node. A group below a node's floor is missing from
//! that node's partials only: totals then count the groups each node may release.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_flight::Ticket;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DataFusionError, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::error::Result as DfResult;
use datafusion::execution::TaskContext;
use datafusion::functions_aggregate::expr_fn::{max, min, sum};
use datafusion::logical_expr::{
    Aggregate, Expr, LogicalPlan, LogicalPlanBuilder, TableProviderFilterPushDown, cast, lit, when,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use datafusion::prelude::DataFrame;
use futures::{StreamExt, TryStreamExt};
use passerelle_policies::{Principal, Purpose};

use crate::catalog::{self, AggregateSpec, DataCommand, Measure, MeasureFn};
use crate::error::{Error, Result};
use crate::federation::{ClientTls, Peer, ask_peer, on_behalf, peer_schema};
use crate::node::Node;

/// A federated dataset as a table.
#[derive(Debug, Clone)]
pub struct FederatedTable {
    node: Arc<Node>,
    principal: Principal,
    purpose: Purpose,
    name: String,
    schema: SchemaRef,
}

/// One node's contribution to a scan.
#[derive(Clone)]
enum Source {
    /// This node's part, planned through its gate.
    Local(DataFrame),
    /// One endpoint of a peer's part.
    Remote {
        peer: Peer,
        tls: Option<ClientTls>,
        assertion: String,
        purpose: String,
        ticket: Ticket,
        timeout: Duration,
    },
}

fn external(e: Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// What `gather` asks each node for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// The post-policy schema only (GetSchema; aggregates-only parts answer it too).
    Schema,
    /// Rows, or groups when the command carries an aggregate.
    Data,
}

/// Every node's part of `cmd.dataset` for this principal: the merged (nullable) schema and, for
/// `Ask::Data`, the sources. Any node that refuses or does not answer fails the scan, naming it;
/// nodes without a part are left out.
async fn gather(
    node: &Arc<Node>,
    principal: &Principal,
    purpose: &Purpose,
    cmd: DataCommand,
    ask: Ask,
) -> Result<(SchemaRef, Vec<Source>)> {
    let name = cmd.dataset.clone();
    let mut schemas = Vec::new();
    let mut sources = Vec::new();
    let mut failures = Vec::new();
    // Every node found the request itself invalid (a bad filter or aggregate): say so as such.
    let mut invalid = true;
    if let Some(local) = node.snapshot().federated_dataset(&name).filter(|l| *l != name) {
        let local_cmd = DataCommand {
            dataset: local,
            ..cmd.clone()
        };
        match catalog::plan_for(node, principal, purpose, &local_cmd, ask == Ask::Schema).await {
            Ok(planned) => {
                schemas.push(planned.schema.as_ref().clone());
                if ask == Ask::Data {
                    sources.push(Source::Local(planned.df));
                }
            }
            Err(e) => {
                invalid &= e.status() == crate::error::StatusClass::InvalidArgument;
                failures.push(format!("{}: {}", node.node_id(), e.public_message()));
            }
        }
    }
    let timeout = Duration::from_secs(node.federation.peer_timeout_secs.max(1));
    let body = serde_json::to_value(&cmd).map_err(|e| Error::Internal(e.to_string()))?;
    let tls = node.client_tls.as_ref();
    let asks = node.peers.iter().map(|peer| {
        let assertion = node.assert_for(peer, principal, purpose.as_str(), Some(&name));
        let body = &body;
        async move {
            let answer = match (&assertion, ask) {
                (Err(e), _) => Err(("unavailable".to_string(), e.to_string())),
                (Ok(a), Ask::Schema) => peer_schema(peer, tls, timeout, body, purpose.as_str(), a)
                    .await
                    .map(|s| (s, Vec::new())),
                (Ok(a), Ask::Data) => match ask_peer(peer, tls, timeout, body, purpose.as_str(), a).await {
                    Ok(info) => match info.clone().try_decode_schema() {
                        Ok(schema) => Ok((schema, info.endpoint)),
                        Err(e) => Err(("unavailable".to_string(), format!("unreadable answer: {e}"))),
                    },
                    Err(e) => Err(e),
                },
            };
            (peer, assertion, answer)
        }
    });
    for (peer, assertion, answer) in futures::future::join_all(asks).await {
        match (answer, assertion) {
            (Ok((schema, endpoints)), Ok(assertion)) => {
                schemas.push(schema);
                for ep in endpoints {
                    let Some(ticket) = ep.ticket else { continue };
                    sources.push(Source::Remote {
                        peer: peer.clone(),
                        tls: node.client_tls.clone(),
                        assertion: assertion.clone(),
                        purpose: purpose.to_string(),
                        ticket,
                        timeout,
                    });
                }
            }
            (Err((kind, _)), _) if kind == "absent" => {}
            (Err((kind, reason)), _) => {
                invalid &= kind == "refused";
                failures.push(format!("{} {kind}: {reason}", peer.node_id));
            }
            (_, Err(e)) => {
                invalid = false;
                failures.push(format!("{}: {e}", peer.node_id));
            }
        }
    }
    if !failures.is_empty() && invalid {
        return Err(Error::invalid(
            format!(
                "{} refused the request on `{name}`: {}",
                if schemas.is_empty() { "every node" } else { "a node" },
                failures.join("; ")
            ),
            "correct the query (each node names what it could not use)",
        ));
    }
    if !failures.is_empty() {
        return Err(Error::PermissionDenied {
            reason: format!(
                "federated dataset `{name}` cannot be read whole: {}",
                failures.join("; ")
            ),
        });
    }
    if schemas.is_empty() {
        return Err(Error::DatasetNotFound { name });
    }
    let merged = Schema::try_merge(schemas).map_err(|e| {
        Error::invalid(
            format!("the nodes' parts of `{name}` disagree on column types: {e}"),
            "ask the stewards to align the column types of their parts",
        )
    })?;
    Ok((nullable(&merged), sources))
}

/// The columns of the federated table a request uses (`names`), with their types, sent with it
/// so that a node that does not send one answers with nulls in it: the same rows, groups and
/// filter results as if the home node had filled the column in after a raw scan. Only the
/// columns used travel (peers learn nothing of the rest), and only flat types
/// ([`catalog::fill_type`]; a dictionary as its value type): a node asked for another
/// column it lacks refuses the request, naming it.
pub(crate) fn fill_nulls(schema: &Schema, names: impl IntoIterator<Item = String>) -> BTreeMap<String, String> {
    names
        .into_iter()
        .filter_map(|name| {
            let field = schema.field_with_name(&name).ok()?;
            let ty = match field.data_type() {
                DataType::Dictionary(_, v) => v.as_ref().clone(),
                other => other.clone(),
            }
            .to_string();
            catalog::fill_type(&name, &ty).ok()?;
            Some((name, ty))
        })
        .collect()
}

/// Names of the columns `exprs` refer to.
fn referenced(exprs: &[Expr]) -> Vec<String> {
    exprs
        .iter()
        .flat_map(|e| e.column_refs().into_iter().map(|c| c.name.clone()).collect::<Vec<_>>())
        .collect()
}

/// A column one node withholds (or a group a node lacks) is null in that node's rows.
fn nullable(schema: &Schema) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    Arc::new(Schema::new(fields))
}

impl FederatedTable {
    /// The table if `name` is a federated dataset some node answers for.
    pub async fn open(node: &Arc<Node>, principal: &Principal, purpose: &Purpose, name: &str) -> Result<Self> {
        let cmd = DataCommand {
            dataset: name.to_string(),
            ..Default::default()
        };
        let (schema, _) = gather(node, principal, purpose, cmd, Ask::Schema).await?;
        Ok(Self {
            node: Arc::clone(node),
            principal: principal.clone(),
            purpose: purpose.clone(),
            name: name.to_string(),
            schema,
        })
    }
}

/// SQL text of the filters, with columns unqualified (each node names its table differently);
/// `None` if a filter cannot be written as SQL (it is then applied here only).
fn filter_sql(filters: &[Expr]) -> Option<String> {
    let conjunction = filters.iter().cloned().reduce(Expr::and)?;
    // A correlated subquery's outer column means nothing at a node: applied here only.
    if conjunction
        .exists(|e| Ok(matches!(e, Expr::OuterReferenceColumn(..))))
        .unwrap_or(true)
    {
        return None;
    }
    let unqualified = conjunction
        .transform(|e| match e {
            Expr::Column(c) => Ok(Transformed::yes(Expr::Column(Column::new_unqualified(c.name)))),
            // The unparser writes NaN and infinities as bare words a node would read as columns.
            Expr::Literal(ScalarValue::Float64(Some(v)), _) if !v.is_finite() => {
                Ok(Transformed::yes(cast(lit(non_finite(v)), DataType::Float64)))
            }
            Expr::Literal(ScalarValue::Float32(Some(v)), _) if !v.is_finite() => {
                Ok(Transformed::yes(cast(lit(non_finite(f64::from(v))), DataType::Float32)))
            }
            other => Ok(Transformed::no(other)),
        })
        .ok()?
        .data;
    datafusion::sql::unparser::expr_to_sql(&unqualified)
        .ok()
        .map(|e| e.to_string())
}

/// SQL text DataFusion casts back to the non-finite float `v`.
fn non_finite(v: f64) -> &'static str {
    if v.is_nan() {
        "NaN"
    } else if v > 0.0 {
        "inf"
    } else {
        "-inf"
    }
}

#[async_trait]
impl TableProvider for FederatedTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Filters go to every node and are applied here again (they may not unparse).
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let target = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => Arc::clone(&self.schema),
        };
        let columns = projection
            .filter(|p| !p.is_empty())
            .map(|p| p.iter().map(|&i| self.schema.field(i).name().clone()).collect());
        let fill = fill_nulls(
            &self.schema,
            columns.iter().flatten().cloned().chain(referenced(filters)),
        );
        let cmd = DataCommand {
            dataset: self.name.clone(),
            columns,
            filter: filter_sql(filters),
            fill_nulls: Some(fill),
            ..Default::default()
        };
        let (_, sources) = gather(&self.node, &self.principal, &self.purpose, cmd, Ask::Data)
            .await
            .map_err(external)?;
        streaming(target, sources, limit)
    }
}

/// One partition per source, each adapted to `target`.
fn streaming(target: SchemaRef, sources: Vec<Source>, limit: Option<usize>) -> DfResult<Arc<dyn ExecutionPlan>> {
    let partitions: Vec<Arc<dyn PartitionStream>> = sources
        .into_iter()
        .map(|source| {
            Arc::new(PartStream {
                schema: Arc::clone(&target),
                source,
            }) as Arc<dyn PartitionStream>
        })
        .collect();
    Ok(Arc::new(StreamingTableExec::try_new(
        target,
        partitions,
        None,
        Vec::new(),
        false,
        limit,
    )?))
}

/// Accepts federated scans in governed plans (see `sql::check_guarded`).
pub fn is_federated(provider: &dyn TableProvider) -> bool {
    provider.downcast_ref::<FederatedTable>().is_some() || provider.downcast_ref::<FederatedAggregate>().is_some()
}

/// One source, adapted to the scan's schema.
struct PartStream {
    schema: SchemaRef,
    source: Source,
}

impl std::fmt::Debug for PartStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PartStream")
    }
}

impl PartitionStream for PartStream {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let target = Arc::clone(&self.schema);
        let source = self.source.clone();
        let batches = futures::stream::once(open(source)).try_flatten();
        let adapted = batches.map(move |b| b.and_then(|b| adapt(&b, &target)));
        Box::pin(RecordBatchStreamAdapter::new(Arc::clone(&self.schema), adapted))
    }
}

async fn open(source: Source) -> DfResult<futures::stream::BoxStream<'static, DfResult<RecordBatch>>> {
    match source {
        Source::Local(df) => Ok(df.execute_stream().await?.boxed()),
        Source::Remote {
            peer,
            tls,
            assertion,
            purpose,
            ticket,
            timeout,
        } => {
            let unavailable = |why: String| {
                external(Error::PeerUnavailable {
                    message: format!("{}: {why}", peer.node_id),
                })
            };
            let mut client = crate::federation::connect(&peer, tls.as_ref(), timeout)
                .await
                .map_err(unavailable)?;
            let req = on_behalf(ticket, &purpose, &assertion).map_err(|(_, why)| unavailable(why))?;
            let node_id = peer.node_id.clone();
            let data = client
                .do_get(req)
                .await
                .map_err(|s| unavailable(s.message().to_string()))?
                .into_inner();
            // Each message is checked before it is decoded: a peer's compressed buffer may not
            // claim more than a message may hold (see `crate::ipc`).
            let data = data.map(|m| {
                let m = m.map_err(|s| FlightError::Tonic(Box::new(s)))?;
                crate::ipc::check(&m, crate::ipc::MAX_DECOMPRESSED_MESSAGE).map_err(FlightError::ProtocolError)?;
                Ok(m)
            });
            let stream = FlightRecordBatchStream::new_from_flight_data(data).map_err(move |e| {
                external(Error::PeerUnavailable {
                    message: format!("{node_id}: the part's stream failed: {e}"),
                })
            });
            Ok(stream.boxed())
        }
    }
}

/// A node's batch in the scan's schema: columns by name, a withheld column as nulls.
fn adapt(batch: &RecordBatch, target: &SchemaRef) -> DfResult<RecordBatch> {
    let columns = target
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(Arc::clone(c)),
            Some(c) => Ok(arrow::compute::cast(c, f.data_type())?),
            None => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<DfResult<Vec<ArrayRef>>>()?;
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(target),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )?)
}

/// The partial results of a pushed-down aggregate: every node's groups, as the nodes computed
/// them (group columns, then one column per [`Measure`], named like it).
#[derive(Debug)]
pub struct FederatedAggregate {
    node: Arc<Node>,
    principal: Principal,
    purpose: Purpose,
    name: String,
    filter: Option<String>,
    spec: AggregateSpec,
    /// The federated table's columns, for `fill_nulls`.
    fill: BTreeMap<String, String>,
    schema: SchemaRef,
}

#[async_trait]
impl TableProvider for FederatedAggregate {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let target = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => Arc::clone(&self.schema),
        };
        let cmd = DataCommand {
            dataset: self.name.clone(),
            filter: self.filter.clone(),
            aggregate: Some(self.spec.clone()),
            fill_nulls: Some(self.fill.clone()),
            ..Default::default()
        };
        let (_, sources) = gather(&self.node, &self.principal, &self.purpose, cmd, Ask::Data)
            .await
            .map_err(external)?;
        streaming(target, sources, limit)
    }
}

/// How the home node combines one aggregate of the statement from the nodes' partials.
enum Combine {
    /// `count`: the sum of the counts, 0 when no node has the group.
    Count(String),
    /// `sum`, `min`, `max`: the same function over the partials.
    Same(MeasureFn, String),
    /// `avg`: the sum of the sums over the sum of the counts.
    Avg { sum: String, count: String },
}

/// Pushes every pushable `Aggregate` over a federated table down to the nodes (see the module
/// documentation). Aggregates it cannot push stay as they are, over a raw scan.
pub fn push_aggregates(plan: LogicalPlan) -> DfResult<LogicalPlan> {
    Ok(plan
        .transform_up_with_subqueries(|node| {
            let LogicalPlan::Aggregate(agg) = &node else {
                return Ok(Transformed::no(node));
            };
            match pushed(agg)? {
                Some(p) => Ok(Transformed::yes(p)),
                None => Ok(Transformed::no(node)),
            }
        })?
        .data)
}

/// The federated table below `input` through filters, plain projections and aliases, with the
/// filters met on the way; `None` for anything else.
fn federated_below(input: &LogicalPlan) -> Option<(Arc<FederatedTable>, Vec<Expr>)> {
    let mut filters = Vec::new();
    let mut plan = input;
    loop {
        match plan {
            LogicalPlan::Filter(f) => {
                filters.push(f.predicate.clone());
                plan = &f.input;
            }
            LogicalPlan::SubqueryAlias(a) => plan = &a.input,
            LogicalPlan::Projection(p) if p.expr.iter().all(|e| matches!(e, Expr::Column(_))) => plan = &p.input,
            LogicalPlan::TableScan(scan) => {
                let provider = source_as_provider(&scan.source).ok()?;
                let table = provider.downcast_ref::<FederatedTable>()?;
                filters.extend(scan.filters.iter().cloned());
                return Some((Arc::new(table.clone()), filters));
            }
            _ => return None,
        }
    }
}

/// The measure an aggregate expression asks for, if the nodes can compute and the home node
/// combine it exactly.
fn measure_of(e: &Expr) -> Option<(MeasureFn, Option<String>)> {
    let mut inner = e;
    while let Expr::Alias(a) = inner {
        inner = &a.expr;
    }
    let Expr::AggregateFunction(f) = inner else {
        return None;
    };
    let p = &f.params;
    if p.distinct || p.filter.is_some() || !p.order_by.is_empty() || p.args.len() != 1 {
        return None;
    }
    let func = match f.func.name().to_ascii_lowercase().as_str() {
        "count" => MeasureFn::Count,
        "sum" => MeasureFn::Sum,
        "avg" | "mean" => MeasureFn::Avg,
        "min" => MeasureFn::Min,
        "max" => MeasureFn::Max,
        _ => return None,
    };
    match (&p.args[0], func) {
        (Expr::Column(c), _) => Some((func, Some(c.name.clone()))),
        // count(*) is count of a non-null literal.
        (Expr::Literal(v, _), MeasureFn::Count) if !v.is_null() => Some((func, None)),
        _ => None,
    }
}

/// `agg` computed by the nodes and combined here, with `agg`'s exact output schema; `None`
/// when it cannot be pushed.
fn pushed(agg: &Aggregate) -> DfResult<Option<LogicalPlan>> {
    let Some((table, filters)) = federated_below(&agg.input) else {
        return Ok(None);
    };
    if filters.iter().any(has_subquery) {
        return Ok(None);
    }
    let filter = match filters.is_empty() {
        true => None,
        false => match filter_sql(&filters) {
            Some(f) => Some(f),
            None => return Ok(None),
        },
    };
    let mut group_by = Vec::new();
    for g in &agg.group_expr {
        let Expr::Column(c) = g else { return Ok(None) };
        group_by.push(c.name.clone());
    }
    let mut measures: Vec<Measure> = Vec::new();
    let mut add = |func, column: Option<String>| {
        let m = Measure { func, column };
        let name = m.name();
        if !measures.contains(&m) {
            measures.push(m);
        }
        name
    };
    let mut combines = Vec::new();
    for (i, e) in agg.aggr_expr.iter().enumerate() {
        let Some((func, column)) = measure_of(e) else {
            return Ok(None);
        };
        let out_type = agg.schema.field(agg.group_expr.len() + i).data_type();
        combines.push(match func {
            MeasureFn::Count => Combine::Count(add(MeasureFn::Count, column)),
            MeasureFn::Avg if *out_type == DataType::Float64 => Combine::Avg {
                sum: add(MeasureFn::Sum, column.clone()),
                count: add(MeasureFn::Count, column),
            },
            MeasureFn::Avg => return Ok(None),
            f => Combine::Same(f, add(f, column)),
        });
    }
    // A GROUP BY without summaries still needs one measure per node (a hidden count).
    if measures.is_empty() {
        measures.push(Measure {
            func: MeasureFn::Count,
            column: None,
        });
    }
    let spec = AggregateSpec { group_by, measures };
    // The partials' types, as the nodes' own planners will produce them.
    let exprs = spec
        .measures
        .iter()
        .map(Measure::expr)
        .collect::<Result<Vec<_>>>()
        .map_err(external)?;
    let groups: Vec<Expr> = spec
        .group_by
        .iter()
        .map(|g| Expr::Column(Column::from_name(g)))
        .collect();
    let typed = datafusion::logical_expr::table_scan(Some("t"), &table.schema, None)?
        .aggregate(groups.clone(), exprs)?
        .build()?;
    let partial_schema = nullable(typed.schema().as_arrow());
    let fill = fill_nulls(&table.schema, referenced(&filters).into_iter().chain(spec.columns()));
    let provider = Arc::new(FederatedAggregate {
        node: Arc::clone(&table.node),
        principal: table.principal.clone(),
        purpose: table.purpose.clone(),
        name: table.name.clone(),
        filter,
        spec,
        fill,
        schema: partial_schema,
    });
    // Combine per group: sums of the partial counts and sums, min of mins, max of maxes.
    let partial = |name: &str| Expr::Column(Column::from_name(name));
    let mut finals = Vec::new();
    let mut combined = Vec::new();
    for (i, c) in combines.iter().enumerate() {
        let p = |n: usize| format!("__passerelle_partial_{i}_{n}");
        match c {
            Combine::Count(m) => {
                finals.push(sum(partial(m)).alias(p(0)));
                combined.push(when(partial(&p(0)).is_null(), lit(0i64)).otherwise(partial(&p(0)))?);
            }
            Combine::Same(f, m) => {
                let e = match f {
                    MeasureFn::Min => min(partial(m)),
                    MeasureFn::Max => max(partial(m)),
                    _ => sum(partial(m)),
                };
                finals.push(e.alias(p(0)));
                combined.push(partial(&p(0)));
            }
            Combine::Avg { sum: s, count: n } => {
                finals.push(sum(partial(s)).alias(p(0)));
                finals.push(sum(partial(n)).alias(p(1)));
                let ratio = cast(partial(&p(0)), DataType::Float64) / cast(partial(&p(1)), DataType::Float64);
                let none = lit(ScalarValue::Float64(None));
                combined.push(when(partial(&p(1)).is_null().or(partial(&p(1)).eq(lit(0i64))), none).otherwise(ratio)?);
            }
        }
    }
    let regrouped = LogicalPlanBuilder::scan(table.name.as_str(), provider_as_source(provider), None)?
        .aggregate(groups.clone(), finals)?
        .build()?;
    // The statement's own names and types, so that the plan above reads the same columns.
    let outputs = groups.into_iter().chain(combined);
    let mut projected = Vec::new();
    for (i, e) in outputs.enumerate() {
        let (qualifier, field) = agg.schema.qualified_field(i);
        projected.push(cast(e, field.data_type().clone()).alias_qualified(qualifier.cloned(), field.name()));
    }
    let plan = LogicalPlanBuilder::from(regrouped).project(projected)?.build()?;
    let same = plan.schema().fields().len() == agg.schema.fields().len()
        && plan
            .schema()
            .iter()
            .zip(agg.schema.iter())
            .all(|((q1, f1), (q2, f2))| q1 == q2 && f1.name() == f2.name() && f1.data_type() == f2.data_type());
    if !same {
        tracing::debug!("federated aggregate not pushed: the combined schema differs");
        return Ok(None);
    }
    Ok(Some(plan))
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, TimeUnit};

    /// Nodes parse the types `fill_nulls` prints: every flat type comes back whole.
    #[test]
    fn fill_nulls_types_round_trip() {
        let types = [
            DataType::Utf8,
            DataType::LargeUtf8,
            DataType::Utf8View,
            DataType::Int64,
            DataType::Float64,
            DataType::Boolean,
            DataType::Date32,
            DataType::Timestamp(TimeUnit::Microsecond, None),
            DataType::Timestamp(TimeUnit::Nanosecond, Some("Europe/Paris".into())),
            DataType::Decimal128(12, 3),
            DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
        ];
        let fields: Vec<Field> = types
            .iter()
            .enumerate()
            .map(|(i, t)| Field::new(format!("c{i}"), t.clone(), true))
            .collect();
        let schema = Schema::new(fields);
        let fill = fill_nulls(&schema, schema.fields().iter().map(|f| f.name().clone()));
        assert_eq!(fill.len(), types.len());
        for (i, t) in types.iter().enumerate() {
            let printed = &fill[&format!("c{i}")];
            let want = match t {
                DataType::Dictionary(_, v) => v.as_ref(),
                t => t,
            };
            assert_eq!(&printed.parse::<DataType>().unwrap(), want, "{printed}");
        }
        // Nested types and unknown names do not travel.
        let nested = Schema::new(vec![Field::new_list(
            "l",
            Field::new_list_field(DataType::Int64, true),
            true,
        )]);
        assert!(fill_nulls(&nested, ["l".to_string(), "nowhere".to_string()]).is_empty());
    }
}
