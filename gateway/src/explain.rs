//! `policy explain`: why a principal may or may not pull a dataset for a purpose, which rule
//! decided, and what the gate would withhold (rows by legal basis and consent, columns by class).

use passerelle_policies::consent::index::KeyKind;
use passerelle_policies::{LegalBasis, Principal, Purpose, Role, Treatment};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::node::Node;

/// One column's fate.
#[derive(Debug, Clone, Serialize)]
pub struct ColumnFate {
    /// Column name.
    pub name: String,
    /// Its class.
    pub class: String,
    /// `dropped`, `nullified`, `sent`, `pseudonymised` or `generalised:<rule>`.
    pub treatment: String,
}

/// The explanation of one decision.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub principal: String,
    pub organisation: String,
    pub member_state: String,
    pub dataset: String,
    pub purpose: String,
    pub decision: &'static str,
    pub reason: String,
    /// The policy line that decided, when one did.
    pub rule: Option<String>,
    pub policy_version: String,
    pub legal_basis: &'static str,
    pub consent_registry: String,
    pub consent_version: u64,
    /// Under `consent`: subjects whose rows are sent. Under `public-interest`: subjects who
    /// objected (whose rows are withheld).
    pub subjects_counted: usize,
    pub special_category: bool,
    pub special_category_allowed: bool,
    pub columns: Vec<ColumnFate>,
}

impl Explanation {
    /// Human-readable form for the CLI.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "decision: {} — {}", self.decision, self.reason);
        let _ = writeln!(
            s,
            "principal: {} ({}, {}), purpose: {}, dataset: {}",
            self.principal, self.organisation, self.member_state, self.purpose, self.dataset
        );
        let _ = writeln!(s, "rule: {}", self.rule.as_deref().unwrap_or("(none matched)"));
        let _ = writeln!(s, "policy version: {}", self.policy_version);
        let who = if self.legal_basis == "consent" {
            "subjects with consent (rows sent)"
        } else {
            "subjects who objected (rows withheld)"
        };
        let _ = writeln!(
            s,
            "rows: legal basis {}, registry `{}` at version {}: {} {who}",
            self.legal_basis, self.consent_registry, self.consent_version, self.subjects_counted
        );
        if self.special_category {
            let _ = writeln!(
                s,
                "special category: sensitive columns {}",
                if self.special_category_allowed {
                    "allowed by permit or rule"
                } else {
                    "withheld (no permit names the condition)"
                }
            );
        }
        let _ = writeln!(s, "columns:");
        for c in &self.columns {
            let _ = writeln!(s, "  {:<24} {:<18} {}", c.name, c.class, c.treatment);
        }
        s
    }
}

/// Explains a decision for `principal_name`. The caller must be allowed to ask: admins and
/// auditors for anyone, stewards for their own organisation's datasets, others for themselves.
pub async fn explain(
    node: &Node,
    asker: Option<&Principal>,
    principal_name: &str,
    dataset: &str,
    purpose: &Purpose,
) -> Result<Explanation> {
    let snap = node.snapshot();
    let principals = node.meta.principals().await?;
    let principal = principals
        .into_iter()
        .map(|p| p.principal)
        .find(|p| p.name == principal_name)
        .ok_or_else(|| {
            Error::invalid(
                format!("no principal named `{principal_name}`"),
                "list principals with the CLI",
            )
        })?;
    // Visibility is judged for the asker (a steward asking about a trainer sees the steward's datasets).
    let viewer = asker.unwrap_or(&principal);
    let manifest = snap.visible_dataset(viewer, dataset)?;
    if let Some(a) = asker {
        let allowed = match a.role {
            Role::Admin | Role::Auditor => true,
            Role::Steward => a.org == manifest.controller,
            Role::Trainer => a.name == principal.name,
        };
        if !allowed {
            return Err(Error::PermissionDenied {
                reason: "you may explain only your own access, or your organisation's datasets as a steward".into(),
            });
        }
    }
    let policy = manifest.policy();
    let decision = snap
        .authorizer
        .decide(&principal, &policy, purpose, chrono::Utc::now())?;
    let special_allowed = policy.special_category
        && snap
            .authorizer
            .allows_special_category(&principal, &policy, purpose, chrono::Utc::now())?;
    // Counted in the set the gate itself probes (the subject column's kind): the same number,
    // and no second set of every subject built for the asking.
    let kind = match node.open_source(&manifest, snap.meta_version).await {
        Ok(source) => source
            .schema()
            .field_with_name(&policy.subject_column)
            .map_or(KeyKind::Str, |f| KeyKind::of(f.data_type())),
        Err(_) => KeyKind::Str,
    };
    let counted = node
        .consent
        .subject_set(&policy.consent_registry, purpose, policy.legal_basis, kind)
        .set
        .len();
    let columns = policy
        .columns
        .iter()
        .map(|(name, c)| ColumnFate {
            name: name.clone(),
            class: c.class.as_str().to_string(),
            treatment: match policy.treatment(name, special_allowed) {
                Treatment::Drop => "dropped".into(),
                Treatment::Nullify => "nullified".into(),
                Treatment::Keep => "sent".into(),
                Treatment::Pseudonymise => "pseudonymised".into(),
                Treatment::Generalise(g) => format!("generalised:{g}"),
            },
        })
        .collect();
    Ok(Explanation {
        principal: principal.name.clone(),
        organisation: principal.org.clone(),
        member_state: principal.member_state.clone(),
        dataset: policy.name.to_string(),
        purpose: purpose.to_string(),
        decision: if decision.allow { "allow" } else { "deny" },
        reason: decision.reason,
        rule: decision.rule,
        policy_version: snap.authorizer.version().to_string(),
        legal_basis: match policy.legal_basis {
            LegalBasis::Consent => "consent",
            LegalBasis::PublicInterest => "public-interest",
        },
        consent_registry: policy.consent_registry.clone(),
        consent_version: node.consent.registry_version(&policy.consent_registry),
        subjects_counted: counted,
        special_category: policy.special_category,
        special_category_allowed: special_allowed,
        columns,
    })
}
