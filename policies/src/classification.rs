//! Column classification and the per-dataset policy a steward registers.
//!
//! Every column of a dataset must be classified before any of it can be served: an unclassified
//! column is a registration error, never a silent pass-through.

use std::collections::BTreeMap;
use std::fmt;

use arrow::datatypes::{DataType, Schema};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::purpose::Purpose;

/// A dataset name: a lowercase SQL identifier, so it can be a table name without quoting.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DatasetId(String);

impl DatasetId {
    /// Parses `[a-z_][a-z0-9_]{0,62}`.
    pub fn parse(s: &str) -> Result<Self> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(Error::InvalidName {
                what: "dataset name",
                name: s.to_string(),
                rule: "use 1-63 characters of lowercase letters, digits and `_`, starting with a letter or `_`",
            })
        }
    }
    /// The name as registered.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DatasetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl TryFrom<String> for DatasetId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}
impl From<DatasetId> for String {
    fn from(d: DatasetId) -> String {
        d.0
    }
}

/// An ISO 3166-1 alpha-2 member-state code (`FR`), or `EU` for EU-level bodies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MemberState(String);

impl MemberState {
    /// Parses two uppercase ASCII letters.
    pub fn parse(s: &str) -> Result<Self> {
        if s.len() == 2 && s.chars().all(|c| c.is_ascii_uppercase()) {
            Ok(Self(s.to_string()))
        } else {
            Err(Error::InvalidName {
                what: "member state",
                name: s.to_string(),
                rule: "use an ISO 3166-1 alpha-2 code in upper case, e.g. `FR`",
            })
        }
    }
    /// The two-letter code.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl TryFrom<String> for MemberState {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}
impl From<MemberState> for String {
    fn from(d: MemberState) -> String {
        d.0
    }
}

/// GDPR-oriented column classes, from most to least identifying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ColumnClass {
    /// Names, national ids: never leave the node.
    DirectIdentifier,
    /// Record keys: sent as a keyed pseudonym per recipient organisation.
    Identifier,
    /// Birth dates, postcodes: sent only generalised.
    QuasiIdentifier,
    /// Health data and the like: sent (subject to consent filtering).
    Sensitive,
    /// Not personal data.
    NonPersonal,
}

impl ColumnClass {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnClass::DirectIdentifier => "direct-identifier",
            ColumnClass::Identifier => "identifier",
            ColumnClass::QuasiIdentifier => "quasi-identifier",
            ColumnClass::Sensitive => "sensitive",
            ColumnClass::NonPersonal => "non-personal",
        }
    }
}

/// A generalisation rule for a quasi-identifier. The output keeps the input's type so that
/// clients see one schema: dates are truncated, strings cut, numbers floored to a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Generalisation {
    /// Date or timestamp truncated to 1 January of its year.
    Year,
    /// Date or timestamp truncated to the first day of its month.
    Month,
    /// String cut to its first N characters.
    Prefix(u16),
    /// Number floored to a multiple of N.
    Bucket(u32),
    /// Number capped at N (top-coding: the rare large values that single people out).
    Top(i64),
}

impl Generalisation {
    /// Parses `year`, `month`, `prefix:N` (N ≥ 1) or `bucket:N` (N ≥ 1).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::InvalidGeneralisation { rule: s.to_string() };
        match s {
            "year" => Ok(Self::Year),
            "month" => Ok(Self::Month),
            _ => {
                let (kind, n) = s.split_once(':').ok_or_else(bad)?;
                match kind {
                    "prefix" => n
                        .parse::<u16>()
                        .ok()
                        .filter(|n| (1..=32).contains(n))
                        .map(Self::Prefix)
                        .ok_or_else(bad),
                    "top" => n.parse::<i64>().map(Self::Top).map_err(|_| bad()),
                    "bucket" => n
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n >= 2)
                        .map(Self::Bucket)
                        .ok_or_else(bad),
                    _ => Err(bad()),
                }
            }
        }
    }

    /// Whether the rule can apply to a column of this type.
    pub fn applies_to(&self, dt: &DataType) -> bool {
        match self {
            Self::Year | Self::Month => matches!(dt, DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, _)),
            Self::Prefix(_) => matches!(dt, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View),
            Self::Bucket(_) | Self::Top(_) => dt.is_integer() || dt.is_floating(),
        }
    }
}

impl fmt::Display for Generalisation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Year => f.write_str("year"),
            Self::Month => f.write_str("month"),
            Self::Prefix(n) => write!(f, "prefix:{n}"),
            Self::Bucket(n) => write!(f, "bucket:{n}"),
            Self::Top(n) => write!(f, "top:{n}"),
        }
    }
}
impl TryFrom<String> for Generalisation {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}
impl From<Generalisation> for String {
    fn from(g: Generalisation) -> String {
        g.to_string()
    }
}

/// A per-column override of the class's default treatment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mask {
    /// Never sent.
    Drop,
    /// Sent as an all-null column (keeps the schema stable for readers).
    Nullify,
    /// Sent as the recipient's keyed pseudonym.
    Pseudonymise,
}

/// How one column is classified in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnPolicy {
    /// The column's class.
    pub class: ColumnClass,
    /// Required for quasi-identifiers (unless masked), refused elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generalise: Option<Generalisation>,
    /// Overrides the class's default treatment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Mask>,
}

impl ColumnPolicy {
    /// A column of `class` with its default treatment.
    pub fn new(class: ColumnClass) -> Self {
        Self {
            class,
            generalise: None,
            mask: None,
        }
    }
    /// A quasi-identifier with a generalisation rule.
    pub fn generalised(rule: Generalisation) -> Self {
        Self {
            class: ColumnClass::QuasiIdentifier,
            generalise: Some(rule),
            mask: None,
        }
    }
}

/// What the gate does with one column, after class defaults, masks and the special-category
/// condition are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Not sent.
    Drop,
    /// Sent as nulls.
    Nullify,
    /// Sent as is.
    Keep,
    /// Sent as the recipient's keyed pseudonym.
    Pseudonymise,
    /// Sent generalised.
    Generalise(Generalisation),
}

/// The lawful basis under which rows are released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LegalBasis {
    /// Opt-in: a row is sent only if its subject's latest event for the purpose is a grant.
    Consent,
    /// Opt-out: a row is sent unless its subject's latest event for the purpose is a withdrawal.
    PublicInterest,
}

impl LegalBasis {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LegalBasis::Consent => "consent",
            LegalBasis::PublicInterest => "public-interest",
        }
    }
}

/// How a dataset's rows may leave the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Release {
    /// Row by row (through the gate).
    #[default]
    Rows,
    /// Only as results of `GROUP BY` queries, each group holding at least `min_group_size` rows:
    /// how a member state shares data it may not release row by row.
    Aggregates,
}

impl Release {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Release::Rows => "rows",
            Release::Aggregates => "aggregates",
        }
    }
    /// Whether this is the default (for `skip_serializing_if`).
    pub fn is_rows(&self) -> bool {
        *self == Release::Rows
    }
}

/// Smallest group an aggregates-only dataset releases when the manifest names none.
pub const DEFAULT_MIN_GROUP_SIZE: u32 = 10;

/// Everything policy needs to know about a dataset; the storage half lives in connectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetPolicy {
    /// Dataset name.
    pub name: DatasetId,
    /// Member state holding the data.
    pub member_state: MemberState,
    /// Organisation holding the data (the controller).
    pub controller: String,
    /// Column naming the data subject of each row.
    pub subject_column: String,
    /// Legal basis for release.
    pub legal_basis: LegalBasis,
    /// Consent registry whose events govern this dataset.
    pub consent_registry: String,
    /// Purposes this dataset may be used for (and their descendants).
    pub purposes: Vec<Purpose>,
    /// Classification of every column.
    pub columns: BTreeMap<String, ColumnPolicy>,
    /// Whether the `sensitive` columns are special-category data (GDPR Art. 9): then they are
    /// sent only under a permit or rule that names that condition.
    pub special_category: bool,
    /// Rows or aggregates only.
    pub release: Release,
    /// With `Release::Aggregates`: groups with fewer rows are suppressed.
    pub min_group_size: u32,
    /// k-anonymity-style floor: rows whose combination of released quasi-identifier values
    /// occurs fewer than k times in the stream are suppressed.
    pub k_anonymity: Option<u32>,
}

/// Subject column types the consent kernels can probe.
pub fn is_supported_subject_type(dt: &DataType) -> bool {
    match dt {
        DataType::Int64 | DataType::Int32 | DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => matches!(
            v.as_ref(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Int64
        ),
        _ => false,
    }
}

impl DatasetPolicy {
    /// Checks the policy against the source's schema. Every failure says what to change in the
    /// manifest; nothing is stored by the caller unless this passes.
    pub fn validate(&self, schema: &Schema) -> Result<()> {
        let ds = self.name.as_str();
        let invalid = |reason: String| Error::InvalidManifest {
            dataset: ds.to_string(),
            reason,
        };
        if self.controller.trim().is_empty() {
            return Err(invalid(
                "`controller` is empty; name the organisation that holds the data".into(),
            ));
        }
        if self.consent_registry.trim().is_empty() {
            return Err(invalid("`consent_registry` is empty".into()));
        }
        if let Some(k) = self.k_anonymity {
            if k < 2 {
                return Err(invalid(format!("`k_anonymity` is {k}; a floor needs k of at least 2")));
            }
            if !self.columns.values().any(|c| c.class == ColumnClass::QuasiIdentifier) {
                return Err(invalid(
                    "`k_anonymity` is set but no column is a quasi-identifier; classify the quasi-identifiers or remove the floor"
                        .into(),
                ));
            }
        }
        if self.release == Release::Aggregates && self.min_group_size < 2 {
            return Err(invalid(format!(
                "`min_group_size` is {}; an aggregates-only dataset needs groups of at least 2 rows (default {DEFAULT_MIN_GROUP_SIZE})",
                self.min_group_size
            )));
        }
        if self.purposes.is_empty() {
            return Err(invalid(
                "`purposes` is empty; list at least one purpose, e.g. \"research/ai-training\"".into(),
            ));
        }
        for field in schema.fields() {
            if !self.columns.contains_key(field.name()) {
                return Err(invalid(format!(
                    "column `{}` is not classified; add it under [columns] with a class (direct-identifier, identifier, quasi-identifier, sensitive, non-personal)",
                    field.name()
                )));
            }
        }
        for (name, col) in &self.columns {
            let field = schema.field_with_name(name).map_err(|_| {
                invalid(format!(
                    "column `{name}` is classified but the source has no such column"
                ))
            })?;
            match (col.class, col.mask) {
                (ColumnClass::DirectIdentifier, Some(Mask::Pseudonymise)) => {
                    return Err(invalid(format!(
                        "direct identifier `{name}` may only be dropped or nullified; classify it identifier to pseudonymise it"
                    )));
                }
                (_, Some(Mask::Pseudonymise))
                    if !crate::enforce::pseudonymise::is_pseudonymisable(field.data_type()) =>
                {
                    return Err(invalid(format!(
                        "column `{name}` of type {} cannot be pseudonymised",
                        field.data_type()
                    )));
                }
                (_, Some(m)) if col.generalise.is_some() => {
                    return Err(invalid(format!(
                        "column `{name}` sets both mask = \"{}\" and generalise; choose one",
                        serde_json::to_value(m)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default()
                    )));
                }
                _ => {}
            }
            if col.class == ColumnClass::QuasiIdentifier && col.mask.is_some() {
                continue;
            }
            match (col.class, &col.generalise) {
                (ColumnClass::QuasiIdentifier, None) => {
                    return Err(invalid(format!(
                        "quasi-identifier `{name}` has no generalisation rule; set generalise = \"year\", \"month\", \"prefix:N\" or \"bucket:N\""
                    )));
                }
                (ColumnClass::QuasiIdentifier, Some(g)) if !g.applies_to(field.data_type()) => {
                    return Err(invalid(format!(
                        "generalisation `{g}` cannot apply to column `{name}` of type {}",
                        field.data_type()
                    )));
                }
                (ColumnClass::QuasiIdentifier, Some(_)) => {}
                (_, Some(g)) => {
                    return Err(invalid(format!(
                        "column `{name}` has generalise = \"{g}\" but is not a quasi-identifier"
                    )));
                }
                (ColumnClass::Identifier, None)
                    if col.mask.is_none() && !crate::enforce::pseudonymise::is_pseudonymisable(field.data_type()) =>
                {
                    return Err(invalid(format!(
                        "identifier `{name}` has type {} which cannot be pseudonymised; use an integer or string column",
                        field.data_type()
                    )));
                }
                _ => {}
            }
        }
        let subject = schema.field_with_name(&self.subject_column).map_err(|_| {
            invalid(format!(
                "subject column `{}` is not in the source; set `subject_column` to the column naming the data subject",
                self.subject_column
            ))
        })?;
        match self.columns.get(&self.subject_column).map(|c| c.class) {
            Some(ColumnClass::Identifier | ColumnClass::DirectIdentifier) => {}
            _ => {
                return Err(invalid(format!(
                    "subject column `{}` must be classified identifier (sent pseudonymised) or direct-identifier (never sent)",
                    self.subject_column
                )));
            }
        }
        if !is_supported_subject_type(subject.data_type()) {
            return Err(invalid(format!(
                "subject column `{}` has type {}; use an integer or string column",
                self.subject_column,
                subject.data_type()
            )));
        }
        Ok(())
    }

    /// The treatment of one column. `special_allowed` says whether the request may receive
    /// special-category data.
    pub fn treatment(&self, column: &str, special_allowed: bool) -> Treatment {
        let Some(col) = self.columns.get(column) else {
            return Treatment::Drop;
        };
        match (col.mask, col.class) {
            (Some(Mask::Drop), _) => Treatment::Drop,
            (Some(Mask::Nullify), _) => Treatment::Nullify,
            (_, ColumnClass::DirectIdentifier) => Treatment::Drop,
            (Some(Mask::Pseudonymise), ColumnClass::Sensitive) if self.special_category && !special_allowed => {
                Treatment::Drop
            }
            (Some(Mask::Pseudonymise), _) => Treatment::Pseudonymise,
            (None, ColumnClass::Identifier) => Treatment::Pseudonymise,
            (None, ColumnClass::QuasiIdentifier) => col.generalise.map_or(Treatment::Drop, Treatment::Generalise),
            (None, ColumnClass::Sensitive) if self.special_category && !special_allowed => Treatment::Drop,
            (None, ColumnClass::Sensitive | ColumnClass::NonPersonal) => Treatment::Keep,
        }
    }

    /// Whether this dataset may be used for `purpose` at all (independently of who asks).
    pub fn allows_purpose(&self, purpose: &Purpose) -> bool {
        self.purposes.iter().any(|p| p.covers(purpose))
    }

    /// Whether a permit for `purpose` can ever let anyone use this dataset: `purpose` is one of
    /// the dataset's purposes, a sub-purpose of one, or an ancestor of one (a permit for
    /// `research` covers a dataset registered for `research/ai-training`; requests are still
    /// confined to the dataset's purposes by [`DatasetPolicy::allows_purpose`]).
    pub fn accepts_permit_for(&self, purpose: &Purpose) -> bool {
        self.purposes.iter().any(|p| p.covers(purpose) || purpose.covers(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, TimeUnit};

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("born", DataType::Date32, true),
            Field::new("at", DataType::Timestamp(TimeUnit::Microsecond, None), true),
        ])
    }

    fn policy() -> DatasetPolicy {
        let mut columns = BTreeMap::new();
        columns.insert("id".into(), ColumnPolicy::new(ColumnClass::Identifier));
        columns.insert("name".into(), ColumnPolicy::new(ColumnClass::DirectIdentifier));
        columns.insert("born".into(), ColumnPolicy::generalised(Generalisation::Year));
        columns.insert("at".into(), ColumnPolicy::new(ColumnClass::NonPersonal));
        DatasetPolicy {
            name: DatasetId::parse("ds").unwrap(),
            member_state: MemberState::parse("FR").unwrap(),
            controller: "aphp".into(),
            subject_column: "id".into(),
            legal_basis: LegalBasis::Consent,
            consent_registry: "reg".into(),
            purposes: vec![Purpose::parse("research").unwrap()],
            columns,
            special_category: false,
            release: Release::Rows,
            min_group_size: DEFAULT_MIN_GROUP_SIZE,
            k_anonymity: None,
        }
    }

    #[test]
    fn treatments_follow_class_mask_and_special_category() {
        let mut p = policy();
        p.columns.insert(
            "name".into(),
            ColumnPolicy {
                mask: Some(Mask::Nullify),
                ..ColumnPolicy::new(ColumnClass::DirectIdentifier)
            },
        );
        p.columns.insert(
            "at".into(),
            ColumnPolicy {
                mask: Some(Mask::Drop),
                ..ColumnPolicy::new(ColumnClass::NonPersonal)
            },
        );
        p.validate(&schema()).unwrap();
        assert_eq!(p.treatment("id", false), Treatment::Pseudonymise);
        assert_eq!(p.treatment("name", false), Treatment::Nullify);
        assert_eq!(p.treatment("born", false), Treatment::Generalise(Generalisation::Year));
        assert_eq!(p.treatment("at", false), Treatment::Drop);
        p.columns.insert("at".into(), ColumnPolicy::new(ColumnClass::Sensitive));
        assert_eq!(p.treatment("at", false), Treatment::Keep);
        p.special_category = true;
        assert_eq!(p.treatment("at", false), Treatment::Drop);
        assert_eq!(p.treatment("at", true), Treatment::Keep);
        p.columns.insert(
            "name".into(),
            ColumnPolicy {
                mask: Some(Mask::Pseudonymise),
                ..ColumnPolicy::new(ColumnClass::DirectIdentifier)
            },
        );
        assert!(
            p.validate(&schema())
                .unwrap_err()
                .to_string()
                .contains("direct identifier")
        );
    }

    #[test]
    fn valid_policy_passes() {
        policy().validate(&schema()).unwrap();
    }

    #[test]
    fn each_defect_is_named() {
        type Mutation = Box<dyn Fn(&mut DatasetPolicy)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|p| {
                    p.columns.remove("at");
                }),
                "column `at` is not classified",
            ),
            (
                Box::new(|p| {
                    p.columns
                        .insert("ghost".into(), ColumnPolicy::new(ColumnClass::Sensitive));
                }),
                "no such column",
            ),
            (
                Box::new(|p| {
                    p.columns.get_mut("born").unwrap().generalise = None;
                }),
                "no generalisation rule",
            ),
            (
                Box::new(|p| {
                    p.columns.get_mut("born").unwrap().generalise = Some(Generalisation::Prefix(2));
                }),
                "cannot apply",
            ),
            (Box::new(|p| p.subject_column = "nope".into()), "subject column `nope`"),
            (Box::new(|p| p.purposes.clear()), "`purposes` is empty"),
        ];
        for (mutate, needle) in cases {
            let mut p = policy();
            mutate(&mut p);
            let err = p.validate(&schema()).unwrap_err().to_string();
            assert!(err.contains(needle), "expected `{needle}` in `{err}`");
        }
    }

    #[test]
    fn generalisation_syntax() {
        assert_eq!(Generalisation::parse("prefix:2").unwrap(), Generalisation::Prefix(2));
        assert_eq!(Generalisation::parse("bucket:10").unwrap(), Generalisation::Bucket(10));
        for bad in ["prefix:0", "prefix:", "prefix:33", "decade", "bucket:-1", "bucket:1"] {
            assert!(Generalisation::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_validated() {
        assert!(DatasetId::parse("demo_patients").is_ok());
        assert!(DatasetId::parse("Demo").is_err());
        assert!(DatasetId::parse("a;drop").is_err());
        assert!(MemberState::parse("fr").is_err());
    }
}
