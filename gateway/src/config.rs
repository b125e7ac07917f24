//! Gateway configuration. Precedence: defaults < TOML file (`--config`) < environment
//! (`PASSERELLE_DATA_DIR`, and clap's `env` on flags) < command-line flags. Unknown keys are
//! refused: a typo must fail, not be ignored.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Network settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerOptions {
    /// Arrow Flight listen address; port 0 picks a free port.
    pub flight_addr: String,
    /// REST listen address; port 0 picks a free port.
    pub http_addr: String,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            flight_addr: "127.0.0.1:50051".into(),
            http_addr: "127.0.0.1:8080".into(),
        }
    }
}

/// Ticket settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TicketOptions {
    /// Lifetime of a Flight ticket, in seconds.
    pub ttl_secs: u64,
}

impl Default for TicketOptions {
    fn default() -> Self {
        Self { ttl_secs: 600 }
    }
}

/// How opened sources are reused between requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceOptions {
    /// Seconds an opened source (its schema) is reused; `passerelle dataset refresh` or any
    /// metadata change re-opens it sooner. Files are listed at every scan regardless.
    pub cache_ttl_secs: u64,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self { cache_ttl_secs: 60 }
    }
}

/// Demo settings (`serve --demo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoOptions {
    /// Create the demo dataset on start.
    pub enabled: bool,
    /// Rows in the demo dataset.
    pub rows: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            enabled: false,
            rows: 1_000_000,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Data directory (database, keys, demo data).
    pub data_dir: Option<PathBuf>,
    /// This node's name in tickets, checkpoints and federation (default `passerelle-<key id>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Listen addresses.
    pub server: ServerOptions,
    /// Tickets.
    pub tickets: TicketOptions,
    /// Demo.
    pub demo: DemoOptions,
    /// Policy files (hot-reloaded when they change).
    pub policy: crate::node::PolicyOptions,
    /// Limits on governed SQL.
    pub sql: crate::sql::SqlOptions,
    /// How opened sources are reused.
    pub sources: SourceOptions,
    /// Rate and concurrency limits.
    pub limits: crate::limits::LimitOptions,
    /// How this node takes part in federated requests.
    pub federation: crate::federation::FederationOptions,
    /// Other member states' nodes, by node id (`[peers.<node id>]`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub peers: std::collections::BTreeMap<String, crate::federation::PeerOptions>,
    /// TLS for both listeners, and client certificates (`[tls]`); absent: plain TCP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::TlsOptions>,
    /// Object stores by name (`[stores.<name>]`); manifests refer to them by name.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub stores: std::collections::BTreeMap<String, passerelle_connectors::StoreOptions>,
    /// Storage locations by name (`[locations.<name>]`): where each controller's datasets may
    /// live. With any declared, datasets register only inside one naming their controller.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub locations: std::collections::BTreeMap<String, passerelle_connectors::LocationOptions>,
}

impl GatewayConfig {
    /// Loads a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            op: "read config",
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
            .map_err(|e| Error::invalid(format!("{}: {e}", path.display()), "see deploy/config/*.example.toml"))
    }

    /// Parses TOML.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| {
            Error::invalid(
                format!("config does not parse: {e}"),
                "see deploy/config/*.example.toml",
            )
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-field checks after all layers are merged.
    pub fn validate(&self) -> Result<()> {
        for (name, addr) in [
            ("server.flight_addr", &self.server.flight_addr),
            ("server.http_addr", &self.server.http_addr),
        ] {
            addr.parse::<std::net::SocketAddr>().map_err(|e| {
                Error::invalid(
                    format!("{name} = `{addr}` is not host:port ({e})"),
                    "write e.g. 127.0.0.1:50051",
                )
            })?;
        }
        if self.tickets.ttl_secs == 0 || self.tickets.ttl_secs > 86_400 {
            return Err(Error::invalid(
                "tickets.ttl_secs must be between 1 and 86400",
                "tickets are short-lived by design",
            ));
        }
        self.sql.validate()?;
        self.limits.validate()?;
        if let Some(id) = &self.node_id
            && (id.is_empty()
                || id.len() > 64
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(Error::invalid(
                format!("node_id `{id}` is not a short name"),
                "use letters, digits, '-', '_' or '.', at most 64 characters (e.g. gw-fr)",
            ));
        }
        crate::federation::Peers::new(&self.peers)?;
        self.federation.validate()?;
        for (name, store) in &self.stores {
            store.validate(name)?;
        }
        self.checked_locations()?;
        if self.demo.rows == 0 {
            return Err(Error::invalid("demo.rows must be at least 1", "the default is 1000000"));
        }
        Ok(())
    }

    /// The `[locations.*]` sections, checked, each object-store location naming a configured
    /// store of its kind.
    pub fn checked_locations(&self) -> Result<passerelle_connectors::Locations> {
        let locations = passerelle_connectors::Locations::new(self.locations.clone())?;
        for (name, loc) in &self.locations {
            for c in &loc.controllers {
                passerelle_policies::authz::check_policy_value(c)?;
            }
            let Some(store) = &loc.store else { continue };
            let Some(opts) = self.stores.get(store) else {
                return Err(Error::invalid(
                    format!("[locations.{name}] names store `{store}`, which is not configured"),
                    "declare it as [stores.<name>] or name a configured store",
                ));
            };
            let scheme = passerelle_connectors::CanonicalLocation::lexical(&loc.url)?.scheme();
            if !opts.reads(scheme) {
                return Err(Error::invalid(
                    format!(
                        "[locations.{name}]: store `{store}` cannot read `{}://` locations",
                        scheme.as_str()
                    ),
                    "name a store of the location's kind (s3, azure, gcs, http)",
                ));
            }
        }
        Ok(locations)
    }

    /// The effective configuration as TOML (there are no secrets in it to redact).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::Internal(format!("render config: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_typos_fail() {
        GatewayConfig::default().validate().unwrap();
        let cfg = GatewayConfig::from_toml("[server]\nflight_addr = \"0.0.0.0:0\"\n").unwrap();
        assert_eq!(cfg.server.flight_addr, "0.0.0.0:0");
        assert!(
            GatewayConfig::from_toml("[server]\nflight_adr = \"x\"\n")
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
        assert!(GatewayConfig::from_toml("[server]\nflight_addr = \"nope\"\n").is_err());
        let round = GatewayConfig::from_toml(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(round, cfg);
    }

    #[test]
    fn a_peer_names_a_member_state_code() {
        let peer = |state: &str| {
            format!(
                "[peers.gw-fr]\nmember_state = \"{state}\"\nflight_url = \"grpc://127.0.0.1:1\"\nkey = \"U3Qhgxjj-EdImgGnhqpGOGwOMB9jlTvZahG6Efp5BSY\"\n"
            )
        };
        GatewayConfig::from_toml(&peer("FR")).unwrap();
        for bad in ["France", "fr", "", "F/R"] {
            let e = GatewayConfig::from_toml(&peer(bad)).unwrap_err().to_string();
            assert!(e.contains("member state"), "{bad}: {e}");
        }
    }
}
