//! An independent reference model of the consent rule, read from the demo's own files, so the
//! gate's output is checked against something that does not share its code.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type, TimestampMicrosecondType};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The pseudonyms organisation `org` of member state `member_state` receives for `ids`.
pub fn pseudonyms(
    node: &passerelle::node::Node,
    member_state: &str,
    org: &str,
    ids: impl IntoIterator<Item = i64>,
) -> HashSet<String> {
    let ids: arrow::array::ArrayRef = std::sync::Arc::new(arrow::array::Int64Array::from_iter_values(ids));
    let out = node.pseudonymiser(member_state, org).unwrap().apply(&ids).unwrap();
    out.as_string::<i32>().iter().map(|s| s.unwrap().to_string()).collect()
}

/// Raw demo rows.
pub fn raw_batches(data_dir: &Path) -> Vec<RecordBatch> {
    let f = File::open(data_dir.join("demo/patients/patients.parquet")).unwrap();
    ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

fn ancestors(p: &str) -> Vec<String> {
    let mut out = Vec::new();
    let parts: Vec<&str> = p.split('/').collect();
    for i in 1..=parts.len() {
        out.push(parts[..i].join("/"));
    }
    out
}

/// Subjects whose latest event among `purpose` and its ancestors is a grant, from consent.csv
/// plus extra `(subject, purpose, status, rfc3339)` events.
pub fn consented(data_dir: &Path, purpose: &str, extra: &[(String, String, String, String)]) -> HashSet<i64> {
    let text = std::fs::read_to_string(data_dir.join("demo/consent.csv")).unwrap();
    let wanted: HashSet<String> = ancestors(purpose).into_iter().collect();
    let mut latest: HashMap<String, (String, bool)> = HashMap::new();
    let mut events: Vec<(String, String, String, String)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[1].to_string(), f[2].to_string(), f[3].to_string())
        })
        .collect();
    events.extend_from_slice(extra);
    for (s, p, st, t) in events {
        if !wanted.contains(&p) {
            continue;
        }
        // RFC 3339 in UTC with a fixed shape compares as text; ties go to the later line.
        let t = chrono_normalise(&t);
        match latest.get(&s) {
            Some((cur, _)) if *cur > t => {}
            _ => {
                latest.insert(s, (t, st == "granted"));
            }
        }
    }
    latest
        .into_iter()
        .filter(|(_, (_, g))| *g)
        .map(|(s, _)| s.parse().unwrap())
        .collect()
}

fn chrono_normalise(t: &str) -> String {
    // Normalise to microsecond UTC so `...Z` and `...000000Z` compare correctly.
    let secs_and_frac = t.trim_end_matches('Z');
    let (secs, frac) = secs_and_frac.split_once('.').unwrap_or((secs_and_frac, ""));
    format!("{secs}.{:0<6}", frac)
}

/// Multiset of (admitted_at, hba1c bits, diagnosis) for rows whose subject is in `keep`.
pub fn fingerprint(batches: &[RecordBatch], keep: Option<&HashSet<i64>>) -> Vec<(i64, u64, String)> {
    let mut out = Vec::new();
    for b in batches {
        let at = b
            .column_by_name("admitted_at")
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>();
        let h = b.column_by_name("hba1c").unwrap().as_primitive::<Float64Type>();
        let d = b.column_by_name("diagnosis").unwrap().as_string::<i32>();
        let ids = keep.map(|_| b.column_by_name("patient_id").unwrap().as_primitive::<Int64Type>());
        for i in 0..b.num_rows() {
            if let (Some(k), Some(ids)) = (keep, ids)
                && (ids.is_null(i) || !k.contains(&ids.value(i)))
            {
                continue;
            }
            out.push((at.value(i), h.value(i).to_bits(), d.value(i).to_string()));
        }
    }
    out.sort();
    out
}
