//! Property tests (fuzzing with shrinking) for every decoder that reads bytes from outside: Flight
//! tickets, JSON commands, manifests (TOML and JSON), consent CSV and JSON Lines, authorization
//! headers. Each must answer arbitrary and mutated input with a clean error of the right class —
//! never a panic, never `INTERNAL` — and a ticket with any byte changed never verifies.
//!
//! `PROPTEST_CASES` sets the iterations per property (default 3000, what `.ci/run` runs; raise it
//! for a longer fuzzing session).

use std::sync::Arc;

use passerelle::catalog::DataCommand;
use passerelle::error::StatusClass;
use passerelle::manifest::Manifest;
use passerelle::signing::NodeKey;
use passerelle::ticket::{TicketClaims, TicketSigner};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

fn signer() -> TicketSigner {
    static KEY: std::sync::OnceLock<Arc<NodeKey>> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        Arc::new(NodeKey::load_or_create(&dir.path().join("node.key")).unwrap())
    });
    TicketSigner::new(Arc::clone(key), "node-test".into())
}

fn claims(principal: String, filter: Option<String>, columns: Option<Vec<String>>) -> TicketClaims {
    TicketClaims {
        v: passerelle::ticket::TICKET_VERSION,
        iss: String::new(),
        kid: String::new(),
        iat: 0,
        principal,
        org: "dkfz".into(),
        member_state: "DE".into(),
        consent_version: 7,
        policy_version: "p".into(),
        purpose: "research/ai-training".into(),
        dataset: "demo_patients".into(),
        columns,
        filter,
        limit: Some(10),
        exp: i64::MAX,
        nonce: 1,
        sql: None,
        part: None,
        skip: 0,
        aggregate: None,
        fill_nulls: None,
        role: None,
    }
}

const MANIFEST: &str = r#"
name = "d"
location = "file:///tmp/d/"
format = "parquet"
member_state = "FR"
controller = "aphp"
subject_column = "patient_id"
legal_basis = "consent"
purposes = ["research/ai-training"]
[columns]
patient_id = { class = "identifier" }
"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn arbitrary_tickets_are_refused_as_invalid_arguments(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let e = signer().verify(&bytes, 0).unwrap_err();
        prop_assert_eq!(e.status(), StatusClass::InvalidArgument);
    }

    #[test]
    fn a_ticket_with_any_byte_changed_never_verifies(
        principal in "[a-z-]{1,20}",
        filter in proptest::option::of(".{0,40}"),
        columns in proptest::option::of(proptest::collection::vec("[a-z_]{1,10}", 0..4)),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let s = signer();
        let c = claims(principal, filter, columns);
        let t = s.sign(&c).unwrap();
        let good = s.verify(&t, 0).unwrap();
        prop_assert_eq!(&good.principal, &c.principal);
        let i = at.index(t.len());
        let mut bad = t.clone();
        bad[i] ^= flip;
        prop_assert!(s.verify(&bad, 0).is_err());
        // Truncated or extended tickets neither.
        prop_assert!(s.verify(&t[..i], 0).is_err());
        let mut longer = t.clone();
        longer.push(b'A');
        prop_assert!(s.verify(&longer, 0).is_err());
    }

    #[test]
    fn json_commands_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Err(e) = DataCommand::from_json(&bytes) {
            prop_assert_eq!(e.status(), StatusClass::InvalidArgument);
        }
    }

    #[test]
    fn json_shaped_commands_never_panic(
        dataset in proptest::option::of(".{0,20}"),
        columns in proptest::option::of(proptest::collection::vec(".{0,8}", 0..4)),
        filter in proptest::option::of(".{0,30}"),
        limit in proptest::option::of(any::<i64>()),
        extra in proptest::option::of("[a-z]{1,6}"),
    ) {
        let mut v = serde_json::json!({});
        if let Some(d) = dataset { v["dataset"] = d.into(); }
        if let Some(c) = columns { v["columns"] = c.into(); }
        if let Some(f) = filter { v["filter"] = f.into(); }
        if let Some(l) = limit { v["limit"] = l.into(); }
        if let Some(x) = extra { v[x] = 1.into(); }
        if let Err(e) = DataCommand::from_json(v.to_string().as_bytes()) {
            prop_assert_eq!(e.status(), StatusClass::InvalidArgument);
        }
    }

    #[test]
    fn mutated_manifests_are_clean_errors(at in any::<prop::sample::Index>(), insert in ".{0,12}", cut in 0usize..20) {
        let i = at.index(MANIFEST.len());
        let end = (i + cut).min(MANIFEST.len());
        let text = format!("{}{}{}", &MANIFEST[..i], insert, &MANIFEST[end..]);
        match Manifest::from_toml(&text) {
            // Whatever parses must also yield its policy and source without panicking.
            Ok(m) => {
                let _ = (m.policy(), m.source().normalised_location());
            }
            Err(e) => prop_assert_eq!(e.status(), StatusClass::InvalidArgument),
        }
    }

    #[test]
    fn arbitrary_json_manifests_are_clean_errors(keys in proptest::collection::vec(("[a-z_]{1,16}", ".{0,10}"), 0..12)) {
        let mut v = serde_json::Map::new();
        for (k, val) in keys {
            v.insert(k, serde_json::Value::String(val));
        }
        if let Err(e) = Manifest::from_json(serde_json::Value::Object(v)) {
            prop_assert_eq!(e.status(), StatusClass::InvalidArgument);
        }
    }

    #[test]
    fn consent_csv_and_jsonl_never_panic(text in "(?s).{0,400}") {
        for parsed in [
            passerelle::consent_file::parse_csv(&text),
            passerelle::consent_file::parse_jsonl(&text),
        ] {
            if let Err(e) = parsed {
                prop_assert_eq!(e.status(), StatusClass::InvalidArgument);
            }
        }
    }

    #[test]
    fn consent_csv_shaped_rows_never_panic(
        rows in proptest::collection::vec(("[0-9a-z]{0,6}", "[a-z/-]{0,20}", "granted|withdrawn|maybe|", "[0-9T:Z+-]{0,25}"), 0..20),
    ) {
        let mut text = String::from("subject_id,purpose,status,timestamp\n");
        for (s, p, st, t) in rows {
            text.push_str(&format!("{s},{p},{st},{t}\n"));
        }
        if let Err(e) = passerelle::consent_file::parse_csv(&text) {
            prop_assert_eq!(e.status(), StatusClass::InvalidArgument);
        }
    }

    #[test]
    fn authorization_headers_never_panic(header in "(?s).{0,200}") {
        if let Err(e) = passerelle::auth::parse_authorization(&header) {
            prop_assert_eq!(e.status(), StatusClass::Unauthenticated);
        }
    }
}

/// The raw DoPut of a prepared statement's parameters: the command, then the given messages.
async fn bind_raw(
    gw: &passerelle_tests::TestGateway,
    messages: Vec<arrow_flight::FlightData>,
) -> Result<Vec<arrow_flight::PutResult>, arrow_flight::error::FlightError> {
    use arrow_flight::sql::{ActionCreatePreparedStatementRequest, CommandPreparedStatementQuery, ProstMessageExt};
    use futures::TryStreamExt;
    use prost::Message;
    let mut client = gw
        .client(Some(&gw.key("trainer-de")), Some("research/ai-training"))
        .await
        .unwrap();
    let request = ActionCreatePreparedStatementRequest {
        query: "SELECT count(*) AS n FROM demo_patients WHERE hba1c > $1".into(),
        transaction_id: None,
    };
    let action = arrow_flight::Action::new("CreatePreparedStatement", request.as_any().encode_to_vec());
    let result: Vec<_> = client.do_action(action).await?.try_collect().await?;
    let any = arrow_flight::sql::Any::decode(result[0].clone()).unwrap();
    let created: arrow_flight::sql::ActionCreatePreparedStatementResult = any.unpack().unwrap().unwrap();
    let command = CommandPreparedStatementQuery {
        prepared_statement_handle: created.prepared_statement_handle,
    };
    let mut messages = messages;
    messages[0].flight_descriptor = Some(arrow_flight::FlightDescriptor::new_cmd(
        command.as_any().encode_to_vec(),
    ));
    client
        .do_put(futures::stream::iter(messages.into_iter().map(Ok)))
        .await?
        .try_collect()
        .await
}

/// The schema message and one LZ4-compressed batch of `values` (one Float64 parameter column).
fn lz4_parameters(values: Vec<f64>) -> Vec<arrow_flight::FlightData> {
    use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions};
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
        "p",
        arrow::datatypes::DataType::Float64,
        false,
    )]));
    let batch = arrow::array::RecordBatch::try_new(
        Arc::clone(&schema),
        vec![Arc::new(arrow::array::Float64Array::from(values))],
    )
    .unwrap();
    let options = IpcWriteOptions::default()
        .try_with_compression(Some(arrow::ipc::CompressionType::LZ4_FRAME))
        .unwrap();
    let schema_message: arrow_flight::FlightData = arrow_flight::SchemaAsIpc::new(&schema, &options).into();
    let (_, encoded) = IpcDataGenerator::default()
        .encode(
            &batch,
            &mut DictionaryTracker::new(false),
            &options,
            &mut Default::default(),
        )
        .unwrap();
    vec![schema_message, encoded.into()]
}

/// A parameter batch whose LZ4 buffer claims 2^45 bytes uncompressed (a few bytes on the wire):
/// arrow-ipc would allocate that much before decompressing, which aborts the process. It is
/// refused before decoding, with INVALID_ARGUMENT naming the limit, and the node answers on.
#[tokio::test]
async fn a_parameter_buffer_claiming_2_pow_45_bytes_is_refused_before_allocation() {
    let gw = passerelle_tests::TestGateway::start(500).await.unwrap();
    // The honest compressed row binds.
    bind_raw(&gw, lz4_parameters(vec![8.0])).await.unwrap();
    let mut messages = lz4_parameters(vec![8.0]);
    let header = arrow::ipc::root_as_message(&messages[1].data_header).unwrap();
    let data = header
        .header_as_record_batch()
        .unwrap()
        .buffers()
        .unwrap()
        .iter()
        .find(|b| b.length() >= 8)
        .unwrap();
    let mut body = messages[1].data_body.to_vec();
    let at = usize::try_from(data.offset()).unwrap();
    body[at..at + 8].copy_from_slice(&(1i64 << 45).to_le_bytes());
    messages[1].data_body = body.into();
    let err = bind_raw(&gw, messages).await.unwrap_err();
    assert_eq!(
        passerelle_tests::status_code(&err),
        Some(tonic::Code::InvalidArgument),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("35184372088832") && text.contains("sql.max_statement_bytes"),
        "{text}"
    );
    // Two rows: refused as soon as the second arrives.
    let err = bind_raw(&gw, lz4_parameters(vec![1.0, 2.0])).await.unwrap_err();
    assert!(err.to_string().contains("exactly one row"), "{err}");
    // A buffer pointing outside the body: a clean error, not a panic.
    let mut messages = lz4_parameters(vec![8.0]);
    messages[1].data_body = messages[1].data_body.slice(0..4);
    let err = bind_raw(&gw, messages).await.unwrap_err();
    assert_eq!(
        passerelle_tests::status_code(&err),
        Some(tonic::Code::InvalidArgument),
        "{err}"
    );
    // The node still answers.
    let mut sql = passerelle_tests::sql::sql_client(&gw, &gw.key("trainer-de"), "research/ai-training")
        .await
        .unwrap();
    assert!(
        !passerelle_tests::sql::query(&mut sql, "SELECT count(*) FROM demo_patients")
            .await
            .unwrap()
            .is_empty()
    );
    gw.shutdown_and_wait().await.unwrap();
}
