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
}

impl ConsentEvent {
    /// Builds an event from the CSV/JSON text fields, naming the field that is wrong.
    pub fn parse(subject_id: &str, purpose: &str, status: &str, timestamp: &str) -> Result<Self> {
        let subject_id = subject_id.trim();
        if subject_id.is_empty() {
            return Err(Error::InvalidConsentEvent {
                reason: "subject_id is empty".into(),
            });
        }
        if subject_id.len() > 256 {
            return Err(Error::InvalidConsentEvent {
                reason: "subject_id is longer than 256 bytes".into(),
            });
        }
        let purpose = Purpose::parse(purpose.trim())?;
        let status = ConsentStatus::parse(status.trim())?;
        let at = chrono::DateTime::parse_from_rfc3339(timestamp.trim()).map_err(|e| Error::InvalidConsentEvent {
            reason: format!("timestamp `{timestamp}` is not RFC 3339 ({e}); write e.g. 2024-05-01T12:00:00Z"),
        })?;
        Ok(Self {
            subject_id: subject_id.to_string(),
            purpose,
            status,
            at_micros: at.timestamp_micros(),
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
