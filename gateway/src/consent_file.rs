//! Consent files: CSV (`subject_id,purpose,status,timestamp[,expires_at]`) and JSON Lines (one
//! object per line with the same fields). Errors name the line; nothing is imported unless every
//! line parses.

use passerelle_policies::consent::ConsentEvent;
use serde::Deserialize;

use crate::error::{Error, Result};

const HINT: &str =
    "CSV header: subject_id,purpose,status,timestamp[,expires_at]; status granted|withdrawn; RFC 3339 times";

/// Parses consent CSV (RFC 4180: fields may be quoted, so a subject id may hold a comma; the
/// header may carry a byte-order mark). Spaces around the header's names and around purpose,
/// status and times are ignored; a subject id is taken byte for byte.
pub fn parse_csv(text: &str) -> Result<Vec<ConsentEvent>> {
    let body = text.trim_start_matches('\u{feff}');
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::None)
        .from_reader(body.as_bytes());
    let mut record = csv::StringRecord::new();
    let bad_header = || {
        Error::invalid(
            "consent CSV must start with the header `subject_id,purpose,status,timestamp` (optionally `,expires_at`)",
            HINT,
        )
    };
    // Counted from the byte offset: the csv crate's own line count lags by one after a CRLF.
    let line_at = |pos: Option<&csv::Position>| {
        let Some(pos) = pos else { return 0 };
        let start = usize::try_from(pos.byte()).unwrap_or(usize::MAX).min(body.len());
        let skipped = body[start..].bytes().take_while(|b| matches!(b, b'\r' | b'\n')).count();
        1 + body.as_bytes()[..start + skipped]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
    };
    let line_of = |r: &csv::StringRecord| line_at(r.position());
    let unreadable = |e: csv::Error| {
        let line = line_at(e.position());
        Error::invalid(format!("line {line}: {e}"), HINT)
    };
    if !reader.read_record(&mut record).map_err(unreadable)? {
        return Err(bad_header());
    }
    let with_expiry = match record.iter().map(str::trim).collect::<Vec<_>>().as_slice() {
        ["subject_id", "purpose", "status", "timestamp"] => false,
        ["subject_id", "purpose", "status", "timestamp", "expires_at"] => true,
        _ => return Err(bad_header()),
    };
    let want = if with_expiry { 5 } else { 4 };
    let mut events = Vec::new();
    while reader.read_record(&mut record).map_err(unreadable)? {
        if record.len() == 1 && record[0].trim().is_empty() {
            continue; // a blank line
        }
        // The line is counted on the error path only: counting it for every record is
        // quadratic in the file's length.
        if record.len() != want {
            return Err(Error::invalid(
                format!(
                    "line {}: expected {want} fields, found {}",
                    line_of(&record),
                    record.len()
                ),
                HINT,
            ));
        }
        let expiry = if with_expiry { Some(&record[4]) } else { None };
        events.push(
            ConsentEvent::parse_with_expiry(&record[0], &record[1], &record[2], &record[3], expiry)
                .map_err(|e| Error::invalid(format!("line {}: {e}", line_of(&record)), HINT))?,
        );
    }
    Ok(events)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEvent {
    subject_id: serde_json::Value,
    purpose: String,
    status: String,
    timestamp: String,
    #[serde(default)]
    expires_at: Option<String>,
}

/// Parses one JSON consent event (a string or integer `subject_id`).
pub fn parse_json_value(v: serde_json::Value) -> std::result::Result<ConsentEvent, String> {
    let e: JsonEvent = serde_json::from_value(v).map_err(|e| e.to_string())?;
    let subject = match &e.subject_id {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        _ => return Err("subject_id must be a string or an integer".into()),
    };
    ConsentEvent::parse_with_expiry(&subject, &e.purpose, &e.status, &e.timestamp, e.expires_at.as_deref())
        .map_err(|e| e.to_string())
}

/// Parses JSON Lines.
pub fn parse_jsonl(text: &str) -> Result<Vec<ConsentEvent>> {
    let mut events = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::invalid(format!("line {}: not JSON: {e}", i + 1), "one JSON object per line"))?;
        events.push(parse_json_value(v).map_err(|e| Error::invalid(format!("line {}: {e}", i + 1), HINT))?);
    }
    Ok(events)
}

/// Parses a file by its extension: `.jsonl`/`.ndjson`/`.json` as JSON Lines, anything else as CSV.
pub fn parse_file(path: &std::path::Path, text: &str) -> Result<Vec<ConsentEvent>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "ndjson" | "json") => parse_jsonl(text),
        _ => parse_csv(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_and_without_expiry() {
        let a = parse_csv("subject_id,purpose,status,timestamp\n1,research,granted,2024-01-01T00:00:00Z\n\n").unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].expires_at_micros, None);
        let b = parse_csv(
            "subject_id,purpose,status,timestamp,expires_at\n1,research,granted,2024-01-01T00:00:00Z,2025-01-01T00:00:00Z\n2,research,granted,2024-01-01T00:00:00Z,\n",
        )
        .unwrap();
        assert!(b[0].expires_at_micros.is_some() && b[1].expires_at_micros.is_none());
        for (bad, needle) in [
            ("subject_id,purpose\n", "header"),
            (
                "subject_id,purpose,status,timestamp\n1,research,maybe,2024-01-01T00:00:00Z\n",
                "line 2",
            ),
            ("subject_id,purpose,status,timestamp\n1,research,granted\n", "line 2"),
            (
                "subject_id,purpose,status,timestamp,expires_at\n1,research,granted,2024-01-01T00:00:00Z,2023-01-01T00:00:00Z\n",
                "not after",
            ),
        ] {
            let err = parse_csv(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn csv_quoted_fields_as_spreadsheets_export_them() {
        let text = "\u{feff}\"subject_id\",\"purpose\",\"status\",\"timestamp\"\r\n\"Dupont, Marie\",research,granted,2024-01-01T00:00:00Z\r\n\"42\",\"research\",withdrawn, 2024-01-02T00:00:00Z \r\n";
        let events = parse_csv(text).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].subject_id, "Dupont, Marie");
        assert_eq!(events[1].subject_id, "42");
        let err =
            parse_csv("subject_id,purpose,status,timestamp\n1,research,granted,2024-01-01T00:00:00Z\n\"2,research\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn csv_errors_name_the_line_whatever_the_line_endings() {
        for eol in ["\n", "\r\n"] {
            let text = [
                "subject_id,purpose,status,timestamp",
                "good,research,granted,2024-01-01T00:00:00Z",
                "",
                ",research,granted,2024-01-01T00:00:00Z",
                "",
            ]
            .join(eol);
            let err = parse_csv(&text).unwrap_err().to_string();
            assert!(err.contains("line 4"), "{eol:?}: {err}");
        }
        // Subject ids are taken byte for byte; the other fields may be padded.
        let e =
            parse_csv("subject_id , purpose,status,timestamp\n  carol  , research ,granted, 2024-01-01T00:00:00Z\n")
                .unwrap();
        assert_eq!(e[0].subject_id, "  carol  ");
    }

    #[test]
    fn jsonl_lines_and_errors() {
        let ok = parse_jsonl(
            "{\"subject_id\": 7, \"purpose\": \"research\", \"status\": \"granted\", \"timestamp\": \"2024-01-01T00:00:00Z\"}\n\n{\"subject_id\": \"x\", \"purpose\": \"research\", \"status\": \"withdrawn\", \"timestamp\": \"2024-01-02T00:00:00Z\", \"expires_at\": null}\n",
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].subject_id, "7");
        let err = parse_jsonl("{\"subject_id\": 1.5, \"purpose\": \"r\", \"status\": \"granted\", \"timestamp\": \"2024-01-01T00:00:00Z\"}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
        assert!(parse_jsonl("{\"subject_id\": 1, \"extra\": 1}").is_err());
    }
}
