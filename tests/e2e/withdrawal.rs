//! Consent changes reach streams: the next stream at once, and a stream already open at its
//! next batch boundaries.

use std::collections::HashSet;

use arrow::array::AsArray;
use arrow_flight::FlightDescriptor;
use futures::StreamExt;
use passerelle_policies::consent::ConsentEvent;
use passerelle_tests::TestGateway;

use crate::reference::{consented, pseudonyms, raw_batches};

const AI: &str = "research/ai-training";

#[tokio::test]
async fn withdrawal_reaches_an_open_stream() {
    let gw = TestGateway::start(400_000).await.unwrap();
    let keep = consented(gw.data_dir(), AI, &[]);
    // Withdraw a tenth of the consenting subjects while a stream is open.
    let withdrawn: Vec<i64> = keep.iter().copied().filter(|s| s % 10 == 0).collect();
    let withdrawn_p = pseudonyms(&gw.node, "DE", "dkfz", withdrawn.iter().copied());

    let mut c = gw.client(Some(&gw.key("trainer-de")), Some(AI)).await.unwrap();
    let info = c
        .get_flight_info(FlightDescriptor::new_path(vec!["demo_patients".into()]))
        .await
        .unwrap();
    let mut stream = c.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.num_rows() > 0);

    let now = chrono_now();
    let events: Vec<ConsentEvent> = withdrawn
        .iter()
        .map(|s| ConsentEvent::parse(&s.to_string(), AI, "withdrawn", &now).unwrap())
        .collect();
    // As the REST and CLI writes do: durable append, then the node picks it up.
    gw.node.append_consent("aphp-patients", &events).await.unwrap();
    gw.node.refresh().await.unwrap();
    let acknowledged = std::time::Instant::now();

    // A slow reader: the server produces each batch only as the reader makes room for it, so
    // most of the stream is produced after the withdrawal. Batches produced before it (in the
    // server's and HTTP/2's buffers) may still carry the subjects; none received a second after
    // it may.
    let mut after: Vec<(f64, usize)> = Vec::new();
    while let Some(b) = stream.next().await {
        let b = b.unwrap();
        let withdrawn_rows = b
            .column(0)
            .as_string::<i32>()
            .iter()
            .filter(|p| withdrawn_p.contains(p.unwrap()))
            .count();
        after.push((acknowledged.elapsed().as_secs_f64(), withdrawn_rows));
        tokio::time::sleep(std::time::Duration::from_millis(80)).await;
    }
    assert!(after.len() >= 20, "need a long stream, got {} batches", after.len());
    // Batches already in the server's and HTTP/2's buffers drain at the reader's pace (~0.1 s
    // each): a second and a half leaves room for one buffer's worth on a loaded 2-core machine
    // (the same 1.5 s the client tests allow; at exactly 1 s this flaked at 1.04 s).
    let late: Vec<&(f64, usize)> = after.iter().filter(|(t, _)| *t > 1.5).collect();
    assert!(
        late.len() >= 10,
        "need batches read well after the withdrawal: {after:?}"
    );
    assert!(
        late.iter().all(|(_, n)| *n == 0),
        "withdrawn subjects in batches read 1.5 s after the withdrawal: {after:?}"
    );
    let tail = &after[after.len() / 2..];
    assert!(
        tail.iter().all(|(_, n)| *n == 0),
        "withdrawn subjects in late batches: {after:?}"
    );
    // And the raw data does hold rows of those subjects in that part of the file.
    let raw = raw_batches(gw.data_dir());
    let withdrawn_set: HashSet<i64> = withdrawn.iter().copied().collect();
    let raw_tail: usize = raw[raw.len() / 2..]
        .iter()
        .map(|b| {
            b.column_by_name("patient_id")
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values()
                .iter()
                .filter(|v| withdrawn_set.contains(v))
                .count()
        })
        .sum();
    assert!(raw_tail > 100);
    drop(stream);

    // The audit entry shows the consent versions the stream moved through.
    let entry = poll_completed(&gw).await;
    assert!(entry.consent_version_last.unwrap() > entry.consent_version, "{entry:?}");
    gw.shutdown_and_wait().await.unwrap();
}

async fn poll_completed(gw: &TestGateway) -> passerelle::audit::AuditRecord {
    for _ in 0..200 {
        let rows = gw.node.audit.list(&Default::default()).await.unwrap();
        if let Some(r) = rows
            .into_iter()
            .find(|r| r.action == "do_get" && r.status != "requested")
        {
            return r;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the stream's audit entry was never completed");
}

fn chrono_now() -> String {
    // Far enough after the demo's events (2023-2024) to be the latest.
    "2026-01-01T00:00:00Z".to_string()
}
