//! Flight SQL on the plain Flight port: statements, prepared statements with Arrow-bound
//! parameters, and catalog metadata, all for one caller and purpose.
//!
//! Statement handles and tickets are signed claims (see `ticket`) carrying the SQL text and its
//! parameters: the server keeps no per-statement state, every `DoGet` re-plans the statement
//! under the policy, consent and limits in force at that moment, and any replica can serve it.
//! Commands not listed in `action_types` answer `UNIMPLEMENTED` (ADBC relies on that code).

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    Any, CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandPreparedStatementQuery, CommandStatementQuery, CommandStatementUpdate, DoPutPreparedStatementResult,
    ProstMessageExt, SqlInfo, SqlSupportedCaseSensitivity, SqlSupportedTransaction, TicketStatementQuery,
};
use arrow_flight::{Action, ActionType, FlightDescriptor, FlightEndpoint, FlightInfo, IpcMessage, SchemaAsIpc, Ticket};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use datafusion::common::{ParamValues, ScalarValue};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::audit;
use crate::error::{Error, Result};
use crate::flight::{AuditedStream, Caller, Target, caller, record};
use crate::node::Node;
use crate::sql::{self, CATALOG, LimitedStream, PlannedSql, SCHEMA};
use crate::ticket::{SqlClaim, TicketClaims};

/// Prefix of every Flight SQL message type.
const SQL_TYPE_PREFIX: &str = "type.googleapis.com/arrow.flight.protocol.sql.";

/// How long a prepared-statement handle stays valid.
const HANDLE_TTL_SECS: i64 = 24 * 3600;

type DoGetStream = <SqlService as FlightService>::DoGetStream;
type DoActionStream = <SqlService as FlightService>::DoActionStream;

/// Whether `bytes` is a Flight SQL command or ticket (a protobuf `Any` of a Flight SQL type);
/// plain Flight tickets and JSON commands are not.
pub fn is_sql_command(bytes: &[u8]) -> bool {
    Any::decode(bytes).is_ok_and(|a| a.type_url.starts_with(SQL_TYPE_PREFIX))
}

/// The actions the gateway offers (ListActions).
pub fn action_types() -> Vec<ActionType> {
    vec![
        ActionType {
            r#type: "CreatePreparedStatement".into(),
            description: "Plans a query under the caller's policy and returns a signed handle.\nRequest: ActionCreatePreparedStatementRequest\nResponse: ActionCreatePreparedStatementResult".into(),
        },
        ActionType {
            r#type: "ClosePreparedStatement".into(),
            description: "Releases a prepared statement (handles are stateless; always succeeds for a valid handle).\nRequest: ActionClosePreparedStatementRequest".into(),
        },
    ]
}

/// The Flight SQL half of the Flight service.
#[derive(Debug, Clone)]
pub struct SqlService {
    node: Arc<Node>,
}

fn encode_schema(schema: &Schema) -> Result<prost::bytes::Bytes> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: arrow::error::ArrowError| Error::Internal(format!("encode schema: {e}")))?;
    Ok(bytes)
}

fn batch_stream(schema: SchemaRef, batch: RecordBatch) -> DoGetStream {
    FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::once(async move { Ok(batch) }))
        .map_err(|e: FlightError| Status::from(Error::Internal(format!("encode metadata: {e}"))))
        .boxed()
}

fn metadata_error(e: FlightError) -> Error {
    Error::Internal(format!("build metadata: {e}"))
}

/// Parameters as a one-row Arrow IPC stream, base64url (carried in handles).
fn encode_params(batch: &RecordBatch) -> Result<String> {
    let mut buf = Vec::new();
    let mut w = StreamWriter::try_new(&mut buf, &batch.schema())?;
    w.write(batch)?;
    w.finish()?;
    drop(w);
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

fn decode_params(text: &str) -> Result<ParamValues> {
    let bad = || Error::invalid("prepared-statement parameters are corrupt", "bind the parameters again");
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?;
    let mut reader = StreamReader::try_new(std::io::Cursor::new(bytes), None).map_err(|_| bad())?;
    let batch = reader.next().ok_or_else(bad)?.map_err(|_| bad())?;
    let values = batch
        .columns()
        .iter()
        .map(|c| ScalarValue::try_from_array(c, 0))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(ParamValues::from(values))
}

const PARAMETERS_HINT: &str = "bind parameters as one Arrow record batch with one row";

/// Reads the parameters a client binds: one row, in at most `max_bytes` of Arrow IPC (the
/// statement's own limit, `sql.max_statement_bytes`: the values end up in the handle beside
/// the SQL). Every message is checked before it is decoded ([`crate::ipc::check`]), and reading
/// stops at the first message past a limit, so a client cannot make the node hold or
/// decompress more than that.
async fn read_parameters(input: PeekableFlightDataStream, max_bytes: usize) -> Result<RecordBatch> {
    let too_big = move |n: usize| {
        Error::invalid(
            format!(
                "the bound parameters reach {n} bytes of Arrow data, more than sql.max_statement_bytes = {max_bytes}"
            ),
            "bind smaller values (the parameters travel in the statement handle)",
        )
    };
    let mut seen = 0usize;
    let checked = input.map(move |m| {
        let data = m.map_err(|s| FlightError::Tonic(Box::new(s)))?;
        seen = seen.saturating_add(data.data_header.len() + data.data_body.len() + data.app_metadata.len());
        if seen > max_bytes {
            return Err(FlightError::ExternalError(Box::new(too_big(seen))));
        }
        crate::ipc::check(&data, max_bytes as u64).map_err(|why| {
            FlightError::ExternalError(Box::new(Error::invalid(
                format!("the bound parameters are refused: {why} (sql.max_statement_bytes = {max_bytes})"),
                PARAMETERS_HINT,
            )))
        })?;
        Ok(data)
    });
    let mut batches = FlightRecordBatchStream::new_from_flight_data(checked);
    let mut row: Option<RecordBatch> = None;
    let mut rows = 0usize;
    while let Some(next) = batches.next().await {
        let batch = next.map_err(|e| match e {
            FlightError::ExternalError(inner) => match inner.downcast::<Error>() {
                Ok(ours) => *ours,
                Err(other) => Error::invalid(
                    format!("parameters are not a valid Arrow stream: {other}"),
                    PARAMETERS_HINT,
                ),
            },
            other => Error::invalid(
                format!("parameters are not a valid Arrow stream: {other}"),
                PARAMETERS_HINT,
            ),
        })?;
        rows = rows.saturating_add(batch.num_rows());
        if rows > 1 {
            // Stop reading: the rest of the stream is not wanted.
            return Err(Error::invalid(
                "more than one parameter row was bound; exactly one row is supported",
                "execute the statement once per set of parameters",
            ));
        }
        if batch.num_rows() == 1 {
            row = Some(batch);
        }
    }
    row.ok_or_else(|| {
        Error::invalid(
            "0 parameter rows were bound; exactly one row is supported",
            "execute the statement once per set of parameters",
        )
    })
}

/// Static server facts for CommandGetSqlInfo.
fn sql_info() -> Result<SqlInfoData> {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "Passerelle");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, "1.5");
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(
        SqlInfo::FlightSqlServerTransaction,
        SqlSupportedTransaction::None as i32,
    );
    b.append(SqlInfo::FlightSqlServerCancel, false);
    b.append(SqlInfo::SqlDdlCatalog, false);
    b.append(SqlInfo::SqlDdlSchema, false);
    b.append(SqlInfo::SqlDdlTable, false);
    b.append(
        SqlInfo::SqlIdentifierCase,
        SqlSupportedCaseSensitivity::SqlCaseSensitivityLowercase as i32,
    );
    b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    b.append(
        SqlInfo::SqlQuotedIdentifierCase,
        SqlSupportedCaseSensitivity::SqlCaseSensitivityCaseInsensitive as i32,
    );
    b.append(SqlInfo::SqlAllTablesAreSelectable, true);
    b.build().map_err(|e| Error::Internal(format!("build SqlInfo: {e}")))
}

impl SqlService {
    /// The Flight SQL service of a node.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// Authenticates; an unauthenticated attempt is audited. Peers' principals read federated
    /// parts over plain Flight only: SQL here is for this node's own principals.
    async fn authenticated(&self, md: &MetadataMap, action: audit::Action) -> Result<Caller> {
        match caller(&self.node, md) {
            Ok(c) if c.federated.is_some() => {
                let e = Error::PermissionDenied {
                    reason: "a peer node's principal reads its federated part over Flight, not SQL; query the federated dataset at your home node".into(),
                };
                record(&self.node, md, Some(&c), action, &Target::default(), Err(&e), true).await?;
                Err(e)
            }
            Ok(c) => Ok(c),
            Err(e) => {
                record(&self.node, md, None, action, &Target::default(), Err(&e), true).await?;
                Err(e)
            }
        }
    }

    /// Signs a statement for this caller: a prepared-statement handle or a DoGet ticket.
    fn sign(&self, caller: &Caller, claim: SqlClaim, ttl_secs: i64) -> Result<Vec<u8>> {
        self.node.tickets.sign(&TicketClaims {
            principal: caller.principal.name.clone(),
            purpose: caller.purpose.to_string(),
            dataset: String::new(),
            columns: None,
            filter: None,
            limit: None,
            exp: chrono::Utc::now().timestamp() + ttl_secs,
            nonce: rand::random(),
            sql: Some(claim),
            ..self.node.claims_for(&caller.principal)
        })
    }

    /// Verifies a handle or ticket and that it was issued to this caller for this purpose.
    fn open(&self, caller: &Caller, bytes: &[u8]) -> Result<SqlClaim> {
        let claims = self.node.tickets.verify(bytes, chrono::Utc::now().timestamp())?;
        if claims.principal != caller.principal.name {
            return Err(Error::PermissionDenied {
                reason: "statement handle was issued to another principal".into(),
            });
        }
        if claims.purpose != caller.purpose.as_str() {
            return Err(Error::PermissionDenied {
                reason: format!(
                    "statement handle was issued for purpose `{}`; declare the same purpose to use it",
                    claims.purpose
                ),
            });
        }
        claims.sql.ok_or_else(|| {
            Error::invalid(
                "this is a plain Flight ticket, not a Flight SQL statement handle",
                "send plain Flight tickets to DoGet as they were received",
            )
        })
    }

    /// Plans a statement within the query deadline.
    async fn plan(&self, caller: &Caller, claim: &SqlClaim) -> Result<PlannedSql> {
        let params = claim.params.as_deref().map(decode_params).transpose()?;
        let secs = self.node.sql.timeout_secs;
        tokio::time::timeout(
            self.node.sql.timeout(),
            sql::plan_sql(&self.node, &caller.principal, &caller.purpose, &claim.text, params),
        )
        .await
        .map_err(|_| Error::ResourceExhausted {
            message: format!("planning took longer than sql.timeout_secs = {secs}"),
        })?
    }

    /// Audits a decision about a statement.
    async fn audit(
        &self,
        md: &MetadataMap,
        caller: &Caller,
        action: audit::Action,
        statement: &str,
        planned: Option<&PlannedSql>,
        outcome: std::result::Result<&str, &Error>,
    ) -> Result<i64> {
        // An allowed DoGet stays `requested` until its stream ends; everything else is final.
        let final_entry = !(action == audit::Action::DoGet && outcome.is_ok());
        let target = Target {
            dataset: planned.map(PlannedSql::datasets).unwrap_or_default(),
            statement: Some(statement),
            consent_version: planned.map(PlannedSql::consent_version),
            ..Default::default()
        };
        record(&self.node, md, Some(caller), action, &target, outcome, final_entry).await
    }

    /// Plans a statement (from a handle or a CommandStatementQuery) and answers its FlightInfo
    /// with a signed DoGet ticket.
    async fn statement_info(
        &self,
        md: &MetadataMap,
        desc: FlightDescriptor,
        claim: std::result::Result<SqlClaim, &[u8]>,
    ) -> Result<FlightInfo> {
        let action = audit::Action::SqlQuery;
        let caller = self.authenticated(md, action).await?;
        let claim = match claim {
            Ok(c) => c,
            Err(handle) => match self.open(&caller, handle) {
                Ok(c) => c,
                Err(e) => {
                    self.audit(md, &caller, action, "", None, Err(&e)).await?;
                    return Err(e);
                }
            },
        };
        let planned = match self.plan(&caller, &claim).await {
            Ok(p) => p,
            Err(e) => {
                self.audit(md, &caller, action, &claim.text, None, Err(&e)).await?;
                return Err(e);
            }
        };
        let statement = claim.text.clone();
        let handle = self.sign(&caller, claim, self.node.ticket_ttl.as_secs() as i64)?;
        let ticket = TicketStatementQuery {
            statement_handle: handle.into(),
        }
        .as_any()
        .encode_to_vec();
        let info = FlightInfo::new()
            .try_with_schema(&planned.schema)
            .map_err(|e| Error::Internal(format!("encode schema: {e}")))?
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
            .with_descriptor(desc)
            .with_total_records(-1)
            .with_ordered(true);
        self.audit(md, &caller, action, &statement, Some(&planned), Ok(&planned.reason()))
            .await?;
        Ok(info)
    }

    /// Re-plans a signed statement and streams it through the gate, the limits and the audit.
    async fn statement_stream(&self, md: &MetadataMap, handle: &[u8]) -> Result<DoGetStream> {
        let action = audit::Action::DoGet;
        let started = tokio::time::Instant::now();
        let caller = self.authenticated(md, action).await?;
        let claim = match self.open(&caller, handle) {
            Ok(c) => c,
            Err(e) => {
                self.audit(md, &caller, action, "", None, Err(&e)).await?;
                return Err(e);
            }
        };
        let slot = match self.node.limits.open_stream(&caller.principal.name) {
            Ok(s) => s,
            Err(e) => {
                self.audit(md, &caller, action, &claim.text, None, Err(&e)).await?;
                return Err(e);
            }
        };
        // Decide again at stream time: permits, consent and datasets may have changed.
        let planned = match self.plan(&caller, &claim).await {
            Ok(p) => p,
            Err(e) => {
                self.audit(md, &caller, action, &claim.text, None, Err(&e)).await?;
                return Err(e);
            }
        };
        let id = self
            .audit(md, &caller, action, &claim.text, Some(&planned), Ok(&planned.reason()))
            .await?;
        let schema = Arc::clone(&planned.schema);
        let counters = planned.touched.iter().map(|t| Arc::clone(&t.counters)).collect();
        let version = planned.consent_version();
        let limited = LimitedStream::new(planned, &self.node.queries, &self.node.sql, started);
        let audited =
            AuditedStream::new(Box::pin(limited), self.node.audit.clone(), id, counters, version).with_slot(slot);
        Ok(audited.encode(schema))
    }

    /// A FlightInfo whose ticket is the metadata command itself (answered at DoGet).
    async fn metadata_info(
        &self,
        md: &MetadataMap,
        desc: FlightDescriptor,
        command: Any,
        schema: &Schema,
    ) -> Result<FlightInfo> {
        self.authenticated(md, audit::Action::SqlMetadata).await?;
        Ok(FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Error::Internal(format!("encode schema: {e}")))?
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(command.encode_to_vec())))
            .with_descriptor(desc))
    }

    /// `metadata_info` as a handler's response.
    async fn metadata_response(
        &self,
        request: Request<FlightDescriptor>,
        command: Any,
        schema: &Schema,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let md = request.metadata().clone();
        status(self.metadata_info(&md, request.into_inner(), command, schema).await).map(Response::new)
    }

    /// The tables the caller may query for its purpose, with their post-policy schemas.
    async fn tables(&self, md: &MetadataMap, query: CommandGetTables) -> Result<DoGetStream> {
        let action = audit::Action::SqlMetadata;
        let caller = self.authenticated(md, action).await?;
        let include_schema = query.include_schema;
        let mut builder = query.into_builder();
        let empty = Schema::empty();
        let mut listed = 0usize;
        for name in crate::catalog::allowed_datasets(&self.node, &caller.principal, &caller.purpose) {
            if include_schema {
                // A dataset whose source is broken is skipped here and reported when queried.
                let Ok(guarded) = crate::catalog::guard(&self.node, &caller.principal, &caller.purpose, &name).await
                else {
                    continue;
                };
                let schema = datafusion::catalog::TableProvider::schema(&guarded.table);
                builder
                    .append(CATALOG, SCHEMA, &name, "TABLE", &schema)
                    .map_err(metadata_error)?;
            } else {
                builder
                    .append(CATALOG, SCHEMA, &name, "TABLE", &empty)
                    .map_err(metadata_error)?;
            }
            listed += 1;
        }
        // Federated datasets, as this node and its peers show them to the caller: queryable here
        // by name, so SQL tools browsing the catalogue must see them too.
        let mut federated = 0usize;
        for f in crate::flight::federated_datasets(&self.node, &caller).await {
            let schema = if include_schema { &f.schema } else { &empty };
            builder
                .append(CATALOG, SCHEMA, &f.name, "TABLE", schema)
                .map_err(metadata_error)?;
            federated += 1;
        }
        let schema = builder.schema();
        let batch = builder.build().map_err(metadata_error)?;
        let target = Target::default();
        let reason = format!("GetTables listed {listed} dataset(s) and {federated} federated dataset(s)");
        record(&self.node, md, Some(&caller), action, &target, Ok(&reason), true).await?;
        Ok(batch_stream(schema, batch))
    }
}

/// A metadata answer as a Flight stream.
fn metadata_stream(
    schema: SchemaRef,
    built: arrow_flight::error::Result<RecordBatch>,
) -> std::result::Result<Response<DoGetStream>, Status> {
    let batch = status(built.map_err(metadata_error))?;
    Ok(Response::new(batch_stream(schema, batch)))
}

/// Flight SQL handlers return `Status`; our errors convert once, here.
fn status<T>(r: Result<T>) -> std::result::Result<T, Status> {
    r.map_err(Status::from)
}

#[tonic::async_trait]
impl FlightSqlService for SqlService {
    type FlightService = SqlService;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        if query.transaction_id.is_some() {
            return Err(Error::invalid(
                "transactions are not supported",
                "send the query without a transaction id",
            )
            .into());
        }
        let claim = SqlClaim {
            text: query.query,
            params: None,
        };
        let md = request.metadata().clone();
        status(self.statement_info(&md, request.into_inner(), Ok(claim)).await).map(Response::new)
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let md = request.metadata().clone();
        let handle = query.prepared_statement_handle;
        status(self.statement_info(&md, request.into_inner(), Err(&handle)).await).map(Response::new)
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<DoGetStream>, Status> {
        status(
            self.statement_stream(request.metadata(), &ticket.statement_handle)
                .await,
        )
        .map(Response::new)
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<DoGetStream>, Status> {
        status(
            self.statement_stream(request.metadata(), &query.prepared_statement_handle)
                .await,
        )
        .map(Response::new)
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> std::result::Result<ActionCreatePreparedStatementResult, Status> {
        let md = request.metadata();
        let action = audit::Action::SqlPrepare;
        let caller = status(self.authenticated(md, action).await)?;
        if query.transaction_id.is_some() {
            return Err(Error::invalid(
                "transactions are not supported",
                "prepare the query without a transaction id",
            )
            .into());
        }
        let claim = SqlClaim {
            text: query.query,
            params: None,
        };
        let planned = match self.plan(&caller, &claim).await {
            Ok(p) => p,
            Err(e) => {
                status(self.audit(md, &caller, action, &claim.text, None, Err(&e)).await)?;
                return Err(e.into());
            }
        };
        // Parameter types DataFusion inferred ($1, $2, ...); unknown ones are Null.
        let mut params: Vec<(usize, Field)> = planned
            .parameters
            .clone()
            .into_iter()
            .map(|(id, field)| {
                let n = id.trim_start_matches('$').parse::<usize>().unwrap_or(usize::MAX);
                let dt = field
                    .map(|f| f.data_type().clone())
                    .unwrap_or(arrow::datatypes::DataType::Null);
                (n, Field::new(id, dt, true))
            })
            .collect();
        params.sort_by_key(|(n, _)| *n);
        let parameter_schema = Schema::new(params.into_iter().map(|(_, f)| f).collect::<Vec<_>>());
        let statement = claim.text.clone();
        let handle = status(self.sign(&caller, claim, HANDLE_TTL_SECS))?;
        let result = ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into(),
            dataset_schema: status(encode_schema(&planned.schema))?,
            parameter_schema: if parameter_schema.fields().is_empty() {
                Default::default()
            } else {
                status(encode_schema(&parameter_schema))?
            },
        };
        status(
            self.audit(md, &caller, action, &statement, Some(&planned), Ok(&planned.reason()))
                .await,
        )?;
        Ok(result)
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> std::result::Result<(), Status> {
        // Handles are stateless; closing only checks that the handle is the caller's.
        let caller = status(self.authenticated(request.metadata(), audit::Action::SqlPrepare).await)?;
        status(self.open(&caller, &query.prepared_statement_handle))?;
        Ok(())
    }

    /// Binds parameters: the client sends one row; the answer is a new handle carrying it.
    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> std::result::Result<DoPutPreparedStatementResult, Status> {
        let caller = status(self.authenticated(request.metadata(), audit::Action::SqlPrepare).await)?;
        let mut claim = status(self.open(&caller, &query.prepared_statement_handle))?;
        let batch = status(read_parameters(request.into_inner(), self.node.sql.max_statement_bytes).await)?;
        claim.params = Some(status(encode_params(&batch))?);
        let handle = status(self.sign(&caller, claim, HANDLE_TTL_SECS))?;
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(handle.into()),
        })
    }

    async fn do_put_statement_update(
        &self,
        _query: CommandStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> std::result::Result<i64, Status> {
        Err(Error::PermissionDenied {
            reason: "the gateway is read-only; only SELECT queries are allowed".into(),
        }
        .into())
    }

    async fn do_put_fallback(
        &self,
        _request: Request<PeekableFlightDataStream>,
        message: Any,
    ) -> std::result::Result<Response<<Self as FlightService>::DoPutStream>, Status> {
        Err(Status::unimplemented(format!(
            "DoPut `{}` is not supported: the gateway is read-only; register data with `passerelle dataset register`",
            message.type_url
        )))
    }

    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> std::result::Result<Response<DoActionStream>, Status> {
        Err(Status::unimplemented(format!(
            "action `{}` is not supported; see ListActions",
            request.get_ref().r#type
        )))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.metadata_response(request, query.as_any(), &schema).await
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<DoGetStream>, Status> {
        status(self.authenticated(request.metadata(), audit::Action::SqlMetadata).await)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        metadata_stream(builder.schema(), builder.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.metadata_response(request, query.as_any(), &schema).await
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<DoGetStream>, Status> {
        status(self.authenticated(request.metadata(), audit::Action::SqlMetadata).await)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG, SCHEMA);
        metadata_stream(builder.schema(), builder.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.metadata_response(request, query.as_any(), &schema).await
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<DoGetStream>, Status> {
        status(self.tables(request.metadata(), query).await).map(Response::new)
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.metadata_response(request, query.as_any(), &schema).await
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<DoGetStream>, Status> {
        status(self.authenticated(request.metadata(), audit::Action::SqlMetadata).await)?;
        let mut builder = query.into_builder();
        builder.append("TABLE");
        metadata_stream(builder.schema(), builder.build())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let infos = status(sql_info())?;
        let schema = query.clone().into_builder(&infos).schema();
        self.metadata_response(request, query.as_any(), &schema).await
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<DoGetStream>, Status> {
        status(self.authenticated(request.metadata(), audit::Action::SqlMetadata).await)?;
        let infos = status(sql_info())?;
        let builder = query.into_builder(&infos);
        metadata_stream(builder.schema(), builder.build())
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
