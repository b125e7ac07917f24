//! Purposes are slash-separated paths (`research/ai-training/llm`). Allowing or consenting to a
//! purpose covers all of its descendants, so every check reduces to "is one path a prefix of the
//! other, segment by segment".

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A validated purpose path, e.g. `research/ai-training`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Purpose(String);

impl Purpose {
    /// Parses a purpose: 1 to 16 segments of `[a-z0-9][a-z0-9._-]*`, joined by `/`.
    /// Upper case, spaces, empty segments and leading or trailing slashes are refused, so that
    /// one purpose has exactly one spelling and a typo cannot widen access.
    pub fn parse(s: &str) -> Result<Self> {
        let invalid = |why: &str| Error::InvalidPurpose {
            purpose: s.to_string(),
            reason: why.to_string(),
        };
        if s.is_empty() {
            return Err(invalid("it is empty"));
        }
        if s.len() > 256 {
            return Err(invalid("it is longer than 256 characters"));
        }
        let segments: Vec<&str> = s.split('/').collect();
        if segments.len() > 16 {
            return Err(invalid("it has more than 16 segments"));
        }
        for seg in segments {
            let mut chars = seg.chars();
            match chars.next() {
                None => {
                    return Err(invalid(
                        "it has an empty segment (check for `//` or a leading/trailing `/`)",
                    ));
                }
                Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit() => {}
                Some(_) => {
                    return Err(invalid("each segment must start with a lowercase letter or digit"));
                }
            }
            if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')) {
                return Err(invalid(
                    "segments may only contain lowercase letters, digits, `-`, `_` and `.`",
                ));
            }
        }
        Ok(Self(s.to_string()))
    }

    /// The purpose as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True if `self` is `other` or one of its ancestors: allowing `self` allows `other`.
    pub fn covers(&self, other: &Purpose) -> bool {
        covers(&self.0, &other.0)
    }

    /// This purpose and all its ancestors, from the root down (`research`, `research/ai-training`).
    /// Consent for any of them counts for this purpose.
    pub fn self_and_ancestors(&self) -> Vec<Purpose> {
        let mut out = Vec::new();
        for (i, c) in self.0.char_indices() {
            if c == '/' {
                out.push(Purpose(self.0[..i].to_string()));
            }
        }
        out.push(self.clone());
        out
    }
}

/// String form of [`Purpose::covers`], for casbin matcher functions that receive plain strings.
pub fn covers(ancestor: &str, purpose: &str) -> bool {
    purpose == ancestor
        || (purpose.len() > ancestor.len()
            && purpose.starts_with(ancestor)
            && purpose.as_bytes()[ancestor.len()] == b'/')
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Purpose {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Purpose::parse(&s)
    }
}

impl From<Purpose> for String {
    fn from(p: Purpose) -> String {
        p.0
    }
}

impl std::str::FromStr for Purpose {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Purpose::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Purpose {
        Purpose::parse(s).unwrap()
    }

    #[test]
    fn parses_valid_paths() {
        for s in ["research", "research/ai-training", "a/b.c/d_e/0x"] {
            assert_eq!(p(s).as_str(), s);
        }
    }

    #[test]
    fn refuses_bad_syntax() {
        for s in ["", "/research", "research/", "a//b", "Research", "a b", "a/-b", "é"] {
            let err = Purpose::parse(s).unwrap_err().to_string();
            assert!(err.contains("purpose"), "{s}: {err}");
        }
    }

    #[test]
    fn covers_is_segment_aware() {
        assert!(p("research").covers(&p("research/ai-training")));
        assert!(p("research/ai-training").covers(&p("research/ai-training")));
        assert!(!p("research/ai").covers(&p("research/ai-training")));
        assert!(!p("research/ai-training").covers(&p("research")));
    }

    #[test]
    fn ancestors_from_root() {
        let got: Vec<String> = p("a/b/c").self_and_ancestors().into_iter().map(String::from).collect();
        assert_eq!(got, vec!["a", "a/b", "a/b/c"]);
    }
}
