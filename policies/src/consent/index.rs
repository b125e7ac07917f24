//! The in-memory consent index.
//!
//! Events are applied incrementally in store order (by sequence number). For each registry and
//! purpose the index keeps the latest event per subject. The gate does not walk events: it asks
//! for a compiled [`SubjectSet`] for (registry, requested purpose, legal basis, key kind), which
//! is built once per registry version and shared by every stream through an `Arc`. A stream
//! checks the registry version at each batch boundary, so a withdrawal reaches open streams.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ahash::RandomState;

use crate::classification::LegalBasis;
use crate::consent::event::{ConsentEvent, ConsentStatus};
use crate::purpose::Purpose;

/// The physical kind of subject column a set is compiled for, so that probes never convert
/// per row between integers and strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// Integer subject ids (Int32/Int64 columns).
    Int,
    /// String subject ids (Utf8, LargeUtf8, Utf8View, dictionaries of those).
    Str,
}

#[derive(Debug, Clone, Copy)]
struct Latest {
    at: i64,
    seq: u64,
    granted: bool,
}

impl Latest {
    /// Order of events for one subject: later time wins; at the same time a withdrawal beats a
    /// grant (the conservative reading); then the later store sequence.
    fn rank(&self) -> (i64, bool, u64) {
        (self.at, !self.granted, self.seq)
    }
}

#[derive(Debug, Default)]
struct Registry {
    /// Sequence number of the last event applied to this registry.
    version: u64,
    by_purpose: HashMap<Purpose, HashMap<Box<str>, Latest, RandomState>>,
    compiled: HashMap<(Purpose, LegalBasis, KeyKind), Arc<SubjectSet>>,
}

#[derive(Debug, Default)]
struct Inner {
    applied_seq: u64,
    registries: HashMap<String, Registry>,
}

/// Latest consent state per (registry, purpose, subject), and compiled probe sets.
#[derive(Debug, Default)]
pub struct ConsentIndex {
    inner: RwLock<Inner>,
}

/// Integer subject ids: a bitmap when the ids are dense, a hash set otherwise.
#[derive(Debug)]
pub enum IntSet {
    /// Bit `id - min` is set for members: one load and a shift per probe.
    Dense {
        /// Smallest member.
        min: i64,
        /// Bitmap over `min..min + bits.len() * 64`.
        bits: Vec<u64>,
        /// Number of members.
        len: usize,
    },
    /// Sparse ids.
    Sparse(HashSet<i64, RandomState>),
}

/// The subjects a compiled rule matches. Under `consent` they are the subjects whose rows are
/// kept; under `public-interest` they are the subjects who objected (rows dropped).
#[derive(Debug)]
pub enum SubjectSet {
    /// For integer subject columns.
    Ints(IntSet),
    /// For string subject columns.
    Strs(HashSet<Box<str>, RandomState>),
}

impl SubjectSet {
    /// Whether an integer subject is a member.
    #[inline]
    pub fn contains_i64(&self, id: i64) -> bool {
        match self {
            SubjectSet::Ints(IntSet::Dense { min, bits, .. }) => {
                let off = id.wrapping_sub(*min);
                if id < *min || off as u64 >= (bits.len() as u64) * 64 {
                    return false;
                }
                let off = off as usize;
                bits[off >> 6] & (1u64 << (off & 63)) != 0
            }
            SubjectSet::Ints(IntSet::Sparse(s)) => s.contains(&id),
            SubjectSet::Strs(s) => s.contains(itoa::Buffer::new().format(id)),
        }
    }

    /// Whether a string subject is a member.
    #[inline]
    pub fn contains_str(&self, id: &str) -> bool {
        match self {
            SubjectSet::Strs(s) => s.contains(id),
            SubjectSet::Ints(_) => id.parse::<i64>().is_ok_and(|v| self.contains_i64(v)),
        }
    }

    /// Number of subjects in the set.
    pub fn len(&self) -> usize {
        match self {
            SubjectSet::Ints(IntSet::Dense { len, .. }) => *len,
            SubjectSet::Ints(IntSet::Sparse(s)) => s.len(),
            SubjectSet::Strs(s) => s.len(),
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn compile_ints(ids: Vec<i64>) -> Self {
        let (Some(&min), Some(&max)) = (ids.iter().min(), ids.iter().max()) else {
            return SubjectSet::Ints(IntSet::Sparse(HashSet::default()));
        };
        let range = (max as i128) - (min as i128) + 1;
        // Dense when the bitmap costs at most ~8 bytes per member (plus a small floor).
        if range <= (ids.len() as i128) * 64 + 65_536 && range <= (1i128 << 34) {
            let mut bits = vec![0u64; (range as usize).div_ceil(64)];
            for id in &ids {
                let off = (*id - min) as usize;
                bits[off >> 6] |= 1u64 << (off & 63);
            }
            let len = bits.iter().map(|w| w.count_ones() as usize).sum();
            SubjectSet::Ints(IntSet::Dense { min, bits, len })
        } else {
            SubjectSet::Ints(IntSet::Sparse(ids.into_iter().collect()))
        }
    }
}

impl ConsentIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Highest store sequence number applied; the refresher loads events after it.
    pub fn applied_seq(&self) -> u64 {
        self.read().applied_seq
    }

    /// Applies events in store order. Events at or below [`Self::applied_seq`] are skipped, so
    /// re-applying a range is harmless.
    pub fn apply<'a>(&self, events: impl IntoIterator<Item = (u64, &'a str, &'a ConsentEvent)>) {
        let mut inner = self.write();
        for (seq, registry, ev) in events {
            if seq <= inner.applied_seq {
                continue;
            }
            inner.applied_seq = seq;
            let reg = inner.registries.entry(registry.to_string()).or_default();
            reg.version = seq;
            reg.compiled.clear();
            let latest = Latest {
                at: ev.at_micros,
                seq,
                granted: ev.status == ConsentStatus::Granted,
            };
            let per_subject = reg.by_purpose.entry(ev.purpose.clone()).or_default();
            match per_subject.get_mut(ev.subject_id.as_str()) {
                Some(cur) if cur.rank() > latest.rank() => {}
                Some(cur) => *cur = latest,
                None => {
                    per_subject.insert(ev.subject_id.as_str().into(), latest);
                }
            }
        }
    }

    /// The version of one registry: the sequence number of its last event (0 if none).
    pub fn registry_version(&self, registry: &str) -> u64 {
        self.read().registries.get(registry).map_or(0, |r| r.version)
    }

    /// Reference decision for one subject (used by explain and tests; the gate uses sets).
    pub fn decide(&self, registry: &str, purpose: &Purpose, subject: &str) -> Option<ConsentStatus> {
        let inner = self.read();
        let reg = inner.registries.get(registry)?;
        latest_for(reg, purpose, subject).map(|l| {
            if l.granted {
                ConsentStatus::Granted
            } else {
                ConsentStatus::Withdrawn
            }
        })
    }

    /// The compiled set for a request, with the registry version it reflects.
    pub fn subject_set(
        &self,
        registry: &str,
        purpose: &Purpose,
        basis: LegalBasis,
        kind: KeyKind,
    ) -> (u64, Arc<SubjectSet>) {
        let key = (purpose.clone(), basis, kind);
        {
            let inner = self.read();
            match inner.registries.get(registry) {
                None => return (0, Arc::new(SubjectSet::compile_ints(Vec::new()))),
                Some(reg) => {
                    if let Some(set) = reg.compiled.get(&key) {
                        return (reg.version, Arc::clone(set));
                    }
                }
            }
        }
        let mut inner = self.write();
        let Some(reg) = inner.registries.get_mut(registry) else {
            return (0, Arc::new(SubjectSet::compile_ints(Vec::new())));
        };
        if let Some(set) = reg.compiled.get(&key) {
            return (reg.version, Arc::clone(set));
        }
        let set = Arc::new(compile(reg, purpose, basis, kind));
        reg.compiled.insert(key, Arc::clone(&set));
        (reg.version, set)
    }
}

fn latest_for(reg: &Registry, purpose: &Purpose, subject: &str) -> Option<Latest> {
    purpose
        .self_and_ancestors()
        .iter()
        .filter_map(|p| reg.by_purpose.get(p)?.get(subject).copied())
        .max_by_key(|l| l.rank())
}

fn compile(reg: &Registry, purpose: &Purpose, basis: LegalBasis, kind: KeyKind) -> SubjectSet {
    let maps: Vec<_> = purpose
        .self_and_ancestors()
        .iter()
        .filter_map(|p| reg.by_purpose.get(p))
        .collect();
    // Under consent we collect grants (rows kept); under public interest, withdrawals (rows dropped).
    let want_granted = basis == LegalBasis::Consent;
    let mut decided: HashMap<&str, Latest, RandomState> = HashMap::default();
    for m in &maps {
        for (subject, l) in m.iter() {
            decided
                .entry(subject)
                .and_modify(|cur| {
                    if l.rank() > cur.rank() {
                        *cur = *l;
                    }
                })
                .or_insert(*l);
        }
    }
    let members = decided
        .into_iter()
        .filter(|(_, l)| l.granted == want_granted)
        .map(|(s, _)| s);
    match kind {
        KeyKind::Int => SubjectSet::compile_ints(members.filter_map(|s| s.parse::<i64>().ok()).collect()),
        KeyKind::Str => SubjectSet::Strs(members.map(Box::from).collect()),
    }
}

/// A stream's handle on the consent that governs it: re-read at every batch boundary.
#[derive(Debug, Clone)]
pub struct ConsentView {
    index: Arc<ConsentIndex>,
    registry: String,
    purpose: Purpose,
    basis: LegalBasis,
    kind: KeyKind,
}

impl ConsentView {
    /// A view for one dataset's registry, the requested purpose and the subject column's kind.
    pub fn new(index: Arc<ConsentIndex>, registry: String, purpose: Purpose, basis: LegalBasis, kind: KeyKind) -> Self {
        Self {
            index,
            registry,
            purpose,
            basis,
            kind,
        }
    }
    /// Current registry version (cheap: one read lock).
    pub fn version(&self) -> u64 {
        self.index.registry_version(&self.registry)
    }
    /// Current compiled set and its version.
    pub fn snapshot(&self) -> (u64, Arc<SubjectSet>) {
        self.index
            .subject_set(&self.registry, &self.purpose, self.basis, self.kind)
    }
    /// Under `consent`, members are kept; under `public-interest`, members are dropped.
    pub fn keep_members(&self) -> bool {
        self.basis == LegalBasis::Consent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(s: &str, p: &str, st: &str, t: i64) -> ConsentEvent {
        ConsentEvent {
            subject_id: s.into(),
            purpose: Purpose::parse(p).unwrap(),
            status: ConsentStatus::parse(st).unwrap(),
            at_micros: t,
        }
    }

    #[test]
    fn latest_event_among_ancestors_decides() {
        let idx = ConsentIndex::new();
        let events = [
            ev("1", "research", "granted", 10),
            ev("1", "research/ai-training", "withdrawn", 20),
            ev("2", "research/ai-training", "granted", 5),
            ev("2", "research", "withdrawn", 30),
            ev("3", "research/epidemiology", "granted", 1),
            ev("4", "research/ai-training", "withdrawn", 50),
            ev("4", "research/ai-training", "granted", 40), // older, arrives later
        ];
        idx.apply(events.iter().enumerate().map(|(i, e)| (i as u64 + 1, "r", e)));
        let ai = Purpose::parse("research/ai-training").unwrap();
        let (_, set) = idx.subject_set("r", &ai, LegalBasis::Consent, KeyKind::Int);
        assert!(!set.contains_i64(1) && !set.contains_i64(2) && !set.contains_i64(3) && !set.contains_i64(4));
        let epi = Purpose::parse("research/epidemiology").unwrap();
        let (_, set) = idx.subject_set("r", &epi, LegalBasis::Consent, KeyKind::Str);
        assert!(set.contains_str("1") && set.contains_str("3") && !set.contains_str("2"));
        let (_, objectors) = idx.subject_set("r", &ai, LegalBasis::PublicInterest, KeyKind::Int);
        assert!(objectors.contains_i64(1) && objectors.contains_i64(2) && objectors.contains_i64(4));
        assert_eq!(objectors.len(), 3);
    }

    #[test]
    fn version_moves_and_cache_invalidates() {
        let idx = ConsentIndex::new();
        let p = Purpose::parse("a").unwrap();
        let g = ev("7", "a", "granted", 1);
        idx.apply([(1, "r", &g)]);
        let (v1, s1) = idx.subject_set("r", &p, LegalBasis::Consent, KeyKind::Int);
        assert!(s1.contains_i64(7));
        let w = ev("7", "a", "withdrawn", 2);
        idx.apply([(2, "r", &w), (1, "r", &g)]);
        let (v2, s2) = idx.subject_set("r", &p, LegalBasis::Consent, KeyKind::Int);
        assert_eq!((v1, v2), (1, 2));
        assert!(!s2.contains_i64(7));
        assert_eq!(idx.registry_version("other"), 0);
    }

    #[test]
    fn dense_and_sparse_int_sets_agree() {
        let dense = SubjectSet::compile_ints((0..1000).step_by(3).collect());
        let sparse = SubjectSet::compile_ints(vec![i64::MIN, -5, 0, 3, i64::MAX]);
        assert!(matches!(dense, SubjectSet::Ints(IntSet::Dense { .. })));
        assert!(matches!(sparse, SubjectSet::Ints(IntSet::Sparse(_))));
        for i in -10..1010 {
            assert_eq!(dense.contains_i64(i), (0..1000).contains(&i) && i % 3 == 0, "{i}");
        }
        assert!(sparse.contains_i64(i64::MIN) && sparse.contains_i64(i64::MAX) && !sparse.contains_i64(1));
        assert!(!dense.contains_i64(i64::MIN) && !dense.contains_i64(i64::MAX));
    }
}
