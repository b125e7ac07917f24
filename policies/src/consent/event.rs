//! One consent event, as imported from CSV or posted over REST.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::purpose::Purpose;

/// Whether a subject granted or withdrew consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsentStatus {
    /// Consent given for the purpose (and its sub-purposes).
    Granted,
    /// Consent withdrawn (or objection, under public interest).
    Withdrawn,
}

impl ConsentStatus {
    /// Parses `granted` or `withdrawn`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "granted" => Ok(Self::Granted),
            "withdrawn" => Ok(Self::Withdrawn),
            other => Err(Error::InvalidConsentEvent {
                reason: format!("status `{other}` is neither `granted` nor `withdrawn`"),
            }),
        }
    }
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::Withdrawn => "withdrawn",
        }
    }
}

/// A consent event for one subject and one purpose in one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentEvent {
    /// The data subject, as it appears in datasets' subject columns (decimal for integers).
    pub subject_id: String,
    /// The purpose the event is about; it covers the purpose's descendants.
    pub purpose: Purpose,
    /// Grant or withdrawal.
    pub status: ConsentStatus,
    /// When the subject made the decision, in microseconds since the Unix epoch (UTC).
    pub at_micros: i64,
    /// When a grant stops counting (microseconds since the epoch), if it has an end date.
    pub expires_at_micros: Option<i64>,
}

/// Longest subject id accepted, in bytes.
pub const MAX_SUBJECT_ID_BYTES: usize = 256;

impl ConsentEvent {
    /// Builds an event from the CSV/JSON text fields, naming the field that is wrong.
    pub fn parse(subject_id: &str, purpose: &str, status: &str, timestamp: &str) -> Result<Self> {
        Self::parse_with_expiry(subject_id, purpose, status, timestamp, None)
    }

    /// As [`ConsentEvent::parse`], with an optional RFC 3339 expiry (empty means none).
    pub fn parse_with_expiry(
        subject_id: &str,
        purpose: &str,
        status: &str,
        timestamp: &str,
        expires_at: Option<&str>,
    ) -> Result<Self> {
        // Byte-exact: a subject id is never trimmed, case-folded or normalised, since `" carol "`
        // and `carol` may be two people; a wrong id is refused, never altered.
        if subject_id.is_empty() {
            return Err(Error::InvalidConsentEvent {
                reason: "subject_id is empty".into(),
            });
        }
        if subject_id.len() > MAX_SUBJECT_ID_BYTES {
            return Err(Error::InvalidConsentEvent {
                reason: format!("subject_id is longer than {MAX_SUBJECT_ID_BYTES} bytes"),
            });
        }
        let purpose = Purpose::parse(purpose.trim())?;
        let status = ConsentStatus::parse(status.trim())?;
        let at = chrono::DateTime::parse_from_rfc3339(timestamp.trim()).map_err(|e| Error::InvalidConsentEvent {
            reason: format!("timestamp `{timestamp}` is not RFC 3339 ({e}); write e.g. 2024-05-01T12:00:00Z"),
        })?;
        let expires_at_micros = match expires_at.map(str::trim).filter(|e| !e.is_empty()) {
            None => None,
            Some(e) => {
                let t = chrono::DateTime::parse_from_rfc3339(e).map_err(|err| Error::InvalidConsentEvent {
                    reason: format!("expires_at `{e}` is not RFC 3339 ({err}); write e.g. 2027-01-01T00:00:00Z"),
                })?;
                if t.timestamp_micros() <= at.timestamp_micros() {
                    return Err(Error::InvalidConsentEvent {
                        reason: format!("expires_at `{e}` is not after the event's timestamp `{timestamp}`"),
                    });
                }
                Some(t.timestamp_micros())
            }
        };
        Ok(Self {
            subject_id: subject_id.to_string(),
            purpose,
            status,
            at_micros: at.timestamp_micros(),
            expires_at_micros,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_bad_fields() {
        let e = ConsentEvent::parse("42", "research", "granted", "2024-01-01T00:00:00+01:00").unwrap();
        assert_eq!(e.at_micros, 1_704_063_600_000_000);
        assert!(
            ConsentEvent::parse("", "research", "granted", "2024-01-01T00:00:00Z")
                .unwrap_err()
                .to_string()
                .contains("subject_id")
        );
        assert!(
            ConsentEvent::parse("1", "Research", "granted", "2024-01-01T00:00:00Z")
                .unwrap_err()
                .to_string()
                .contains("purpose")
        );
        assert!(
            ConsentEvent::parse("1", "research", "yes", "2024-01-01T00:00:00Z")
                .unwrap_err()
                .to_string()
                .contains("status")
        );
        assert!(
            ConsentEvent::parse("1", "research", "granted", "yesterday")
                .unwrap_err()
                .to_string()
                .contains("RFC 3339")
        );
    }
}
