//! Kernels of the enforcement gate, with their baselines in the same groups.
//!
//! Run: `cargo bench -p passerelle-policies --bench enforce_kernels -- <filter>`
//!
//! Timed: building the consent keep-mask for 1M subject ids (70 % consenting) for Int64 and Utf8
//! subject columns, against a naive per-row `HashSet<String>` probe (the "obvious" code) and a
//! passthrough (mask of all true); and the column actions: filtering a 1M-row, 8-column batch by
//! the mask, pseudonymising an identifier column, generalising a date column. Batch generation
//! is not timed (`iter_batched`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::compute::filter_record_batch;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use passerelle_policies::consent::index::KeyKind;
use passerelle_policies::consent::{ConsentEvent, ConsentIndex};
use passerelle_policies::enforce::Pseudonymiser;
use passerelle_policies::enforce::kernels::{consent_mask, generalise};
use passerelle_policies::{Generalisation, LegalBasis, Purpose};

const ROWS: usize = 1_000_000;
const SUBJECTS: i64 = 500_000;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn ids() -> Vec<i64> {
    (0..ROWS).map(|i| (mix(i as u64) % SUBJECTS as u64) as i64).collect()
}

fn index() -> (Arc<ConsentIndex>, Vec<i64>) {
    let granted: Vec<i64> = (0..SUBJECTS).filter(|s| mix(*s as u64 ^ 7) % 100 < 70).collect();
    let events: Vec<ConsentEvent> = granted
        .iter()
        .map(|s| ConsentEvent::parse(&s.to_string(), "research", "granted", "2024-01-01T00:00:00Z").unwrap())
        .collect();
    let idx = Arc::new(ConsentIndex::new());
    idx.apply(events.iter().enumerate().map(|(i, e)| (i as u64 + 1, "r", e)));
    (idx, granted)
}

fn consent(c: &mut Criterion) {
    let (idx, granted) = index();
    let purpose = Purpose::parse("research/ai-training").unwrap();
    let int_ids: ArrayRef = Arc::new(Int64Array::from(ids()));
    let str_ids: ArrayRef = Arc::new(StringArray::from(
        ids().iter().map(|i| i.to_string()).collect::<Vec<_>>(),
    ));
    let int_set = idx.subject_set("r", &purpose, LegalBasis::Consent, KeyKind::Int).set;
    let str_set = idx.subject_set("r", &purpose, LegalBasis::Consent, KeyKind::Str).set;
    let naive: HashSet<String> = granted.iter().map(|s| s.to_string()).collect();

    let mut g = c.benchmark_group("consent_filter");
    g.throughput(Throughput::Elements(ROWS as u64));
    let id = |s: &str| BenchmarkId::new(s, "1M_rows_70pct");
    g.bench_function(id("passthrough"), |b| b.iter(|| BooleanArray::from(vec![true; ROWS])));
    g.bench_function(id("int64_mask"), |b| {
        b.iter(|| consent_mask(int_ids.as_ref(), &int_set, true).unwrap())
    });
    g.bench_function(id("utf8_mask"), |b| {
        b.iter(|| consent_mask(str_ids.as_ref(), &str_set, true).unwrap())
    });
    let ints = ids();
    g.bench_function(id("naive_hashset_string_per_row"), |b| {
        b.iter(|| {
            ints.iter()
                .map(|i| Some(naive.contains(&i.to_string())))
                .collect::<BooleanArray>()
        })
    });
    g.finish();
}

fn batch() -> RecordBatch {
    let ids = ids();
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("patient_id", Arc::new(Int64Array::from(ids.clone()))),
        (
            "birth_date",
            Arc::new(Date32Array::from(
                ids.iter().map(|i| (i % 30_000) as i32 - 15_000).collect::<Vec<_>>(),
            )),
        ),
        (
            "postcode",
            Arc::new(StringArray::from(
                ids.iter().map(|i| format!("{:05}", i % 99_999)).collect::<Vec<_>>(),
            )),
        ),
        (
            "a",
            Arc::new(Float64Array::from(ids.iter().map(|i| *i as f64).collect::<Vec<_>>())),
        ),
        (
            "b",
            Arc::new(Float64Array::from(
                ids.iter().map(|i| *i as f64 * 0.5).collect::<Vec<_>>(),
            )),
        ),
        (
            "c",
            Arc::new(Int64Array::from(ids.iter().map(|i| i * 3).collect::<Vec<_>>())),
        ),
        (
            "d",
            Arc::new(Int64Array::from(ids.iter().map(|i| i * 5).collect::<Vec<_>>())),
        ),
        (
            "e",
            Arc::new(StringArray::from(
                ids.iter()
                    .map(|i| ["E11.9", "I10", "J45"][(*i % 3) as usize])
                    .collect::<Vec<_>>(),
            )),
        ),
    ];
    RecordBatch::try_from_iter(cols).unwrap()
}

fn actions(c: &mut Criterion) {
    let (idx, _) = index();
    let purpose = Purpose::parse("research").unwrap();
    let set = idx.subject_set("r", &purpose, LegalBasis::Consent, KeyKind::Int).set;
    let b = batch();
    let mask = consent_mask(b.column(0).as_ref(), &set, true).unwrap();
    let pseudo = Pseudonymiser::for_recipient(b"master-key-for-benchmarks-000000", "dkfz");

    let mut g = c.benchmark_group("column_actions");
    g.throughput(Throughput::Elements(ROWS as u64));
    let id = |s: &str| BenchmarkId::new(s, "1M_rows_8cols_70pct");
    g.bench_function(id("passthrough"), |bn| {
        bn.iter_batched(|| b.clone(), |x| x, BatchSize::LargeInput)
    });
    g.bench_function(id("project_hide_filter"), |bn| {
        bn.iter(|| filter_record_batch(&b.project(&[0, 1, 2, 3, 4, 5]).unwrap(), &mask).unwrap())
    });
    g.bench_function(id("pseudonymise"), |bn| bn.iter(|| pseudo.apply(b.column(0)).unwrap()));
    g.bench_function(id("generalise_year"), |bn| {
        bn.iter(|| generalise(b.column(1), Generalisation::Year).unwrap())
    });
    g.bench_function(id("full"), |bn| {
        bn.iter(|| {
            let m = consent_mask(b.column(0).as_ref(), &set, true).unwrap();
            let f = filter_record_batch(&b, &m).unwrap();
            let p = pseudo.apply(f.column(0)).unwrap();
            let y = generalise(f.column(1), Generalisation::Year).unwrap();
            let z = generalise(f.column(2), Generalisation::Prefix(2)).unwrap();
            (p, y, z)
        })
    });
    g.finish();
}

criterion_group!(benches, consent, actions);
criterion_main!(benches);
