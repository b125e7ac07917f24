//! The node: shared state of one Passerelle gateway (stores, keys, consent index) and the
//! snapshot of metadata every request reads. CLI commands and REST handlers call the same
//! operations here, so the rules (validation, role checks) live in one place.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use passerelle_policies::authz::{DEFAULT_MODEL, DEFAULT_POLICY};
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
    /// The enforcer built from the store.
    pub authorizer: Arc<Authorizer>,
}

impl Snapshot {
    /// The dataset if it exists and the principal may know it exists; otherwise the same
    /// `NotFound` for both cases.
    pub fn visible_dataset(&self, principal: &Principal, name: &str) -> Result<Arc<Manifest>> {
        let not_found = || Error::DatasetNotFound { name: name.to_string() };
        let m = self.datasets.get(name).ok_or_else(not_found)?;
        let all_seeing = matches!(principal.role, Role::Admin | Role::Auditor);
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
    /// How long tickets live.
    pub ticket_ttl: Duration,
    pseudonym_master: Vec<u8>,
    snapshot: RwLock<Arc<Snapshot>>,
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
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
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write as _;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp).map_err(io("create secret"))?;
        f.write_all(&secret).map_err(io("write secret"))?;
        f.sync_all().map_err(io("sync secret"))?;
    }
    std::fs::rename(&tmp, path).map_err(io("install secret"))?;
    Ok(secret.to_vec())
}

impl Node {
    /// Opens the node's stores in `data_dir` (creating them on first use). Does not load consent
    /// into memory: [`Node::refresh`] does, for servers.
    pub async fn open(data_dir: &Path) -> Result<Arc<Self>> {
        let pool = meta::open_pool(data_dir).await?;
        let meta = MetaStore::open(pool.clone()).await?;
        let consent_store = ConsentStore::open(pool.clone()).await?;
        let audit = AuditLog::open(pool).await?;
        let tickets = TicketSigner::new(load_or_create_secret(&data_dir.join("ticket.key"))?);
        let pseudonym_master = load_or_create_secret(&data_dir.join("pseudonym.key"))?;
        let authorizer = Authorizer::build(DEFAULT_MODEL, DEFAULT_POLICY, Vec::new(), &[]).await?;
        let empty = Snapshot {
            meta_version: u64::MAX,
            datasets: BTreeMap::new(),
            principals_by_hash: HashMap::new(),
            authorizer: Arc::new(authorizer),
        };
        let (changed, _) = watch::channel(0);
        Ok(Arc::new(Self {
            data_dir: data_dir.to_path_buf(),
            meta,
            consent_store,
            audit,
            consent: Arc::new(ConsentIndex::new()),
            tickets,
            ticket_ttl: Duration::from_secs(600),
            pseudonym_master,
            snapshot: RwLock::new(Arc::new(empty)),
            changed,
        }))
    }

    /// The current metadata snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Brings the snapshot and the consent index up to date with the store.
    pub async fn refresh(&self) -> Result<()> {
        let version = self.meta.version().await?;
        if version != self.snapshot().meta_version {
            let datasets = self.meta.datasets().await?;
            let principals = self.meta.principals().await?;
            let permits = self.meta.permits().await?;
            let people: Vec<Principal> = principals.iter().map(|p| p.principal.clone()).collect();
            let authorizer = Authorizer::build(DEFAULT_MODEL, DEFAULT_POLICY, permits, &people).await?;
            let snap = Snapshot {
                meta_version: version,
                datasets: datasets
                    .into_iter()
                    .map(|m| (m.name.to_string(), Arc::new(m)))
                    .collect(),
                principals_by_hash: principals.into_iter().map(|p| (p.key_hash, p.principal)).collect(),
                authorizer: Arc::new(authorizer),
            };
            *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snap);
            tracing::info!(version, "metadata reloaded");
        }
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
                        if let Err(e) = node.refresh().await {
                            tracing::warn!(error = %e, "refresh failed; keeping the previous snapshot");
                        }
                    }
                    _ = shutdown.changed() => break,
                }
            }
        })
    }

    /// Resolves an `authorization` header to a principal.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Principal> {
        let header = header.ok_or(Error::Unauthenticated {
            reason: "missing authorization header",
        })?;
        let (key, claimed_name) = match auth::parse_authorization(header)? {
            Credentials::Bearer(k) => (k, None),
            Credentials::Basic { name, key } => (key, Some(name)),
        };
        let hash = auth::hash_key(&key);
        let snap = self.snapshot();
        let wrong = Error::Unauthenticated {
            reason: "unknown or revoked key",
        };
        let (stored_hash, principal) = snap.principals_by_hash.get_key_value(&hash).ok_or(wrong)?;
        if !auth::hashes_equal(stored_hash, &hash) || claimed_name.is_some_and(|n| n != principal.name) {
            return Err(Error::Unauthenticated {
                reason: "unknown or revoked key",
            });
        }
        Ok(principal.clone())
    }

    /// The keyed pseudonymiser for a recipient organisation.
    pub fn pseudonymiser(&self, org: &str) -> Pseudonymiser {
        Pseudonymiser::for_recipient(&self.pseudonym_master, org)
    }

    /// Adds a principal and returns its new API key (shown once, stored hashed).
    pub async fn add_principal(&self, principal: &Principal) -> Result<String> {
        if principal.name.is_empty() || principal.name.len() > 128 || principal.name.contains([':', ',', '"', '\n']) {
            return Err(Error::invalid(
                "principal name must be 1-128 characters without `:`, `,`, quotes or newlines",
                "choose a simple name such as trainer-de",
            ));
        }
        if principal.org.is_empty() || principal.org.contains([',', '"', '\n']) {
            return Err(Error::invalid(
                "organisation must be non-empty without commas, quotes or newlines",
                "use a short organisation id such as dkfz",
            ));
        }
        passerelle_policies::MemberState::parse(&principal.member_state)?;
        let key = auth::generate_key();
        self.meta.add_principal(principal, &auth::hash_key(&key)).await?;
        Ok(key)
    }

    /// Validates a manifest against its source and stores it. Nothing is stored on failure.
    pub async fn register_dataset(&self, manifest: &Manifest) -> Result<()> {
        let ctx = crate::catalog::source_context();
        let raw = passerelle_connectors::open(&ctx.state(), &manifest.source()).await?;
        manifest.policy().validate(&raw.schema())?;
        self.meta.insert_dataset(manifest).await
    }

    /// Adds or renews a permit for a registered dataset.
    pub async fn add_permit(&self, permit: &Permit) -> Result<()> {
        if permit.org.is_empty() || permit.org.contains([',', '"', '\n']) {
            return Err(Error::invalid(
                "organisation must be non-empty without commas, quotes or newlines",
                "use the organisation id principals are registered with",
            ));
        }
        self.meta.upsert_permit(permit).await
    }

    /// Appends consent events durably; returns the new consent version.
    pub async fn append_consent(&self, registry: &str, events: &[ConsentEvent]) -> Result<u64> {
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
