//! Flight SQL end to end: results equal plain Flight's, prepared statements with bound
//! parameters, handles bound to their principal, metadata only for usable datasets, limits that
//! name themselves, and the audit of every statement.

use arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use arrow_flight::sql::{
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any, CommandGetPrimaryKeys,
    CommandGetTables, CommandPreparedStatementQuery, ProstMessageExt,
};
use arrow_flight::{Action, FlightDescriptor};
use futures::TryStreamExt;
use passerelle_tests::sql::{OUTSIDER, VISITS, VISITS_AGG, add_sql_fixtures, query, sql_client};
use passerelle_tests::{TestGateway, pull, status_code};
use prost::Message;
use std::sync::Arc;

const PURPOSE: &str = "research/ai-training";
const ROWS: usize = 3_000;

async fn gateway() -> (TestGateway, String) {
    let gw = TestGateway::start(ROWS).await.unwrap();
    let outsider = add_sql_fixtures(&gw, passerelle::demo::subjects_for(ROWS))
        .await
        .unwrap();
    (gw, outsider)
}

fn count(batches: &[RecordBatch]) -> i64 {
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}

fn code(e: &arrow_flight::error::FlightError) -> tonic::Code {
    status_code(e).unwrap_or(tonic::Code::Unknown)
}

/// Rows as sorted debug strings, for multiset comparison.
fn rows(batches: &[RecordBatch]) -> Vec<String> {
    let Some(first) = batches.first() else {
        return Vec::new();
    };
    let all = concat_batches(&first.schema(), batches).unwrap();
    let fmt: Vec<_> = all
        .columns()
        .iter()
        .map(|c| arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &Default::default()).unwrap())
        .collect();
    let mut out: Vec<String> = (0..all.num_rows())
        .map(|r| fmt.iter().map(|f| f.value(r).to_string()).collect::<Vec<_>>().join("|"))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn sql_returns_exactly_what_plain_flight_returns() {
    let (gw, _) = gateway().await;
    let key = gw.key("trainer-de");
    let mut flight = gw.client(Some(&key), Some(PURPOSE)).await.unwrap();
    let plain = pull(&mut flight, FlightDescriptor::new_path(vec!["demo_patients".into()]))
        .await
        .unwrap();
    let mut sql = sql_client(&gw, &key, PURPOSE).await.unwrap();
    let via_sql = query(&mut sql, "SELECT * FROM demo_patients").await.unwrap();
    assert_eq!(via_sql[0].schema(), plain[0].schema());
    let (a, b) = (rows(&plain), rows(&via_sql));
    assert!(!a.is_empty());
    assert_eq!(a, b);

    // The join of two registries holds only subjects consenting in both: the visits registry
    // grants even subjects only, so every joined visit cost is of an even subject.
    let joined = query(
        &mut sql,
        "SELECT v.cost FROM demo_patients p JOIN demo_visits v ON p.patient_id = v.patient_id",
    )
    .await
    .unwrap();
    let patients: std::collections::HashSet<String> = plain
        .iter()
        .flat_map(|b| {
            let c = b.column_by_name("patient_id").unwrap().as_string::<i32>().clone();
            (0..c.len()).map(move |i| c.value(i).to_string())
        })
        .collect();
    let mut n = 0;
    for b in &joined {
        for cost in b.column(0).as_primitive::<arrow::datatypes::Float64Type>().values() {
            let subject = (*cost as i64) / 10;
            assert_eq!(subject % 2, 0, "visit of a non-consenting subject: cost {cost}");
            n += 1;
        }
    }
    // Each plain-Flight row (already checked against the reference model elsewhere) of an even
    // subject meets its two visits.
    let subjects = passerelle::demo::subjects_for(ROWS) as i64;
    let even = crate::reference::pseudonyms(&gw.node, "DE", "dkfz", (0..subjects).filter(|s| s % 2 == 0));
    let mut expected = 0;
    for b in &plain {
        let pid = b.column_by_name("patient_id").unwrap().as_string::<i32>();
        expected += 2 * pid.iter().filter(|p| even.contains(p.unwrap())).count();
    }
    assert!(patients.len() > 10);
    assert_eq!(n, expected);
    gw.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn prepared_statements_bind_parameters_and_stay_with_their_principal() {
    let (gw, outsider) = gateway().await;
    let key = gw.key("trainer-de");
    let mut sql = sql_client(&gw, &key, PURPOSE).await.unwrap();
    let literal = count(
        &query(&mut sql, "SELECT count(*) FROM demo_patients WHERE diagnosis = 'E11.9'")
            .await
            .unwrap(),
    );
    assert!(literal > 0);

    let mut stmt = sql
        .prepare("SELECT count(*) FROM demo_patients WHERE diagnosis = $1".into(), None)
        .await
        .unwrap();
    assert_eq!(stmt.dataset_schema().unwrap().fields().len(), 1);
    let params = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("$1", DataType::Utf8, false)])),
        vec![Arc::new(StringArray::from(vec!["E11.9"]))],
    )
    .unwrap();
    stmt.set_parameters(params).unwrap();
    let info = stmt.execute().await.unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let got: Vec<RecordBatch> = sql.do_get(ticket).await.unwrap().try_collect().await.unwrap();
    assert_eq!(count(&got), literal);

    // The same handle, presented by someone else or for another purpose, is refused.
    let mut raw = gw.client(Some(&key), Some(PURPOSE)).await.unwrap();
    let body = ActionCreatePreparedStatementRequest {
        query: "SELECT count(*) FROM demo_patients".into(),
        transaction_id: None,
    }
    .as_any()
    .encode_to_vec();
    let results: Vec<_> = raw
        .do_action(Action::new("CreatePreparedStatement", body))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let created: ActionCreatePreparedStatementResult =
        Any::decode(results[0].as_ref()).unwrap().unpack().unwrap().unwrap();
    let cmd = CommandPreparedStatementQuery {
        prepared_statement_handle: created.prepared_statement_handle,
    }
    .as_any()
    .encode_to_vec();
    assert!(
        raw.get_flight_info(FlightDescriptor::new_cmd(cmd.clone()))
            .await
            .is_ok()
    );
    let mut other = gw.client(Some(&outsider), Some(PURPOSE)).await.unwrap();
    let e = other
        .get_flight_info(FlightDescriptor::new_cmd(cmd.clone()))
        .await
        .unwrap_err();
    assert_eq!(code(&e), tonic::Code::PermissionDenied, "{e}");
    assert!(e.to_string().contains("another principal"), "{e}");
    let mut llm = gw.client(Some(&key), Some("research/ai-training/llm")).await.unwrap();
    let e = llm.get_flight_info(FlightDescriptor::new_cmd(cmd)).await.unwrap_err();
    assert_eq!(code(&e), tonic::Code::PermissionDenied, "{e}");

    // A forged handle does not verify.
    let forged = CommandPreparedStatementQuery {
        prepared_statement_handle: b"e30.AAAA".to_vec().into(),
    }
    .as_any()
    .encode_to_vec();
    let e = raw
        .get_flight_info(FlightDescriptor::new_cmd(forged))
        .await
        .unwrap_err();
    assert_ne!(code(&e), tonic::Code::Ok);
    gw.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn metadata_lists_only_usable_datasets_with_post_policy_schemas() {
    let (gw, outsider) = gateway().await;
    let key = gw.key("trainer-de");
    let mut sql = sql_client(&gw, &key, PURPOSE).await.unwrap();
    let tables = |include_schema| CommandGetTables {
        catalog: None,
        db_schema_filter_pattern: None,
        table_name_filter_pattern: None,
        table_types: vec![],
        include_schema,
    };
    let info = sql.get_tables(tables(true)).await.unwrap();
    let batches: Vec<RecordBatch> = sql
        .do_get(info.endpoint[0].ticket.clone().unwrap())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let all = concat_batches(&batches[0].schema(), &batches).unwrap();
    let names: Vec<String> = all
        .column_by_name("table_name")
        .unwrap()
        .as_string::<i32>()
        .iter()
        .map(|s| s.unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["demo_patients", VISITS, VISITS_AGG]);
    let schema_bytes = all.column_by_name("table_schema").unwrap().as_binary::<i32>().value(0);
    let schema = arrow::ipc::convert::try_schema_from_ipc_buffer(schema_bytes).unwrap();
    let fields: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert!(!fields.contains(&"full_name"), "{fields:?}");
    assert_eq!(
        schema.field_with_name("patient_id").unwrap().data_type(),
        &DataType::Utf8
    );

    let mut other = sql_client(&gw, &outsider, PURPOSE).await.unwrap();
    let info = other.get_tables(tables(false)).await.unwrap();
    let batches: Vec<RecordBatch> = other
        .do_get(info.endpoint[0].ticket.clone().unwrap())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 0);

    // Catalogs, schemas, table types and SqlInfo answer; unsupported commands are UNIMPLEMENTED.
    let info = sql.get_catalogs().await.unwrap();
    let b: Vec<RecordBatch> = sql
        .do_get(info.endpoint[0].ticket.clone().unwrap())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(b[0].column(0).as_string::<i32>().value(0), "passerelle");
    assert!(sql.get_sql_info(vec![]).await.is_ok());
    assert!(sql.get_table_types().await.is_ok());
    let mut raw = gw.client(Some(&key), Some(PURPOSE)).await.unwrap();
    let pk = CommandGetPrimaryKeys {
        catalog: None,
        db_schema: None,
        table: "demo_patients".into(),
    }
    .as_any()
    .encode_to_vec();
    let e = raw.get_flight_info(FlightDescriptor::new_cmd(pk)).await.unwrap_err();
    assert_eq!(code(&e), tonic::Code::Unimplemented, "{e}");

    // Without credentials, nothing.
    let mut anon = gw.client(None, Some(PURPOSE)).await.unwrap();
    let e = anon
        .get_flight_info(FlightDescriptor::new_cmd(tables(false).as_any().encode_to_vec()))
        .await
        .unwrap_err();
    assert_eq!(code(&e), tonic::Code::Unauthenticated, "{e}");
    gw.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn limits_name_themselves() {
    let gw = TestGateway::start_with(ROWS, |cfg, _| {
        cfg.sql.max_rows = 10;
        cfg.sql.timeout_secs = 2;
        cfg.sql.memory_limit_mb = 1;
    })
    .await
    .unwrap();
    add_sql_fixtures(&gw, passerelle::demo::subjects_for(ROWS))
        .await
        .unwrap();
    let mut sql = sql_client(&gw, &gw.key("trainer-de"), PURPOSE).await.unwrap();
    assert_eq!(
        query(&mut sql, "SELECT * FROM demo_patients LIMIT 10")
            .await
            .unwrap()
            .iter()
            .map(RecordBatch::num_rows)
            .sum::<usize>(),
        10
    );
    let e = query(&mut sql, "SELECT * FROM demo_patients").await.unwrap_err();
    assert_eq!(code(&e), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("sql.max_rows = 10"), "{e}");

    // Millions of groups do not fit in 1 MiB (and nothing spills to disk).
    let e = query(
        &mut sql,
        "SELECT a.cost, b.cost, count(*) FROM demo_visits a CROSS JOIN demo_visits b GROUP BY a.cost, b.cost",
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("sql.memory_limit_mb = 1"), "{e}");

    // Billions of rows from a cross join cannot finish in 2 s.
    let e = query(
        &mut sql,
        "SELECT count(*) FROM demo_visits a CROSS JOIN demo_visits b CROSS JOIN demo_visits c",
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("sql.timeout_secs = 2"), "{e}");
    gw.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn every_statement_is_audited_with_its_text_datasets_and_rows() {
    let (gw, outsider) = gateway().await;
    let mut sql = sql_client(&gw, &gw.key("trainer-de"), PURPOSE).await.unwrap();
    let text = "SELECT p.diagnosis, v.ward FROM demo_patients p JOIN demo_visits v USING (patient_id) LIMIT 7";
    let got = query(&mut sql, text).await.unwrap();
    assert_eq!(got.iter().map(RecordBatch::num_rows).sum::<usize>(), 7);
    let mut other = sql_client(&gw, &outsider, PURPOSE).await.unwrap();
    let e = query(&mut other, "SELECT * FROM demo_patients").await.unwrap_err();
    assert_eq!(code(&e), tonic::Code::NotFound, "{e}");

    // The DoGet entry is completed asynchronously when the stream ends.
    let mut done = None;
    for _ in 0..100 {
        let entries = gw.node.audit.list(&Default::default()).await.unwrap();
        let get = entries
            .iter()
            .find(|r| r.action == "do_get" && r.statement.as_deref() == Some(text) && r.status == "completed")
            .cloned();
        if let Some(get) = get {
            done = Some((entries, get));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (entries, get) = done.expect("completed do_get entry for the statement");
    assert_eq!(get.dataset, "demo_patients,demo_visits");
    assert_eq!(get.rows_sent, 7);
    assert_eq!(get.decision, "allow");
    let info = entries
        .iter()
        .find(|r| r.action == "sql_query" && r.statement.as_deref() == Some(text))
        .expect("sql_query entry");
    assert_eq!(info.dataset, "demo_patients,demo_visits");
    let denied = entries
        .iter()
        .find(|r| r.principal == OUTSIDER && r.action == "sql_query")
        .expect("denied entry");
    assert_eq!(denied.decision, "deny");
    assert_eq!(denied.statement.as_deref(), Some("SELECT * FROM demo_patients"));
    // Filtering by one dataset finds multi-dataset entries.
    let q = passerelle::audit::AuditQuery {
        dataset: Some(VISITS.into()),
        ..Default::default()
    };
    assert!(
        gw.node
            .audit
            .list(&q)
            .await
            .unwrap()
            .iter()
            .any(|r| r.statement.as_deref() == Some(text))
    );
    gw.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn aggregates_only_datasets_refuse_plain_flight() {
    let (gw, _) = gateway().await;
    let mut flight = gw.client(Some(&gw.key("trainer-de")), Some(PURPOSE)).await.unwrap();
    let e = pull(&mut flight, FlightDescriptor::new_path(vec![VISITS_AGG.into()]))
        .await
        .unwrap_err();
    assert_eq!(code(&e), tonic::Code::PermissionDenied, "{e}");
    assert!(e.to_string().contains("aggregates only"), "{e}");
    // Through SQL, grouped counts arrive; they add up to the visible rows.
    let mut sql = sql_client(&gw, &gw.key("trainer-de"), PURPOSE).await.unwrap();
    let grouped = query(&mut sql, "SELECT ward, count(*) AS n FROM visits_agg GROUP BY ward")
        .await
        .unwrap();
    let total: i64 = grouped
        .iter()
        .map(|b| {
            b.column_by_name("n")
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .iter()
                .sum::<i64>()
        })
        .sum();
    let visible = count(&query(&mut sql, "SELECT count(*) FROM demo_visits").await.unwrap());
    assert_eq!(total, visible);
    gw.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn new_files_under_a_prefix_reach_the_next_request() {
    let (gw, _) = gateway().await;
    let mut sql = sql_client(&gw, &gw.key("trainer-de"), PURPOSE).await.unwrap();
    let before = count(&query(&mut sql, "SELECT count(*) FROM demo_visits").await.unwrap());
    // Three more visits of subject 0 (consenting in the visits registry), in a new file.
    let schema = Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("ward", DataType::Utf8, false),
        Field::new("cost", DataType::Float64, false),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(Int64Array::from(vec![0, 0, 0])),
            Arc::new(StringArray::from(vec!["oncology"; 3])),
            Arc::new(arrow::array::Float64Array::from(vec![-1.0, -2.0, -3.0])),
        ],
    )
    .unwrap();
    let path = gw.data_dir().join("demo/visits/more.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let after = count(&query(&mut sql, "SELECT count(*) FROM demo_visits").await.unwrap());
    assert_eq!(after, before + 3);
    gw.shutdown_and_wait().await.unwrap();
}
