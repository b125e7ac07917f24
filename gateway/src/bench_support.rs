//! Bench-only: stream a dataset's raw rows (direct identifiers excepted) over the same Flight
//! encoder without the gate, as the baseline for the governed stream. Compiled only with
//! `--features bench`, and even then answered only once the in-process bench sets
//! `Node::bench_unguarded` (no flag or configuration does): the shipped binary has no such path.

use std::sync::Arc;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use passerelle_policies::ColumnClass;
use tonic::{Response, Status};

use crate::catalog::source_context;
use crate::error::Error;
use crate::node::Node;

/// Tickets starting with this prefix name a dataset to stream unguarded.
pub const UNGUARDED_PREFIX: &[u8] = b"bench-unguarded:";

/// Streams the raw dataset named by `name`.
pub async fn unguarded_do_get(
    node: &Node,
    name: &[u8],
) -> Result<Response<BoxStream<'static, Result<arrow_flight::FlightData, Status>>>, Status> {
    let name = std::str::from_utf8(name).map_err(|_| Status::invalid_argument("dataset name is not UTF-8"))?;
    let manifest = node
        .snapshot()
        .datasets
        .get(name)
        .cloned()
        .ok_or_else(|| Status::not_found(name.to_string()))?;
    let ctx = source_context(&node.stores)?;
    let raw = passerelle_connectors::open(&ctx.state(), &manifest.source())
        .await
        .map_err(Error::from)?;
    ctx.register_table("raw", raw).map_err(Error::from)?;
    let cols: Vec<&str> = manifest
        .columns
        .iter()
        .filter(|(_, c)| c.class != ColumnClass::DirectIdentifier)
        .map(|(n, _)| n.as_str())
        .collect();
    let df = ctx
        .table("raw")
        .await
        .map_err(Error::from)?
        .select_columns(&cols)
        .map_err(Error::from)?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let stream = df.execute_stream().await.map_err(Error::from)?;
    let encoded = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(stream.map_err(|e| FlightError::ExternalError(Box::new(e))))
        .map_err(|e| Status::internal(e.to_string()));
    Ok(Response::new(encoded.boxed()))
}
