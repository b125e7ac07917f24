//! End-to-end Flight throughput: the governed stream against the same data unguarded, in one run.
//!
//! Run (release, bench profile):
//!   cargo bench -p passerelle-tests --features bench --bench flight_e2e
//! Rows default to 10,000,000; override with `PASSERELLE_BENCH_ROWS=N`.
//!
//! It starts a gateway in-process on loopback with the synthetic demo data (about 70 % of subjects
//! consenting), then pulls `demo_patients` over Flight: once through the gate (consent filter,
//! pseudonymisation, generalisation) and once through the bench-only unguarded path (same
//! columns, raw values, no filtering). It prints rows/s, MB/s of decoded Arrow data and the
//! governed/unguarded ratio.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use arrow_flight::{FlightDescriptor, Ticket};
use futures::TryStreamExt;
use passerelle_tests::TestGateway;

struct Run {
    rows: usize,
    bytes: usize,
    secs: f64,
    /// CPU seconds of the whole process (gateway and client) during the pull.
    cpu: f64,
}

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`; 0 elsewhere).
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces): utime is the 14th field, stime the 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Unguarded,
    Governed,
    /// Governed, without the identifier column: the gate's cost without HMAC pseudonymisation.
    GovernedNoIdentifier,
}

async fn pull(gw: &TestGateway, mode: Mode) -> Run {
    let mut c = gw
        .client(Some(&gw.key("trainer-de")), Some("research/ai-training"))
        .await
        .unwrap();
    let started = Instant::now();
    let cpu0 = cpu_secs();
    let descriptor = match mode {
        Mode::Unguarded => None,
        Mode::Governed => Some(FlightDescriptor::new_path(vec!["demo_patients".into()])),
        Mode::GovernedNoIdentifier => Some(FlightDescriptor::new_cmd(
            r#"{"dataset": "demo_patients", "columns": ["birth_date", "postcode", "diagnosis", "hba1c", "admitted_at"]}"#,
        )),
    };
    let ticket = match descriptor {
        Some(d) => c.get_flight_info(d).await.unwrap().endpoint[0].ticket.clone().unwrap(),
        None => Ticket::new("bench-unguarded:demo_patients"),
    };
    let mut stream = c.do_get(ticket).await.unwrap();
    let (mut rows, mut bytes) = (0, 0);
    while let Some(b) = stream.try_next().await.unwrap() {
        rows += b.num_rows();
        bytes += b.get_array_memory_size();
    }
    Run {
        rows,
        bytes,
        secs: started.elapsed().as_secs_f64(),
        cpu: cpu_secs() - cpu0,
    }
}

fn best(runs: &[Run]) -> &Run {
    runs.iter().min_by(|a, b| a.secs.total_cmp(&b.secs)).unwrap()
}

#[tokio::main]
async fn main() {
    let rows: usize = std::env::var("PASSERELLE_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let setup = Instant::now();
    let gw = TestGateway::start(rows).await.unwrap();
    // The baseline path answers only when the bench itself turns it on.
    gw.node
        .bench_unguarded
        .store(true, std::sync::atomic::Ordering::Relaxed);
    println!(
        "setup: {rows} rows generated, consent loaded in {:.1} s",
        setup.elapsed().as_secs_f64()
    );
    // Warm the page cache and the consent set.
    pull(&gw, Mode::Unguarded).await;
    pull(&gw, Mode::Governed).await;
    let (mut unguarded, mut governed, mut no_id) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        unguarded.push(pull(&gw, Mode::Unguarded).await);
        governed.push(pull(&gw, Mode::Governed).await);
        no_id.push(pull(&gw, Mode::GovernedNoIdentifier).await);
    }
    let (u, g, n) = (best(&unguarded), best(&governed), best(&no_id));
    let line = |name: &str, r: &Run| {
        println!(
            "{name:<10} rows={:>10}  time={:>6.3} s  {:>12.0} rows/s  {:>8.1} MB/s (decoded Arrow)  cores busy {:.2}",
            r.rows,
            r.secs,
            r.rows as f64 / r.secs,
            r.bytes as f64 / r.secs / 1e6,
            r.cpu / r.secs
        );
    };
    line("unguarded", u);
    line("governed", g);
    line("gov_no_id", n);
    println!(
        "governed/unguarded: input rows/s ratio = {:.3}; without the pseudonymised column {:.3}  (governed sends {:.1} % of the rows)",
        u.secs / g.secs,
        u.secs / n.secs,
        100.0 * g.rows as f64 / u.rows as f64
    );
    gw.shutdown_and_wait().await.unwrap();
}
