//! Memory and build time of the consent index for N subjects (default 10 million).
//!
//! Run: `cargo bench -p passerelle-policies --bench consent_index` (`PASSERELLE_BENCH_SUBJECTS=N`)
//!
//! Applies one event per subject (70 % grants, integer ids, one purpose), then compiles the
//! probe set for a sub-purpose, and prints the resident-memory growth of each step (VmRSS from
//! /proc/self/status) and the time taken.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use passerelle_policies::consent::index::KeyKind;
use passerelle_policies::consent::{ConsentEvent, ConsentIndex, ConsentStatus};
use passerelle_policies::{LegalBasis, Purpose};

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let n: u64 = std::env::var("PASSERELLE_BENCH_SUBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let purpose = Purpose::parse("research/ai-training").unwrap();
    let index = ConsentIndex::new();
    let before = rss_mb();
    let started = Instant::now();
    const CHUNK: u64 = 1_000_000;
    let mut seq = 0u64;
    for start in (0..n).step_by(CHUNK as usize) {
        let events: Vec<ConsentEvent> = (start..(start + CHUNK).min(n))
            .map(|s| ConsentEvent {
                subject_id: s.to_string(),
                purpose: purpose.clone(),
                status: if s % 10 < 7 {
                    ConsentStatus::Granted
                } else {
                    ConsentStatus::Withdrawn
                },
                at_micros: 1_700_000_000_000_000 + s as i64,
                expires_at_micros: None,
            })
            .collect();
        index.apply(events.iter().map(|e| {
            seq += 1;
            (seq, "registry", e)
        }));
    }
    let applied = started.elapsed();
    let after_apply = rss_mb();
    let started = Instant::now();
    let snap = index.subject_set(
        "registry",
        &Purpose::parse("research/ai-training/llm").unwrap(),
        LegalBasis::Consent,
        KeyKind::Int,
    );
    let compiled = started.elapsed();
    let after_compile = rss_mb();
    println!(
        "subjects: {n}  entries: {}  consenting: {}",
        index.entries(),
        snap.set.len()
    );
    println!(
        "apply:   {:>8.2} s  {:>10.0} events/s  index RSS +{:.0} MB ({:.1} B/subject)",
        applied.as_secs_f64(),
        n as f64 / applied.as_secs_f64(),
        after_apply - before,
        (after_apply - before) * 1048576.0 / n as f64
    );
    println!(
        "compile: {:>8.2} s  probe set heap {:.1} MB  RSS +{:.0} MB",
        compiled.as_secs_f64(),
        snap.set.heap_bytes() as f64 / 1048576.0,
        after_compile - after_apply
    );
    println!("total RSS growth: {:.0} MB", after_compile - before);
}
