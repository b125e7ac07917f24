//! The dataset manifest: TOML for the CLI, the same fields as JSON for REST. It composes the
//! storage half (connectors) and the policy half (policies); unknown fields are refused so that a
//! typo cannot silently widen access.

use std::collections::BTreeMap;

use passerelle_connectors::{CsvOptions, Format, SourceSpec};
use passerelle_policies::{
    ColumnPolicy, DEFAULT_MIN_GROUP_SIZE, DatasetId, DatasetPolicy, LegalBasis, MemberState, Purpose, Release,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A dataset registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Dataset name (a lowercase identifier).
    pub name: DatasetId,
    /// File, directory or prefix URL.
    pub location: String,
    /// File format.
    pub format: Format,
    /// For object-store locations: the `[stores.<name>]` section of the node's configuration
    /// holding the credentials (manifests never carry secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// CSV dialect and optional explicit schema (`[csv]` table; `format = "csv"` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csv: Option<CsvOptions>,
    /// Member state holding the data.
    pub member_state: MemberState,
    /// Organisation holding the data.
    pub controller: String,
    /// Column naming each row's data subject.
    pub subject_column: String,
    /// `consent` or `public-interest`.
    pub legal_basis: LegalBasis,
    /// Consent registry; defaults to the dataset name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_registry: Option<String>,
    /// Purposes allowed (and their descendants).
    pub purposes: Vec<Purpose>,
    /// Classification of every column.
    pub columns: BTreeMap<String, ColumnPolicy>,
    /// `sensitive` columns are special-category data (GDPR Art. 9).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub special_category: bool,
    /// `rows` (default) or `aggregates`: then only `GROUP BY` results leave, each group holding
    /// at least `min_group_size` rows.
    #[serde(default, skip_serializing_if = "Release::is_rows")]
    pub release: Release,
    /// Smallest group released by an aggregates-only dataset (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_group_size: Option<u32>,
    /// Suppress rows whose released quasi-identifier values occur fewer than k times in the
    /// stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k_anonymity: Option<u32>,
    /// The federated dataset this one is this node's part of (e.g. `eu_diabetes`): peers'
    /// principals reach it under that name, each node deciding under its own policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<String>,
}

const MANIFEST_HINT: &str = "see the manifest format in the README (name, location, format, member_state, controller, subject_column, legal_basis, purposes, [columns])";

impl Manifest {
    /// Parses TOML, naming the line and field that are wrong.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::invalid(format!("manifest does not parse: {e}"), MANIFEST_HINT))
    }

    /// Parses JSON.
    pub fn from_json(value: serde_json::Value) -> Result<Self> {
        serde_json::from_value(value)
            .map_err(|e| Error::invalid(format!("manifest does not parse: {e}"), MANIFEST_HINT))
    }

    /// The storage half.
    pub fn source(&self) -> SourceSpec {
        SourceSpec {
            location: self.location.clone(),
            format: self.format,
            store: self.store.clone(),
            csv: self.csv.clone(),
        }
    }

    /// The policy half.
    pub fn policy(&self) -> DatasetPolicy {
        DatasetPolicy {
            name: self.name.clone(),
            member_state: self.member_state.clone(),
            controller: self.controller.clone(),
            subject_column: self.subject_column.clone(),
            legal_basis: self.legal_basis,
            consent_registry: self.consent_registry.clone().unwrap_or_else(|| self.name.to_string()),
            purposes: self.purposes.clone(),
            columns: self.columns.clone(),
            special_category: self.special_category,
            release: self.release,
            min_group_size: self.min_group_size.unwrap_or(DEFAULT_MIN_GROUP_SIZE),
            k_anonymity: self.k_anonymity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
name = "demo_patients"
location = "file:///data/patients/"
format = "parquet"
member_state = "FR"
controller = "aphp"
subject_column = "patient_id"
legal_basis = "consent"
consent_registry = "aphp-patients"
purposes = ["research/ai-training", "research/epidemiology"]
[columns]
patient_id  = { class = "identifier" }
full_name   = { class = "direct-identifier" }
birth_date  = { class = "quasi-identifier", generalise = "year" }
postcode    = { class = "quasi-identifier", generalise = "prefix:2" }
diagnosis   = { class = "sensitive" }
hba1c       = { class = "sensitive" }
admitted_at = { class = "non-personal" }
"#;

    #[test]
    fn parses_the_readme_example() {
        let m = Manifest::from_toml(EXAMPLE).unwrap();
        assert_eq!(m.policy().consent_registry, "aphp-patients");
        assert_eq!(m.columns.len(), 7);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(Manifest::from_json(json).unwrap(), m);
    }

    #[test]
    fn refuses_typos_and_bad_values() {
        for (from, to, needle) in [
            ("purposes =", "purpose =", "unknown field"),
            ("\"research/ai-training\",", "\"Research\",", "invalid purpose"),
            (
                "class = \"sensitive\" }\nhba1c",
                "class = \"secret\" }\nhba1c",
                "unknown variant",
            ),
            ("prefix:2", "prefix:x", "invalid generalisation"),
            ("\"FR\"", "\"France\"", "member state"),
            ("\"consent\"", "\"contract\"", "unknown variant"),
        ] {
            let text = EXAMPLE.replacen(from, to, 1);
            let err = Manifest::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{from} -> {to}: {err}");
        }
        let default_registry =
            Manifest::from_toml(&EXAMPLE.replace("consent_registry = \"aphp-patients\"\n", "")).unwrap();
        assert_eq!(default_registry.policy().consent_registry, "demo_patients");
    }
}
