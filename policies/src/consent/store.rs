//! Durable, append-only consent events in SQLite.
//!
//! An append returns only after its transaction commits (the pool is opened with
//! `synchronous = FULL` in WAL mode by the gateway), so an acknowledged event survives a crash.
//! Rows are never updated or deleted; the sequence number is the consent version.

use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};

use crate::consent::event::{ConsentEvent, ConsentStatus};
use crate::error::{Error, Result};
use crate::purpose::Purpose;

/// SQLite-backed consent event log.
#[derive(Debug, Clone)]
pub struct ConsentStore {
    pool: SqlitePool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS consent_events (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    registry           TEXT    NOT NULL,
    subject_id         TEXT    NOT NULL,
    purpose            TEXT    NOT NULL,
    status             TEXT    NOT NULL CHECK (status IN ('granted', 'withdrawn')),
    at_micros          INTEGER NOT NULL,
    expires_at_micros  INTEGER,
    recorded_at_micros INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS consent_events_no_update BEFORE UPDATE ON consent_events
BEGIN SELECT RAISE(ABORT, 'consent events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS consent_events_no_delete BEFORE DELETE ON consent_events
BEGIN SELECT RAISE(ABORT, 'consent events are append-only'); END;
";

/// Rows per multi-row INSERT (7 parameters each, well under SQLite's parameter limit).
const INSERT_CHUNK: usize = 1000;

impl ConsentStore {
    /// Opens the store on a shared pool and creates its table if needed.
    pub async fn open(pool: SqlitePool) -> Result<Self> {
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .map_err(|source| Error::Store {
                op: "create consent tables",
                source,
            })?;
        Ok(Self { pool })
    }

    /// Appends events for one registry atomically: all are stored or none is.
    /// Returns the new highest sequence number.
    pub async fn append(&self, registry: &str, events: &[ConsentEvent]) -> Result<u64> {
        if registry.trim().is_empty() {
            return Err(Error::InvalidConsentEvent {
                reason: "registry name is empty".into(),
            });
        }
        let now = chrono::Utc::now().timestamp_micros();
        let mut tx = self.pool.begin().await.map_err(|source| Error::Store {
            op: "begin consent append",
            source,
        })?;
        for chunk in events.chunks(INSERT_CHUNK) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO consent_events (registry, subject_id, purpose, status, at_micros, expires_at_micros, recorded_at_micros) ",
            );
            qb.push_values(chunk, |mut b, e| {
                b.push_bind(registry)
                    .push_bind(e.subject_id.as_str())
                    .push_bind(e.purpose.as_str())
                    .push_bind(e.status.as_str())
                    .push_bind(e.at_micros)
                    .push_bind(e.expires_at_micros)
                    .push_bind(now);
            });
            qb.build().execute(&mut *tx).await.map_err(|source| Error::Store {
                op: "insert consent events",
                source,
            })?;
        }
        // Read inside the transaction, which holds SQLite's write lock: this append's own last
        // sequence number, not one another writer committed just after it.
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM consent_events")
            .fetch_one(&mut *tx)
            .await
            .map_err(|source| Error::Store {
                op: "read consent version",
                source,
            })?;
        tx.commit().await.map_err(|source| Error::Store {
            op: "commit consent events",
            source,
        })?;
        Ok(last.max(0) as u64)
    }

    /// The highest sequence number stored (the global consent version).
    pub async fn max_seq(&self) -> Result<u64> {
        let v: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM consent_events")
            .fetch_one(&self.pool)
            .await
            .map_err(|source| Error::Store {
                op: "read consent version",
                source,
            })?;
        Ok(v.max(0) as u64)
    }

    /// Events after `seq`, in order, at most `limit` of them.
    pub async fn load_since(&self, seq: u64, limit: u32) -> Result<Vec<(u64, String, ConsentEvent)>> {
        let rows = sqlx::query(
            "SELECT seq, registry, subject_id, purpose, status, at_micros, expires_at_micros FROM consent_events WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(seq as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|source| Error::Store { op: "load consent events", source })?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.get(0);
            let registry: String = row.get(1);
            let purpose: String = row.get(3);
            let status: String = row.get(4);
            out.push((
                seq as u64,
                registry,
                ConsentEvent {
                    subject_id: row.get(2),
                    purpose: Purpose::parse(&purpose)?,
                    status: ConsentStatus::parse(&status)?,
                    at_micros: row.get(5),
                    expires_at_micros: row.get(6),
                },
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::SqlitePoolOptions;

    #[tokio::test]
    async fn append_is_atomic_and_ordered() {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let store = ConsentStore::open(pool).await.unwrap();
        let e = |s: &str, st: &str| ConsentEvent::parse(s, "research", st, "2024-01-01T00:00:00Z").unwrap();
        let many: Vec<_> = (0..2500).map(|i| e(&i.to_string(), "granted")).collect();
        assert_eq!(store.append("r", &many).await.unwrap(), 2500);
        assert_eq!(store.append("r", &[e("1", "withdrawn")]).await.unwrap(), 2501);
        let tail = store.load_since(2499, 10).await.unwrap();
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[1].2.status, ConsentStatus::Withdrawn);
        assert!(store.append(" ", &[e("1", "granted")]).await.is_err());
        assert_eq!(store.max_seq().await.unwrap(), 2501);
        // Append-only: the triggers refuse edits.
        assert!(
            sqlx::query("DELETE FROM consent_events")
                .execute(&store.pool)
                .await
                .is_err()
        );
    }
}
