//! The in-memory consent index.
//!
//! Events are applied incrementally in store order. For each registry and purpose the index keeps
//! one `i64` per subject, the rank of its latest event: `rank = 2 * time + withdrawn`, so the
//! largest rank is the latest event and, at equal times, a withdrawal beats a grant. Canonical
//! integer ids (`"42"`) are kept as integers, other ids as strings; grants with an end date keep
//! it in a small side map. That is 16 bytes per subject and purpose for integer ids, so ten
//! million subjects fit in a few hundred MB.
//!
//! The gate does not walk events: it asks for a compiled [`SubjectSet`] for (registry, requested
//! purpose, legal basis, key kind), built once per registry version (or earliest grant expiry)
//! and shared by every stream through an `Arc`. A stream checks the registry version at each
//! batch boundary, so a withdrawal reaches open streams.

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

impl KeyKind {
    /// The kind of set a subject column of type `dt` is probed against.
    pub fn of(dt: &arrow::datatypes::DataType) -> Self {
        use arrow::datatypes::DataType as T;
        match dt {
            T::Int32 | T::Int64 => KeyKind::Int,
            T::Dictionary(_, v) if v.is_integer() => KeyKind::Int,
            _ => KeyKind::Str,
        }
    }
}

/// Time source for consent validity, injectable so that tests can move time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Microseconds since the Unix epoch.
    fn now_micros(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> i64 {
        chrono::Utc::now().timestamp_micros()
    }
}

/// A compiled set with the registry version it reflects and the time until which it holds
/// (the earliest future grant expiry among its decisions).
#[derive(Debug, Clone)]
pub struct ConsentSnapshot {
    /// Registry version.
    pub version: u64,
    /// Valid until this time (microseconds since the epoch).
    pub valid_until: i64,
    /// The subjects.
    pub set: Arc<SubjectSet>,
}

/// `2 * time + withdrawn`: larger is later; a withdrawal wins a tie.
fn rank(at_micros: i64, granted: bool) -> i64 {
    at_micros.saturating_mul(2).saturating_add(i64::from(!granted))
}
fn rank_granted(rank: i64) -> bool {
    rank & 1 == 0
}

/// A subject id as stored: canonical integers as integers, anything else as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SubjectKey {
    Int(i64),
    Str(Box<str>),
}

impl SubjectKey {
    fn of(s: &str) -> Self {
        match s.parse::<i64>() {
            Ok(i) if itoa::Buffer::new().format(i) == s => SubjectKey::Int(i),
            _ => SubjectKey::Str(s.into()),
        }
    }
}

/// Latest event rank per subject for one purpose.
#[derive(Debug, Default)]
struct PurposeMap {
    ints: HashMap<i64, i64, RandomState>,
    strs: HashMap<Box<str>, i64, RandomState>,
    /// End of validity of latest events that are grants with an end date.
    expiring: HashMap<SubjectKey, i64, RandomState>,
}

impl PurposeMap {
    fn apply(&mut self, key: SubjectKey, new_rank: i64, expires: Option<i64>) {
        let slot = match &key {
            SubjectKey::Int(i) => self.ints.entry(*i).or_insert(i64::MIN),
            SubjectKey::Str(s) => match self.strs.get_mut(s.as_ref()) {
                Some(r) => r,
                None => self.strs.entry(s.clone()).or_insert(i64::MIN),
            },
        };
        if new_rank < *slot {
            return;
        }
        *slot = new_rank;
        match expires.filter(|_| rank_granted(new_rank)) {
            Some(e) => {
                self.expiring.insert(key, e);
            }
            None => {
                if !self.expiring.is_empty() {
                    self.expiring.remove(&key);
                }
            }
        }
    }

    fn get(&self, key: &SubjectKey) -> Option<(i64, i64)> {
        let r = match key {
            SubjectKey::Int(i) => self.ints.get(i)?,
            SubjectKey::Str(s) => self.strs.get(s.as_ref())?,
        };
        Some((*r, self.expiring.get(key).copied().unwrap_or(i64::MAX)))
    }

    fn len(&self) -> usize {
        self.ints.len() + self.strs.len()
    }
}

#[derive(Debug, Default)]
struct Registry {
    /// Sequence number of the last event applied to this registry.
    version: u64,
    by_purpose: HashMap<Purpose, PurposeMap>,
    compiled: HashMap<(Purpose, LegalBasis, KeyKind), ConsentSnapshot>,
}

impl Registry {
    /// The deepest of `purpose` and its ancestors that an event names, if any.
    fn named_ancestor(&self, purpose: &Purpose) -> Option<Purpose> {
        purpose
            .self_and_ancestors()
            .into_iter()
            .rev()
            .find(|p| self.by_purpose.contains_key(p))
    }

    /// Keeps compiled sets current after one event, changing only the subject's membership, so
    /// a withdrawal costs microseconds however many subjects the registry holds. Sets that cannot
    /// be patched in place are dropped and recompiled on next use.
    fn patch_compiled(&mut self, event_purpose: &Purpose, key: &SubjectKey, seq: u64, now: i64) {
        let Registry {
            by_purpose, compiled, ..
        } = self;
        let mut stale = Vec::new();
        for (k, snap) in compiled.iter_mut() {
            let (purpose, basis, kind) = k;
            snap.version = seq;
            if !event_purpose.covers(purpose) {
                continue;
            }
            let maps: Vec<&PurposeMap> = purpose
                .self_and_ancestors()
                .iter()
                .filter_map(|p| by_purpose.get(p))
                .collect();
            // Ids are byte-exact: text that is not an integer's canonical decimal (`042`, ` 42`,
            // `+42`) never names a subject of an integer column.
            if *kind == KeyKind::Int && matches!(key, SubjectKey::Str(_)) {
                continue;
            }
            let latest = maps.iter().filter_map(|m| m.get(key)).max_by_key(|(r, _)| *r);
            let member = match latest {
                None => false,
                Some((r, expires)) => {
                    let granted = rank_granted(r) && expires > now;
                    if granted && expires != i64::MAX {
                        snap.valid_until = snap.valid_until.min(expires);
                    }
                    if *basis == LegalBasis::Consent {
                        granted
                    } else {
                        !rank_granted(r)
                    }
                }
            };
            if !Arc::make_mut(&mut snap.set).set_member(key, member) {
                stale.push(k.clone());
            }
        }
        for k in stale {
            compiled.remove(&k);
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    applied_seq: u64,
    registries: HashMap<String, Registry>,
}

/// Latest consent state per (registry, purpose, subject), and compiled probe sets.
#[derive(Debug)]
pub struct ConsentIndex {
    inner: RwLock<Inner>,
    clock: Arc<dyn Clock>,
}

impl Default for ConsentIndex {
    fn default() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }
}

/// Integer subject ids: a bitmap when the ids are dense, a hash set otherwise.
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone)]
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
                if id < *min {
                    return false;
                }
                let off = id.wrapping_sub(*min) as u64;
                if off >= (bits.len() as u64) * 64 {
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
            SubjectSet::Ints(_) => match SubjectKey::of(id) {
                SubjectKey::Int(v) => self.contains_i64(v),
                SubjectKey::Str(_) => false,
            },
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

    /// Makes one subject a member or not. Returns false when the set cannot take the change in
    /// place (an id outside a dense bitmap's range; a key of the wrong kind): recompile then.
    fn set_member(&mut self, key: &SubjectKey, member: bool) -> bool {
        match (self, key) {
            (SubjectSet::Ints(IntSet::Dense { min, bits, len }), SubjectKey::Int(id)) => {
                let in_range = *id >= *min && (id.wrapping_sub(*min) as u64) < (bits.len() as u64) * 64;
                if !in_range {
                    return !member;
                }
                let off = id.wrapping_sub(*min) as usize;
                let (word, bit) = (off >> 6, 1u64 << (off & 63));
                let was = bits[word] & bit != 0;
                if member && !was {
                    bits[word] |= bit;
                    *len += 1;
                } else if !member && was {
                    bits[word] &= !bit;
                    *len -= 1;
                }
                true
            }
            (SubjectSet::Ints(IntSet::Sparse(s)), SubjectKey::Int(id)) => {
                if member {
                    s.insert(*id);
                } else {
                    s.remove(id);
                }
                true
            }
            (SubjectSet::Strs(s), key) => {
                let text: Box<str> = match key {
                    SubjectKey::Int(i) => Box::from(itoa::Buffer::new().format(*i)),
                    SubjectKey::Str(t) => t.clone(),
                };
                if member {
                    s.insert(text);
                } else {
                    s.remove(&text);
                }
                true
            }
            (SubjectSet::Ints(_), SubjectKey::Str(_)) => false,
        }
    }

    /// Approximate heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        match self {
            SubjectSet::Ints(IntSet::Dense { bits, .. }) => bits.capacity() * 8,
            SubjectSet::Ints(IntSet::Sparse(s)) => s.capacity() * 9,
            SubjectSet::Strs(s) => s.capacity() * 17 + s.iter().map(|b| b.len().max(8)).sum::<usize>(),
        }
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
    /// An empty index on the system clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty index on the given clock.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            clock,
        }
    }

    /// The index's notion of now.
    pub fn now_micros(&self) -> i64 {
        self.clock.now_micros()
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

    /// Number of (subject, purpose) entries held, for memory reports.
    pub fn entries(&self) -> usize {
        self.read()
            .registries
            .values()
            .flat_map(|r| r.by_purpose.values())
            .map(PurposeMap::len)
            .sum()
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
            let now = self.clock.now_micros();
            let reg = inner.registries.entry(registry.to_string()).or_default();
            reg.version = seq;
            let r = rank(ev.at_micros, ev.status == ConsentStatus::Granted);
            let key = SubjectKey::of(&ev.subject_id);
            reg.by_purpose
                .entry(ev.purpose.clone())
                .or_default()
                .apply(key.clone(), r, ev.expires_at_micros);
            reg.patch_compiled(&ev.purpose, &key, seq, now);
        }
    }

    /// The version of one registry: the sequence number of its last event (0 if none).
    pub fn registry_version(&self, registry: &str) -> u64 {
        self.read().registries.get(registry).map_or(0, |r| r.version)
    }

    /// Reference decision for one subject (used by explain and tests; the gate uses sets).
    /// `None` when the subject has no event for the purpose or its ancestors.
    pub fn decide(&self, registry: &str, purpose: &Purpose, subject: &str) -> Option<ConsentStatus> {
        let inner = self.read();
        let reg = inner.registries.get(registry)?;
        let key = SubjectKey::of(subject);
        let now = self.clock.now_micros();
        let (r, expires) = purpose
            .self_and_ancestors()
            .iter()
            .filter_map(|p| reg.by_purpose.get(p)?.get(&key))
            .max_by_key(|(r, _)| *r)?;
        Some(if rank_granted(r) && expires > now {
            ConsentStatus::Granted
        } else {
            ConsentStatus::Withdrawn
        })
    }

    /// The compiled set for a request, with the registry version it reflects and how long it holds.
    ///
    /// The set of a purpose depends only on the events for it and its ancestors, so it is cached
    /// under the deepest of those that an event names: callers choose purposes freely
    /// (`research/ai-training/<anything>`), and what they send must not grow the cache; the
    /// number of sets is bounded by the purposes the registry's events name.
    pub fn subject_set(&self, registry: &str, purpose: &Purpose, basis: LegalBasis, kind: KeyKind) -> ConsentSnapshot {
        let now = self.clock.now_micros();
        let empty = |version: u64| ConsentSnapshot {
            version,
            valid_until: i64::MAX,
            set: Arc::new(SubjectSet::compile_ints(Vec::new())),
        };
        {
            let inner = self.read();
            let Some(reg) = inner.registries.get(registry) else {
                return empty(0);
            };
            // No event names the purpose or an ancestor: nobody consented, nobody objected.
            let Some(named) = reg.named_ancestor(purpose) else {
                return empty(reg.version);
            };
            if let Some(snap) = reg.compiled.get(&(named, basis, kind)).filter(|s| now < s.valid_until) {
                return snap.clone();
            }
        }
        let mut inner = self.write();
        let Some(reg) = inner.registries.get_mut(registry) else {
            return empty(0);
        };
        let Some(named) = reg.named_ancestor(purpose) else {
            return empty(reg.version);
        };
        let key = (named, basis, kind);
        if let Some(snap) = reg.compiled.get(&key).filter(|s| now < s.valid_until) {
            return snap.clone();
        }
        let (set, valid_until) = compile(reg, &key.0, basis, kind, now);
        let snap = ConsentSnapshot {
            version: reg.version,
            valid_until,
            set: Arc::new(set),
        };
        reg.compiled.insert(key, snap.clone());
        snap
    }
}

/// Decides every subject with an event among `purpose` and its ancestors.
fn compile(reg: &Registry, purpose: &Purpose, basis: LegalBasis, kind: KeyKind, now: i64) -> (SubjectSet, i64) {
    let maps: Vec<&PurposeMap> = purpose
        .self_and_ancestors()
        .iter()
        .filter_map(|p| reg.by_purpose.get(p))
        .collect();
    // Under consent we collect valid grants (rows kept); under public interest, everyone else
    // with an event (objections; an expired grant is no objection).
    let want_granted = basis == LegalBasis::Consent;
    let mut valid_until = i64::MAX;
    let mut decide = |r: i64, expires: i64| {
        let granted = rank_granted(r) && expires > now;
        if granted && expires != i64::MAX {
            valid_until = valid_until.min(expires);
        }
        if basis == LegalBasis::Consent {
            granted == want_granted
        } else {
            !rank_granted(r)
        }
    };
    let expiry = |key: &SubjectKey, m: &PurposeMap| m.expiring.get(key).copied().unwrap_or(i64::MAX);
    let set = match kind {
        KeyKind::Int => {
            // Integer columns match only ids written as the integer's canonical decimal text
            // (`42`, `-5`): `042`, ` 42` or `+42` are other subjects, which no integer names.
            let mut latest: HashMap<i64, (i64, i64), RandomState> = HashMap::default();
            for m in &maps {
                for (id, r) in &m.ints {
                    merge(&mut latest, *id, *r, || expiry(&SubjectKey::Int(*id), m));
                }
            }
            SubjectSet::compile_ints(
                latest
                    .into_iter()
                    .filter(|(_, (r, e))| decide(*r, *e))
                    .map(|(k, _)| k)
                    .collect(),
            )
        }
        KeyKind::Str => {
            let mut latest: HashMap<SubjectKey, (i64, i64), RandomState> = HashMap::default();
            for m in &maps {
                for (id, r) in &m.ints {
                    let k = SubjectKey::Int(*id);
                    let e = expiry(&k, m);
                    merge(&mut latest, k, *r, || e);
                }
                for (s, r) in &m.strs {
                    let k = SubjectKey::Str(s.clone());
                    let e = expiry(&k, m);
                    merge(&mut latest, k, *r, || e);
                }
            }
            SubjectSet::Strs(
                latest
                    .into_iter()
                    .filter(|(_, (r, e))| decide(*r, *e))
                    .map(|(k, _)| match k {
                        SubjectKey::Int(i) => Box::from(itoa::Buffer::new().format(i)),
                        SubjectKey::Str(s) => s,
                    })
                    .collect(),
            )
        }
    };
    (set, valid_until)
}

fn merge<K: std::hash::Hash + Eq>(
    latest: &mut HashMap<K, (i64, i64), RandomState>,
    k: K,
    r: i64,
    expires: impl FnOnce() -> i64,
) {
    match latest.get_mut(&k) {
        Some(cur) if cur.0 >= r => {}
        Some(cur) => *cur = (r, expires()),
        None => {
            latest.insert(k, (r, expires()));
        }
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
    /// Current compiled set.
    pub fn snapshot(&self) -> ConsentSnapshot {
        self.index
            .subject_set(&self.registry, &self.purpose, self.basis, self.kind)
    }
    /// Whether a snapshot still holds: same registry version and no grant in it has expired.
    pub fn is_current(&self, snap: &ConsentSnapshot) -> bool {
        snap.version == self.version() && self.index.now_micros() < snap.valid_until
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
            expires_at_micros: None,
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
        let set = idx.subject_set("r", &ai, LegalBasis::Consent, KeyKind::Int).set;
        assert!(!set.contains_i64(1) && !set.contains_i64(2) && !set.contains_i64(3) && !set.contains_i64(4));
        let epi = Purpose::parse("research/epidemiology").unwrap();
        let set = idx.subject_set("r", &epi, LegalBasis::Consent, KeyKind::Str).set;
        assert!(set.contains_str("1") && set.contains_str("3") && !set.contains_str("2"));
        let objectors = idx.subject_set("r", &ai, LegalBasis::PublicInterest, KeyKind::Int).set;
        assert!(objectors.contains_i64(1) && objectors.contains_i64(2) && objectors.contains_i64(4));
        assert_eq!(objectors.len(), 3);
    }

    #[test]
    fn purposes_callers_invent_share_one_cached_set() {
        let idx = ConsentIndex::new();
        idx.apply([
            (1, "r", &ev("1", "research", "granted", 1)),
            (2, "r", &ev("2", "research/ai-training", "granted", 2)),
            (3, "r", &ev("1", "research/ai-training/ads", "withdrawn", 3)),
        ]);
        let set = |p: &str| {
            let snap = idx.subject_set("r", &Purpose::parse(p).unwrap(), LegalBasis::Consent, KeyKind::Int);
            assert_eq!(snap.version, idx.registry_version("r"), "{p}");
            let mut members: Vec<i64> = (0..5).filter(|i| snap.set.contains_i64(*i)).collect();
            members.sort_unstable();
            members
        };
        for i in 0..1000 {
            assert_eq!(set(&format!("research/ai-training/x{i}/y")), vec![1, 2]);
        }
        assert_eq!(
            idx.read().registries["r"].compiled.len(),
            1,
            "a thousand purposes, one set"
        );
        assert_eq!(
            set("research/ai-training/ads/video"),
            vec![2],
            "a named sub-purpose has its own events"
        );
        assert_eq!(set("research/other"), vec![1]);
        assert_eq!(set("marketing"), Vec::<i64>::new(), "no event names it or an ancestor");
        assert_eq!(idx.read().registries["r"].compiled.len(), 3);
        // Incremental patches reach the shared set.
        idx.apply([(4, "r", &ev("2", "research", "withdrawn", 4))]);
        assert_eq!(
            set("research/ai-training/x7"),
            vec![1],
            "the later withdrawal from an ancestor decides for 2"
        );
        idx.apply([(5, "r", &ev("1", "research/ai-training", "withdrawn", 5))]);
        let snap = idx.subject_set(
            "r",
            &Purpose::parse("research/ai-training/x9").unwrap(),
            LegalBasis::Consent,
            KeyKind::Int,
        );
        assert!(!snap.set.contains_i64(1) && !snap.set.contains_i64(2) && snap.version == 5);
    }

    #[test]
    fn version_moves_and_cache_invalidates() {
        let idx = ConsentIndex::new();
        let p = Purpose::parse("a").unwrap();
        let g = ev("7", "a", "granted", 1);
        idx.apply([(1, "r", &g)]);
        let ConsentSnapshot {
            version: v1, set: s1, ..
        } = idx.subject_set("r", &p, LegalBasis::Consent, KeyKind::Int);
        assert!(s1.contains_i64(7));
        let w = ev("7", "a", "withdrawn", 2);
        idx.apply([(2, "r", &w), (1, "r", &g)]);
        let ConsentSnapshot {
            version: v2, set: s2, ..
        } = idx.subject_set("r", &p, LegalBasis::Consent, KeyKind::Int);
        assert_eq!((v1, v2), (1, 2));
        assert!(!s2.contains_i64(7));
        assert_eq!(idx.registry_version("other"), 0);
    }

    #[derive(Debug)]
    struct FixedClock(std::sync::atomic::AtomicI64);
    impl Clock for FixedClock {
        fn now_micros(&self) -> i64 {
            self.0.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    #[test]
    fn grants_expire_and_sets_follow_the_clock() {
        let clock = Arc::new(FixedClock(std::sync::atomic::AtomicI64::new(100)));
        let idx = ConsentIndex::with_clock(Arc::clone(&clock) as Arc<dyn Clock>);
        let mut g = ev("1", "a", "granted", 10);
        g.expires_at_micros = Some(200);
        let forever = ev("2", "a", "granted", 10);
        idx.apply([(1, "r", &g), (2, "r", &forever)]);
        let p = Purpose::parse("a").unwrap();
        let snap = idx.subject_set("r", &p, LegalBasis::Consent, KeyKind::Int);
        assert!(snap.set.contains_i64(1) && snap.set.contains_i64(2));
        assert_eq!(snap.valid_until, 200);
        let view = ConsentView::new(
            Arc::new(ConsentIndex::with_clock(Arc::clone(&clock) as Arc<dyn Clock>)),
            "r".into(),
            p.clone(),
            LegalBasis::Consent,
            KeyKind::Int,
        );
        assert!(view.is_current(&view.snapshot()));
        clock.0.store(200, std::sync::atomic::Ordering::Relaxed);
        let later = idx.subject_set("r", &p, LegalBasis::Consent, KeyKind::Int);
        assert!(!later.set.contains_i64(1) && later.set.contains_i64(2));
        assert_eq!(idx.decide("r", &p, "1"), Some(ConsentStatus::Withdrawn));
        // Under public interest an expired grant is simply no objection.
        assert!(
            !idx.subject_set("r", &p, LegalBasis::PublicInterest, KeyKind::Int)
                .set
                .contains_i64(1)
        );
    }

    #[test]
    fn integer_columns_match_only_the_canonical_decimal_text() {
        let idx = ConsentIndex::new();
        // Grants under spellings that are not 42's canonical text, and a grant for -5.
        let events = [
            ev("000042", "a", "granted", 1),
            ev(" 42", "a", "granted", 1),
            ev("+42", "a", "granted", 1),
            ev("42 ", "a", "granted", 1),
            ev("-5", "a", "granted", 1),
            ev("-0", "a", "granted", 1),
        ];
        idx.apply(events.iter().enumerate().map(|(i, e)| (i as u64 + 1, "r", e)));
        let p = Purpose::parse("a").unwrap();
        let ints = idx.subject_set("r", &p, LegalBasis::Consent, KeyKind::Int).set;
        assert!(!ints.contains_i64(42), "no spelling but `42` names subject 42");
        assert!(!ints.contains_i64(0), "`-0` is not 0's canonical text");
        assert!(ints.contains_i64(-5));
        for spelled in ["42", "000042", " 42", "+42"] {
            assert!(!ints.contains_str(spelled), "{spelled:?}");
        }
        assert!(ints.contains_str("-5"));
        // String columns keep every spelling apart, byte for byte.
        let strs = idx.subject_set("r", &p, LegalBasis::Consent, KeyKind::Str).set;
        for (id, member) in [
            ("000042", true),
            (" 42", true),
            ("+42", true),
            ("42", false),
            ("42  ", false),
        ] {
            assert_eq!(strs.contains_str(id), member, "{id:?}");
        }
        // Under public interest the set holds objectors: a withdrawal spelled `042` is not
        // subject 42's objection, one spelled `42` is.
        idx.apply([(100, "r", &ev("042", "a", "withdrawn", 2))]);
        let objectors = || idx.subject_set("r", &p, LegalBasis::PublicInterest, KeyKind::Int).set;
        assert!(!objectors().contains_i64(42));
        idx.apply([(101, "r", &ev("42", "a", "withdrawn", 3))]);
        assert!(objectors().contains_i64(42));
    }

    #[test]
    fn text_ids_that_are_not_integers_do_not_stop_integer_sets_being_patched() {
        let idx = ConsentIndex::new();
        let events = [
            ev("1", "a", "granted", 1),
            ev("abc", "a", "granted", 1),
            ev("2", "a", "granted", 1),
        ];
        idx.apply(events.iter().enumerate().map(|(i, e)| (i as u64 + 1, "r", e)));
        let p = Purpose::parse("a").unwrap();
        let compiled = || idx.read().registries["r"].compiled.len();
        let _ = idx.subject_set("r", &p, LegalBasis::Consent, KeyKind::Int);
        assert_eq!(compiled(), 1);
        // A withdrawal of an integer id is patched in place: the set stays compiled.
        idx.apply([(10, "r", &ev("2", "a", "withdrawn", 2))]);
        assert_eq!(compiled(), 1, "patched, not dropped for a recompile");
        let set = idx.subject_set("r", &p, LegalBasis::Consent, KeyKind::Int).set;
        assert!(set.contains_i64(1) && !set.contains_i64(2));
        // A non-canonical spelling of an integer is another subject: the set is untouched.
        idx.apply([(11, "r", &ev("01", "a", "withdrawn", 3))]);
        assert_eq!(compiled(), 1);
        let set = idx.subject_set("r", &p, LegalBasis::Consent, KeyKind::Int).set;
        assert!(set.contains_i64(1) && !set.contains_i64(2));
    }

    #[test]
    fn patched_sets_equal_recompiled_ones() {
        let idx = ConsentIndex::new();
        let grants: Vec<ConsentEvent> = (0..200).map(|s| ev(&s.to_string(), "a", "granted", 1)).collect();
        idx.apply(grants.iter().enumerate().map(|(i, e)| (i as u64 + 1, "r", e)));
        let p = Purpose::parse("a/b").unwrap();
        let kinds = [
            (LegalBasis::Consent, KeyKind::Int),
            (LegalBasis::Consent, KeyKind::Str),
            (LegalBasis::PublicInterest, KeyKind::Int),
        ];
        let held: Vec<_> = kinds.iter().map(|(b, k)| idx.subject_set("r", &p, *b, *k)).collect();
        // Withdraw some at the parent, some at the child, re-grant one, and add a new far id.
        let later = [
            ev("3", "a", "withdrawn", 2),
            ev("4", "a/b", "withdrawn", 2),
            ev("3", "a/b", "granted", 3),
            ev("100000", "a", "granted", 2),
            ev("5", "a/c", "withdrawn", 2),
        ];
        idx.apply(later.iter().enumerate().map(|(i, e)| (1000 + i as u64, "r", e)));
        let fresh = ConsentIndex::new();
        fresh.apply(
            grants
                .iter()
                .chain(later.iter())
                .enumerate()
                .map(|(i, e)| (i as u64 + 1, "r", e)),
        );
        for ((b, k), old) in kinds.iter().zip(held) {
            let patched = idx.subject_set("r", &p, *b, *k);
            let recompiled = fresh.subject_set("r", &p, *b, *k);
            assert_eq!(patched.version, 1004);
            for s in (0..210).chain([100000]) {
                assert_eq!(
                    patched.set.contains_i64(s),
                    recompiled.set.contains_i64(s),
                    "{b:?} {k:?} subject {s}"
                );
            }
            assert_eq!(patched.set.len(), recompiled.set.len());
            // Streams holding the old snapshot keep it unchanged until they re-read.
            assert_eq!(old.set.contains_i64(4), *b == LegalBasis::Consent);
        }
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
