//! The audit log: one row per access decision, appended before any data leaves, completed once
//! with the rows sent and withheld. SQLite triggers refuse deletes and any update other than the
//! single completion step.

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
    /// At most this many, newest first (default 1000).
    pub limit: Option<u32>,
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
        Ok(Self { pool })
    }

    /// Appends an entry; returns its id. Final entries (denials, metadata calls) are written as
    /// `completed`; data streams start as `requested`.
    pub async fn append(&self, e: &AuditEntry, final_entry: bool) -> Result<i64> {
        let columns = e.columns.as_ref().map(|c| serde_json::to_string(c).unwrap_or_default());
        let status = if final_entry { "completed" } else { "requested" };
        let completed_at = final_entry.then(now_text);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO audit (time, principal, organisation, member_state, purpose, dataset, columns, filter, statement, action, decision, reason, consent_version, policy_version, status, completed_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(now_text())
        .bind(&e.principal)
        .bind(&e.organisation)
        .bind(&e.member_state)
        .bind(&e.purpose)
        .bind(&e.dataset)
        .bind(columns)
        .bind(&e.filter)
        .bind(&e.statement)
        .bind(e.action.as_str())
        .bind(if e.allow { "allow" } else { "deny" })
        .bind(&e.reason)
        .bind(e.consent_version as i64)
        .bind(&e.policy_version)
        .bind(status)
        .bind(completed_at)
        .fetch_one(&self.pool)
        .await
        .map_err(Error::store("append audit entry"))?;
        Ok(id)
    }

    /// Completes a `requested` entry (once).
    pub async fn complete(&self, id: i64, c: Completion) -> Result<()> {
        sqlx::query(
            "UPDATE audit SET rows_sent = ?, rows_withheld = ?, consent_version_last = ?, status = ?, completed_at = ? WHERE id = ? AND status = 'requested'",
        )
        .bind(c.rows_sent as i64)
        .bind(c.rows_withheld as i64)
        .bind(c.consent_version_last as i64)
        .bind(if c.ok { "completed" } else { "failed" })
        .bind(now_text())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(Error::store("complete audit entry"))?;
        Ok(())
    }

    /// Lists entries, newest first.
    pub async fn list(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT id, time, principal, organisation, member_state, purpose, dataset, columns, filter, action, decision, reason, consent_version, consent_version_last, policy_version, rows_sent, rows_withheld, status, completed_at, statement FROM audit WHERE 1 = 1",
        );
        if let Some(d) = &q.dataset {
            // SQL entries name every dataset they touched, comma-separated.
            qb.push(" AND instr(',' || dataset || ',', ',' || ")
                .push_bind(d.clone())
                .push(" || ',') > 0");
        }
        if let Some(p) = &q.principal {
            qb.push(" AND principal = ").push_bind(p.clone());
        }
        qb.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(q.limit.unwrap_or(1000).min(100_000)));
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store("list audit entries"))?;
        Ok(rows
            .into_iter()
            .map(|r| {
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
            })
            .collect())
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
}
