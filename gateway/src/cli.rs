//! The `passerelle` command line (a public contract: keep names stable).

use std::path::PathBuf;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use passerelle_policies::consent::ConsentEvent;
use passerelle_policies::{DatasetId, Permit, Principal, Purpose, Role};
use serde_json::json;

use crate::audit::AuditQuery;
use crate::config::GatewayConfig;
use crate::manifest::Manifest;
use crate::node::Node;

/// Passerelle: a policy-enforcing Arrow Flight gateway for member-state data.
#[derive(Debug, Parser)]
#[command(name = "passerelle", version, about)]
pub struct Cli {
    /// Data directory (database, keys, demo data); created on first use.
    /// (Default: the config file's `data_dir` where a command reads one, else `./passerelle-data`.)
    #[arg(long = "data-dir", global = true, env = "PASSERELLE_DATA_DIR")]
    pub data_dir_arg: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (Arrow Flight + REST).
    Serve(ServeArgs),
    /// Manage principals.
    #[command(subcommand)]
    Principal(PrincipalCmd),
    /// Manage datasets.
    #[command(subcommand)]
    Dataset(DatasetCmd),
    /// Manage data permits.
    #[command(subcommand)]
    Permit(PermitCmd),
    /// Load or withdraw consent.
    #[command(subcommand)]
    Consent(ConsentCmd),
    /// Read the audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Inspect and change access policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Show the node's verification key (as GET /api/v1/keys), or rotate the pseudonym key.
    Keys(KeysArgs),
    /// Other member states' nodes.
    #[command(subcommand)]
    Peer(PeerCmd),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
}

/// `keys [--config F] [rotate-pseudonym]`.
#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    /// The node's configuration (for `node_id`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Option<KeysCmd>,
}

/// `peer` subcommands.
#[derive(Debug, Subcommand)]
pub enum PeerCmd {
    /// The configured peers with their health (reachable, and answering with the configured key).
    List {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Replace the pseudonym master key; new pseudonyms carry the next version byte.
    RotatePseudonym,
}

/// `policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Explain a decision: rule, rows and columns withheld.
    Explain {
        #[arg(long)]
        principal: String,
        #[arg(long)]
        dataset: String,
        #[arg(long)]
        purpose: String,
        /// Configuration file naming policy files.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Forbid a purpose (and its sub-purposes) on a dataset; deny beats every permit.
    Deny {
        /// Dataset name, or `*` for all.
        #[arg(long)]
        dataset: String,
        #[arg(long)]
        purpose: String,
        /// Who: `*`, a member state `DE/*`, or an organisation `dkfz` / `DE/dkfz`.
        #[arg(long, default_value = "*")]
        domain: String,
        /// Expiry, RFC 3339.
        #[arg(long)]
        expires: Option<String>,
    },
    /// Add a raw policy line (`p, sub, dom, obj, act, exp, allow|deny`).
    Add {
        #[arg(long)]
        line: String,
    },
    /// List stored policy lines.
    List,
    /// Remove a stored policy line by id.
    Remove {
        #[arg(long)]
        id: i64,
    },
    /// Check the policy files, then make running servers re-read them and the stored lines now.
    Reload {
        /// Configuration file naming policy files.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `serve` flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Arrow Flight address (port 0 picks a free port).
    #[arg(long, env = "PASSERELLE_FLIGHT_ADDR")]
    pub flight_addr: Option<String>,
    /// REST address (port 0 picks a free port).
    #[arg(long, env = "PASSERELLE_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Create the demo dataset, consent, principals and permit if absent.
    #[arg(long)]
    pub demo: bool,
    /// Rows in the demo dataset.
    #[arg(long)]
    pub demo_rows: Option<usize>,
}

/// `principal` subcommands.
#[derive(Debug, Subcommand)]
pub enum PrincipalCmd {
    /// Add a principal and print its API key (shown once).
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        org: String,
        #[arg(long)]
        member_state: String,
        /// trainer, steward, auditor or admin.
        #[arg(long)]
        role: String,
    },
}

/// `dataset` subcommands.
#[derive(Debug, Subcommand)]
pub enum DatasetCmd {
    /// Register a dataset from a TOML manifest.
    Register {
        #[arg(long)]
        manifest: PathBuf,
        /// Configuration holding the `[stores.<name>]` the manifest names (object-store locations).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Make running servers re-open a dataset's source (new schema, new files) now.
    Refresh { name: String },
    /// List datasets.
    List,
    /// Show one dataset.
    Show { name: String },
}

/// `permit` subcommands.
#[derive(Debug, Subcommand)]
pub enum PermitCmd {
    /// Allow an organisation to use a dataset for a purpose (and its sub-purposes).
    Add {
        #[arg(long)]
        dataset: String,
        #[arg(long)]
        org: String,
        #[arg(long)]
        purpose: String,
        /// Expiry, RFC 3339.
        #[arg(long)]
        expires: Option<String>,
        /// The permit covers special-category (GDPR Art. 9) columns.
        #[arg(long)]
        special_category: bool,
    },
}

/// `consent` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConsentCmd {
    /// Import events from CSV (`subject_id,purpose,status,timestamp[,expires_at]`) or JSON Lines
    /// (`.jsonl`).
    Import {
        #[arg(long)]
        registry: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// Record a withdrawal now.
    Withdraw {
        #[arg(long)]
        registry: String,
        /// The subject id, byte for byte (`--subject -5` works: ids may start with a hyphen).
        #[arg(long, allow_hyphen_values = true)]
        subject: String,
        #[arg(long)]
        purpose: String,
    },
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// List entries, newest first.
    List {
        #[arg(long)]
        dataset: Option<String>,
        #[arg(long)]
        principal: Option<String>,
        /// allow or deny.
        #[arg(long)]
        decision: Option<String>,
        /// Entries at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Entries before this RFC 3339 time.
        #[arg(long)]
        until: Option<String>,
        /// Entries with a smaller id (the next page).
        #[arg(long)]
        before_id: Option<i64>,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Recompute the hash chain; exits non-zero naming the first entry that does not match.
    Verify {
        /// Also check a checkpoint saved earlier (`audit checkpoint`): the chain must still pass
        /// through it and it must carry this node's signature.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Print a signed checkpoint (entry count and head hash) to keep outside the node.
    Checkpoint {
        /// The node's configuration (for `node_id`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the effective configuration.
    Show {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn print(json_mode: bool, value: serde_json::Value, human: impl FnOnce() -> String) {
    if json_mode {
        println!("{value}");
    } else {
        println!("{}", human());
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./passerelle-data")
}

impl Cli {
    /// The data directory of commands that read no config file.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir_arg.clone().unwrap_or_else(default_data_dir)
    }
}

/// Merges defaults, the config file, and flags.
pub fn effective_config(
    cli: &Cli,
    config: Option<&PathBuf>,
    serve: Option<&ServeArgs>,
) -> anyhow::Result<GatewayConfig> {
    let mut cfg = match config {
        Some(p) => GatewayConfig::load(p).with_context(|| format!("loading {}", p.display()))?,
        None => GatewayConfig::default(),
    };
    cfg.data_dir = Some(
        cli.data_dir_arg
            .clone()
            .or(cfg.data_dir)
            .unwrap_or_else(default_data_dir),
    );
    if let Some(s) = serve {
        if let Some(a) = &s.flight_addr {
            cfg.server.flight_addr = a.clone();
        }
        if let Some(a) = &s.http_addr {
            cfg.server.http_addr = a.clone();
        }
        if s.demo {
            cfg.demo.enabled = true;
        }
        if let Some(n) = s.demo_rows {
            cfg.demo.rows = n;
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

async fn run_policy(cli: &Cli, node: &Node, cmd: &PolicyCmd) -> anyhow::Result<()> {
    let j = cli.json;
    match cmd {
        PolicyCmd::Explain {
            principal,
            dataset,
            purpose,
            config,
        } => {
            let cfg = effective_config(cli, config.as_ref(), None)?;
            let node = Node::open_with(&cfg.data_dir.clone().unwrap_or_else(default_data_dir), cfg.policy).await?;
            node.refresh().await.context("loading policy and consent")?;
            let e = crate::explain::explain(&node, None, principal, dataset, &Purpose::parse(purpose)?).await?;
            print(j, serde_json::to_value(&e)?, || e.render());
        }
        PolicyCmd::Deny {
            dataset,
            purpose,
            domain,
            expires,
        } => {
            let line = crate::node::deny_line(dataset, purpose, domain, expires.as_deref())?;
            let id = node.meta.add_rule(&line, "cli").await?;
            print(j, json!({ "id": id, "line": line }), || {
                format!("rule {id} added: {line}")
            });
        }
        PolicyCmd::Add { line } => {
            passerelle_policies::authz::check_policy_text("--line", line)?;
            let id = node.meta.add_rule(line.trim(), "cli").await?;
            print(j, json!({ "id": id, "line": line.trim() }), || {
                format!("rule {id} added")
            });
        }
        PolicyCmd::List => {
            let rules = node.meta.rules().await?;
            let v: Vec<_> = rules
                .iter()
                .map(|(id, line, by)| json!({ "id": id, "line": line, "created_by": by }))
                .collect();
            print(j, json!(v), || {
                rules
                    .iter()
                    .map(|(id, l, by)| format!("{id}\t{l}\t({by})"))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        PolicyCmd::Remove { id } => {
            if !node.meta.remove_rule(*id).await? {
                bail!("no stored policy line with id {id}");
            }
            print(j, json!({ "removed": id }), || format!("rule {id} removed"));
        }
        PolicyCmd::Reload { config } => {
            let cfg = effective_config(cli, config.as_ref(), None)?;
            let checked = Node::open_with(&cfg.data_dir.clone().unwrap_or_else(default_data_dir), cfg.policy).await?;
            let (version, model, policy) = checked
                .check_policy_files()
                .await
                .context("servers would refuse these policy files and keep the previous policy; nothing reloaded")?;
            node.meta.request_reload().await?;
            // Servers load the files their own configuration names: say which were checked here.
            print(
                j,
                json!({ "reload": "requested", "policy_version": version, "model": model, "policy": policy }),
                || format!("checked {model} and {policy} (policy {version}); running servers reload within a second"),
            );
        }
    }
    Ok(())
}

/// Runs one non-serve command against the data directory.
pub async fn run_admin(cli: &Cli) -> anyhow::Result<()> {
    let j = cli.json;
    if let Command::Config(ConfigCmd::Show { config }) = &cli.command {
        let cfg = effective_config(cli, config.as_ref(), None)?;
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    let node = Node::open(&cli.data_dir())
        .await
        .with_context(|| format!("opening data directory {}", cli.data_dir().display()))?;
    match &cli.command {
        Command::Serve(_) | Command::Config(_) => bail!("not an admin command"),
        Command::Policy(cmd) => run_policy(cli, &node, cmd).await?,
        Command::Keys(KeysArgs { config, cmd: None }) => {
            let cfg = effective_config(cli, config.as_ref(), None)?;
            let node_id = cfg.node_id.clone().unwrap_or_else(|| node.node_id().to_string());
            println!("{}", json!({ "node_id": node_id, "keys": [node.node_key.jwk()] }));
        }
        Command::Peer(PeerCmd::List { config }) => {
            let cfg = effective_config(cli, config.as_ref(), None)?;
            let peers = crate::federation::Peers::new(&cfg.peers)?;
            let tls = cfg.tls.as_ref().map(|t| crate::federation::ClientTls {
                cert: t.cert.clone(),
                key: t.key.clone(),
            });
            let mut out = Vec::new();
            for p in peers.iter() {
                out.push(crate::federation::peer_health(p, tls.as_ref()).await);
            }
            print(j, serde_json::Value::Array(out.clone()), || {
                out.iter()
                    .map(|p| {
                        format!(
                            "{}\t{}\t{}\t{}\tkey_matches={}",
                            p["node"].as_str().unwrap_or(""),
                            p["member_state"].as_str().unwrap_or(""),
                            p["flight_url"].as_str().unwrap_or(""),
                            p["status"].as_str().unwrap_or(""),
                            p["key_matches"]
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Keys(KeysArgs {
            cmd: Some(KeysCmd::RotatePseudonym),
            ..
        }) => {
            let v = crate::node::rotate_pseudonym_key(&cli.data_dir())?;
            print(j, json!({ "pseudonym_key_version": v }), || {
                format!("pseudonym key rotated to version {v}; running servers use it within a second")
            });
        }
        Command::Principal(PrincipalCmd::Add {
            name,
            org,
            member_state,
            role,
        }) => {
            let p = Principal {
                name: name.clone(),
                org: org.clone(),
                member_state: member_state.clone(),
                role: Role::parse(role)?,
            };
            let key = node.add_principal(&p).await?;
            print(
                j,
                json!({ "name": name, "org": org, "member_state": member_state, "role": role, "key": key }),
                || format!("principal `{name}` added.\nAPI key (shown once, store it now): {key}"),
            );
        }
        Command::Dataset(DatasetCmd::Register { manifest, config }) => {
            let text = std::fs::read_to_string(manifest).with_context(|| format!("reading {}", manifest.display()))?;
            let m = Manifest::from_toml(&text)?;
            let cfg = effective_config(cli, config.as_ref(), None)?;
            let locations = cfg.checked_locations()?;
            let stores = passerelle_connectors::Stores::new(cfg.stores);
            let m = node
                .register_dataset_with(&m, &stores, &locations, crate::node::Registrar::Operator)
                .await?;
            print(j, serde_json::to_value(&m)?, || {
                format!(
                    "dataset `{}` registered ({} columns classified)",
                    m.name,
                    m.columns.len()
                )
            });
        }
        Command::Dataset(DatasetCmd::Refresh { name }) => {
            if !node.meta.datasets().await?.iter().any(|m| m.name.as_str() == name) {
                bail!("dataset `{name}` is not registered; see `passerelle dataset list`");
            }
            node.meta.touch().await?;
            print(j, json!({ "refreshed": name }), || {
                format!("dataset `{name}`: running servers re-open its source within a second")
            });
        }
        Command::Dataset(DatasetCmd::List) => {
            let all = node.meta.datasets().await?;
            print(j, serde_json::to_value(&all)?, || {
                all.iter()
                    .map(|m| format!("{}\t{}\t{}\t{}", m.name, m.member_state, m.controller, m.location))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Dataset(DatasetCmd::Show { name }) => {
            let all = node.meta.datasets().await?;
            let Some(m) = all.into_iter().find(|m| m.name.as_str() == name) else {
                bail!("dataset `{name}` not found")
            };
            print(j, serde_json::to_value(&m)?, || {
                toml::to_string_pretty(&m).unwrap_or_default()
            });
        }
        Command::Permit(PermitCmd::Add {
            dataset,
            org,
            purpose,
            expires,
            special_category,
        }) => {
            let expires_at: Option<DateTime<Utc>> = expires
                .as_deref()
                .map(|e| DateTime::parse_from_rfc3339(e).map(|t| t.with_timezone(&Utc)))
                .transpose()
                .context("--expires must be RFC 3339, e.g. 2027-01-01T00:00:00Z")?;
            let purpose = Purpose::parse(purpose)?;
            let all = node.meta.datasets().await?;
            let Some(m) = all.iter().find(|m| m.name.as_str() == dataset) else {
                bail!("dataset `{dataset}` not found")
            };
            if !m.policy().accepts_permit_for(&purpose) {
                bail!(
                    "dataset `{dataset}` is not registered for purpose `{purpose}`; permit one of its purposes, a sub-purpose or an ancestor of one"
                );
            }
            node.add_permit(&Permit {
                dataset: DatasetId::parse(dataset)?,
                org: org.clone(),
                purpose: purpose.clone(),
                expires: expires_at,
                special_category: *special_category,
            })
            .await?;
            print(
                j,
                json!({ "dataset": dataset, "org": org, "purpose": purpose.to_string(), "expires": expires }),
                || format!("permit added: `{org}` may use `{dataset}` for `{purpose}`"),
            );
        }
        Command::Consent(ConsentCmd::Import { registry, file }) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let events = crate::consent_file::parse_file(file, &text)?;
            let started = std::time::Instant::now();
            let version = node.append_consent(registry, &events).await?;
            print(
                j,
                json!({ "registry": registry, "imported": events.len(), "consent_version": version }),
                || {
                    format!(
                        "imported {} events into `{registry}` in {:.2?} (consent version {version})",
                        events.len(),
                        started.elapsed()
                    )
                },
            );
        }
        Command::Consent(ConsentCmd::Withdraw {
            registry,
            subject,
            purpose,
        }) => {
            let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let event = ConsentEvent::parse(subject, purpose, "withdrawn", &now)?;
            let version = node.append_consent(registry, std::slice::from_ref(&event)).await?;
            print(
                j,
                json!({ "registry": registry, "subject": subject, "purpose": purpose, "consent_version": version }),
                || format!("withdrawal recorded (consent version {version}); running servers apply it within a second"),
            );
        }
        Command::Audit(AuditCmd::Verify { checkpoint }) => {
            let v = match checkpoint {
                None => node.audit.verify().await?,
                Some(path) => {
                    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                    let cp: crate::audit::Checkpoint = serde_json::from_str(&text).with_context(|| {
                        format!("{} is not a checkpoint (JSON from `audit checkpoint`)", path.display())
                    })?;
                    node.audit.verify_checkpoint(&cp, &node.node_key).await?
                }
            };
            print(j, serde_json::to_value(&v)?, || {
                if v.ok {
                    format!(
                        "audit chain verified: {} entries, {} links, head {}",
                        v.entries, v.links, v.head
                    )
                } else {
                    format!(
                        "audit chain BROKEN: {}",
                        v.reason.as_deref().unwrap_or("unknown reason")
                    )
                }
            });
            if !v.ok {
                match v.first_broken_entry {
                    Some(id) => anyhow::bail!("audit verification failed at entry {id}"),
                    None => anyhow::bail!("audit verification failed"),
                }
            }
        }
        Command::Audit(AuditCmd::Checkpoint { config }) => {
            let cfg = effective_config(cli, config.as_ref(), None)?;
            let node_id = cfg.node_id.clone().unwrap_or_else(|| node.node_id().to_string());
            let cp = node.audit.checkpoint(&node_id, &node.node_key).await?;
            println!("{}", serde_json::to_string_pretty(&cp)?);
        }
        Command::Audit(AuditCmd::List {
            dataset,
            principal,
            decision,
            since,
            until,
            before_id,
            limit,
        }) => {
            let q = AuditQuery {
                dataset: dataset.clone(),
                principal: principal.clone(),
                decision: decision.clone(),
                since: since.clone(),
                until: until.clone(),
                before_id: *before_id,
                limit: Some(*limit),
            };
            q.validate()?;
            let rows = node.audit.list(&q).await?;
            print(j, serde_json::to_value(&rows)?, || {
                rows.iter()
                    .map(|r| {
                        format!(
                            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\tsent={}\twithheld={}\t{}",
                            r.id,
                            r.time,
                            r.principal,
                            r.action,
                            r.dataset,
                            r.purpose,
                            r.decision,
                            r.status,
                            r.rows_sent,
                            r.rows_withheld,
                            r.reason
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}
