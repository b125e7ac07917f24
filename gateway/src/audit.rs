//! The audit log: one row per access decision, appended before any data leaves, completed once
//! with the rows sent and withheld. SQLite triggers refuse deletes and any update other than the
//! single completion step.
//!
//! Triggers stop mistakes, not someone with write access to the file, so the log is also a hash
//! chain: every entry and every completion is a link `hash = SHA-256(previous hash "\n"
//! canonical JSON of the fields)` in `audit_chain`, written in the same transaction as the row.
//! [`AuditLog::verify`] recomputes the chain and names the first entry that no longer matches;
//! signed [`Checkpoint`]s (count and head hash) handed to an external notary make a rewrite of
//! the whole chain detectable too.

use serde::Serialize;
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};

use crate::error::{Error, Result};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    time            TEXT    NOT NULL,
    principal       TEXT    NOT NULL,
    organisation    TEXT    NOT NULL,
    member_state    TEXT    NOT NULL,
    purpose         TEXT    NOT NULL,
    dataset         TEXT    NOT NULL,
    columns         TEXT,
    filter          TEXT,
    statement       TEXT,
    action          TEXT    NOT NULL,
    decision        TEXT    NOT NULL CHECK (decision IN ('allow', 'deny')),
    reason          TEXT    NOT NULL,
    consent_version INTEGER NOT NULL,
    consent_version_last INTEGER,
    policy_version  TEXT    NOT NULL DEFAULT '',
    rows_sent       INTEGER NOT NULL DEFAULT 0,
    rows_withheld   INTEGER NOT NULL DEFAULT 0,
    status          TEXT    NOT NULL CHECK (status IN ('requested', 'completed', 'failed')),
    completed_at    TEXT
);
CREATE INDEX IF NOT EXISTS audit_dataset ON audit (dataset);
CREATE INDEX IF NOT EXISTS audit_principal ON audit (principal);
CREATE TABLE IF NOT EXISTS audit_chain (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    entry_id INTEGER NOT NULL,
    kind     TEXT    NOT NULL CHECK (kind IN ('entry', 'completion')),
    hash     TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_chain_entry ON audit_chain (entry_id);
CREATE TRIGGER IF NOT EXISTS audit_chain_append_only BEFORE UPDATE ON audit_chain
BEGIN SELECT RAISE(ABORT, 'the audit chain is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_chain_no_delete BEFORE DELETE ON audit_chain
BEGIN SELECT RAISE(ABORT, 'the audit chain is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit entries are never deleted'); END;
CREATE TRIGGER IF NOT EXISTS audit_complete_once BEFORE UPDATE ON audit
WHEN OLD.status != 'requested'
  OR NEW.id IS NOT OLD.id OR NEW.time IS NOT OLD.time OR NEW.principal IS NOT OLD.principal
  OR NEW.organisation IS NOT OLD.organisation OR NEW.member_state IS NOT OLD.member_state
  OR NEW.purpose IS NOT OLD.purpose OR NEW.dataset IS NOT OLD.dataset OR NEW.columns IS NOT OLD.columns
  OR NEW.filter IS NOT OLD.filter OR NEW.statement IS NOT OLD.statement OR NEW.action IS NOT OLD.action OR NEW.decision IS NOT OLD.decision
  OR NEW.reason IS NOT OLD.reason
  OR NEW.consent_version IS NOT OLD.consent_version OR NEW.policy_version IS NOT OLD.policy_version
BEGIN SELECT RAISE(ABORT, 'audit entries are only updated by their completion'); END;
";

/// The Flight or REST action audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// ListFlights.
    ListFlights,
    /// GetFlightInfo.
    GetFlightInfo,
    /// GetSchema.
    GetSchema,
    /// DoGet.
    DoGet,
    /// Flight SQL: GetFlightInfo of a statement or prepared statement.
    SqlQuery,
    /// Flight SQL: CreatePreparedStatement.
    SqlPrepare,
    /// Flight SQL: catalog, schema and table listings.
    SqlMetadata,
    /// Flight Handshake (login).
    Handshake,
    /// A dataset registration (CLI or REST), allowed or refused.
    RegisterDataset,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::ListFlights => "list_flights",
            Action::GetFlightInfo => "get_flight_info",
            Action::GetSchema => "get_schema",
            Action::DoGet => "do_get",
            Action::SqlQuery => "sql_query",
            Action::SqlPrepare => "sql_prepare",
            Action::SqlMetadata => "sql_metadata",
            Action::Handshake => "handshake",
            Action::RegisterDataset => "register_dataset",
        }
    }
}

/// A new audit entry.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// Principal name (or `(unauthenticated)`).
    pub principal: String,
    /// Organisation.
    pub organisation: String,
    /// Member state.
    pub member_state: String,
    /// Declared purpose.
    pub purpose: String,
    /// Dataset named in the request.
    pub dataset: String,
    /// Columns requested, if the request named them.
    pub columns: Option<Vec<String>>,
    /// User filter, if any.
    pub filter: Option<String>,
    /// SQL text, for Flight SQL requests.
    pub statement: Option<String>,
    /// What was attempted.
    pub action: Action,
    /// Allowed or not.
    pub allow: bool,
    /// The decision's reason.
    pub reason: String,
    /// Consent version at decision time.
    pub consent_version: u64,
    /// Fingerprint of the policy that decided.
    pub policy_version: String,
}

/// A stored audit entry, as listed to auditors.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub time: String,
    pub principal: String,
    pub organisation: String,
    pub member_state: String,
    pub purpose: String,
    pub dataset: String,
    pub columns: Option<Vec<String>>,
    pub filter: Option<String>,
    pub statement: Option<String>,
    pub action: String,
    pub decision: String,
    pub reason: String,
    pub consent_version: i64,
    pub consent_version_last: Option<i64>,
    pub policy_version: String,
    pub rows_sent: i64,
    pub rows_withheld: i64,
    pub status: String,
    pub completed_at: Option<String>,
}

/// Filters for listing.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only this dataset.
    pub dataset: Option<String>,
    /// Only this principal.
    pub principal: Option<String>,
    /// Only `allow` or `deny`.
    pub decision: Option<String>,
    /// Only entries at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Only entries before this time (RFC 3339).
    pub until: Option<String>,
    /// Only entries with a smaller id: pass the last id of a page to get the next one.
    pub before_id: Option<i64>,
    /// At most this many, newest first (default 1000, at most 100000).
    pub limit: Option<u32>,
}

impl AuditQuery {
    /// Checks values (times, decision) so that a typo is an error, not an empty page.
    pub fn validate(&self) -> Result<()> {
        let hint = "since/until are RFC 3339 times (2026-01-31T00:00:00Z), decision is allow or deny";
        for t in [&self.since, &self.until].into_iter().flatten() {
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|e| Error::invalid(format!("`{t}` is not an RFC 3339 time: {e}"), hint))?;
        }
        if let Some(d) = &self.decision
            && d != "allow"
            && d != "deny"
        {
            return Err(Error::invalid(
                format!("decision `{d}` is neither allow nor deny"),
                hint,
            ));
        }
        Ok(())
    }
}

/// The outcome of [`AuditLog::verify`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Verification {
    /// Whether every link matches its entry and every entry is linked.
    pub ok: bool,
    /// Audit entries.
    pub entries: i64,
    /// Chain links (one per entry, one per completion).
    pub links: i64,
    /// Hash of the last link (64 zeros for an empty log).
    pub head: String,
    /// The first entry that does not match the chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_broken_entry: Option<i64>,
    /// What does not match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A signed statement that the chain had `links` links ending in `head` at `time`: an auditor
/// keeps it outside the node; [`AuditLog::verify_checkpoint`] later proves that nothing before
/// it was rewritten.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The node that signed.
    pub node_id: String,
    /// Audit entries at that point.
    pub entries: i64,
    /// Chain links at that point.
    pub links: i64,
    /// Hash of the last link.
    pub head: String,
    /// When it was taken (RFC 3339).
    pub time: String,
    /// Id of the node key that signed (see `GET /api/v1/keys`).
    pub key_id: String,
    /// Ed25519 signature over [`Checkpoint::signed_text`], base64url.
    pub signature: String,
}

impl Checkpoint {
    /// The exact text signed: one field per line.
    pub fn signed_text(&self) -> String {
        format!(
            "passerelle-audit-checkpoint-v1\n{}\n{}\n{}\n{}\n{}\n",
            self.node_id, self.entries, self.links, self.head, self.time
        )
    }
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn link_hash(prev: &str, canonical: &str) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(canonical.as_bytes());
    crate::auth::hex(&h.finalize())
}

/// The fields an entry link covers, in a fixed order (JSON of an array: unambiguous).
#[allow(clippy::too_many_arguments)]
fn entry_canonical(
    id: i64,
    time: &str,
    e: (&str, &str, &str, &str, &str),
    columns: Option<&str>,
    filter: Option<&str>,
    statement: Option<&str>,
    action: &str,
    decision: &str,
    reason: &str,
    consent_version: i64,
    policy_version: &str,
) -> String {
    serde_json::json!([
        "entry",
        id,
        time,
        e.0,
        e.1,
        e.2,
        e.3,
        e.4,
        columns,
        filter,
        statement,
        action,
        decision,
        reason,
        consent_version,
        policy_version
    ])
    .to_string()
}

fn completion_canonical(
    id: i64,
    rows_sent: i64,
    rows_withheld: i64,
    consent_version_last: Option<i64>,
    status: &str,
    completed_at: Option<&str>,
) -> String {
    serde_json::json!([
        "completion",
        id,
        rows_sent,
        rows_withheld,
        consent_version_last,
        status,
        completed_at
    ])
    .to_string()
}

fn canonical_of_row(kind: &str, r: &sqlx::sqlite::SqliteRow) -> String {
    let id: i64 = r.get("id");
    if kind == "entry" {
        let text = |c: &str| -> String { r.get(c) };
        let opt = |c: &str| -> Option<String> { r.get(c) };
        entry_canonical(
            id,
            &text("time"),
            (
                &text("principal"),
                &text("organisation"),
                &text("member_state"),
                &text("purpose"),
                &text("dataset"),
            ),
            opt("columns").as_deref(),
            opt("filter").as_deref(),
            opt("statement").as_deref(),
            &text("action"),
            &text("decision"),
            &text("reason"),
            r.get("consent_version"),
            &text("policy_version"),
        )
    } else {
        let completed_at: Option<String> = r.get("completed_at");
        let status: String = r.get("status");
        completion_canonical(
            id,
            r.get("rows_sent"),
            r.get("rows_withheld"),
            r.get("consent_version_last"),
            &status,
            completed_at.as_deref(),
        )
    }
}

/// How a stream ended.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// Rows sent to the client.
    pub rows_sent: u64,
    /// Rows the gate withheld.
    pub rows_withheld: u64,
    /// Last consent version the stream used.
    pub consent_version_last: u64,
    /// Whether the stream ended normally.
    pub ok: bool,
}

/// The append-only audit log.
#[derive(Debug, Clone)]
pub struct AuditLog {
    pool: SqlitePool,
    /// Serialises chain appends and caches the head hash (`None` until first read).
    head: std::sync::Arc<tokio::sync::Mutex<Option<String>>>,
}

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl AuditLog {
    /// Creates the table and its guards if needed.
    pub async fn open(pool: SqlitePool) -> Result<Self> {
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .map_err(Error::store("create audit table"))?;
        // Logs written before Flight SQL existed lack `statement`: add it and re-create the
        // completion guard so that it covers the new column too.
        let has_statement: bool =
            sqlx::query_scalar("SELECT count(*) > 0 FROM pragma_table_info('audit') WHERE name = 'statement'")
                .fetch_one(&pool)
                .await
                .map_err(Error::store("inspect audit table"))?;
        if !has_statement {
            let mut tx = pool.begin().await.map_err(Error::store("migrate audit table"))?;
            for sql in [
                "ALTER TABLE audit ADD COLUMN statement TEXT",
                "DROP TRIGGER IF EXISTS audit_complete_once",
            ] {
                sqlx::query(sql)
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::store("migrate audit table"))?;
            }
            tx.commit().await.map_err(Error::store("migrate audit table"))?;
            sqlx::raw_sql(SCHEMA)
                .execute(&pool)
                .await
                .map_err(Error::store("create audit table"))?;
        }
        let log = Self {
            pool,
            head: Default::default(),
        };
        log.backfill_chain().await?;
        Ok(log)
    }

    /// Logs written before the chain existed: link their entries now, in id order, so that
    /// from here on they are covered too.
    async fn backfill_chain(&self) -> Result<()> {
        let store = Error::store("backfill audit chain");
        let unlinked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit WHERE id > (SELECT coalesce(max(entry_id), 0) FROM audit_chain)",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(Error::store("inspect audit chain"))?;
        let links: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_chain")
            .fetch_one(&self.pool)
            .await
            .map_err(Error::store("inspect audit chain"))?;
        if unlinked == 0 || links > 0 {
            return Ok(());
        }
        let mut head = self.head.lock().await;
        let mut tx = self.pool.begin().await.map_err(store)?;
        let rows = sqlx::query("SELECT * FROM audit ORDER BY id")
            .fetch_all(&mut *tx)
            .await
            .map_err(store)?;
        let mut prev = GENESIS.to_string();
        for r in &rows {
            let status: String = r.get("status");
            let kinds: &[&str] = if status == "requested" {
                &["entry"]
            } else {
                &["entry", "completion"]
            };
            for kind in kinds {
                prev = link_hash(&prev, &canonical_of_row(kind, r));
                sqlx::query("INSERT INTO audit_chain (entry_id, kind, hash) VALUES (?, ?, ?)")
                    .bind(r.get::<i64, _>("id"))
                    .bind(*kind)
                    .bind(&prev)
                    .execute(&mut *tx)
                    .await
                    .map_err(store)?;
            }
        }
        tx.commit().await.map_err(store)?;
        *head = Some(prev);
        tracing::info!(
            entries = rows.len(),
            "audit entries written before the hash chain are now linked"
        );
        Ok(())
    }

    /// Appends a link in `tx`, given the head (read from the store on first use).
    async fn link(
        &self,
        head: &mut Option<String>,
        tx: &mut sqlx::Transaction<'_, Sqlite>,
        entry_id: i64,
        kind: &str,
        canonical: &str,
    ) -> Result<String> {
        let prev = match head.as_ref() {
            Some(h) => h.clone(),
            None => sqlx::query_scalar::<_, String>("SELECT hash FROM audit_chain ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut **tx)
                .await
                .map_err(Error::store("read audit chain head"))?
                .unwrap_or_else(|| GENESIS.to_string()),
        };
        let hash = link_hash(&prev, canonical);
        sqlx::query("INSERT INTO audit_chain (entry_id, kind, hash) VALUES (?, ?, ?)")
            .bind(entry_id)
            .bind(kind)
            .bind(&hash)
            .execute(&mut **tx)
            .await
            .map_err(Error::store("append audit chain link"))?;
        Ok(hash)
    }

    /// Appends an entry; returns its id. Final entries (denials, metadata calls) are written as
    /// `completed`; data streams start as `requested`.
    pub async fn append(&self, e: &AuditEntry, final_entry: bool) -> Result<i64> {
        let columns = e.columns.as_ref().map(|c| serde_json::to_string(c).unwrap_or_default());
        let status = if final_entry { "completed" } else { "requested" };
        let completed_at = final_entry.then(now_text);
        let time = now_text();
        let decision = if e.allow { "allow" } else { "deny" };
        let store = Error::store("append audit entry");
        let mut head = self.head.lock().await;
        let mut tx = self.pool.begin().await.map_err(store)?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO audit (time, principal, organisation, member_state, purpose, dataset, columns, filter, statement, action, decision, reason, consent_version, policy_version, status, completed_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&time)
        .bind(&e.principal)
        .bind(&e.organisation)
        .bind(&e.member_state)
        .bind(&e.purpose)
        .bind(&e.dataset)
        .bind(&columns)
        .bind(&e.filter)
        .bind(&e.statement)
        .bind(e.action.as_str())
        .bind(decision)
        .bind(&e.reason)
        .bind(e.consent_version as i64)
        .bind(&e.policy_version)
        .bind(status)
        .bind(&completed_at)
        .fetch_one(&mut *tx)
        .await
        .map_err(store)?;
        let entry = entry_canonical(
            id,
            &time,
            (&e.principal, &e.organisation, &e.member_state, &e.purpose, &e.dataset),
            columns.as_deref(),
            e.filter.as_deref(),
            e.statement.as_deref(),
            e.action.as_str(),
            decision,
            &e.reason,
            e.consent_version as i64,
            &e.policy_version,
        );
        let mut new_head = self.link(&mut head, &mut tx, id, "entry", &entry).await?;
        if final_entry {
            let done = completion_canonical(id, 0, 0, None, status, completed_at.as_deref());
            *head = Some(new_head);
            new_head = self.link(&mut head, &mut tx, id, "completion", &done).await?;
        }
        tx.commit().await.map_err(store)?;
        // Only a committed link moves the cached head.
        *head = Some(new_head);
        Ok(id)
    }

    /// Completes a `requested` entry (once).
    pub async fn complete(&self, id: i64, c: Completion) -> Result<()> {
        let store = Error::store("complete audit entry");
        let status = if c.ok { "completed" } else { "failed" };
        let completed_at = now_text();
        let mut head = self.head.lock().await;
        let mut tx = self.pool.begin().await.map_err(store)?;
        let changed = sqlx::query(
            "UPDATE audit SET rows_sent = ?, rows_withheld = ?, consent_version_last = ?, status = ?, completed_at = ? WHERE id = ? AND status = 'requested'",
        )
        .bind(c.rows_sent as i64)
        .bind(c.rows_withheld as i64)
        .bind(c.consent_version_last as i64)
        .bind(status)
        .bind(&completed_at)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(store)?
        .rows_affected();
        if changed == 0 {
            return Ok(());
        }
        let done = completion_canonical(
            id,
            c.rows_sent as i64,
            c.rows_withheld as i64,
            Some(c.consent_version_last as i64),
            status,
            Some(&completed_at),
        );
        let new_head = self.link(&mut head, &mut tx, id, "completion", &done).await?;
        tx.commit().await.map_err(store)?;
        *head = Some(new_head);
        Ok(())
    }

    /// Marks every entry still `requested` as failed: called at start, when no stream of this
    /// node can be open. Returns how many there were.
    pub async fn fail_dangling(&self, why: &str) -> Result<usize> {
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM audit WHERE status = 'requested' ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store("list open audit entries"))?;
        for &id in &ids {
            tracing::info!(audit_id = id, reason = why, "failing interrupted audit entry");
            self.complete(
                id,
                Completion {
                    rows_sent: 0,
                    rows_withheld: 0,
                    consent_version_last: 0,
                    ok: false,
                },
            )
            .await?;
        }
        Ok(ids.len())
    }

    /// Recomputes the chain from the stored rows and reports the first entry that does not
    /// match (edited, deleted, inserted outside the chain, or completed behind its back).
    pub async fn verify(&self) -> Result<Verification> {
        self.walk(None).await.map(|(v, _)| v)
    }

    /// Walks the chain; with `at = Some(n)`, also returns the hash of link `n` (1-based).
    async fn walk(&self, at: Option<i64>) -> Result<(Verification, Option<String>)> {
        use futures::TryStreamExt as _;
        let store = Error::store("verify audit chain");
        let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM audit")
            .fetch_one(&self.pool)
            .await
            .map_err(store)?;
        let mut v = Verification {
            ok: true,
            entries,
            links: 0,
            head: GENESIS.to_string(),
            first_broken_entry: None,
            reason: None,
        };
        let mut at_hash = None;
        let broken = |v: &mut Verification, id: i64, reason: String| {
            if v.ok {
                v.ok = false;
                v.first_broken_entry = Some(id);
                v.reason = Some(reason);
            }
        };
        {
            let mut rows = sqlx::query(
                "SELECT c.seq AS seq, c.entry_id AS link_entry, c.kind AS kind, c.hash AS hash, a.* \
                 FROM audit_chain c LEFT JOIN audit a ON a.id = c.entry_id ORDER BY c.seq",
            )
            .fetch(&self.pool);
            let mut prev = GENESIS.to_string();
            while let Some(r) = rows.try_next().await.map_err(store)? {
                v.links += 1;
                let link_entry: i64 = r.get("link_entry");
                let kind: String = r.get("kind");
                let stored: String = r.get("hash");
                if r.try_get::<Option<i64>, _>("id").ok().flatten().is_none() {
                    broken(&mut v, link_entry, format!("entry {link_entry} was deleted"));
                } else {
                    let expected = link_hash(&prev, &canonical_of_row(&kind, &r));
                    if expected != stored {
                        broken(
                            &mut v,
                            link_entry,
                            format!(
                                "entry {link_entry} does not match its {kind} link (it was edited, or the chain was)"
                            ),
                        );
                    }
                }
                prev = stored;
                if at == Some(v.links) {
                    at_hash = Some(prev.clone());
                }
            }
            v.head = prev;
        }
        // Rows the chain does not cover: inserted directly, or completed without a link.
        for (sql, what) in [
            (
                "SELECT id FROM audit WHERE id NOT IN (SELECT entry_id FROM audit_chain WHERE kind = 'entry') ORDER BY id LIMIT 1",
                "is not in the chain (inserted outside the log)",
            ),
            (
                "SELECT id FROM audit WHERE status != 'requested' AND id NOT IN (SELECT entry_id FROM audit_chain WHERE kind = 'completion') ORDER BY id LIMIT 1",
                "was completed outside the log",
            ),
        ] {
            if let Some(id) = sqlx::query_scalar::<_, i64>(sql)
                .fetch_optional(&self.pool)
                .await
                .map_err(store)?
            {
                if v.first_broken_entry.is_none_or(|b| id < b) {
                    v.ok = true;
                    v.first_broken_entry = None;
                }
                broken(&mut v, id, format!("entry {id} {what}"));
            }
        }
        Ok((v, at_hash))
    }

    /// A checkpoint of the chain as it is now, signed with the node key.
    pub async fn checkpoint(&self, node_id: &str, key: &crate::signing::NodeKey) -> Result<Checkpoint> {
        use base64::Engine as _;
        let head = self.head.lock().await;
        let (links, last): (i64, Option<String>) = {
            let r = sqlx::query(
                "SELECT (SELECT count(*) FROM audit_chain) AS n, (SELECT hash FROM audit_chain ORDER BY seq DESC LIMIT 1) AS h",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(Error::store("read audit chain head"))?;
            (r.get("n"), r.get("h"))
        };
        let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM audit")
            .fetch_one(&self.pool)
            .await
            .map_err(Error::store("count audit entries"))?;
        drop(head);
        let mut cp = Checkpoint {
            node_id: node_id.to_string(),
            entries,
            links,
            head: last.unwrap_or_else(|| GENESIS.to_string()),
            time: now_text(),
            key_id: key.kid().to_string(),
            signature: String::new(),
        };
        cp.signature = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.sign(cp.signed_text().as_bytes())?);
        Ok(cp)
    }

    /// Checks a checkpoint against the chain: its signature (by `key`), and that the chain still
    /// passes through its head at its length. Returns the chain's verification, failed if the
    /// checkpoint does not hold.
    pub async fn verify_checkpoint(&self, cp: &Checkpoint, key: &crate::signing::NodeKey) -> Result<Verification> {
        use base64::Engine as _;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&cp.signature)
            .unwrap_or_default();
        let (mut v, at) = self.walk(Some(cp.links)).await?;
        let refuse = |v: &mut Verification, reason: String| {
            v.ok = false;
            v.first_broken_entry = None;
            v.reason = Some(reason);
        };
        if cp.key_id != key.kid() || !key.verify(cp.signed_text().as_bytes(), &sig) {
            refuse(&mut v, "the checkpoint's signature is not this node's".into());
        } else if cp.links == 0 && cp.head == GENESIS {
            // An empty log's checkpoint holds for any log.
        } else if at.as_deref() != Some(cp.head.as_str()) {
            let reason = format!(
                "the chain no longer passes through the checkpoint (link {} of {} should be {}): entries before it were rewritten or removed",
                cp.links, v.links, cp.head
            );
            refuse(&mut v, reason);
        }
        Ok(v)
    }

    /// Lists entries, newest first.
    pub async fn list(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!("{LIST_SELECT} WHERE 1 = 1"));
        if let Some(d) = &q.dataset {
            // SQL entries name every dataset they touched, comma-separated.
            qb.push(" AND instr(',' || dataset || ',', ',' || ")
                .push_bind(d.clone())
                .push(" || ',') > 0");
        }
        if let Some(p) = &q.principal {
            qb.push(" AND principal = ").push_bind(p.clone());
        }
        if let Some(d) = &q.decision {
            qb.push(" AND decision = ").push_bind(d.clone());
        }
        // Times are stored as UTC RFC 3339 with microseconds, so text order is time order once
        // the bound is written the same way.
        let utc = |t: &str| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|t| {
                    t.with_timezone(&chrono::Utc)
                        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                })
                .unwrap_or_else(|_| t.to_string())
        };
        if let Some(t) = &q.since {
            qb.push(" AND time >= ").push_bind(utc(t));
        }
        if let Some(t) = &q.until {
            qb.push(" AND time < ").push_bind(utc(t));
        }
        if let Some(id) = q.before_id {
            qb.push(" AND id < ").push_bind(id);
        }
        qb.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(q.limit.unwrap_or(1000).min(100_000)));
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store("list audit entries"))?;
        Ok(rows.iter().map(record_of).collect())
    }

    /// Up to `n` entries with ids above `after`, oldest first (the SQL `audit` table's pages).
    pub async fn page_after(&self, after: i64, n: u32) -> Result<Vec<AuditRecord>> {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!("{LIST_SELECT} WHERE id > "));
        qb.push_bind(after).push(" ORDER BY id LIMIT ").push_bind(i64::from(n));
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store("read audit entries"))?;
        Ok(rows.iter().map(record_of).collect())
    }
}

const LIST_SELECT: &str = "SELECT id, time, principal, organisation, member_state, purpose, dataset, columns, filter, action, decision, reason, consent_version, consent_version_last, policy_version, rows_sent, rows_withheld, status, completed_at, statement FROM audit";

fn record_of(r: &sqlx::sqlite::SqliteRow) -> AuditRecord {
    let columns: Option<String> = r.get(7);
    AuditRecord {
        id: r.get(0),
        time: r.get(1),
        principal: r.get(2),
        organisation: r.get(3),
        member_state: r.get(4),
        purpose: r.get(5),
        dataset: r.get(6),
        columns: columns.and_then(|c| serde_json::from_str(&c).ok()),
        filter: r.get(8),
        statement: r.get(19),
        action: r.get(9),
        decision: r.get(10),
        reason: r.get(11),
        consent_version: r.get(12),
        consent_version_last: r.get(13),
        policy_version: r.get(14),
        rows_sent: r.get(15),
        rows_withheld: r.get(16),
        status: r.get(17),
        completed_at: r.get(18),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::SqlitePoolOptions;

    #[tokio::test]
    async fn entries_complete_once_and_are_never_deleted() {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let log = AuditLog::open(pool.clone()).await.unwrap();
        let e = AuditEntry {
            principal: "t".into(),
            organisation: "o".into(),
            member_state: "DE".into(),
            purpose: "research".into(),
            dataset: "d".into(),
            columns: Some(vec!["a".into()]),
            filter: None,
            statement: None,
            action: Action::DoGet,
            allow: true,
            reason: "ok".into(),
            consent_version: 3,
            policy_version: "abc".into(),
        };
        let id = log.append(&e, false).await.unwrap();
        log.complete(
            id,
            Completion {
                rows_sent: 5,
                rows_withheld: 2,
                consent_version_last: 4,
                ok: true,
            },
        )
        .await
        .unwrap();
        // A second completion changes nothing.
        log.complete(
            id,
            Completion {
                rows_sent: 0,
                rows_withheld: 0,
                consent_version_last: 0,
                ok: false,
            },
        )
        .await
        .unwrap();
        let rows = log.list(&AuditQuery::default()).await.unwrap();
        assert_eq!(
            (rows[0].rows_sent, rows[0].rows_withheld, rows[0].status.as_str()),
            (5, 2, "completed")
        );
        assert_eq!(rows[0].columns.as_deref(), Some(&["a".to_string()][..]));
        assert!(sqlx::query("DELETE FROM audit").execute(&pool).await.is_err());
        assert!(
            sqlx::query("UPDATE audit SET principal = 'x'")
                .execute(&pool)
                .await
                .is_err()
        );
        let denied = log.append(&AuditEntry { allow: false, ..e }, true).await.unwrap();
        assert!(
            sqlx::query("UPDATE audit SET reason = 'x' WHERE id = ?")
                .bind(denied)
                .execute(&pool)
                .await
                .is_err()
        );
        assert_eq!(
            log.list(&AuditQuery {
                principal: Some("nobody".into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .len(),
            0
        );
    }

    async fn memory_log() -> (SqlitePool, AuditLog) {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let log = AuditLog::open(pool.clone()).await.unwrap();
        (pool, log)
    }

    fn entry(principal: &str) -> AuditEntry {
        AuditEntry {
            principal: principal.into(),
            organisation: "o".into(),
            member_state: "DE".into(),
            purpose: "research".into(),
            dataset: "d".into(),
            columns: None,
            filter: Some("x > 1".into()),
            statement: None,
            action: Action::DoGet,
            allow: true,
            reason: "ok".into(),
            consent_version: 1,
            policy_version: "p".into(),
        }
    }

    const DONE: Completion = Completion {
        rows_sent: 10,
        rows_withheld: 1,
        consent_version_last: 2,
        ok: true,
    };

    #[tokio::test]
    async fn the_chain_names_the_first_edited_deleted_or_smuggled_entry() {
        let (pool, log) = memory_log().await;
        let key_dir = tempfile::tempdir().unwrap();
        let key = crate::signing::NodeKey::load_or_create(&key_dir.path().join("k")).unwrap();
        let empty = log.checkpoint("n", &key).await.unwrap();
        for i in 0..5 {
            let id = log.append(&entry(&format!("p{i}")), i % 2 == 0).await.unwrap();
            log.complete(id, DONE).await.unwrap();
        }
        let v = log.verify().await.unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!((v.entries, v.links), (5, 10));
        let cp = log.checkpoint("n", &key).await.unwrap();
        assert_eq!(cp.head, v.head);
        assert!(log.verify_checkpoint(&cp, &key).await.unwrap().ok);
        assert!(log.verify_checkpoint(&empty, &key).await.unwrap().ok);
        // A forged signature, or a checkpoint of another node key, does not hold.
        let other = crate::signing::NodeKey::load_or_create(&key_dir.path().join("o")).unwrap();
        assert!(!log.verify_checkpoint(&cp, &other).await.unwrap().ok);
        let forged = Checkpoint { links: 4, ..cp.clone() };
        assert!(!log.verify_checkpoint(&forged, &key).await.unwrap().ok);

        // Later entries keep the checkpoint valid.
        let open_id = log.append(&entry("later"), false).await.unwrap();
        assert!(log.verify_checkpoint(&cp, &key).await.unwrap().ok);
        assert!(log.verify().await.unwrap().ok);

        // Someone with write access edits entry 2 behind the triggers' back.
        sqlx::raw_sql("DROP TRIGGER audit_complete_once; UPDATE audit SET principal = 'someone-else' WHERE id = 2; UPDATE audit SET rows_sent = 0 WHERE id = 4;")
            .execute(&pool)
            .await
            .unwrap();
        let v = log.verify().await.unwrap();
        assert!(!v.ok);
        assert_eq!(v.first_broken_entry, Some(2), "{v:?}");
        assert!(v.reason.unwrap().contains("entry 2"));
        assert!(!log.verify_checkpoint(&cp, &key).await.unwrap().ok);
        sqlx::raw_sql("UPDATE audit SET principal = 'p1' WHERE id = 2; UPDATE audit SET rows_sent = 10 WHERE id = 4;")
            .execute(&pool)
            .await
            .unwrap();
        assert!(
            log.verify().await.unwrap().ok,
            "restoring the values restores the chain"
        );

        // A row completed outside the log, a row inserted outside the log, a deleted row.
        sqlx::query("UPDATE audit SET status = 'completed' WHERE id = ?")
            .bind(open_id)
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(log.verify().await.unwrap().first_broken_entry, Some(open_id));
        sqlx::query("UPDATE audit SET status = 'requested' WHERE id = ?")
            .bind(open_id)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::raw_sql("INSERT INTO audit (time, principal, organisation, member_state, purpose, dataset, action, decision, reason, consent_version, status) SELECT time, principal, organisation, member_state, purpose, dataset, action, decision, reason, consent_version, 'requested' FROM audit WHERE id = 1")
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(log.verify().await.unwrap().first_broken_entry, Some(open_id + 1));
        sqlx::raw_sql("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE id IN (3, 7);")
            .execute(&pool)
            .await
            .unwrap();
        let v = log.verify().await.unwrap();
        assert_eq!(v.first_broken_entry, Some(3), "{v:?}");
        assert!(v.reason.unwrap().contains("deleted"));
        // The chain itself refuses edits.
        assert!(
            sqlx::query("UPDATE audit_chain SET hash = 'x'")
                .execute(&pool)
                .await
                .is_err()
        );
        assert!(sqlx::query("DELETE FROM audit_chain").execute(&pool).await.is_err());
    }

    #[tokio::test]
    async fn filters_and_pages() {
        let (_pool, log) = memory_log().await;
        for i in 0..7 {
            log.append(
                &AuditEntry {
                    allow: i % 3 != 0,
                    ..entry(&format!("p{}", i % 2))
                },
                true,
            )
            .await
            .unwrap();
        }
        let q = |f: fn(&mut AuditQuery)| {
            let mut q = AuditQuery::default();
            f(&mut q);
            q
        };
        let denied = log.list(&q(|q| q.decision = Some("deny".into()))).await.unwrap();
        assert_eq!(denied.iter().map(|r| r.id).collect::<Vec<_>>(), vec![7, 4, 1]);
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = log
                .list(&AuditQuery {
                    limit: Some(3),
                    before_id: before,
                    ..Default::default()
                })
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            before = page.last().map(|r| r.id);
            seen.extend(page.into_iter().map(|r| r.id));
        }
        assert_eq!(seen, vec![7, 6, 5, 4, 3, 2, 1]);
        let future = log
            .list(&q(|q| q.since = Some("2999-01-01T00:00:00+02:00".into())))
            .await
            .unwrap();
        assert!(future.is_empty());
        let past = log
            .list(&q(|q| q.since = Some("2000-01-01T00:00:00Z".into())))
            .await
            .unwrap();
        assert_eq!(past.len(), 7);
        assert!(
            log.list(&q(|q| q.until = Some("2000-01-01T00:00:00Z".into())))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(q(|q| q.since = Some("yesterday".into())).validate().is_err());
        assert!(q(|q| q.decision = Some("maybe".into())).validate().is_err());
    }
}
