//! Plain Flight: the governed stream against the reference model, and every error status.

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Date32Type, Int64Type, TimestampMicrosecondType};
use arrow_flight::{FlightDescriptor, Ticket};
use futures::TryStreamExt;
use passerelle_tests::{TestGateway, command, pull, status_code};
use serde_json::json;
use tonic::Code;

use crate::reference::{consented, fingerprint, pseudonyms, raw_batches};

const AI: &str = "research/ai-training";

#[tokio::test]
async fn governed_stream_equals_reference_model() {
    let gw = TestGateway::start(20_000).await.unwrap();
    let mut c = gw.client(Some(&gw.key("trainer-de")), Some(AI)).await.unwrap();
    let got = pull(&mut c, FlightDescriptor::new_path(vec!["demo_patients".into()]))
        .await
        .unwrap();
    let schema = got[0].schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        [
            "patient_id",
            "birth_date",
            "postcode",
            "diagnosis",
            "hba1c",
            "admitted_at"
        ]
    );
    assert_eq!(schema.field(0).data_type(), &DataType::Utf8);

    let raw = raw_batches(gw.data_dir());
    let keep = consented(gw.data_dir(), AI, &[]);
    let expected = fingerprint(&raw, Some(&keep));
    assert!(!expected.is_empty());
    assert_eq!(
        fingerprint(&got, None),
        expected,
        "exactly the consented rows, no more, no fewer"
    );

    // Pseudonyms: the keyed HMAC for dkfz of exactly the consented subjects' ids.
    let allowed = pseudonyms(&gw.node, "DE", "dkfz", keep.iter().copied());
    for b in &got {
        for p in b.column(0).as_string::<i32>().iter() {
            assert!(allowed.contains(p.unwrap()));
        }
        // Generalisation: every birth date is a 1 January, every postcode two characters.
        for d in b.column(1).as_primitive::<Date32Type>().values() {
            let date = chrono_date(*d);
            assert_eq!((date.1, date.2), (1, 1), "{d}");
        }
        assert!(
            b.column(2)
                .as_string::<i32>()
                .iter()
                .all(|p| p.unwrap().chars().count() == 2)
        );
    }

    // Another organisation sees unrelated pseudonyms.
    let other = pseudonyms(&gw.node, "IT", "gemelli", keep.iter().copied());
    assert!(allowed.is_disjoint(&other));
    gw.shutdown_and_wait().await.unwrap();
}

fn chrono_date(days: i32) -> (i64, u32, u32) {
    // Independent of the kernel's calendar: go through the standard library's SystemTime-free path.
    let z = i64::from(days) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[tokio::test]
async fn command_columns_filter_and_limit_apply_above_the_gate() {
    let gw = TestGateway::start(5_000).await.unwrap();
    let mut c = gw.client(Some(&gw.key("trainer-de")), Some(AI)).await.unwrap();
    let got = pull(
        &mut c,
        command(json!({"dataset": "demo_patients", "columns": ["hba1c", "admitted_at"], "filter": "hba1c >= 10"})),
    )
    .await
    .unwrap();
    let n: usize = got.iter().map(|b| b.num_rows()).sum();
    let raw = raw_batches(gw.data_dir());
    let keep = consented(gw.data_dir(), AI, &[]);
    let expected = fingerprint(&raw, Some(&keep))
        .into_iter()
        .filter(|(_, h, _)| f64::from_bits(*h) >= 10.0)
        .count();
    assert_eq!(n, expected);
    assert_eq!(got[0].num_columns(), 2);
    let limited = pull(&mut c, command(json!({"dataset": "demo_patients", "limit": 7})))
        .await
        .unwrap();
    assert_eq!(limited.iter().map(|b| b.num_rows()).sum::<usize>(), 7);
    gw.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn user_expressions_never_see_hidden_rows() {
    let gw = TestGateway::start(5_000).await.unwrap();
    let raw = raw_batches(gw.data_dir());
    let keep = consented(gw.data_dir(), AI, &[]);
    // One admission of a subject without consent, and one of a subject with consent.
    let (mut hidden, mut visible) = (None, None);
    for b in &raw {
        let ids = b.column_by_name("patient_id").unwrap().as_primitive::<Int64Type>();
        let at = b
            .column_by_name("admitted_at")
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>();
        for i in 0..b.num_rows() {
            let slot = if keep.contains(&ids.value(i)) {
                &mut visible
            } else {
                &mut hidden
            };
            slot.get_or_insert(at.value(i));
        }
    }
    let probe = |t: i64| format!("1 / (CASE WHEN CAST(admitted_at AS BIGINT) = {t} THEN 0 ELSE 1 END) = 1");
    let mut c = gw.client(Some(&gw.key("trainer-de")), Some(AI)).await.unwrap();
    // A divide-by-zero planted on a hidden row never fires: the filter runs above the gate.
    let got = pull(
        &mut c,
        command(json!({"dataset": "demo_patients", "filter": probe(hidden.unwrap())})),
    )
    .await
    .unwrap();
    assert_eq!(
        got.iter().map(|b| b.num_rows()).sum::<usize>(),
        fingerprint(&raw, Some(&keep)).len()
    );
    // The same probe on a visible row does fire, as a clean INVALID_ARGUMENT.
    let err = pull(
        &mut c,
        command(json!({"dataset": "demo_patients", "filter": probe(visible.unwrap())})),
    )
    .await
    .unwrap_err();
    assert_eq!(status_code(&err), Some(Code::InvalidArgument), "{err}");
    gw.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn every_error_has_its_status() {
    let gw = TestGateway::start(2_000).await.unwrap();
    // A second dataset the trainer's organisation holds no permit for: invisible to it.
    let mut m = passerelle::manifest::Manifest::from_toml(
        &std::fs::read_to_string(gw.data_dir().join("demo/demo_patients.toml")).unwrap(),
    )
    .unwrap();
    m.name = passerelle_policies::DatasetId::parse("private_patients").unwrap();
    gw.node.register_dataset(&m).await.unwrap();
    gw.node.refresh().await.unwrap();

    let trainer = gw.key("trainer-de");
    let path = |n: &str| FlightDescriptor::new_path(vec![n.to_string()]);
    let code = |r: Result<arrow_flight::FlightInfo, arrow_flight::error::FlightError>| {
        r.map(|_| ()).map_err(|e| (status_code(&e), e.to_string()))
    };

    let mut anon = gw.client(None, Some(AI)).await.unwrap();
    assert_eq!(
        code(anon.get_flight_info(path("demo_patients")).await).unwrap_err().0,
        Some(Code::Unauthenticated)
    );
    let mut wrong = gw.client(Some("psk_wrong"), Some(AI)).await.unwrap();
    assert_eq!(
        code(wrong.get_flight_info(path("demo_patients")).await).unwrap_err().0,
        Some(Code::Unauthenticated)
    );
    let mut no_purpose = gw.client(Some(&trainer), None).await.unwrap();
    let (c, msg) = code(no_purpose.get_flight_info(path("demo_patients")).await).unwrap_err();
    assert_eq!(c, Some(Code::InvalidArgument));
    assert!(msg.contains("x-passerelle-purpose"), "{msg}");

    let mut t = gw.client(Some(&trainer), Some(AI)).await.unwrap();
    let (c1, m1) = code(t.get_flight_info(path("no_such_dataset")).await).unwrap_err();
    let (c2, m2) = code(t.get_flight_info(path("private_patients")).await).unwrap_err();
    assert_eq!((c1, c2), (Some(Code::NotFound), Some(Code::NotFound)));
    assert_eq!(
        m1.replace("no_such_dataset", "X"),
        m2.replace("private_patients", "X"),
        "existence must not leak"
    );

    let mut epi = gw.client(Some(&trainer), Some("research/epidemiology")).await.unwrap();
    assert_eq!(
        code(epi.get_flight_info(path("demo_patients")).await).unwrap_err().0,
        Some(Code::PermissionDenied)
    );
    let (c, msg) = code(
        t.get_flight_info(command(json!({"dataset": "demo_patients", "columns": ["full_name"]})))
            .await,
    )
    .unwrap_err();
    assert_eq!(c, Some(Code::PermissionDenied));
    assert!(msg.contains("full_name"), "{msg}");
    let (c, msg) = code(
        t.get_flight_info(command(
            json!({"dataset": "demo_patients", "filter": "full_name = 'Marie Martin'"}),
        ))
        .await,
    )
    .unwrap_err();
    assert_eq!(c, Some(Code::PermissionDenied), "{msg}");
    for bad in [
        json!({"dataset": "demo_patients", "columns": ["nope"]}),
        json!({"dataset": "demo_patients", "filter": "hba1c >"}),
        json!({"dataset": "demo_patients", "filter": "nope > 1"}),
        json!({"dataset": "demo_patients", "filter": "hba1c + 1"}),
        json!({"dataset": "demo_patients", "colums": ["hba1c"]}),
    ] {
        let (c, msg) = code(t.get_flight_info(command(bad.clone())).await).unwrap_err();
        assert_eq!(c, Some(Code::InvalidArgument), "{bad}: {msg}");
    }
    let (c, _) = code(t.get_flight_info(FlightDescriptor::new_cmd("{not json")).await).unwrap_err();
    assert_eq!(c, Some(Code::InvalidArgument));

    // Tickets: tampered, foreign principal, other purpose.
    let info = t.get_flight_info(path("demo_patients")).await.unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let mut tampered = ticket.ticket.to_vec();
    tampered[5] ^= 1;
    let e = t.do_get(Ticket::new(tampered)).await.err().unwrap();
    assert_eq!(status_code(&e), Some(Code::InvalidArgument));
    let e = t.do_get(Ticket::new("garbage")).await.err().unwrap();
    assert_eq!(status_code(&e), Some(Code::InvalidArgument));

    let key2 = gw
        .node
        .add_principal(&passerelle_policies::Principal {
            name: "trainer-de-2".into(),
            org: "dkfz".into(),
            member_state: "DE".into(),
            role: passerelle_policies::Role::Trainer,
        })
        .await
        .unwrap();
    gw.node.refresh().await.unwrap();
    let mut other = gw.client(Some(&key2), Some(AI)).await.unwrap();
    let e = other.do_get(ticket.clone()).await.err().unwrap();
    assert_eq!(status_code(&e), Some(Code::PermissionDenied), "{e}");
    let mut sub = gw
        .client(Some(&trainer), Some("research/ai-training/llm"))
        .await
        .unwrap();
    let e = sub.do_get(ticket.clone()).await.err().unwrap();
    assert_eq!(status_code(&e), Some(Code::PermissionDenied), "{e}");
    // The rightful holder can still use it.
    let batches: Vec<_> = t.do_get(ticket).await.unwrap().try_collect().await.unwrap();
    assert!(!batches.is_empty());

    // Every decision was audited, allowed or denied.
    let rows = gw.node.audit.list(&Default::default()).await.unwrap();
    assert!(
        rows.iter()
            .any(|r| r.principal == "(unauthenticated)" && r.decision == "deny")
    );
    assert!(
        rows.iter()
            .any(|r| r.action == "do_get" && r.decision == "deny" && r.reason.contains("another principal"))
    );
    assert!(
        rows.iter()
            .any(|r| r.dataset == "private_patients" && r.decision == "deny")
    );
    gw.shutdown_and_wait().await.unwrap();
}

#[tokio::test]
async fn list_and_schema_show_only_what_the_caller_may_pull() {
    let gw = TestGateway::start(1_000).await.unwrap();
    let mut t = gw.client(Some(&gw.key("trainer-de")), Some(AI)).await.unwrap();
    let listed: Vec<_> = t.list_flights("").await.unwrap().try_collect().await.unwrap();
    assert_eq!(listed.len(), 1);
    let schema = t
        .get_schema(FlightDescriptor::new_path(vec!["demo_patients".into()]))
        .await
        .unwrap();
    assert!(schema.field_with_name("full_name").is_err());
    for (who, purpose) in [
        ("trainer-de", "research/epidemiology"),
        ("steward-fr", AI),
        ("auditor-eu", AI),
    ] {
        let mut c = gw.client(Some(&gw.key(who)), Some(purpose)).await.unwrap();
        let listed: Vec<_> = c.list_flights("").await.unwrap().try_collect().await.unwrap();
        assert!(listed.is_empty(), "{who} {purpose}");
    }
    gw.shutdown_and_wait().await.unwrap();
}
