//! Property tests of the gate against a reference model written independently of it.
//!
//! Run: `cargo test -p passerelle-policies --test properties`
//!
//! For random subject columns (Int64, Int32, Utf8, LargeUtf8, Utf8View with unicode and an
//! empty id, dictionaries of strings and of integers; nulls and duplicates),
//! random consent event sequences over a purpose tree (ties included), both legal bases and
//! random batch splits, the rows the gate lets through are exactly the reference model's, hidden
//! columns are never present, and pseudonyms are the documented HMAC of the subject (computed
//! here with the `hmac` crate alone).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use passerelle_policies::consent::index::KeyKind;
use passerelle_policies::consent::{ConsentEvent, ConsentIndex, ConsentStatus};
use passerelle_policies::enforce::{Grant, GuardedTable, Pseudonymiser};
use passerelle_policies::{
    ColumnClass, ColumnPolicy, DatasetId, DatasetPolicy, Decision, Generalisation, LegalBasis, MemberState, Purpose,
};
use proptest::prelude::*;

const PURPOSES: [&str; 5] = ["a", "a/b", "a/b/c", "a/d", "e"];

#[derive(Debug, Clone, Copy)]
enum Kind {
    Int,
    Int32,
    Utf8,
    LargeUtf8,
    Utf8View,
    Dict,
    DictInt,
}

impl Kind {
    fn is_integer(self) -> bool {
        matches!(self, Kind::Int | Kind::Int32 | Kind::DictInt)
    }

    fn data_type(self) -> DataType {
        let dict = |v: DataType| DataType::Dictionary(Box::new(DataType::Int16), Box::new(v));
        match self {
            Kind::Int => DataType::Int64,
            Kind::Int32 => DataType::Int32,
            Kind::Utf8 => DataType::Utf8,
            Kind::LargeUtf8 => DataType::LargeUtf8,
            Kind::Utf8View => DataType::Utf8View,
            Kind::Dict => dict(DataType::Utf8),
            Kind::DictInt => dict(DataType::Int64),
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    kind: Kind,
    basis: LegalBasis,
    purpose: usize,
    /// (subject, purpose index, granted, time)
    events: Vec<(u8, usize, bool, i64)>,
    rows: Vec<Option<u8>>,
    splits: Vec<usize>,
}

fn subject_text(kind: Kind, s: u8) -> String {
    match kind {
        _ if kind.is_integer() => s.to_string(),
        // An empty id is an id like any other.
        _ if s == 11 => String::new(),
        // Unicode, and ids that differ only after a multi-byte character.
        _ => format!("é{s}ü"),
    }
}

/// The documented pseudonym, computed with the `hmac` crate alone (not the gate's code):
/// `hex(1 || HMAC-SHA256(k_org, text)[..15])`, `k_org = HMAC-SHA256(master, "passerelle/pseudonym/v1/" || org)`.
fn reference_pseudonym(master: &[u8], org: &str, text: &str) -> String {
    use hmac::{Hmac, Mac};
    type H = Hmac<sha2::Sha256>;
    let mut kdf = H::new_from_slice(master).unwrap();
    kdf.update(format!("passerelle/pseudonym/v1/{org}").as_bytes());
    let mut mac = H::new_from_slice(&kdf.finalize().into_bytes()).unwrap();
    mac.update(text.as_bytes());
    let tag = mac.finalize().into_bytes();
    std::iter::once(1u8)
        .chain(tag[..15].iter().copied())
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![
            Just(Kind::Int),
            Just(Kind::Int32),
            Just(Kind::Utf8),
            Just(Kind::LargeUtf8),
            Just(Kind::Utf8View),
            Just(Kind::Dict),
            Just(Kind::DictInt),
        ],
        prop_oneof![Just(LegalBasis::Consent), Just(LegalBasis::PublicInterest)],
        0..PURPOSES.len(),
        prop::collection::vec((0u8..12, 0..PURPOSES.len(), any::<bool>(), 0i64..6), 0..40),
        prop::collection::vec(prop::option::weighted(0.9, 0u8..15), 0..120),
        prop::collection::vec(0usize..120, 0..5),
    )
        .prop_map(|(kind, basis, purpose, events, rows, splits)| Case {
            kind,
            basis,
            purpose,
            events,
            rows,
            splits,
        })
}

/// The rule, written out plainly: the latest event among the purpose and its ancestors decides;
/// at equal times a withdrawal wins, then the later event.
fn reference_keep(case: &Case, subject: Option<u8>) -> bool {
    let Some(s) = subject else { return false };
    let want = PURPOSES[case.purpose];
    let mut best: Option<(i64, bool, usize, bool)> = None; // (time, withdrawn, seq, granted)
    for (seq, (es, p, granted, at)) in case.events.iter().enumerate() {
        let p = PURPOSES[*p];
        let ancestor_or_self = want == p || want.starts_with(&format!("{p}/"));
        if *es != s || !ancestor_or_self {
            continue;
        }
        let key = (*at, !*granted, seq, *granted);
        if best.is_none_or(|b| (key.0, key.1, key.2) > (b.0, b.1, b.2)) {
            best = Some(key);
        }
    }
    match case.basis {
        LegalBasis::Consent => best.is_some_and(|b| b.3),
        LegalBasis::PublicInterest => best.is_none_or(|b| b.3),
    }
}

fn policy(kind: Kind) -> DatasetPolicy {
    let mut columns = BTreeMap::new();
    let c = |class, generalise| ColumnPolicy {
        class,
        generalise,
        mask: None,
    };
    columns.insert("subject".to_string(), c(ColumnClass::Identifier, None));
    columns.insert("name".to_string(), c(ColumnClass::DirectIdentifier, None));
    columns.insert("row".to_string(), c(ColumnClass::NonPersonal, None));
    columns.insert(
        "postcode".to_string(),
        c(ColumnClass::QuasiIdentifier, Some(Generalisation::Prefix(1))),
    );
    let _ = kind;
    DatasetPolicy {
        name: DatasetId::parse("t").unwrap(),
        member_state: MemberState::parse("FR").unwrap(),
        controller: "ctl".into(),
        subject_column: "subject".into(),
        legal_basis: LegalBasis::Consent,
        consent_registry: "reg".into(),
        purposes: PURPOSES.iter().map(|p| Purpose::parse(p).unwrap()).collect(),
        columns,
        special_category: false,
        release: passerelle_policies::Release::Rows,
        min_group_size: passerelle_policies::DEFAULT_MIN_GROUP_SIZE,
        k_anonymity: None,
    }
}

fn batches(case: &Case) -> (Arc<Schema>, Vec<RecordBatch>) {
    let subject_type = case.kind.data_type();
    let schema = Arc::new(Schema::new(vec![
        Field::new("subject", subject_type.clone(), true),
        Field::new("name", DataType::Utf8, true),
        Field::new("row", DataType::Int64, false),
        Field::new("postcode", DataType::Utf8, true),
    ]));
    let mut cuts: Vec<usize> = case.splits.iter().map(|s| s % (case.rows.len() + 1)).collect();
    cuts.extend([0, case.rows.len()]);
    cuts.sort();
    cuts.dedup();
    let mut out = Vec::new();
    for w in cuts.windows(2) {
        let range = w[0]..w[1];
        let rows = &case.rows[range.clone()];
        // Built as Int64 or Utf8, then cast to the case's layout (the cast kernels are arrow's).
        let base: ArrayRef = if case.kind.is_integer() {
            Arc::new(Int64Array::from(
                rows.iter().map(|s| s.map(i64::from)).collect::<Vec<_>>(),
            ))
        } else {
            Arc::new(StringArray::from(
                rows.iter()
                    .map(|s| s.map(|s| subject_text(case.kind, s)))
                    .collect::<Vec<_>>(),
            ))
        };
        let subject = arrow::compute::cast(&base, &subject_type).unwrap();
        let name: ArrayRef = Arc::new(StringArray::from(
            rows.iter().map(|_| Some("Secret Name")).collect::<Vec<_>>(),
        ));
        let row: ArrayRef = Arc::new(Int64Array::from(range.clone().map(|i| i as i64).collect::<Vec<_>>()));
        let postcode: ArrayRef = Arc::new(StringArray::from(
            range.map(|i| Some(format!("{:05}", i * 7))).collect::<Vec<_>>(),
        ));
        out.push(RecordBatch::try_new(Arc::clone(&schema), vec![subject, name, row, postcode]).unwrap());
    }
    (schema, out)
}

fn run(case: &Case) -> Vec<RecordBatch> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let index = Arc::new(ConsentIndex::new());
        let events: Vec<ConsentEvent> = case
            .events
            .iter()
            .map(|(s, p, g, at)| ConsentEvent {
                subject_id: subject_text(case.kind, *s),
                purpose: Purpose::parse(PURPOSES[*p]).unwrap(),
                status: if *g {
                    ConsentStatus::Granted
                } else {
                    ConsentStatus::Withdrawn
                },
                at_micros: *at,
                expires_at_micros: None,
            })
            .collect();
        // Compile the request's set half-way, so the second half is applied by patching the
        // compiled set in place (the withdrawal fast path), not by a fresh compile.
        let half = events.len() / 2;
        index.apply(events[..half].iter().enumerate().map(|(i, e)| (i as u64 + 1, "reg", e)));
        let kind = KeyKind::of(&case.kind.data_type());
        let _warm = index.subject_set(
            "reg",
            &Purpose::parse(PURPOSES[case.purpose]).unwrap(),
            case.basis,
            kind,
        );
        index.apply(
            events[half..]
                .iter()
                .enumerate()
                .map(|(i, e)| ((half + i) as u64 + 1, "reg", e)),
        );
        let mut policy = policy(case.kind);
        policy.legal_basis = case.basis;
        let (schema, data) = batches(case);
        let raw = Arc::new(MemTable::try_new(Arc::clone(&schema), vec![data]).unwrap());
        let decision = Decision {
            allow: true,
            rule: None,
            reason: "test".into(),
            special_category: false,
        };
        let grant = Grant::new(
            &decision,
            Arc::new(policy),
            schema,
            Purpose::parse(PURPOSES[case.purpose]).unwrap(),
            Pseudonymiser::for_recipient(b"k", "org"),
            index,
        )
        .unwrap();
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(GuardedTable::new(raw, grant)))
            .unwrap();
        ctx.table("t").await.unwrap().collect().await.unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn gate_equals_reference_model(case in case()) {
        let out = run(&case);
        let mut got: Vec<i64> = Vec::new();
        let mut pseudonym_of: HashMap<u8, String> = HashMap::new();
        let mut seen_pseudonyms: HashSet<String> = HashSet::new();
        for b in &out {
            let names: Vec<&str> = b.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
            prop_assert_eq!(&names, &["subject", "row", "postcode"], "hidden columns never appear");
            let rows = b.column(1).as_primitive::<Int64Type>();
            let subjects = b.column(0).as_string::<i32>();
            for i in 0..b.num_rows() {
                let r = rows.value(i);
                got.push(r);
                let s = case.rows[r as usize].unwrap();
                let p = subjects.value(i).to_string();
                prop_assert_eq!(&p, &reference_pseudonym(b"k", "org", &subject_text(case.kind, s)));
                // One subject, one pseudonym; two subjects, two pseudonyms.
                let first = pseudonym_of.entry(s).or_insert_with(|| p.clone());
                prop_assert_eq!(&*first, &p);
                if seen_pseudonyms.insert(p.clone()) {
                    prop_assert_eq!(pseudonym_of.values().filter(|v| **v == p).count(), 1);
                }
                prop_assert_eq!(b.column(2).as_string::<i32>().value(i).chars().count(), 1);
            }
            prop_assert!(b.num_rows() > 0, "empty batches are not sent");
        }
        got.sort();
        let expected: Vec<i64> = (0..case.rows.len()).filter(|i| reference_keep(&case, case.rows[*i])).map(|i| i as i64).collect();
        prop_assert_eq!(got, expected);
    }
}
