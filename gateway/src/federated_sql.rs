//! Federated datasets as SQL tables at the home node: `SELECT … FROM eu_diabetes` scans this
//! node's part through its own gate and each peer's part through the peer's gate (a governed
//! Flight stream requested on the principal's behalf with an assertion). Columns and filters are
//! pushed to every node, so each sends only the columns used and the rows that pass the
//! filter; joins, aggregates and sorts then run here on governed rows only.
//!
//! Peers serve no raw rows of an aggregates-only part: such a node refuses, and the query fails
//! naming it (aggregate push-down to peers is not done yet).

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions, new_null_array};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow_flight::Ticket;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DataFusionError};
use datafusion::datasource::TableType;
use datafusion::error::Result as DfResult;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use datafusion::prelude::DataFrame;
use futures::{StreamExt, TryStreamExt};
use passerelle_policies::{Principal, Purpose};
use tonic::metadata::MetadataValue;

use crate::catalog::{self, DataCommand};
use crate::error::{Error, Result};
use crate::federation::{ASSERTION_HEADER, ClientTls, Peer, ask_peer};
use crate::node::Node;

/// A federated dataset as a table.
#[derive(Debug)]
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

/// Every node's part of `name` for this principal, with `columns` and `filter`: the merged
/// (nullable) schema and the sources. Any node that refuses or does not answer fails the scan,
/// naming it; nodes without a part are left out.
async fn gather(
    node: &Arc<Node>,
    principal: &Principal,
    purpose: &Purpose,
    name: &str,
    columns: Option<Vec<String>>,
    filter: Option<String>,
) -> Result<(SchemaRef, Vec<Source>)> {
    let cmd = DataCommand {
        dataset: name.to_string(),
        columns,
        filter,
        ..Default::default()
    };
    let mut schemas = Vec::new();
    let mut sources = Vec::new();
    let mut failures = Vec::new();
    if let Some(local) = node.snapshot().federated_dataset(name).filter(|l| l != name) {
        let local_cmd = DataCommand {
            dataset: local,
            ..cmd.clone()
        };
        match catalog::plan(node, principal, purpose, &local_cmd).await {
            Ok(planned) => {
                schemas.push(planned.schema.as_ref().clone());
                sources.push(Source::Local(planned.df));
            }
            Err(e) => failures.push(format!("{}: {}", node.node_id(), e.public_message())),
        }
    }
    let timeout = Duration::from_secs(node.federation.peer_timeout_secs.max(1));
    let body = serde_json::to_value(&cmd).map_err(|e| Error::Internal(e.to_string()))?;
    let asks = node.peers.iter().map(|peer| {
        let assertion = node.assert_for(peer, principal, purpose.as_str());
        let body = &body;
        async move {
            let answer = match &assertion {
                Ok(a) => ask_peer(peer, node.client_tls.as_ref(), timeout, body, purpose.as_str(), a).await,
                Err(e) => Err(("unavailable".to_string(), e.to_string())),
            };
            (peer, assertion, answer)
        }
    });
    for (peer, assertion, answer) in futures::future::join_all(asks).await {
        match (answer, assertion) {
            (Ok(info), Ok(assertion)) => match info.clone().try_decode_schema() {
                Ok(schema) => {
                    schemas.push(schema);
                    for ep in info.endpoint {
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
                Err(e) => failures.push(format!("{}: unreadable answer: {e}", peer.node_id)),
            },
            (Err((kind, _)), _) if kind == "absent" => {}
            (Err((kind, reason)), _) => failures.push(format!("{} {kind}: {reason}", peer.node_id)),
            (_, Err(e)) => failures.push(format!("{}: {e}", peer.node_id)),
        }
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
        return Err(Error::DatasetNotFound { name: name.to_string() });
    }
    let merged = Schema::try_merge(schemas).map_err(|e| {
        Error::invalid(
            format!("the nodes' parts of `{name}` disagree on column types: {e}"),
            "ask the stewards to align the column types of their parts",
        )
    })?;
    // A column one node withholds is null in that node's rows.
    let fields: Vec<Field> = merged
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    Ok((Arc::new(Schema::new(fields)), sources))
}

impl FederatedTable {
    /// The table if `name` is a federated dataset some node answers for.
    pub async fn open(node: &Arc<Node>, principal: &Principal, purpose: &Purpose, name: &str) -> Result<Self> {
        let (schema, _) = gather(node, principal, purpose, name, None, None).await?;
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
    let unqualified = conjunction
        .transform(|e| match e {
            Expr::Column(c) => Ok(Transformed::yes(Expr::Column(Column::new_unqualified(c.name)))),
            other => Ok(Transformed::no(other)),
        })
        .ok()?
        .data;
    datafusion::sql::unparser::expr_to_sql(&unqualified)
        .ok()
        .map(|e| e.to_string())
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
        let (_, sources) = gather(
            &self.node,
            &self.principal,
            &self.purpose,
            &self.name,
            columns,
            filter_sql(filters),
        )
        .await
        .map_err(external)?;
        let partitions: Vec<Arc<dyn PartitionStream>> = sources
            .into_iter()
            .map(|source| {
                Arc::new(PartStream {
                    schema: Arc::clone(&target),
                    source,
                }) as Arc<dyn PartitionStream>
            })
            .collect();
        let exec = StreamingTableExec::try_new(target, partitions, None, Vec::new(), false, limit)?;
        Ok(Arc::new(exec))
    }
}

/// Accepts `FederatedTable` scans in governed plans (see `sql::check_guarded`).
pub fn is_federated(provider: &dyn TableProvider) -> bool {
    provider.downcast_ref::<FederatedTable>().is_some()
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
            let mut req = tonic::Request::new(ticket);
            let md = req.metadata_mut();
            md.insert(
                crate::flight::PURPOSE_HEADER,
                MetadataValue::try_from(purpose.as_str()).map_err(|_| unavailable("bad purpose".into()))?,
            );
            md.insert(
                ASSERTION_HEADER,
                MetadataValue::try_from(assertion.as_str()).map_err(|_| unavailable("bad assertion".into()))?,
            );
            let node_id = peer.node_id.clone();
            let data = client
                .do_get(req)
                .await
                .map_err(|s| unavailable(s.message().to_string()))?
                .into_inner();
            let stream =
                FlightRecordBatchStream::new_from_flight_data(data.map_err(|s| FlightError::Tonic(Box::new(s))))
                    .map_err(move |e| {
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
