//! Metadata in SQLite: principals, datasets, permits and the version counter a running server
//! watches (so CLI changes on the same data directory reach it without a restart).
//!
//! The database runs in WAL mode with `synchronous = FULL`: a write the CLI or REST acknowledges
//! is on disk.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use passerelle_policies::{DatasetId, Permit, Principal, Purpose, Role};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::error::{Error, Result};
use crate::manifest::Manifest;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta_version (id, version) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS principals (
    name         TEXT PRIMARY KEY,
    org          TEXT NOT NULL,
    member_state TEXT NOT NULL,
    role         TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,
    created_at   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    name          TEXT PRIMARY KEY,
    manifest      TEXT NOT NULL,
    registered_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS consent_registries (
    name      TEXT PRIMARY KEY,
    owner_org TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS permits (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset    TEXT NOT NULL REFERENCES datasets(name),
    org        TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    expires_at TEXT,
    special_category INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    UNIQUE (dataset, org, purpose)
);
CREATE TABLE IF NOT EXISTS policy_rules (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    line       TEXT NOT NULL UNIQUE,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL
);
";

/// Opens (creating if needed) the node's SQLite database in `data_dir`.
pub async fn open_pool(data_dir: &Path) -> Result<SqlitePool> {
    crate::data_dir::prepare(data_dir)?;
    let path = data_dir.join("passerelle.db");
    // SQLite creates the database with the umask's mode and gives its `-wal` and `-shm` files
    // the database file's: made here first, private, all three are.
    if !path.exists() {
        crate::data_dir::private_file_options()
            .truncate(false)
            .open(&path)
            .map_err(|source| Error::Io {
                op: "create",
                path: path.display().to_string(),
                source,
            })?;
    }
    let options = SqliteConnectOptions::from_str("sqlite://")
        .map_err(Error::store("parse sqlite options"))?
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .map_err(Error::store("open the metadata database"))
}

/// A principal row, including the hash of its key.
#[derive(Debug, Clone)]
pub struct PrincipalRecord {
    /// The principal.
    pub principal: Principal,
    /// SHA-256 of its API key, hex.
    pub key_hash: String,
}

/// Access to the metadata tables.
#[derive(Debug, Clone)]
pub struct MetaStore {
    pool: SqlitePool,
}

fn now_text() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl MetaStore {
    /// Creates the tables if needed.
    pub async fn open(pool: SqlitePool) -> Result<Self> {
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .map_err(Error::store("create metadata tables"))?;
        Ok(Self { pool })
    }

    /// The pool, shared with the consent store and the audit log.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The version counter, bumped by every metadata write.
    pub async fn version(&self) -> Result<u64> {
        let v: i64 = sqlx::query_scalar("SELECT version FROM meta_version WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(Error::store("read metadata version"))?;
        Ok(v.max(0) as u64)
    }

    /// Bumps the version without other change: running servers reload their snapshot and
    /// re-open every source (`passerelle dataset refresh`).
    pub async fn touch(&self) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(Error::store("begin"))?;
        Self::bump(&mut tx).await?;
        tx.commit().await.map_err(Error::store("commit"))?;
        Ok(())
    }

    async fn bump(tx: &mut sqlx::SqliteConnection) -> Result<()> {
        sqlx::query("UPDATE meta_version SET version = version + 1 WHERE id = 1")
            .execute(tx)
            .await
            .map_err(Error::store("bump metadata version"))?;
        Ok(())
    }

    /// Adds a principal; its name must be new.
    pub async fn add_principal(&self, p: &Principal, key_hash: &str) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(Error::store("begin"))?;
        let res = sqlx::query(
            "INSERT INTO principals (name, org, member_state, role, key_hash, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&p.name)
        .bind(&p.org)
        .bind(&p.member_state)
        .bind(p.role.as_str())
        .bind(key_hash)
        .bind(now_text())
        .execute(&mut *tx)
        .await;
        match res {
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                return Err(Error::AlreadyExists {
                    what: format!("principal `{}`", p.name),
                });
            }
            other => other.map_err(Error::store("insert principal"))?,
        };
        Self::bump(&mut tx).await?;
        tx.commit().await.map_err(Error::store("commit principal"))
    }

    /// All principals.
    pub async fn principals(&self) -> Result<Vec<PrincipalRecord>> {
        let rows = sqlx::query("SELECT name, org, member_state, role, key_hash FROM principals ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store("list principals"))?;
        rows.into_iter()
            .map(|r| {
                let role: String = r.get(3);
                Ok(PrincipalRecord {
                    principal: Principal {
                        name: r.get(0),
                        org: r.get(1),
                        member_state: r.get(2),
                        role: Role::parse(&role)?,
                    },
                    key_hash: r.get(4),
                })
            })
            .collect()
    }

    /// Stores a validated manifest; the name must be new.
    pub async fn insert_dataset(&self, m: &Manifest) -> Result<()> {
        let json = serde_json::to_string(m).map_err(|e| Error::Internal(format!("serialise manifest: {e}")))?;
        let mut tx = self.pool.begin().await.map_err(Error::store("begin"))?;
        let res = sqlx::query("INSERT INTO datasets (name, manifest, registered_at) VALUES (?, ?, ?)")
            .bind(m.name.as_str())
            .bind(json)
            .bind(now_text())
            .execute(&mut *tx)
            .await;
        match res {
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                return Err(Error::AlreadyExists {
                    what: format!("dataset `{}`", m.name),
                });
            }
            other => other.map_err(Error::store("insert dataset"))?,
        };
        Self::bump(&mut tx).await?;
        tx.commit().await.map_err(Error::store("commit dataset"))
    }

    /// All registered manifests.
    pub async fn datasets(&self) -> Result<Vec<Manifest>> {
        let rows: Vec<String> = sqlx::query_scalar("SELECT manifest FROM datasets ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store("list datasets"))?;
        rows.iter()
            .map(|j| {
                serde_json::from_str(j).map_err(|e| Error::Internal(format!("stored manifest does not parse: {e}")))
            })
            .collect()
    }

    /// Adds a policy line (already checked by the caller); returns its id.
    pub async fn add_rule(&self, line: &str, created_by: &str) -> Result<i64> {
        let mut tx = self.pool.begin().await.map_err(Error::store("begin"))?;
        let res =
            sqlx::query_scalar("INSERT INTO policy_rules (line, created_by, created_at) VALUES (?, ?, ?) RETURNING id")
                .bind(line)
                .bind(created_by)
                .bind(now_text())
                .fetch_one(&mut *tx)
                .await;
        let id: i64 = match res {
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                return Err(Error::AlreadyExists {
                    what: format!("policy line `{line}`"),
                });
            }
            other => other.map_err(Error::store("insert policy rule"))?,
        };
        Self::bump(&mut tx).await?;
        tx.commit().await.map_err(Error::store("commit policy rule"))?;
        Ok(id)
    }

    /// Removes a stored policy line.
    pub async fn remove_rule(&self, id: i64) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(Error::store("begin"))?;
        let n = sqlx::query("DELETE FROM policy_rules WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(Error::store("delete policy rule"))?;
        Self::bump(&mut tx).await?;
        tx.commit().await.map_err(Error::store("commit"))?;
        Ok(n.rows_affected() > 0)
    }

    /// Stored policy lines `(id, line, created_by)`, oldest first.
    pub async fn rules(&self) -> Result<Vec<(i64, String, String)>> {
        let rows = sqlx::query("SELECT id, line, created_by FROM policy_rules ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store("list policy rules"))?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
    }

    /// Forces running servers to rebuild their policy (re-reading policy files).
    pub async fn request_reload(&self) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(Error::store("begin"))?;
        Self::bump(&mut tx).await?;
        tx.commit().await.map_err(Error::store("commit"))
    }

    /// The organisation owning a consent registry, if it has one.
    pub async fn registry_owner(&self, registry: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT owner_org FROM consent_registries WHERE name = ?")
            .bind(registry)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::store("read registry owner"))
    }

    /// Claims a registry for `org` if nobody owns it; returns the owner afterwards.
    pub async fn claim_registry(&self, registry: &str, org: &str) -> Result<String> {
        sqlx::query("INSERT OR IGNORE INTO consent_registries (name, owner_org) VALUES (?, ?)")
            .bind(registry)
            .bind(org)
            .execute(&self.pool)
            .await
            .map_err(Error::store("claim registry"))?;
        Ok(self.registry_owner(registry).await?.unwrap_or_default())
    }

    /// Adds (or renews, with a new expiry) a permit for an existing dataset.
    pub async fn upsert_permit(&self, p: &Permit) -> Result<()> {
        let expires = p.expires.map(|e| e.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        let mut tx = self.pool.begin().await.map_err(Error::store("begin"))?;
        let res = sqlx::query(
            "INSERT INTO permits (dataset, org, purpose, expires_at, special_category, created_at) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (dataset, org, purpose) DO UPDATE SET expires_at = excluded.expires_at, special_category = excluded.special_category",
        )
        .bind(p.dataset.as_str())
        .bind(&p.org)
        .bind(p.purpose.as_str())
        .bind(expires)
        .bind(p.special_category)
        .bind(now_text())
        .execute(&mut *tx)
        .await;
        match res {
            Err(sqlx::Error::Database(d)) if d.is_foreign_key_violation() => {
                return Err(Error::DatasetNotFound {
                    name: p.dataset.to_string(),
                });
            }
            other => other.map_err(Error::store("insert permit"))?,
        };
        Self::bump(&mut tx).await?;
        tx.commit().await.map_err(Error::store("commit permit"))
    }

    /// All permits.
    pub async fn permits(&self) -> Result<Vec<Permit>> {
        let rows = sqlx::query("SELECT dataset, org, purpose, expires_at, special_category FROM permits ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store("list permits"))?;
        rows.into_iter()
            .map(|r| {
                let dataset: String = r.get(0);
                let purpose: String = r.get(2);
                let expires: Option<String> = r.get(3);
                Ok(Permit {
                    dataset: DatasetId::parse(&dataset)?,
                    org: r.get(1),
                    purpose: Purpose::parse(&purpose)?,
                    expires: expires
                        .map(|e| DateTime::parse_from_rfc3339(&e).map(|t| t.with_timezone(&Utc)))
                        .transpose()
                        .map_err(|e| Error::Internal(format!("stored permit expiry does not parse: {e}")))?,
                    special_category: r.get(4),
                })
            })
            .collect()
    }
}
