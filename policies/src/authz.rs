//! Authorisation: a casbin enforcer over the model in `policies/model/passerelle.conf`, the default
//! lines in `policies/policy/default.csv` and lines generated from the metadata store (permits and
//! role assignments). There is one copy of truth: the store; the enforcer is rebuilt from it.

use std::fmt::Write as _;

use casbin::function_map::OperatorFunction;
use casbin::prelude::*;
use casbin::rhai::Dynamic;
use chrono::{DateTime, SecondsFormat, Utc};

use crate::classification::{DatasetId, DatasetPolicy};
use crate::error::{Error, Result};
use crate::purpose::{self, Purpose};

/// The access model, compiled into the binary so that a deployment cannot run without one.
pub const DEFAULT_MODEL: &str = include_str!("../model/passerelle.conf");
/// The default policy lines.
pub const DEFAULT_POLICY: &str = include_str!("../policy/default.csv");

const NO_EXPIRY: &str = "9999-12-31T23:59:59Z";

/// Roles a principal can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Pulls governed data for a purpose.
    Trainer,
    /// Registers its organisation's datasets, permits and consent.
    Steward,
    /// Reads the audit log.
    Auditor,
    /// Operates the node.
    Admin,
}

impl Role {
    /// Parses `trainer|steward|auditor|admin`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "trainer" => Ok(Self::Trainer),
            "steward" => Ok(Self::Steward),
            "auditor" => Ok(Self::Auditor),
            "admin" => Ok(Self::Admin),
            _ => Err(Error::InvalidName {
                what: "role",
                name: s.to_string(),
                rule: "use trainer, steward, auditor or admin",
            }),
        }
    }
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trainer => "trainer",
            Self::Steward => "steward",
            Self::Auditor => "auditor",
            Self::Admin => "admin",
        }
    }
}

/// Who is asking: enough to decide, nothing about how they authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Principal name, unique on the node.
    pub name: String,
    /// Organisation (the casbin domain).
    pub org: String,
    /// Member state of the organisation.
    pub member_state: String,
    /// Role on this node.
    pub role: Role,
}

/// A data permit: organisation `org` may use `dataset` for `purpose` and its sub-purposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    /// Dataset the permit is for.
    pub dataset: DatasetId,
    /// Organisation holding the permit.
    pub org: String,
    /// Purpose (covers descendants).
    pub purpose: Purpose,
    /// Expiry, if any.
    pub expires: Option<DateTime<Utc>>,
    /// Whether the permit covers special-category data (GDPR Art. 9).
    pub special_category: bool,
}

impl Principal {
    /// A peer node's principal (`name@home-node`, vouched for by a federation assertion), not
    /// one of this node's registry.
    pub fn is_peer(&self) -> bool {
        self.name.contains('@')
    }

    /// The casbin subject. A peer node's principal (`name@home-node`) is not in this node's
    /// registry and has no `g` line: casbin sees it by its role, so rules for its role and
    /// domain apply to it, and rules naming one of this node's principals do not.
    pub fn subject(&self) -> &str {
        if self.is_peer() { self.role.as_str() } else { &self.name }
    }

    /// The casbin request domain: [`Principal::domain`], marked `#peer` for a peer node's
    /// principal (`#` never occurs in a policy line's domain). The peer vouches for its member
    /// state only, so an allow line naming a bare organisation (`dkfz`) does not reach it; see
    /// [`domain_matches`].
    pub fn request_domain(&self) -> String {
        if self.is_peer() {
            format!("{}{PEER_MARK}", self.domain())
        } else {
            self.domain()
        }
    }

    /// The casbin domain: `<member state>/<organisation>`, so rules can name a member state
    /// (`DE/*`), an organisation (`dkfz`) or both (`DE/dkfz`).
    pub fn domain(&self) -> String {
        format!("{}/{}", self.member_state, self.org)
    }
}

/// Marks a peer node's principal's request domain (see [`Principal::request_domain`]).
const PEER_MARK: &str = "#peer";

/// Whether `permit` names `principal`'s organisation: a permit naming a member state
/// (`DE/dkfz`) names that organisation of that state, for this node's principals and peers'
/// alike; a bare organisation (`dkfz`) names this node's principals of it only (a peer could
/// claim any organisation name; only its member state is vouched for).
pub fn permit_names(permit: &Permit, principal: &Principal) -> bool {
    match permit.org.split_once('/') {
        Some((state, org)) => state == principal.member_state && org == principal.org,
        None => !principal.is_peer() && permit.org == principal.org,
    }
}

/// Suffix of the casbin object that stands for a dataset's special-category columns.
pub const SPECIAL_SUFFIX: &str = "#special";

/// The outcome of an access decision, with the reason shown to the caller and the audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether access is allowed.
    pub allow: bool,
    /// The policy line that decided, when one did.
    pub rule: Option<String>,
    /// Why, in words a steward can act on.
    pub reason: String,
    /// Whether special-category (Art. 9) columns may be sent too.
    pub special_category: bool,
}

/// A policy file's text and the name used in error messages.
#[derive(Debug, Clone, Copy)]
pub struct PolicyFile<'a> {
    /// File name (or a description) for errors.
    pub name: &'a str,
    /// The text.
    pub text: &'a str,
}

/// The built-in default policy.
pub const DEFAULT_POLICY_FILE: PolicyFile<'static> = PolicyFile {
    name: "policies/policy/default.csv",
    text: DEFAULT_POLICY,
};

/// A built enforcer plus what it was built from.
pub struct Authorizer {
    enforcer: Enforcer,
    permits: Vec<Permit>,
    version: String,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("permits", &self.permits.len())
            .finish()
    }
}

/// `domainMatch(r.dom, p.dom, p.eft)`: `*`, `CC/*`, `CC/org` or a bare `org`. A bare
/// organisation names any member state's organisation of that name, except that an allow line
/// naming one does not reach a peer node's principal (a peer vouches for its member state, not
/// for which organisation names are whose): `DE/dkfz` does. Deny lines reach everyone they name.
pub fn domain_matches(request: &str, pattern: &str, effect: &str) -> bool {
    let (request, peer) = match request.strip_suffix(PEER_MARK) {
        Some(r) => (r, true),
        None => (request, false),
    };
    if pattern == "*" || request == pattern {
        return true;
    }
    if let Some(state) = pattern.strip_suffix("/*") {
        return request.split_once('/').is_some_and(|(cc, _)| cc == state);
    }
    // A bare organisation: not for a peer's principal, unless the line denies.
    let bare_reaches = !peer || effect == "deny";
    !pattern.contains('/') && bare_reaches && request.split_once('/').is_some_and(|(_, org)| org == pattern)
}

fn domain_match(a: Dynamic, b: Dynamic, c: Dynamic) -> Dynamic {
    let a = casbin::function_map::dynamic_to_str(&a);
    let b = casbin::function_map::dynamic_to_str(&b);
    let c = casbin::function_map::dynamic_to_str(&c);
    domain_matches(&a, &b, &c).into()
}

/// `purposeCovers(p.act, r.act)`: `*` covers every purpose, a purpose itself and its descendants.
fn purpose_covers(a: Dynamic, b: Dynamic) -> Dynamic {
    let a = casbin::function_map::dynamic_to_str(&a);
    let b = casbin::function_map::dynamic_to_str(&b);
    (a == "*" || purpose::covers(&a, &b)).into()
}

/// `objectMatch(r.obj, p.obj, p.eft)`: the dataset itself, or `*`. An allow line's `*` does
/// not reach a dataset's special-category columns (`<dataset>#special`): those need a line
/// naming them, or `*#special`. A deny line's `*` reaches everything.
pub fn object_matches(request: &str, pattern: &str, effect: &str) -> bool {
    let special = request.ends_with(SPECIAL_SUFFIX);
    request == pattern
        || (pattern == "*" && (!special || effect == "deny"))
        || (special && pattern.strip_prefix('*') == Some(SPECIAL_SUFFIX))
}

fn object_match(a: Dynamic, b: Dynamic, c: Dynamic) -> Dynamic {
    let a = casbin::function_map::dynamic_to_str(&a);
    let b = casbin::function_map::dynamic_to_str(&b);
    let c = casbin::function_map::dynamic_to_str(&c);
    object_matches(&a, &b, &c).into()
}

/// Whether a bare domain looks like a member-state code (two capital letters, as
/// `MemberState` accepts): as a bare domain it would name an organisation of that name, which is
/// almost never what the author of a line meant (`DE/*` is the member state).
fn looks_like_state(dom: &str) -> bool {
    dom.len() == 2 && dom.bytes().all(|b| b.is_ascii_uppercase())
}

/// Why a policy line's domain would never match what its author meant, if it would not.
fn domain_problem(dom: &str) -> Option<String> {
    let ok = match dom.split_once('/') {
        None => !looks_like_state(dom) && !dom.contains('#'),
        Some((cc, org)) => looks_like_state(cc) && !org.is_empty() && !org.contains(['/', '#']),
    };
    (!ok).then(|| {
        format!(
            "domain `{dom}` is not `*`, `CC/*` (a member state), `CC/org` or `org`{}",
            if looks_like_state(dom) {
                format!("; for the member state write `{dom}/*`")
            } else {
                String::new()
            }
        )
    })
}

/// A `p` line with its expiry in the form the matcher compares as text (UTC, whole seconds):
/// `2027-01-01T02:00:00+02:00` or `...00.5Z` would otherwise compare wrongly against the
/// request time.
fn normalise_expiry(line: &str) -> String {
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    match fields.as_slice() {
        ["p", sub, dom, obj, act, exp, eft] => match DateTime::parse_from_rfc3339(exp) {
            Ok(t) => {
                let utc = t.with_timezone(&Utc);
                // Past year 9999 the text would read `+10000-...` and sort before every date.
                let exp = match chrono::Datelike::year(&utc) > 9999 {
                    true => NO_EXPIRY.to_string(),
                    false => policy_time(utc),
                };
                format!("p, {sub}, {dom}, {obj}, {act}, {exp}, {eft}")
            }
            Err(_) => line.to_string(),
        },
        _ => line.to_string(),
    }
}

/// Formats a time the way policy lines compare it (fixed-width RFC 3339 UTC, so text order is
/// time order).
pub fn policy_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Checks a policy file: each non-comment line must be `p, sub, dom, obj, act, exp, allow|deny`
/// or `g, principal, role, org`. Errors name the line.
pub fn check_policy_text(file: &str, text: &str) -> Result<()> {
    check_lines(text, file, true)
}

/// [`check_policy_text`]; with `shapes`, also the fields' shapes (no empty subject, domain or
/// object; a domain that can match what it says).
fn check_lines(text: &str, file: &str, shapes: bool) -> Result<()> {
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let bad = |reason: String| Error::InvalidPolicyLine {
            file: file.to_string(),
            line: i + 1,
            reason,
        };
        match fields.first().copied() {
            Some("p") => {
                if fields.len() != 7 {
                    return Err(bad(format!(
                        "a `p` line has 7 fields (p, sub, dom, obj, act, exp, eft), found {}",
                        fields.len()
                    )));
                }
                if let Some(empty) = fields[1..4].iter().position(|f| f.is_empty()).filter(|_| shapes) {
                    return Err(bad(format!(
                        "field {} (sub, dom, obj) is empty; use `*` for any",
                        empty + 2
                    )));
                }
                if let Some(why) = domain_problem(fields[2]).filter(|_| shapes) {
                    return Err(bad(why));
                }
                if fields[4] != "*" {
                    Purpose::parse(fields[4]).map_err(|e| bad(e.to_string()))?;
                }
                if DateTime::parse_from_rfc3339(fields[5]).is_err() {
                    return Err(bad(format!("expiry `{}` is not RFC 3339", fields[5])));
                }
                if !matches!(fields[6], "allow" | "deny") {
                    return Err(bad(format!("effect `{}` must be allow or deny", fields[6])));
                }
            }
            Some("g") => {
                if fields.len() != 4 {
                    return Err(bad(format!(
                        "a `g` line has 4 fields (g, principal, role, org), found {}",
                        fields.len()
                    )));
                }
            }
            other => return Err(bad(format!("unknown line type `{}`; use p or g", other.unwrap_or("")))),
        }
    }
    Ok(())
}

impl Authorizer {
    /// Builds an enforcer from the model, the default policy file, stored rule lines (stewards'
    /// deny and allow rules) and the store's permits and roles. Errors name the file and line.
    pub async fn build(
        model: &str,
        base_policy: &PolicyFile<'_>,
        rules: &[String],
        permits: Vec<Permit>,
        principals: &[Principal],
    ) -> Result<Self> {
        check_policy_text(base_policy.name, base_policy.text)?;
        // Stored lines were checked when written; those written before a domain's shape was
        // checked keep the meaning they had (a bare `HP` names that organisation; a bare `DE`
        // or an empty field names nothing), so only the line format is checked again here.
        let stored = rules.join("\n");
        check_lines(&stored, "stored policy rules", false)?;
        let mut text = String::new();
        for line in base_policy.text.lines().chain(stored.lines()) {
            let line = line.trim();
            if !line.is_empty() && !line.starts_with('#') {
                text.push_str(&normalise_expiry(line));
                text.push('\n');
            }
        }
        for p in &permits {
            let exp = p.expires.map_or_else(|| NO_EXPIRY.to_string(), policy_time);
            let org = csv_safe(&p.org)?;
            let _ = writeln!(text, "p, trainer, {org}, {}, {}, {exp}, allow", p.dataset, p.purpose);
            if p.special_category {
                let _ = writeln!(
                    text,
                    "p, trainer, {org}, {}{SPECIAL_SUFFIX}, {}, {exp}, allow",
                    p.dataset, p.purpose
                );
            }
        }
        for pr in principals {
            let _ = writeln!(
                text,
                "g, {}, {}, {}",
                csv_safe(&pr.name)?,
                pr.role.as_str(),
                pr.domain()
            );
        }
        let model_parsed = DefaultModel::from_str(model).await.map_err(|e| Error::Casbin {
            op: "parse model",
            source: Box::new(e),
        })?;
        let mut enforcer = Enforcer::new(model_parsed, StringAdapter::new(text.clone()))
            .await
            .map_err(|e| Error::Casbin {
                op: "load policy",
                source: Box::new(e),
            })?;
        enforcer.add_function("purposeCovers", OperatorFunction::Arg2(purpose_covers));
        enforcer.add_function("domainMatch", OperatorFunction::Arg3(domain_match));
        enforcer.add_function("objectMatch", OperatorFunction::Arg3(object_match));
        // A model can parse and still be unable to decide (an effect casbin does not support
        // panics in `enforce`, a matcher naming an unknown field errors): decide one request now,
        // so such a model is refused at load, never on every request afterwards.
        // A throwaway enforcer over lines matching anything, so that no clause of the matcher is
        // skipped by short-circuiting.
        // (The role line first: casbin stops at the first line that settles the effect.)
        let probe_lines = format!(
            "p, probe-role, *, *, *, {NO_EXPIRY}, allow\ng, probe, probe-role, ZZ/probe\n\
             p, *, *, *, *, {NO_EXPIRY}, allow\np, *, *, *, *, {NO_EXPIRY}, deny\n"
        );
        let mut prober = Enforcer::new(
            DefaultModel::from_str(model).await.map_err(|e| Error::Casbin {
                op: "parse model",
                source: Box::new(e),
            })?,
            StringAdapter::new(probe_lines),
        )
        .await
        .map_err(|e| Error::Casbin {
            op: "load policy",
            source: Box::new(e),
        })?;
        prober.add_function("purposeCovers", OperatorFunction::Arg2(purpose_covers));
        prober.add_function("domainMatch", OperatorFunction::Arg3(domain_match));
        prober.add_function("objectMatch", OperatorFunction::Arg3(object_match));
        let probe = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            prober.enforce(("probe", "ZZ/probe", "probe", "probe", "2000-01-01T00:00:00Z"))
        }));
        match probe {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(Error::Casbin {
                    op: "decide with the model",
                    source: Box::new(e),
                });
            }
            Err(_) => {
                return Err(Error::InvalidModel {
                    reason:
                        "the policy engine cannot decide with this model (is its [policy_effect] one casbin supports?)"
                            .into(),
                });
            }
        }
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(format!("{model}\n--\n{text}").as_bytes());
        let version = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            enforcer,
            permits,
            version,
        })
    }

    /// A short fingerprint of everything the enforcer was built from (model and every line),
    /// recorded in the audit with each access.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Permits this enforcer knows.
    pub fn permits(&self) -> &[Permit] {
        &self.permits
    }

    /// Whether the principal may know the dataset exists: its organisation controls it or holds an
    /// unexpired permit for it. Invisible datasets are reported exactly like missing ones.
    pub fn visible(&self, principal: &Principal, dataset: &DatasetPolicy, now: DateTime<Utc>) -> bool {
        let controls = principal.org == dataset.controller
            && (!principal.is_peer() || principal.member_state == dataset.member_state.as_str());
        controls
            || self
                .permits
                .iter()
                .any(|p| p.dataset == dataset.name && permit_names(p, principal) && p.expires.is_none_or(|e| e > now))
    }

    /// Whether an allowed request may also receive the dataset's special-category (Art. 9)
    /// columns: a permit naming that condition, or a policy line allowing `<dataset>#special`.
    pub fn allows_special_category(
        &self,
        principal: &Principal,
        dataset: &DatasetPolicy,
        purpose: &Purpose,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let object = format!("{}{SPECIAL_SUFFIX}", dataset.name);
        self.enforcer
            .enforce((
                principal.subject(),
                principal.request_domain().as_str(),
                object.as_str(),
                purpose.as_str(),
                policy_time(now).as_str(),
            ))
            .map_err(|e| Error::Casbin {
                op: "enforce",
                source: Box::new(e),
            })
    }

    /// Decides whether `principal` may pull `dataset` for `purpose` at `now`.
    pub fn decide(
        &self,
        principal: &Principal,
        dataset: &DatasetPolicy,
        purpose: &Purpose,
        now: DateTime<Utc>,
    ) -> Result<Decision> {
        if principal.role != Role::Trainer {
            return Ok(Decision {
                allow: false,
                rule: None,
                special_category: false,
                reason: format!(
                    "role `{}` may not pull data; only trainers may",
                    principal.role.as_str()
                ),
            });
        }
        if !dataset.allows_purpose(purpose) {
            let listed: Vec<&str> = dataset.purposes.iter().map(Purpose::as_str).collect();
            return Ok(Decision {
                allow: false,
                rule: None,
                special_category: false,
                reason: format!(
                    "dataset `{}` is not registered for purpose `{purpose}` (registered: {})",
                    dataset.name,
                    listed.join(", ")
                ),
            });
        }
        let (allow, rules) = self
            .enforcer
            .enforce_ex((
                principal.subject(),
                principal.request_domain().as_str(),
                dataset.name.as_str(),
                purpose.as_str(),
                policy_time(now).as_str(),
            ))
            .map_err(|e| Error::Casbin {
                op: "enforce",
                source: Box::new(e),
            })?;
        // casbin also lists allow lines that matched before a deny line: a denial names the deny line.
        let deny_line = rules.iter().find(|r| r.last().is_some_and(|e| e == "deny"));
        let shown = if allow { rules.first() } else { deny_line };
        let rule = shown.map(|r| r.join(", "));
        let reason = if allow {
            format!("permit for organisation `{}` covers purpose `{purpose}`", principal.org)
        } else if let Some(r) = deny_line {
            format!("denied by policy line `{}`", r.join(", "))
        } else {
            format!(
                "organisation `{}` holds no unexpired permit for dataset `{}` and purpose `{purpose}` or an ancestor of it",
                principal.org, dataset.name
            )
        };
        let special_category =
            allow && dataset.special_category && self.allows_special_category(principal, dataset, purpose, now)?;
        Ok(Decision {
            allow,
            rule,
            reason,
            special_category,
        })
    }
}

/// Checks a name that becomes part of a policy line (principal, organisation). Stores call this
/// before writing, so a stored value can never make the enforcer fail to build.
pub fn check_policy_value(s: &str) -> Result<&str> {
    csv_safe(s)
}

/// Values go into comma-separated policy lines: refuse the separators rather than escape them.
fn csv_safe(s: &str) -> Result<&str> {
    if s.is_empty()
        || s.len() > 128
        || s.contains([',', '\n', '\r', '"', '#'])
        || s.trim() != s
        || s.chars().any(char::is_control)
    {
        return Err(Error::InvalidName {
            what: "policy value",
            name: s.to_string(),
            rule: "must be non-empty with no commas, quotes, newlines or surrounding spaces",
        });
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classification::{LegalBasis, MemberState};
    use std::collections::BTreeMap;

    fn dataset(purposes: &[&str]) -> DatasetPolicy {
        DatasetPolicy {
            name: DatasetId::parse("demo").unwrap(),
            member_state: MemberState::parse("FR").unwrap(),
            controller: "aphp".into(),
            subject_column: "id".into(),
            legal_basis: LegalBasis::Consent,
            consent_registry: "r".into(),
            purposes: purposes.iter().map(|p| Purpose::parse(p).unwrap()).collect(),
            columns: BTreeMap::new(),
            special_category: false,
            release: crate::Release::Rows,
            min_group_size: crate::DEFAULT_MIN_GROUP_SIZE,
            k_anonymity: None,
        }
    }
    fn principal(name: &str, org: &str, role: Role) -> Principal {
        Principal {
            name: name.into(),
            org: org.into(),
            member_state: if org == "gemelli" { "IT" } else { "DE" }.into(),
            role,
        }
    }
    fn permit(org: &str, purpose: &str, expires: Option<&str>) -> Permit {
        Permit {
            dataset: DatasetId::parse("demo").unwrap(),
            org: org.into(),
            purpose: Purpose::parse(purpose).unwrap(),
            expires: expires.map(|e| DateTime::parse_from_rfc3339(e).unwrap().with_timezone(&Utc)),
            special_category: false,
        }
    }
    fn p(s: &str) -> Purpose {
        Purpose::parse(s).unwrap()
    }

    async fn authorizer(base: &str) -> (Authorizer, Vec<Principal>) {
        let people = vec![
            principal("t-de", "dkfz", Role::Trainer),
            principal("t-it", "gemelli", Role::Trainer),
            principal("s-fr", "aphp", Role::Steward),
        ];
        let permits = vec![
            permit("dkfz", "research/ai-training", None),
            permit("gemelli", "research", Some("2020-01-01T00:00:00Z")),
        ];
        let base = PolicyFile {
            name: "base.csv",
            text: base,
        };
        (
            Authorizer::build(DEFAULT_MODEL, &base, &[], permits, &people)
                .await
                .unwrap(),
            people,
        )
    }

    #[tokio::test]
    async fn permits_cover_sub_purposes_and_expire() {
        let (a, people) = authorizer(DEFAULT_POLICY).await;
        let ds = dataset(&["research"]);
        let now = Utc::now();
        assert!(
            a.decide(&people[0], &ds, &p("research/ai-training/llm"), now)
                .unwrap()
                .allow
        );
        let d = a.decide(&people[0], &ds, &p("research/epidemiology"), now).unwrap();
        assert!(!d.allow && d.reason.contains("no unexpired permit"), "{d:?}");
        // Expired permit: denied and invisible.
        assert!(!a.decide(&people[1], &ds, &p("research"), now).unwrap().allow);
        assert!(!a.visible(&people[1], &ds, now));
        assert!(a.visible(&people[0], &ds, now));
        // Stewards see their own data but may not pull it.
        assert!(a.visible(&people[2], &ds, now));
        assert!(
            a.decide(&people[2], &ds, &p("research"), now)
                .unwrap()
                .reason
                .contains("only trainers")
        );
        // The dataset's own purposes bound every permit.
        let narrow = dataset(&["research/epidemiology"]);
        assert!(
            a.decide(&people[0], &narrow, &p("research/ai-training"), now)
                .unwrap()
                .reason
                .contains("not registered for purpose")
        );
    }

    /// A permit for an ancestor of the dataset's purposes is accepted and covers them, never a
    /// purpose outside the dataset's list (nor the ancestor itself, which the dataset does not list).
    #[tokio::test]
    async fn a_permit_for_an_ancestor_covers_the_datasets_sub_purposes_only() {
        let people = vec![principal("t-de", "dkfz", Role::Trainer)];
        let ds = dataset(&["research/ai-training"]);
        assert!(ds.accepts_permit_for(&p("research")));
        assert!(ds.accepts_permit_for(&p("research/ai-training/llm")));
        assert!(!ds.accepts_permit_for(&p("research/epidemiology")));
        assert!(!ds.accepts_permit_for(&p("marketing")));
        let a = Authorizer::build(
            DEFAULT_MODEL,
            &DEFAULT_POLICY_FILE,
            &[],
            vec![permit("dkfz", "research", None)],
            &people,
        )
        .await
        .unwrap();
        let now = Utc::now();
        assert!(
            a.decide(&people[0], &ds, &p("research/ai-training"), now)
                .unwrap()
                .allow
        );
        assert!(
            a.decide(&people[0], &ds, &p("research/ai-training/llm"), now)
                .unwrap()
                .allow
        );
        for outside in ["research/epidemiology", "research"] {
            let d = a.decide(&people[0], &ds, &p(outside), now).unwrap();
            assert!(!d.allow && d.reason.contains("not registered for purpose"), "{d:?}");
        }
        assert!(a.visible(&people[0], &ds, now));
    }

    #[tokio::test]
    async fn expiries_compare_as_times_whatever_their_offset() {
        let people = vec![principal("t-de", "dkfz", Role::Trainer)];
        let now = DateTime::parse_from_rfc3339("2030-06-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let denied = |exp: &str| {
            let rules = vec![format!("p, *, *, demo, research, {exp}, deny")];
            let people = people.clone();
            async move {
                let a = Authorizer::build(
                    DEFAULT_MODEL,
                    &DEFAULT_POLICY_FILE,
                    &rules,
                    vec![permit("dkfz", "research", None)],
                    &people,
                )
                .await
                .unwrap();
                !a.decide(&people[0], &dataset(&["research"]), &p("research"), now)
                    .unwrap()
                    .allow
            }
        };
        // 13:00+02:00 is 11:00Z: expired at noon UTC, though "13:00" sorts after "12:00" as text.
        assert!(!denied("2030-06-01T13:00:00+02:00").await);
        // 11:00-02:00 is 13:00Z: still in force.
        assert!(denied("2030-06-01T11:00:00-02:00").await);
        assert!(!denied("2030-06-01T11:59:59.9Z").await);
        assert!(denied("2030-06-01T12:00:01Z").await);
        // "Forever" written with a negative offset stays forever (not `+10000-...` as text).
        assert!(denied("9999-12-31T23:59:59-01:00").await);
    }

    #[tokio::test]
    async fn deny_beats_allow() {
        let base = "p, *, *, *, research/ai-training/commercial, 9999-12-31T23:59:59Z, deny\n";
        let (a, people) = authorizer(base).await;
        let ds = dataset(&["research"]);
        let d = a
            .decide(&people[0], &ds, &p("research/ai-training/commercial/ads"), Utc::now())
            .unwrap();
        assert!(!d.allow);
        assert!(d.reason.contains("deny"), "{d:?}");
        assert!(
            a.decide(&people[0], &ds, &p("research/ai-training"), Utc::now())
                .unwrap()
                .allow
        );
    }

    #[tokio::test]
    async fn member_state_domains_and_special_category() {
        let people = vec![
            principal("t-de", "dkfz", Role::Trainer),
            principal("t-it", "gemelli", Role::Trainer),
        ];
        let mut special = permit("gemelli", "research", None);
        special.special_category = true;
        let permits = vec![permit("dkfz", "research", None), special];
        let rules = vec!["p, *, DE/*, demo, research/ai-training, 9999-12-31T23:59:59Z, deny".to_string()];
        let a = Authorizer::build(DEFAULT_MODEL, &DEFAULT_POLICY_FILE, &rules, permits, &people)
            .await
            .unwrap();
        let ds = dataset(&["research"]);
        let now = Utc::now();
        let ai = p("research/ai-training/llm");
        assert!(
            !a.decide(&people[0], &ds, &ai, now).unwrap().allow,
            "DE trainers are denied by the member-state rule"
        );
        assert!(
            a.decide(&people[1], &ds, &ai, now).unwrap().allow,
            "IT trainers are not"
        );
        assert!(
            a.decide(&people[0], &ds, &p("research/epidemiology"), now)
                .unwrap()
                .allow
        );
        assert!(a.allows_special_category(&people[1], &ds, &ai, now).unwrap());
        assert!(
            !a.allows_special_category(&people[0], &ds, &p("research/epidemiology"), now)
                .unwrap()
        );
        assert_eq!(a.version().len(), 12);
        // A different rule set is a different policy version.
        let b = Authorizer::build(DEFAULT_MODEL, &DEFAULT_POLICY_FILE, &[], vec![], &people)
            .await
            .unwrap();
        assert_ne!(a.version(), b.version());
        assert!(
            domain_matches("DE/dkfz", "dkfz", "allow")
                && domain_matches("DE/dkfz", "DE/*", "allow")
                && !domain_matches("FR/aphp", "DE/*", "allow")
        );
        assert!(!domain_matches("DE/dkfz", "dkf", "allow") && !domain_matches("DE/dkfz", "FR/dkfz", "allow"));
        // A peer's principal: a bare organisation allows nothing, denies all the same.
        assert!(!domain_matches("DE/dkfz#peer", "dkfz", "allow") && domain_matches("DE/dkfz#peer", "dkfz", "deny"));
        assert!(domain_matches("DE/dkfz#peer", "DE/dkfz", "allow") && domain_matches("DE/dkfz#peer", "DE/*", "allow"));
        assert!(domain_matches("DE/dkfz#peer", "*", "allow") && !domain_matches("DE/dkfz#peer", "FR/*", "deny"));
    }

    #[tokio::test]
    async fn wildcards_deny_everything_but_allow_no_special_category() {
        let people = vec![principal("t-de", "dkfz", Role::Trainer)];
        let mut ds = dataset(&["research"]);
        ds.special_category = true;
        let now = Utc::now();
        let ai = p("research/ai-training");
        let build = |rules: &[&str]| {
            let rules: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
            let people = people.clone();
            async move {
                Authorizer::build(DEFAULT_MODEL, &DEFAULT_POLICY_FILE, &rules, vec![], &people)
                    .await
                    .unwrap()
            }
        };
        // An allow line for every dataset reaches the rows, not the Art. 9 columns.
        let star = build(&["p, trainer, DE/*, *, research, 9999-12-31T23:59:59Z, allow"]).await;
        let d = star.decide(&people[0], &ds, &ai, now).unwrap();
        assert!(d.allow && !d.special_category, "{d:?}");
        for named in ["demo#special", "*#special"] {
            let a = build(&[
                "p, trainer, DE/*, *, research, 9999-12-31T23:59:59Z, allow",
                &format!("p, trainer, DE/*, {named}, research, 9999-12-31T23:59:59Z, allow"),
            ])
            .await;
            assert!(a.decide(&people[0], &ds, &ai, now).unwrap().special_category, "{named}");
        }
        // `*#special` alone opens no dataset.
        let only = build(&["p, trainer, DE/*, *#special, research, 9999-12-31T23:59:59Z, allow"]).await;
        assert!(!only.decide(&people[0], &ds, &ai, now).unwrap().allow);
        // A deny line's `*` purpose and `*` dataset reach everything, the special columns included.
        let denied = build(&[
            "p, trainer, DE/*, *, research, 9999-12-31T23:59:59Z, allow",
            "p, trainer, DE/*, *#special, research, 9999-12-31T23:59:59Z, allow",
            "p, *, DE/*, demo, *, 9999-12-31T23:59:59Z, deny",
        ])
        .await;
        let d = denied.decide(&people[0], &ds, &ai, now).unwrap();
        assert!(!d.allow, "{d:?}");
        // The denial names the deny line, not an allow line casbin matched before it.
        assert!(d.rule.as_deref().is_some_and(|r| r.ends_with("deny")), "{d:?}");
        assert!(d.reason.contains("denied by policy line `*, DE/*, demo, *,"), "{d:?}");
        let special_denied = build(&[
            "p, trainer, DE/*, *#special, research, 9999-12-31T23:59:59Z, allow",
            "p, *, *, *, *, 9999-12-31T23:59:59Z, deny",
        ])
        .await;
        assert!(
            !special_denied
                .allows_special_category(&people[0], &ds, &ai, now)
                .unwrap()
        );
        assert!(object_matches("demo#special", "*", "deny") && !object_matches("demo#special", "*", "allow"));
        assert!(!object_matches("demo", "*#special", "allow") && object_matches("demo", "*", "allow"));
    }

    #[tokio::test]
    async fn a_peer_principal_needs_a_permit_naming_its_member_state() {
        // This node's trainer of aphp (FR), and peers' principals: DE's node vouches for DE only,
        // so "aphp" claimed by DE is not FR's aphp; dkfz vouched for by DE is DE's dkfz.
        let local = Principal {
            name: "t-fr".into(),
            org: "aphp".into(),
            member_state: "FR".into(),
            role: Role::Trainer,
        };
        let peer = |org: &str| Principal {
            name: "t@gw-de".into(),
            org: org.into(),
            member_state: "DE".into(),
            role: Role::Trainer,
        };
        let permits = vec![
            permit("aphp", "research", None),
            permit("DE/dkfz", "research", None),
            permit("FR/inserm", "research", None),
        ];
        let a = Authorizer::build(
            DEFAULT_MODEL,
            &DEFAULT_POLICY_FILE,
            &[],
            permits,
            std::slice::from_ref(&local),
        )
        .await
        .unwrap();
        let ds = dataset(&["research"]);
        let now = Utc::now();
        let ai = p("research/ai-training");
        let allowed = |who: &Principal| a.decide(who, &ds, &ai, now).unwrap().allow;
        assert!(
            allowed(&local) && a.visible(&local, &ds, now),
            "a bare permit names this node's principals"
        );
        assert!(
            !allowed(&peer("aphp")) && !a.visible(&peer("aphp"), &ds, now),
            "a peer claiming a bare permit's organisation gets nothing, not even the dataset's existence"
        );
        assert!(!a.visible(&peer("aphp"), &ds, now), "nor does it control FR's dataset");
        assert!(allowed(&peer("dkfz")) && a.visible(&peer("dkfz"), &ds, now));
        assert!(
            !allowed(&peer("inserm")) && !a.visible(&peer("inserm"), &ds, now),
            "FR/inserm is not DE's"
        );
        let fr_dkfz = Principal {
            member_state: "FR".into(),
            ..peer("dkfz")
        };
        assert!(!allowed(&fr_dkfz) && !a.visible(&fr_dkfz, &ds, now));
        // A deny line naming the bare organisation reaches the peer's principal.
        let denied = Authorizer::build(
            DEFAULT_MODEL,
            &DEFAULT_POLICY_FILE,
            &["p, *, dkfz, demo, research, 9999-12-31T23:59:59Z, deny".to_string()],
            vec![permit("DE/dkfz", "research", None)],
            &[],
        )
        .await
        .unwrap();
        assert!(!denied.decide(&peer("dkfz"), &ds, &ai, now).unwrap().allow);
        // A qualified permit names this node's principals of that state too.
        let local_inserm = Principal {
            name: "t-inserm".into(),
            org: "inserm".into(),
            ..local.clone()
        };
        let b = Authorizer::build(
            DEFAULT_MODEL,
            &DEFAULT_POLICY_FILE,
            &[],
            vec![permit("FR/inserm", "research", None)],
            std::slice::from_ref(&local_inserm),
        )
        .await
        .unwrap();
        assert!(b.decide(&local_inserm, &ds, &ai, now).unwrap().allow && b.visible(&local_inserm, &ds, now));
    }

    #[tokio::test]
    async fn a_model_that_cannot_decide_is_refused_when_loaded() {
        let people = vec![principal("t-de", "dkfz", Role::Trainer)];
        let effect = "e = some(where (p.eft == allow)) && !some(where (p.eft == deny))";
        assert!(DEFAULT_MODEL.contains(effect));
        let unsupported = DEFAULT_MODEL.replace(effect, "e = some(where (p.eft == deny))");
        let err = Authorizer::build(&unsupported, &DEFAULT_POLICY_FILE, &[], vec![], &people)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidModel { .. }), "{err}");
        // A matcher naming a request field the model does not define (a typo).
        let matcher = "m = (p.sub == \"*\"";
        assert!(DEFAULT_MODEL.contains(matcher));
        let unknown = DEFAULT_MODEL.replace(matcher, "m = r.purpose == p.act && (p.sub == \"*\"");
        let err = Authorizer::build(&unknown, &DEFAULT_POLICY_FILE, &[], vec![], &people)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Casbin { .. }), "{err}");
        // Clauses after a short-circuit are checked too: an unknown function, a function of the
        // wrong arity (a model written for an older `domainMatch(r.dom, p.dom)`).
        for (from, to) in [
            ("purposeCovers(p.act, r.act)", "purposeCoverz(p.act, r.act)"),
            ("domainMatch(r.dom, p.dom, p.eft)", "domainMatch(r.dom, p.dom)"),
            ("g(r.sub, p.sub, r.dom)", "g(r.sub, p.sub)"),
        ] {
            assert!(DEFAULT_MODEL.contains(from));
            let model = DEFAULT_MODEL.replace(from, to);
            let built = Authorizer::build(&model, &DEFAULT_POLICY_FILE, &[], vec![], &people).await;
            assert!(built.is_err(), "{to}");
        }
        // With no line at all, the default model decides (deny).
        let empty = PolicyFile {
            name: "empty",
            text: "",
        };
        let a = Authorizer::build(DEFAULT_MODEL, &empty, &[], vec![], &people)
            .await
            .unwrap();
        assert!(
            !a.decide(&people[0], &dataset(&["research"]), &p("research"), Utc::now())
                .unwrap()
                .allow
        );
    }

    #[tokio::test]
    async fn policy_lines_with_a_domain_that_would_never_match_are_refused() {
        let line = |dom: &str| format!("p, *, {dom}, demo, research, 9999-12-31T23:59:59Z, deny");
        for ok in ["*", "DE/*", "DE/dkfz", "dkfz"] {
            check_policy_text("f", &line(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let err = check_policy_text("f", &line("DE")).unwrap_err().to_string();
        assert!(err.contains("DE/*") && err.contains("line 1"), "{err}");
        for bad in ["de/*", "DE/", "DEU/x", "DE/a/b"] {
            assert!(check_policy_text("f", &line(bad)).is_err(), "{bad}");
        }
        assert!(check_policy_text("f", "p, , *, demo, research, 9999-12-31T23:59:59Z, deny").is_err());
        assert!(
            check_policy_text("f", &line("NO")).is_err(),
            "any two capitals look like a member state"
        );
        // Such lines stored by an earlier release keep their meaning, and the node still starts:
        // a deny for an organisation named `HP` still denies it.
        let people = vec![principal("t-hp", "HP", Role::Trainer)];
        let legacy = vec![
            line("DE"),
            line("HP"),
            "p, *, , demo, research, 9999-12-31T23:59:59Z, deny".into(),
        ];
        let a = Authorizer::build(
            DEFAULT_MODEL,
            &DEFAULT_POLICY_FILE,
            &legacy,
            vec![permit("HP", "research", None)],
            &people,
        )
        .await
        .unwrap();
        assert!(
            !a.decide(&people[0], &dataset(&["research"]), &p("research"), Utc::now())
                .unwrap()
                .allow
        );
    }

    #[test]
    fn policy_text_errors_name_the_line() {
        let err = check_policy_text(
            "f.csv",
            "# ok\np, a, b, c, research, 9999-12-31T23:59:59Z, allow\np, a, b\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("f.csv") && err.contains("line 3"), "{err}");
        assert!(check_policy_text("f", "p, a, b, c, Bad, 9999-12-31T23:59:59Z, allow").is_err());
        assert!(check_policy_text("f", "x, a").is_err());
        check_policy_text("default", DEFAULT_POLICY).unwrap();
    }
}
