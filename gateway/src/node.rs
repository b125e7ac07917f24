//! The node: shared state of one Passerelle gateway (stores, keys, consent index) and the
//! snapshot of metadata every request reads. CLI commands and REST handlers call the same
//! operations here, so the rules (validation, role checks) live in one place.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{Datelike as _, Utc};
use passerelle_connectors::{CanonicalLocation, Locations, Scheme};
use passerelle_policies::authz::{DEFAULT_MODEL, DEFAULT_POLICY_FILE, PolicyFile};
use passerelle_policies::consent::{ConsentEvent, ConsentIndex, ConsentStore};
use passerelle_policies::enforce::Pseudonymiser;
use passerelle_policies::{Authorizer, Permit, Principal, Role};
use tokio::sync::watch;

use crate::audit::AuditLog;
use crate::auth::{self, Credentials};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::meta::{self, MetaStore};
use crate::ticket::TicketSigner;

/// How often a running server looks for changes made by the CLI or another process.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(200);

/// Consent events loaded per page when catching up.
const CONSENT_PAGE: u32 = 200_000;

/// An immutable view of the metadata, swapped whole on change.
#[derive(Debug)]
pub struct Snapshot {
    /// Metadata version this snapshot reflects.
    pub meta_version: u64,
    /// Registered datasets by name.
    pub datasets: BTreeMap<String, Arc<Manifest>>,
    principals_by_hash: HashMap<String, Principal>,
    principals_by_name: HashMap<String, Principal>,
    /// The enforcer built from the store.
    pub authorizer: Arc<Authorizer>,
    /// Fingerprint of the policy files' contents this snapshot was built from.
    policy_stamp: u64,
}

impl Snapshot {
    /// The local dataset that is this node's part of federated dataset `name` (or `name` itself
    /// if it is a local dataset belonging to a federation).
    pub fn federated_dataset(&self, name: &str) -> Option<String> {
        if self.datasets.get(name).is_some_and(|m| m.federation.is_some()) {
            return Some(name.to_string());
        }
        self.datasets
            .values()
            .find(|m| m.federation.as_deref() == Some(name))
            .map(|m| m.name.to_string())
    }

    /// The dataset if it exists and the principal may know it exists; otherwise the same
    /// `NotFound` for both cases.
    pub fn visible_dataset(&self, principal: &Principal, name: &str) -> Result<Arc<Manifest>> {
        let not_found = || Error::DatasetNotFound { name: name.to_string() };
        let m = self.datasets.get(name).ok_or_else(not_found)?;
        // Only this node's own admins and auditors see every dataset; a peer's never do.
        let all_seeing = matches!(principal.role, Role::Admin | Role::Auditor) && !principal.is_peer();
        if all_seeing || self.authorizer.visible(principal, &m.policy(), Utc::now()) {
            Ok(Arc::clone(m))
        } else {
            Err(not_found())
        }
    }
}

/// One gateway's state.
pub struct Node {
    /// Where the database, keys and demo data live.
    pub data_dir: PathBuf,
    /// Principals, datasets, permits.
    pub meta: MetaStore,
    /// Durable consent events.
    pub consent_store: ConsentStore,
    /// The audit log.
    pub audit: AuditLog,
    /// In-memory consent index, fed by [`Node::refresh`].
    pub consent: Arc<ConsentIndex>,
    /// Ticket signing.
    pub tickets: TicketSigner,
    /// The node's Ed25519 identity key (tickets, audit checkpoints; published at
    /// `/api/v1/keys`).
    pub node_key: Arc<crate::signing::NodeKey>,
    /// Where the model and default policy come from (built in, or files reloaded on change).
    pub policy: PolicyOptions,
    /// Policy files that failed to load, by content stamp, with the reason (logged once, returned
    /// by every refresh until the files change).
    bad_policy: std::sync::Mutex<Option<(u64, String)>>,
    /// The policy files as they last loaded: while the files on disk are broken, stored changes
    /// (a revoked permit, a new deny rule, a removed dataset) still take effect over these.
    good_policy: std::sync::Mutex<Option<PolicyTexts>>,
    /// Bench builds only: whether the unguarded baseline path answers. Off unless the in-process
    /// bench turns it on, so a binary built with `--all-features` still has no unguarded path.
    #[cfg(feature = "bench")]
    pub bench_unguarded: std::sync::atomic::AtomicBool,
    /// How long tickets live.
    pub ticket_ttl: Duration,
    /// Whether callers without a client certificate may use API keys (`[tls] allow_bearer`;
    /// always true without TLS).
    pub allow_bearer: bool,
    /// Request-rate, stream and failed-authentication limits.
    pub limits: Arc<crate::limits::Limits>,
    /// Other member states' nodes.
    pub peers: crate::federation::Peers,
    /// Federation settings.
    pub federation: crate::federation::FederationOptions,
    /// The Flight URL written into this node's endpoints (set once the listener is bound).
    pub advertise_url: std::sync::OnceLock<String>,
    /// This node's certificate, presented to `grpc+tls://` peers.
    pub client_tls: Option<crate::federation::ClientTls>,
    /// Limits on governed SQL.
    pub sql: crate::sql::SqlOptions,
    /// Threads that run SQL plans.
    pub queries: crate::sql::QueryExecutor,
    /// Object stores of the configuration, shared by every session.
    pub stores: passerelle_connectors::Stores,
    /// Storage locations and the controllers whose datasets may live there (`[locations.*]`).
    pub locations: Locations,
    /// How long an opened source (its file list at opening and schema) is reused.
    pub source_ttl: Duration,
    /// Opened raw sources by dataset: schema inference (listing, footers) once per dataset and
    /// metadata version rather than per request. Scans still list files, so new files under a
    /// prefix reach the next request.
    raw_sources: std::sync::Mutex<HashMap<String, CachedSource>>,
    /// The pseudonym master key in force; swapped by `refresh` when `keys rotate-pseudonym`
    /// installs a new one.
    pseudonym_key: RwLock<PseudonymKey>,
    snapshot: RwLock<Arc<Snapshot>>,
    changed: watch::Sender<u64>,
    /// One refresh at a time, so a slow refresh cannot put back an older snapshot.
    refreshing: tokio::sync::Mutex<()>,
}

/// Who registers a dataset: the node's operator (CLI, demo), who may register anywhere when no
/// location is declared, or a principal over REST.
#[derive(Debug, Clone, Copy)]
pub enum Registrar<'a> {
    /// The CLI or the demo, run by whoever runs the node.
    Operator,
    /// A steward or admin over REST.
    Principal(&'a Principal),
}

/// Builds a checked deny line for `dataset` (or `*`), `purpose` and a domain pattern.
pub fn deny_line(dataset: &str, purpose: &str, domain: &str, expires: Option<&str>) -> Result<String> {
    if dataset != "*" {
        passerelle_policies::DatasetId::parse(dataset)?;
    }
    let purpose = passerelle_policies::Purpose::parse(purpose)?;
    let domain_ok = domain == "*"
        || domain.split('/').all(|part| !part.is_empty())
            && passerelle_policies::authz::check_policy_value(domain).is_ok()
            && domain.matches('/').count() <= 1;
    if !domain_ok {
        return Err(Error::invalid(
            format!("domain `{domain}` is not valid"),
            "use *, a member state like DE/*, or an organisation like dkfz or DE/dkfz",
        ));
    }
    let exp = match expires {
        Some(e) => chrono::DateTime::parse_from_rfc3339(e)
            .map(|t| passerelle_policies::authz::policy_time(t.with_timezone(&Utc)))
            .map_err(|err| {
                Error::invalid(
                    format!("expiry `{e}` is not RFC 3339: {err}"),
                    "write e.g. 2027-01-01T00:00:00Z",
                )
            })?,
        None => "9999-12-31T23:59:59Z".to_string(),
    };
    let line = format!("p, *, {domain}, {dataset}, {purpose}, {exp}, deny");
    passerelle_policies::authz::check_policy_text("rule", &line)?;
    Ok(line)
}

/// Policy file locations; `None` means the built-in model or default policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyOptions {
    /// casbin model file (`.conf`).
    pub model_file: Option<PathBuf>,
    /// Default policy lines (`.csv`).
    pub policy_file: Option<PathBuf>,
}

/// The enforcer over policy files and the store's lines.
async fn build_authorizer(
    texts: PolicyTexts,
    rules: &[String],
    permits: Vec<Permit>,
    people: &[Principal],
) -> std::result::Result<Authorizer, passerelle_policies::Error> {
    let file = PolicyFile {
        name: &texts.policy_name,
        text: &texts.policy,
    };
    Authorizer::build(&texts.model, &file, rules, permits, people)
        .await
        .map_err(|e| match e {
            // Name the model file: casbin's message does not.
            passerelle_policies::Error::Casbin { .. } | passerelle_policies::Error::InvalidModel { .. } => {
                passerelle_policies::Error::InvalidModel {
                    reason: format!("{}: {e}", texts.model_name),
                }
            }
            other => other,
        })
}

#[derive(Clone)]
struct PolicyTexts {
    model: String,
    model_name: String,
    policy: String,
    policy_name: String,
    stamp: u64,
}

impl PolicyOptions {
    fn read(&self) -> Result<PolicyTexts> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|source| Error::Io {
                op: "read policy file",
                path: p.display().to_string(),
                source,
            })
        };
        let (model, model_name) = match &self.model_file {
            Some(p) => (read(p)?, p.display().to_string()),
            None => (DEFAULT_MODEL.to_string(), "the built-in model".to_string()),
        };
        let (policy, policy_name) = match &self.policy_file {
            Some(p) => (read(p)?, p.display().to_string()),
            None => (
                DEFAULT_POLICY_FILE.text.to_string(),
                DEFAULT_POLICY_FILE.name.to_string(),
            ),
        };
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&model, &policy).hash(&mut h);
        Ok(PolicyTexts {
            model,
            model_name,
            policy,
            policy_name,
            stamp: h.finish(),
        })
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// An opened raw source and when.
#[derive(Debug)]
struct CachedSource {
    opened: std::time::Instant,
    meta_version: u64,
    table: Arc<dyn datafusion::catalog::TableProvider>,
}

/// Reads a 32-byte secret from `path`, creating it (mode 0600) on first use.
fn load_or_create_secret(path: &Path) -> Result<Vec<u8>> {
    let io = |op: &'static str| {
        move |source| Error::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    };
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() >= 32 => return Ok(bytes),
        Ok(_) => {
            return Err(Error::Internal(format!(
                "secret `{}` is shorter than 32 bytes; delete it to regenerate",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("read secret")(e)),
    }
    let secret: [u8; 32] = rand::random();
    write_durably(path, &secret, 0o600)?;
    Ok(secret.to_vec())
}

/// Names the first pseudonym key version whose recipients are `member_state/org` rather than
/// `org` alone. Absent in data directories of earlier releases, whose versions keep deriving from
/// the organisation until the next rotation; written when a data directory's first key is made
/// (`1`) or by the first rotation that finds it absent (the new version).
const MEMBER_STATE_FROM: &str = "pseudonym.member-state-from";

/// The pseudonym master key in force, its version (the first byte of every pseudonym) and how
/// recipients' keys derive from it.
#[derive(Debug, Clone)]
struct PseudonymKey {
    key: Arc<Vec<u8>>,
    version: u8,
    /// Recipients are `member_state/org` (otherwise `org`, as keys made by earlier releases).
    with_member_state: bool,
}

/// The first key version deriving recipients from `member_state/org`, if any.
fn member_state_from(data_dir: &Path) -> Result<Option<u8>> {
    read_key_version(&data_dir.join(MEMBER_STATE_FROM))
}

/// A key version (1-255) written in `path`; `None` if the file does not exist.
fn read_key_version(path: &Path) -> Result<Option<u8>> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|v| *v >= 1)
            .map(Some)
            .ok_or_else(|| Error::Internal(format!("`{}` does not hold a key version (1-255)", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            op: "read",
            path: path.display().to_string(),
            source,
        }),
    }
}

/// The pseudonym key in force with its derivation. Makes the first key of a new data directory,
/// so the caller holds the keys lock.
fn pseudonym_key_in_force(data_dir: &Path) -> Result<PseudonymKey> {
    let (key, version) = current_pseudonym_key(data_dir)?;
    let with_member_state = member_state_from(data_dir)?.is_some_and(|first| version >= first);
    Ok(PseudonymKey {
        key: Arc::new(key),
        version,
        with_member_state,
    })
}

/// The current pseudonym key version (1 until the first rotation).
fn pseudonym_key_version(data_dir: &Path) -> Result<u8> {
    Ok(read_key_version(&data_dir.join("pseudonym.version"))?.unwrap_or(1))
}

/// The pseudonym master key in force and its version. The key of version N lives in
/// `pseudonym.key.v<N>`; a data directory from before rotation existed keeps version 1's key in
/// `pseudonym.key` (also the key a fresh directory starts with).
fn current_pseudonym_key(data_dir: &Path) -> Result<(Vec<u8>, u8)> {
    let version = pseudonym_key_version(data_dir)?;
    let versioned = data_dir.join(format!("pseudonym.key.v{version}"));
    match std::fs::read(&versioned) {
        Ok(key) if key.len() >= 32 => Ok((key, version)),
        Ok(_) => Err(Error::Internal(format!(
            "`{}` is shorter than 32 bytes",
            versioned.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let legacy = data_dir.join("pseudonym.key");
            if version == 1 {
                if !legacy.exists() && member_state_from(data_dir)?.is_none() {
                    // A data directory's first key: its recipients are `member_state/org` from
                    // the start (written before the key, so no pseudonym is ever made otherwise).
                    write_durably(&data_dir.join(MEMBER_STATE_FROM), b"1\n", 0o600)?;
                }
                return Ok((load_or_create_secret(&legacy)?, version));
            }
            // Rotated by an earlier release, which kept the key in force here: read, never made.
            // In this layout `pseudonym.key` stays an older version's key, so a copy of an
            // archived key means version N's own file was lost: refused, never used under N.
            let missing = || {
                Error::Internal(format!(
                    "the key of pseudonym version {version} is missing (`{}`)",
                    versioned.display()
                ))
            };
            let key = std::fs::read(&legacy)
                .ok()
                .filter(|k| k.len() >= 32)
                .ok_or_else(missing)?;
            let archived = (1..version)
                .any(|k| std::fs::read(data_dir.join(format!("pseudonym.key.v{k}"))).is_ok_and(|old| old == key));
            if archived {
                return Err(missing());
            }
            Ok((key, version))
        }
        Err(source) => Err(Error::Io {
            op: "read pseudonym key",
            path: versioned.display().to_string(),
            source,
        }),
    }
}

/// Writes `bytes` to `path` durably: a synced temporary file renamed over it, then the directory
/// synced, so a crash leaves the old file or the new one, never a torn or missing one.
fn write_durably(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let io = |op: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |source| Error::Io { op, path, source }
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!("{name}.tmp"));
    {
        use std::io::Write as _;
        let mut opts = crate::data_dir::private_file_options();
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
        let mut f = opts.open(&tmp).map_err(io("create", &tmp))?;
        // The mode applies only at creation: a leftover temporary file keeps its own.
        #[cfg(unix)]
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(io("chmod", &tmp))?;
        #[cfg(not(unix))]
        let _ = mode;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io("install", path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync directory", dir))?;
    }
    Ok(())
}

/// Rotates the pseudonym master key: a new key is made as version N+1, and every earlier key
/// stays as `pseudonym.key.v<N>`. New pseudonyms start with the new version byte, so recipients
/// can tell old from new. Crash-safe: the new key is written durably before the version file
/// names it, so a crash leaves either the old version with its key or the new one with its own
/// (never a new key under an old version byte). Running servers pick the new key up within a
/// refresh interval. Returns the new version.
///
/// In a data directory whose recipients are still organisations alone (made by an earlier
/// release), the new version is the first whose recipients are `member_state/org`.
pub fn rotate_pseudonym_key(data_dir: &Path) -> Result<u8> {
    crate::data_dir::prepare(data_dir)?;
    // One rotation (or first key) at a time: two would both make "version N+1". Released when
    // `_lock` drops.
    let _lock = crate::data_dir::lock_keys(data_dir)?;
    let current = pseudonym_key_version(data_dir)?;
    let next = current.checked_add(1).ok_or_else(|| {
        Error::invalid(
            "pseudonym key version 255 reached",
            "archive the data directory's keys and start a new series",
        )
    })?;
    // The key in force keeps its versioned name (older layouts held it in `pseudonym.key` only).
    let (key, _) = current_pseudonym_key(data_dir)?;
    let archived = data_dir.join(format!("pseudonym.key.v{current}"));
    if !archived.exists() {
        write_durably(&archived, &key, 0o600)?;
    }
    // A leftover of a rotation that crashed before the switch was never in force: replaced.
    let secret: [u8; 32] = rand::random();
    write_durably(&data_dir.join(format!("pseudonym.key.v{next}")), &secret, 0o600)?;
    // Before the switch: a crash in between leaves version N in force with its own derivation.
    if member_state_from(data_dir)?.is_none() {
        write_durably(&data_dir.join(MEMBER_STATE_FROM), format!("{next}\n").as_bytes(), 0o600)?;
    }
    write_durably(
        &data_dir.join("pseudonym.version"),
        format!("{next}\n").as_bytes(),
        0o600,
    )?;
    Ok(next)
}

impl Node {
    /// Opens the node's stores in `data_dir` (creating them on first use) with the built-in
    /// policy. Does not load consent into memory: [`Node::refresh`] does, for servers.
    pub async fn open(data_dir: &Path) -> Result<Arc<Self>> {
        Self::open_with(data_dir, PolicyOptions::default()).await
    }

    /// As [`Node::open`], with policy files.
    pub async fn open_with(data_dir: &Path, policy: PolicyOptions) -> Result<Arc<Self>> {
        crate::data_dir::prepare(data_dir)?;
        // Made once: processes starting at once on an empty data directory take turns, and the
        // later ones read the database (whose switch to WAL would fail them with "database is
        // locked") and the keys the first made. Held for the few milliseconds of opening.
        let init = crate::data_dir::lock_keys(data_dir)?;
        let pool = meta::open_pool(data_dir).await?;
        let meta = MetaStore::open(pool.clone()).await?;
        let consent_store = ConsentStore::open(pool.clone()).await?;
        let audit = AuditLog::open(pool).await?;
        let node_key = Arc::new(crate::signing::NodeKey::load_or_create(&data_dir.join("node.key"))?);
        let pseudonym_key = pseudonym_key_in_force(data_dir)?;
        drop(init);
        let tickets = TicketSigner::new(Arc::clone(&node_key), format!("passerelle-{}", node_key.kid()));
        let authorizer = Authorizer::build(DEFAULT_MODEL, &DEFAULT_POLICY_FILE, &[], Vec::new(), &[]).await?;
        let empty = Snapshot {
            meta_version: u64::MAX,
            datasets: BTreeMap::new(),
            principals_by_hash: HashMap::new(),
            principals_by_name: HashMap::new(),
            authorizer: Arc::new(authorizer),
            policy_stamp: 0,
        };
        let (changed, _) = watch::channel(0);
        Ok(Arc::new(Self {
            data_dir: data_dir.to_path_buf(),
            meta,
            consent_store,
            audit,
            consent: Arc::new(ConsentIndex::new()),
            tickets,
            node_key,
            policy,
            bad_policy: std::sync::Mutex::new(None),
            good_policy: std::sync::Mutex::new(None),
            #[cfg(feature = "bench")]
            bench_unguarded: std::sync::atomic::AtomicBool::new(false),
            ticket_ttl: Duration::from_secs(600),
            allow_bearer: true,
            limits: Arc::default(),
            peers: crate::federation::Peers::default(),
            federation: crate::federation::FederationOptions::default(),
            advertise_url: std::sync::OnceLock::new(),
            client_tls: None,
            sql: crate::sql::SqlOptions::default(),
            stores: passerelle_connectors::Stores::default(),
            locations: Locations::default(),
            source_ttl: Duration::from_secs(60),
            raw_sources: std::sync::Mutex::default(),
            // Twice the cores: a plan that computes for long without yielding (it is aborted at
            // its next yield point) holds at most `target_partitions` threads, and the others
            // keep serving new queries.
            queries: crate::sql::QueryExecutor::new(
                2 * std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            )?,
            pseudonym_key: RwLock::new(pseudonym_key),
            snapshot: RwLock::new(Arc::new(empty)),
            changed,
            refreshing: tokio::sync::Mutex::new(()),
        }))
    }

    /// The current metadata snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Brings the snapshot and the consent index up to date with the store. Consent is applied
    /// even when the metadata cannot be reloaded (the previous snapshot then stays in force), so a
    /// bad metadata row can never hold back a withdrawal.
    pub async fn refresh(&self) -> Result<()> {
        let _one_at_a_time = self.refreshing.lock().await;
        let metadata = self.refresh_metadata().await;
        let consent = self.refresh_consent().await;
        let keys = self.refresh_pseudonym_key();
        metadata.and(consent).and(keys)
    }

    /// [`Node::refresh`] after a write the store has committed: the change is in force even
    /// while the policy files on disk are broken (it applies over the last good files), so that
    /// refusal is logged, not returned as the write's failure (a client would retry a write that
    /// landed).
    pub async fn refresh_after_write(&self) -> Result<()> {
        // The store's version with this write in it (read before refreshing: a later write may
        // move it further, which must not make this one look unapplied).
        let written = self.meta.version().await?;
        match self.refresh().await {
            Err(Error::PolicyRefused { message }) => {
                // Applied when the snapshot now reflects the store (built over the last good files).
                if self.snapshot().meta_version >= written {
                    tracing::warn!(error = %message, "change applied over the last good policy files");
                    Ok(())
                } else {
                    Err(Error::PolicyRefused { message })
                }
            }
            other => other,
        }
    }

    /// Builds the enforcer from the policy files as they are now and the stored lines, without
    /// installing it: `policy reload` says what is wrong (file, line, reason) before asking
    /// servers to load files they would refuse.
    /// Returns the policy version and the model and policy files checked.
    pub async fn check_policy_files(&self) -> Result<(String, String, String)> {
        let texts = self.policy.read()?;
        let (model, policy) = (texts.model_name.clone(), texts.policy_name.clone());
        let rules: Vec<String> = self.meta.rules().await?.into_iter().map(|(_, line, _)| line).collect();
        let people: Vec<Principal> = self.meta.principals().await?.into_iter().map(|p| p.principal).collect();
        let permits = self.meta.permits().await?;
        match build_authorizer(texts, &rules, permits, &people).await {
            Ok(a) => Ok((a.version().to_string(), model, policy)),
            Err(e) => Err(Error::PolicyRefused { message: e.to_string() }),
        }
    }

    /// Picks up a rotated pseudonym key. `rotate_pseudonym_key` installs the key before the
    /// version file, so a version change always finds its key in place; streams already open
    /// keep the key they started with.
    fn refresh_pseudonym_key(&self) -> Result<()> {
        let version = pseudonym_key_version(&self.data_dir)?;
        let current = self.pseudonym_key.read().unwrap_or_else(|e| e.into_inner()).version;
        if version == current {
            return Ok(());
        }
        let key = {
            let _keys = crate::data_dir::lock_keys(&self.data_dir)?;
            pseudonym_key_in_force(&self.data_dir)?
        };
        tracing::info!(
            version = key.version,
            member_state_in_recipient = key.with_member_state,
            "pseudonym key rotated"
        );
        *self.pseudonym_key.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }

    async fn refresh_metadata(&self) -> Result<()> {
        let version = self.meta.version().await?;
        // Files that cannot be read (mid-rename, permissions) are treated like files that do
        // not parse: the last good ones stay in force and stored changes still apply.
        let (texts, unreadable) = match self.policy.read() {
            Ok(t) => (t, None),
            Err(e) => {
                let good = self.good_policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let Some(good) = good else { return Err(e) };
                let message = e.to_string();
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                message.hash(&mut h);
                let mut bad = self.bad_policy.lock().unwrap_or_else(|e| e.into_inner());
                if bad.as_ref().map(|(stamp, _)| *stamp) != Some(h.finish()) {
                    tracing::error!(error = %message, "policy files unreadable; the previous files stay in force");
                    *bad = Some((h.finish(), message.clone()));
                }
                (good, Some(message))
            }
        };
        let unread = || match &unreadable {
            Some(message) => Err(Error::PolicyRefused {
                message: message.clone(),
            }),
            None => Ok(()),
        };
        let current = self.snapshot();
        if version == current.meta_version && texts.stamp == current.policy_stamp {
            return unread();
        }
        let known_bad = self.bad_policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((stamp, message)) = &known_bad
            && *stamp == texts.stamp
            && version == current.meta_version
        {
            // Already logged; the previous policy stays in force until the file is fixed.
            return Err(Error::PolicyRefused {
                message: message.clone(),
            });
        }
        let datasets = self.meta.datasets().await?;
        let principals = self.meta.principals().await?;
        let permits = self.meta.permits().await?;
        let rules: Vec<String> = self.meta.rules().await?.into_iter().map(|(_, line, _)| line).collect();
        let people: Vec<Principal> = principals.iter().map(|p| p.principal.clone()).collect();
        let build = |texts: &PolicyTexts| build_authorizer(texts.clone(), &rules, permits.clone(), &people);
        let (authorizer, stamp, refused) = match build(&texts).await {
            Ok(a) => {
                *self.good_policy.lock().unwrap_or_else(|e| e.into_inner()) = Some(texts.clone());
                *self.bad_policy.lock().unwrap_or_else(|e| e.into_inner()) = None;
                (a, texts.stamp, None)
            }
            Err(e) => {
                let message = e.to_string();
                let good = self.good_policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if known_bad.as_ref().is_none_or(|(stamp, _)| *stamp != texts.stamp) {
                    tracing::error!(error = %message, "policy files refused; the previous files stay in force");
                }
                *self.bad_policy.lock().unwrap_or_else(|e| e.into_inner()) = Some((texts.stamp, message.clone()));
                // The stored lines were checked when written: over the last good files they build.
                match good {
                    Some(good) => match build(&good).await {
                        Ok(a) => (a, good.stamp, Some(message)),
                        Err(_) => return Err(Error::PolicyRefused { message }),
                    },
                    None => return Err(Error::PolicyRefused { message }),
                }
            }
        };
        let policy_version = authorizer.version().to_string();
        let snap = Snapshot {
            meta_version: version,
            datasets: datasets
                .into_iter()
                .map(|m| (m.name.to_string(), Arc::new(m)))
                .collect(),
            principals_by_name: principals
                .iter()
                .map(|p| (p.principal.name.clone(), p.principal.clone()))
                .collect(),
            principals_by_hash: principals.into_iter().map(|p| (p.key_hash, p.principal)).collect(),
            authorizer: Arc::new(authorizer),
            policy_stamp: stamp,
        };
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snap);
        tracing::info!(version, %policy_version, "metadata and policy loaded");
        match refused {
            Some(message) => Err(Error::PolicyRefused { message }),
            None => unread(),
        }
    }

    async fn refresh_consent(&self) -> Result<()> {
        loop {
            let events = self
                .consent_store
                .load_since(self.consent.applied_seq(), CONSENT_PAGE)
                .await?;
            if events.is_empty() {
                break;
            }
            let n = events.len();
            self.consent
                .apply(events.iter().map(|(seq, reg, ev)| (*seq, reg.as_str(), ev)));
            tracing::debug!(
                events = n,
                applied = self.consent.applied_seq(),
                "consent events applied"
            );
            if n < CONSENT_PAGE as usize {
                break;
            }
        }
        self.changed.send_replace(self.consent.applied_seq());
        Ok(())
    }

    /// Runs [`Node::refresh`] every [`REFRESH_INTERVAL`] until `shutdown` fires.
    pub fn spawn_refresher(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let node = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        match node.refresh().await {
                            Ok(()) | Err(Error::PolicyRefused { .. }) => {}
                            Err(e) => tracing::warn!(error = %e, "refresh failed; keeping the previous snapshot"),
                        }
                    }
                    _ = shutdown.changed() => break,
                }
            }
        })
    }

    /// Resolves the caller: the verified client certificate of the request's TLS connection,
    /// if any (its CN, O and C must match a registered principal), else the `authorization`
    /// header. A key sent along with a certificate must be that principal's.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Principal> {
        let principal = self.identify(header)?;
        self.limits.admit(&principal.name)?;
        Ok(principal)
    }

    fn identify(&self, header: Option<&str>) -> Result<Principal> {
        let unauthenticated = |reason: String| Error::Unauthenticated { reason: reason.into() };
        match crate::tls::current_peer_cert() {
            Some(cert) => {
                let snap = self.snapshot();
                let principal = snap.principals_by_name.get(&cert.common_name).ok_or_else(|| {
                    unauthenticated(format!(
                        "client certificate names `{}`, which is not a registered principal",
                        cert.common_name
                    ))
                })?;
                if cert.organisation.as_deref() != Some(principal.org.as_str()) {
                    return Err(unauthenticated(format!(
                        "client certificate organisation (O) `{}` does not match principal `{}`'s organisation",
                        cert.organisation.as_deref().unwrap_or(""),
                        principal.name
                    )));
                }
                if cert.country.as_deref() != Some(principal.member_state.as_str()) {
                    return Err(unauthenticated(format!(
                        "client certificate member state (C) `{}` does not match principal `{}`'s member state",
                        cert.country.as_deref().unwrap_or(""),
                        principal.name
                    )));
                }
                // Every trust anchor is trusted, but only for the member state the configuration
                // binds it to ([tls.anchors]): the French authority, or an intermediate under it
                // whatever its C says, cannot vouch for a German principal.
                if cert.member_state.as_deref() != Some(principal.member_state.as_str()) {
                    return Err(unauthenticated(format!(
                        "client certificate chains to the trust anchor of `{}`, not of principal `{}`'s member state",
                        cert.member_state.as_deref().unwrap_or("(none)"),
                        principal.name
                    )));
                }
                if let Some(h) = header {
                    let by_key = self.authenticate_key(h)?;
                    if by_key.name != principal.name {
                        return Err(unauthenticated(
                            "the authorization header names another principal than the client certificate".into(),
                        ));
                    }
                }
                Ok(principal.clone())
            }
            None if !self.allow_bearer => Err(unauthenticated(
                "this node requires a client certificate issued by a trusted member-state authority".into(),
            )),
            None => self.authenticate_key(header.ok_or(Error::Unauthenticated {
                reason: "missing authorization header".into(),
            })?),
        }
    }

    /// Ticket claims describing the caller and the versions in force; the request fields are
    /// filled by the caller of this function.
    pub fn claims_for(&self, principal: &Principal) -> crate::ticket::TicketClaims {
        crate::ticket::TicketClaims {
            v: crate::ticket::TICKET_VERSION,
            iss: String::new(),
            kid: String::new(),
            iat: 0,
            principal: principal.name.clone(),
            org: principal.org.clone(),
            member_state: principal.member_state.clone(),
            consent_version: self.consent.applied_seq(),
            policy_version: self.snapshot().authorizer.version().to_string(),
            purpose: String::new(),
            dataset: String::new(),
            columns: None,
            filter: None,
            limit: None,
            exp: 0,
            nonce: 0,
            sql: None,
            part: None,
            skip: 0,
            aggregate: None,
            fill_nulls: None,
            role: principal.is_peer().then_some(principal.role),
        }
    }

    /// Whether this node vouches to its peers for `principal` (`[federation] roles`): refused
    /// here, with the reason, for a role the configuration does not name.
    pub fn may_reach_peers(&self, principal: &Principal) -> Result<()> {
        if self.federation.asserts_for(principal.role) {
            return Ok(());
        }
        let roles: Vec<&str> = self.federation.roles.iter().map(|r| r.as_str()).collect();
        Err(Error::PermissionDenied {
            reason: format!(
                "role `{}` does not reach federation peers: this node vouches to its peers only for {} ([federation] roles)",
                principal.role.as_str(),
                if roles.is_empty() {
                    "no role".to_string()
                } else {
                    roles.join(", ")
                }
            ),
        })
    }

    /// An assertion for `peer` that this node vouches for `principal` (its role, declaring
    /// `purpose`, for federated `dataset`, or `None` for the listing of federated datasets),
    /// signed now with the node key and valid for `[federation] assertion_ttl_secs` (at most
    /// [`crate::federation::MAX_ASSERTION_TTL_SECS`]). Refused for roles this node does not
    /// vouch for ([`Node::may_reach_peers`]).
    pub fn assert_for(
        &self,
        peer: &crate::federation::Peer,
        principal: &Principal,
        purpose: &str,
        dataset: Option<&str>,
    ) -> Result<String> {
        self.may_reach_peers(principal)?;
        let now = Utc::now().timestamp();
        let ttl = self
            .federation
            .assertion_ttl_secs
            .clamp(1, crate::federation::MAX_ASSERTION_TTL_SECS);
        crate::federation::Assertion {
            v: crate::federation::ASSERTION_VERSION,
            iss: self.node_id().to_string(),
            aud: peer.node_id.clone(),
            sub: principal.name.clone(),
            org: principal.org.clone(),
            member_state: principal.member_state.clone(),
            role: principal.role,
            purpose: purpose.to_string(),
            dataset: dataset.map(str::to_string),
            iat: now,
            exp: now + ttl as i64,
            jti: auth::hex(&rand::random::<[u8; 12]>()),
        }
        .sign(&self.node_key)
    }

    /// This node's id (config `node_id`, default `passerelle-<key id>`).
    pub fn node_id(&self) -> &str {
        self.tickets.node_id()
    }

    /// A peer node's principal, vouched for by an assertion its home node signed for this node.
    /// Its name here is `name@home-node`; its organisation and member state are the home node's
    /// word, everything else (permits, consent, columns) is decided here.
    pub fn federated_principal(
        &self,
        assertion: &str,
        authorization: Option<&str>,
        purpose: &str,
    ) -> Result<(Principal, crate::federation::Assertion)> {
        let unauthenticated = |reason: String| Error::Unauthenticated { reason: reason.into() };
        if authorization.is_some() {
            return Err(unauthenticated(
                "send either a federation assertion or this node's credentials, not both".into(),
            ));
        }
        let a = crate::federation::Assertion::verify(assertion, self.node_id(), &self.peers, Utc::now().timestamp())?;
        let cert = crate::tls::current_peer_cert();
        if cert.is_none() && !self.allow_bearer {
            return Err(unauthenticated(
                "this node requires a client certificate: present the federation assertion over a connection made with the principal's certificate or its home node's".into(),
            ));
        }
        if a.purpose != purpose {
            return Err(unauthenticated(format!(
                "the federation assertion was issued for purpose `{}`, not `{purpose}`",
                a.purpose
            )));
        }
        // Over TLS, the connection comes either from the principal itself (its certificate must
        // then say what the assertion says) or from its home node (a gateway certificate).
        if let Some(cert) = cert {
            let anchored_in_state = cert.member_state.as_deref() == Some(a.member_state.as_str());
            let is_principal = cert.common_name == a.sub
                && cert.organisation.as_deref() == Some(a.org.as_str())
                && cert.country.as_deref() == Some(a.member_state.as_str())
                && anchored_in_state;
            let is_home = cert.common_name == a.iss && anchored_in_state;
            if !is_principal && !is_home {
                return Err(unauthenticated(format!(
                    "the client certificate (CN `{}`) is neither the asserted principal's nor its home node's",
                    cert.common_name
                )));
            }
        }
        // The role its home node asserted: this node's policy decides what that role may do here
        // (its lines for the role apply; only trainers pull data), never a role assumed here.
        let principal = Principal {
            name: format!("{}@{}", a.sub, a.iss),
            org: a.org.clone(),
            member_state: a.member_state.clone(),
            role: a.role,
        };
        self.limits.admit(&principal.name)?;
        Ok((principal, a))
    }

    fn authenticate_key(&self, header: &str) -> Result<Principal> {
        let (key, claimed_name) = match auth::parse_authorization(header)? {
            Credentials::Bearer(k) => (k, None),
            Credentials::Basic { name, key } => (key, Some(name)),
        };
        let hash = auth::hash_key(&key);
        let snap = self.snapshot();
        let wrong = Error::Unauthenticated {
            reason: "unknown or revoked key".into(),
        };
        let (stored_hash, principal) = snap.principals_by_hash.get_key_value(&hash).ok_or(wrong)?;
        if !auth::hashes_equal(stored_hash, &hash) || claimed_name.is_some_and(|n| n != principal.name) {
            return Err(Error::Unauthenticated {
                reason: "unknown or revoked key".into(),
            });
        }
        Ok(principal.clone())
    }

    /// The raw source of a registered dataset, reused while fresh (see `raw_sources`).
    pub async fn open_source(
        &self,
        manifest: &Manifest,
        meta_version: u64,
    ) -> Result<Arc<dyn datafusion::catalog::TableProvider>> {
        let name = manifest.name.to_string();
        {
            let cache = self.raw_sources.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cache.get(&name)
                && c.meta_version == meta_version
                && c.opened.elapsed() < self.source_ttl
            {
                return Ok(Arc::clone(&c.table));
            }
        }
        let source = self.readable_source(manifest);
        self.stores.prepare(&source)?;
        let ctx = crate::catalog::source_context(&self.stores)?;
        let table = passerelle_connectors::open(&ctx.state(), &source).await?;
        let mut cache = self.raw_sources.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, c| c.meta_version == meta_version);
        cache.insert(
            name,
            CachedSource {
                opened: std::time::Instant::now(),
                meta_version,
                table: Arc::clone(&table),
            },
        );
        Ok(table)
    }

    /// The dataset's source as it is read. Local files are read by their real path only (see
    /// `passerelle_connectors::local`); a location stored by an earlier release may still name its
    /// files through a link or `..`, so it is resolved here, once per opening, rather than failing.
    fn readable_source(&self, manifest: &Manifest) -> passerelle_connectors::SourceSpec {
        let mut source = manifest.source();
        if let Ok(lexical) = CanonicalLocation::lexical(source.location.trim())
            && lexical.scheme() == Scheme::File
            && let Ok(real) = lexical.resolve()
        {
            let real = real.to_string();
            if real != source.location {
                tracing::warn!(
                    dataset = %manifest.name,
                    stored = %source.location,
                    read = %real,
                    "a location stored by an earlier release is read by its real path; re-register the dataset to store it"
                );
                source.location = real;
            }
        }
        source
    }

    /// The keyed pseudonymiser for a recipient: organisation `org` of `member_state` (for a
    /// peer's principal, the member state its node vouches for). Key versions made before
    /// recipients carried their member state keep deriving from `org` alone until the next
    /// rotation, so their recipients' pseudonyms stay stable.
    ///
    /// Fails only if `member_state` is not a two-letter code (stored principals are checked
    /// when added).
    pub fn pseudonymiser(&self, member_state: &str, org: &str) -> Result<Pseudonymiser> {
        let k = self.pseudonym_key.read().unwrap_or_else(|e| e.into_inner()).clone();
        if k.with_member_state {
            let member_state = passerelle_policies::MemberState::parse(member_state)?;
            Ok(Pseudonymiser::for_recipient_in_state(
                &k.key,
                k.version,
                &member_state,
                org,
            ))
        } else {
            Ok(Pseudonymiser::for_recipient_versioned(&k.key, k.version, org))
        }
    }

    /// Adds a principal and returns its new API key (shown once, stored hashed).
    pub async fn add_principal(&self, principal: &Principal) -> Result<String> {
        passerelle_policies::authz::check_policy_value(&principal.name)?;
        passerelle_policies::authz::check_policy_value(&principal.org)?;
        if principal.name.contains([':', '@']) {
            return Err(Error::invalid(
                "principal names may not contain `:` or `@`",
                "basic auth separates name and key with `:`; `name@node` names peer nodes' principals",
            ));
        }
        passerelle_policies::MemberState::parse(&principal.member_state)?;
        let key = auth::generate_key();
        self.meta.add_principal(principal, &auth::hash_key(&key)).await?;
        Ok(key)
    }

    /// Validates a manifest against its source and stores it, as the node's operator (CLI,
    /// demo). Nothing is stored on failure.
    ///
    /// The location is canonicalised first (see `passerelle_connectors::location`) and must lie
    /// inside a declared `[locations.*]` naming the controller, when any is declared; it may not
    /// lie inside the node's data directory other than its `demo/` folder, nor overlap a
    /// dataset of another controller (which would let one organisation re-register another's
    /// data under its own, weaker policy). The consent registry is claimed for the controller
    /// and may not belong to another organisation.
    pub async fn register_dataset(&self, manifest: &Manifest) -> Result<Manifest> {
        self.register_dataset_with(manifest, &self.stores, &self.locations, Registrar::Operator)
            .await
    }

    /// As [`Node::register_dataset`], for a principal over REST: a steward registers only inside
    /// a declared location of its organisation.
    pub async fn register_dataset_as(&self, manifest: &Manifest, by: &Principal) -> Result<Manifest> {
        self.require_steward_of(by, &manifest.controller)?;
        self.register_dataset_with(manifest, &self.stores, &self.locations, Registrar::Principal(by))
            .await
    }

    /// As [`Node::register_dataset`], reading the source through `stores` and checking it
    /// against `locations` (the CLI passes those of its `--config`).
    pub async fn register_dataset_with(
        &self,
        manifest: &Manifest,
        stores: &passerelle_connectors::Stores,
        locations: &Locations,
        by: Registrar<'_>,
    ) -> Result<Manifest> {
        let outcome = self.try_register(manifest, stores, locations, by).await;
        self.audit_registration(manifest, by, &outcome).await?;
        outcome
    }

    /// Audits a registration, allowed or refused: who asked for which dataset at which location
    /// (the canonical one once registered, as given when refused).
    async fn audit_registration(
        &self,
        manifest: &Manifest,
        by: Registrar<'_>,
        outcome: &Result<Manifest>,
    ) -> Result<()> {
        let (principal, organisation, member_state) = match by {
            Registrar::Operator => ("(operator)".to_string(), String::new(), String::new()),
            Registrar::Principal(p) => (p.name.clone(), p.org.clone(), p.member_state.clone()),
        };
        let (location, reason) = match outcome {
            Ok(m) => (
                m.location.clone(),
                format!("registered for controller `{}`", m.controller),
            ),
            Err(e) => (manifest.location.chars().take(1024).collect(), e.public_message()),
        };
        let entry = crate::audit::AuditEntry {
            principal,
            organisation,
            member_state,
            purpose: String::new(),
            dataset: manifest.name.to_string(),
            columns: None,
            filter: None,
            statement: Some(format!("location {location}")),
            action: crate::audit::Action::RegisterDataset,
            allow: outcome.is_ok(),
            reason,
            consent_version: 0,
            policy_version: self.snapshot().authorizer.version().to_string(),
        };
        self.audit.append(&entry, true).await.map(|_| ())
    }

    async fn try_register(
        &self,
        manifest: &Manifest,
        stores: &passerelle_connectors::Stores,
        locations: &Locations,
        by: Registrar<'_>,
    ) -> Result<Manifest> {
        // A taken name is said first, before anything is read, and says nothing of whose it is.
        if self.meta.datasets().await?.iter().any(|m| m.name == manifest.name) {
            return Err(Error::AlreadyExists {
                what: format!("dataset `{}`", manifest.name),
            });
        }
        if let Some(f) = &manifest.federation {
            let valid = !f.is_empty()
                && f.len() <= 64
                && f.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                return Err(Error::invalid(
                    format!("federation `{f}` is not a name"),
                    "use lowercase letters, digits and _ (e.g. eu_diabetes)",
                ));
            }
            let snap = self.snapshot();
            if let Some(other) = snap
                .datasets
                .values()
                .find(|m| m.federation.as_deref() == Some(f) && m.name != manifest.name)
            {
                // Another controller's dataset is not named to the caller.
                let holder = match other.controller == manifest.controller {
                    true => format!("dataset `{}` is", other.name),
                    false => "another dataset is".to_string(),
                };
                return Err(Error::invalid(
                    format!("{holder} already this node's part of federation `{f}`"),
                    "a node holds one part of each federated dataset",
                ));
            }
            if snap.datasets.contains_key(f.as_str()) {
                return Err(Error::invalid(
                    format!("federation `{f}` has the name of a local dataset"),
                    "name the federation differently from every local dataset",
                ));
            }
        }
        if manifest.name.as_str() == crate::audit_table::AUDIT_TABLE {
            return Err(Error::invalid(
                format!(
                    "`{}` is reserved: auditors query the audit log under that name",
                    manifest.name
                ),
                "choose another dataset name",
            ));
        }
        // The location is checked as the caller's before anything is read from it, and stored
        // in its canonical spelling.
        let location = self.check_location(manifest, locations, by).await?;
        let mut manifest = manifest.clone();
        manifest.location = location.to_string();
        let manifest = &manifest;
        // Validate through a private registry; the shared one learns the store on first use.
        let trial = stores.isolated();
        trial.prepare(&manifest.source())?;
        let policy = manifest.policy();
        if let Some(owner) = self.meta.registry_owner(&policy.consent_registry).await?
            && owner != manifest.controller
        {
            return Err(Error::invalid(
                format!(
                    "consent_registry `{}` is not available to `{}`",
                    policy.consent_registry, manifest.controller
                ),
                "choose another registry name (it defaults to the dataset name)",
            ));
        }
        let ctx = crate::catalog::source_context(&trial)?;
        // File by file first, so a mismatch names the file rather than failing the merge.
        passerelle_connectors::verify(&ctx.state(), &manifest.source()).await?;
        let raw = passerelle_connectors::open(&ctx.state(), &manifest.source()).await?;
        policy.validate(&raw.schema())?;
        self.meta
            .claim_registry(&policy.consent_registry, &manifest.controller)
            .await?;
        self.meta.insert_dataset(manifest).await?;
        Ok(manifest.clone())
    }

    /// The dataset's location in canonical form, once it is known to be the caller's to
    /// register. A principal's refusal is one message whatever the reason (outside its
    /// locations, missing, a link elsewhere, another controller's), so that registration cannot
    /// be used to probe the node's storage.
    async fn check_location(
        &self,
        manifest: &Manifest,
        locations: &Locations,
        by: Registrar<'_>,
    ) -> Result<CanonicalLocation> {
        let shown = manifest.location.trim().to_string();
        let refused = || {
            Error::invalid(
                format!("location `{shown}` is not available for registration"),
                "register an existing file or prefix inside a storage location declared for the controller \
                 ([locations.<name>] naming it among `controllers` in the node's configuration), read \
                 through the store that location names",
            )
        };
        let lexical = CanonicalLocation::lexical(&shown)?;
        let steward = matches!(by, Registrar::Principal(p) if p.role != Role::Admin);
        let store = manifest.store.as_deref();
        let canonical = if locations.is_empty() {
            if steward {
                return Err(Error::invalid(
                    "this node declares no storage locations, so stewards cannot register datasets over REST",
                    "the operator declares [locations.<name>] (url, controllers) in the configuration, \
                     or registers the dataset with `passerelle dataset register`",
                ));
            }
            lexical.resolve()?
        } else {
            // Lexically first, so that nothing outside the caller's locations is even looked at.
            locations
                .admit(&manifest.controller, &lexical, store, false)
                .map_err(|_| refused())?;
            let resolved = match lexical.resolve() {
                Ok(r) => r,
                Err(_) if steward => return Err(refused()),
                Err(e) => return Err(e.into()),
            };
            locations
                .admit(&manifest.controller, &resolved, store, true)
                .map_err(|_| refused())?;
            resolved
        };
        if canonical.scheme() == Scheme::File {
            let data_dir = std::fs::canonicalize(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone());
            let inside = |dir: &Path| {
                CanonicalLocation::lexical(&format!("{}/", dir.display())).is_ok_and(|d| d.contains(&canonical))
            };
            if inside(&data_dir) && !inside(&data_dir.join("demo")) {
                return Err(refused());
            }
        }
        for other in self.meta.datasets().await? {
            if other.name == manifest.name {
                continue;
            }
            // Stored locations are canonical since this release; older ones are read as stored.
            let Ok(theirs) =
                CanonicalLocation::lexical(other.location.trim()).map(|l| l.clone().resolve().unwrap_or(l))
            else {
                continue;
            };
            if canonical.overlaps(&theirs) && other.controller != manifest.controller {
                return Err(refused());
            }
            // A bucket is read with one set of credentials: one store per bucket.
            if canonical.scheme() != Scheme::File
                && canonical.bucket() == theirs.bucket()
                && other.store != manifest.store
            {
                return Err(Error::invalid(
                    format!("`{}` is already read through another store", canonical.bucket()),
                    "use the same store for every dataset of a bucket",
                ));
            }
        }
        Ok(canonical)
    }

    /// Adds or renews a permit for a registered dataset.
    pub async fn add_permit(&self, permit: &Permit) -> Result<()> {
        passerelle_policies::authz::check_policy_value(&permit.org)?;
        // A permit names one organisation, alone (`dkfz`: this node's principals of it) or with
        // its member state (`DE/dkfz`: also peers' principals vouched for by DE). `*` or `DE/*`
        // would be read by the policy's domain matching as a wildcard and open the dataset to
        // every organisation.
        let (state, org) = permit.org.split_once('/').unwrap_or(("", permit.org.as_str()));
        if permit.org.contains('*')
            || org.is_empty()
            || org.contains('/')
            || (permit.org.contains('/') && passerelle_policies::MemberState::parse(state).is_err())
        {
            return Err(Error::invalid(
                format!("`{}` is not an organisation name", permit.org),
                "grant permits to one organisation at a time, as `org` or `CC/org` (wildcards are for deny rules)",
            ));
        }
        // Stored as RFC 3339 UTC and read back as such: years outside 0000-9999 would not parse
        // again and would stop every later metadata change.
        if let Some(e) = permit.expires
            && !(0..=9999).contains(&e.year())
        {
            return Err(Error::invalid(
                format!("expiry {e} is out of range"),
                "write a date between the years 0000 and 9999, e.g. 2027-01-01T00:00:00Z",
            ));
        }
        self.meta.upsert_permit(permit).await
    }

    /// Appends consent events durably; returns the new consent version. Events dated more than
    /// five minutes ahead are refused: a future-dated grant would outrank every withdrawal made
    /// before that date.
    pub async fn append_consent(&self, registry: &str, events: &[ConsentEvent]) -> Result<u64> {
        let horizon = Utc::now().timestamp_micros() + 300_000_000;
        if let Some((i, _)) = events.iter().enumerate().find(|(_, e)| e.at_micros > horizon) {
            return Err(Error::invalid(
                format!("event {i} (subject `{}`) is dated in the future", events[i].subject_id),
                "consent events record decisions already made; check the timestamp and the clock",
            ));
        }
        Ok(self.consent_store.append(registry, events).await?)
    }

    /// Waits until the node has applied consent up to `version` (or the timeout passes).
    pub async fn wait_for_consent(&self, version: u64, timeout: Duration) {
        let mut rx = self.changed.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|v| *v >= version)).await;
    }

    /// Stewards act for their own organisation; admins for any.
    pub fn require_steward_of(&self, principal: &Principal, org: &str) -> Result<()> {
        match principal.role {
            Role::Admin => Ok(()),
            Role::Steward if principal.org == org => Ok(()),
            Role::Steward => Err(Error::PermissionDenied {
                reason: format!("steward of `{}` may not act for organisation `{org}`", principal.org),
            }),
            _ => Err(Error::PermissionDenied {
                reason: format!(
                    "role `{}` may not change datasets, permits or consent; stewards may",
                    principal.role.as_str()
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_location_stored_through_a_link_by_an_earlier_release_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(&dir.path().join("data")).await.unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap().join("real");
        crate::demo::write_parquet(&real.join("p.parquet"), 50).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let toml = crate::demo::manifest_toml(&format!("file://{}/link/", dir.path().display()));
        let legacy = Manifest::from_toml(&toml).unwrap();
        // Stored as an earlier release stored it: the text as given, not canonical.
        node.meta.insert_dataset(&legacy).await.unwrap();
        let source = node.readable_source(&legacy);
        assert_eq!(source.location, format!("file://{}/", real.display()));
        let table = node.open_source(&legacy, 1).await.unwrap();
        let ctx = crate::catalog::source_context(&node.stores).unwrap();
        let rows: usize = ctx
            .read_table(table)
            .unwrap()
            .collect()
            .await
            .unwrap()
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(rows, 50);
    }

    #[tokio::test]
    async fn rotation_changes_key_and_version_byte() {
        let dir = tempfile::tempdir().unwrap();
        let ids: arrow::array::ArrayRef = Arc::new(arrow::array::Int64Array::from(vec![42]));
        let p1 = Node::open(dir.path())
            .await
            .unwrap()
            .pseudonymiser("DE", "dkfz")
            .unwrap()
            .apply(&ids)
            .unwrap();
        assert_eq!(rotate_pseudonym_key(dir.path()).unwrap(), 2);
        assert!(dir.path().join("pseudonym.key.v1").exists());
        let p2 = Node::open(dir.path())
            .await
            .unwrap()
            .pseudonymiser("DE", "dkfz")
            .unwrap()
            .apply(&ids)
            .unwrap();
        use arrow::array::AsArray;
        let (a, b) = (p1.as_string::<i32>().value(0), p2.as_string::<i32>().value(0));
        assert!(a.starts_with("01") && b.starts_with("02"), "{a} {b}");
        assert_ne!(a[2..], b[2..]);
        // A rotation that crashed after writing the next key but before switching the version:
        // version 2 stays in force with its own key (the same pseudonyms as before).
        std::fs::write(dir.path().join("pseudonym.key.v3"), [7u8; 32]).unwrap();
        let p3 = Node::open(dir.path())
            .await
            .unwrap()
            .pseudonymiser("DE", "dkfz")
            .unwrap()
            .apply(&ids)
            .unwrap();
        assert_eq!(p3.as_string::<i32>().value(0), b);
        // The next rotation replaces that leftover and moves on.
        assert_eq!(rotate_pseudonym_key(dir.path()).unwrap(), 3);
        assert_ne!(
            std::fs::read(dir.path().join("pseudonym.key.v3")).unwrap(),
            vec![7u8; 32]
        );
        assert_eq!(std::fs::read(dir.path().join("pseudonym.key.v2")).unwrap().len(), 32);
    }

    fn pseudonym_of(node: &Node, member_state: &str, org: &str, id: i64) -> String {
        use arrow::array::AsArray;
        let ids: arrow::array::ArrayRef = Arc::new(arrow::array::Int64Array::from(vec![id]));
        let out = node.pseudonymiser(member_state, org).unwrap().apply(&ids).unwrap();
        out.as_string::<i32>().value(0).to_string()
    }

    #[tokio::test]
    async fn a_new_data_directory_names_recipients_by_member_state_and_org() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(dir.path()).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(MEMBER_STATE_FROM)).unwrap(),
            "1\n"
        );
        let fr = pseudonym_of(&node, "FR", "acme", 42);
        assert_eq!(fr, pseudonym_of(&node, "FR", "acme", 42));
        assert_ne!(fr, pseudonym_of(&node, "DE", "acme", 42));
        assert!(fr.starts_with("01"));
        // A principal's member state is always a two-letter code; anything else is refused.
        assert!(node.pseudonymiser("F/R", "acme").is_err());
        // Reopening (a restart) keeps the derivation.
        drop(node);
        assert_eq!(
            pseudonym_of(&Node::open(dir.path()).await.unwrap(), "FR", "acme", 42),
            fr
        );
    }

    #[tokio::test]
    async fn an_earlier_release_s_data_directory_keeps_its_pseudonyms_until_rotation() {
        // Earlier releases: `pseudonym.key` (version 1) and no member-state marker.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pseudonym.key"), [9u8; 32]).unwrap();
        let node = Node::open(dir.path()).await.unwrap();
        assert!(!dir.path().join(MEMBER_STATE_FROM).exists());
        let fr = pseudonym_of(&node, "FR", "acme", 42);
        assert_eq!(fr, pseudonym_of(&node, "DE", "acme", 42), "org-only until rotation");
        let ids: arrow::array::ArrayRef = Arc::new(arrow::array::Int64Array::from(vec![42]));
        let legacy = Pseudonymiser::for_recipient_versioned(&[9u8; 32], 1, "acme")
            .apply(&ids)
            .unwrap();
        use arrow::array::AsArray;
        assert_eq!(
            legacy.as_string::<i32>().value(0),
            fr,
            "the pseudonyms recipients already hold"
        );
        // The rotation's new version is the first to name recipients by member state; a running
        // node picks it up at its next refresh.
        assert_eq!(rotate_pseudonym_key(dir.path()).unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(MEMBER_STATE_FROM)).unwrap(),
            "2\n"
        );
        node.refresh_pseudonym_key().unwrap();
        let (fr2, de2) = (
            pseudonym_of(&node, "FR", "acme", 42),
            pseudonym_of(&node, "DE", "acme", 42),
        );
        assert!(fr2.starts_with("02") && de2.starts_with("02"));
        assert_ne!(fr2, de2);
        // Later rotations keep the marker.
        assert_eq!(rotate_pseudonym_key(dir.path()).unwrap(), 3);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(MEMBER_STATE_FROM)).unwrap(),
            "2\n"
        );
    }

    /// Processes starting at once on an empty data directory make one node key and one
    /// pseudonym key, and all use them (threads here open separate lock files, as processes do).
    #[test]
    fn concurrent_first_starts_make_one_set_of_keys() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            let barrier = Arc::new(std::sync::Barrier::new(8));
            let seen: Vec<(String, String)> = (0..8)
                .map(|_| {
                    let (data, barrier) = (data.clone(), Arc::clone(&barrier));
                    std::thread::spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        barrier.wait();
                        rt.block_on(async {
                            let node = Node::open(&data).await.unwrap();
                            (node.node_key.kid().to_string(), pseudonym_of(&node, "DE", "dkfz", 7))
                        })
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
            let on_disk = crate::signing::NodeKey::load_or_create(&data.join("node.key")).unwrap();
            assert_eq!(on_disk.kid(), seen[0].0);
        }
    }

    #[tokio::test]
    async fn keys_rotated_by_an_earlier_release_keep_their_versions() {
        // Earlier releases kept the key in force in `pseudonym.key` and archived older ones.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pseudonym.key"), [2u8; 32]).unwrap();
        std::fs::write(dir.path().join("pseudonym.key.v1"), [1u8; 32]).unwrap();
        std::fs::write(dir.path().join("pseudonym.version"), "2\n").unwrap();
        assert_eq!(current_pseudonym_key(dir.path()).unwrap(), (vec![2u8; 32], 2));
        assert_eq!(rotate_pseudonym_key(dir.path()).unwrap(), 3);
        assert_eq!(
            std::fs::read(dir.path().join("pseudonym.key.v2")).unwrap(),
            vec![2u8; 32]
        );
        let (k3, v3) = current_pseudonym_key(dir.path()).unwrap();
        assert_eq!((k3.len(), v3), (32, 3));
        // In this layout `pseudonym.key` is an older version's key: if version 3's own file is
        // lost, that copy is refused rather than used under byte 3.
        std::fs::write(dir.path().join("pseudonym.key"), [2u8; 32]).unwrap();
        std::fs::remove_file(dir.path().join("pseudonym.key.v3")).unwrap();
        assert!(current_pseudonym_key(dir.path()).is_err());
        // A version whose key is nowhere is an error, never a fresh key under an old byte.
        std::fs::write(dir.path().join("pseudonym.version"), "5\n").unwrap();
        std::fs::remove_file(dir.path().join("pseudonym.key")).unwrap();
        assert!(current_pseudonym_key(dir.path()).is_err());
    }
}
