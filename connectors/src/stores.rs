//! Object stores: `[stores.<name>]` sections of the configuration become `object_store` clients,
//! registered in one registry that every DataFusion session of the node shares (no process-wide
//! globals). Manifests name a store; they never carry credentials.
//!
//! ```toml
//! [stores.lake]
//! kind = "s3"
//! endpoint = "https://s3.eu-west-3.amazonaws.com"
//! region = "eu-west-3"
//! access_key_id = "AKIA..."
//! secret_access_key = "env:LAKE_SECRET"   # or "file:/run/secrets/lake", or the value itself
//! ```
//!
//! Secrets are resolved when a store is first used, are never logged, and are replaced by
//! `<redacted>` wherever the configuration is printed.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::error::{Error, Result};
use crate::spec::SourceSpec;

/// The kind of object store a section configures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Amazon S3 or an S3-compatible server (`s3://bucket/...`).
    S3,
    /// Azure Blob Storage (`az://container/...`, `abfs://...`).
    Azure,
    /// Google Cloud Storage (`gs://bucket/...`).
    Gcs,
    /// Plain HTTP(S) with range requests (`https://host/...`).
    Http,
}

impl StoreKind {
    fn schemes(self) -> &'static [&'static str] {
        match self {
            StoreKind::S3 => &["s3", "s3a"],
            StoreKind::Azure => &["az", "azure", "abfs", "abfss", "adl"],
            StoreKind::Gcs => &["gs", "gcs"],
            StoreKind::Http => &["http", "https"],
        }
    }
}

/// A secret in the configuration: `env:NAME`, `file:/path` or the value itself. Serialised as
/// written for references, and as `<redacted>` for literal values.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// A secret from its configuration text.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    fn is_reference(&self) -> bool {
        self.0.starts_with("env:") || self.0.starts_with("file:")
    }

    /// The value, read from the environment or a file if the text is a reference.
    fn resolve(&self, store: &str) -> Result<String> {
        let missing = |reason: String| Error::StoreConfig {
            store: store.to_string(),
            reason,
        };
        if let Some(var) = self.0.strip_prefix("env:") {
            return std::env::var(var).map_err(|_| missing(format!("environment variable `{var}` is not set")));
        }
        if let Some(path) = self.0.strip_prefix("file:") {
            return std::fs::read_to_string(path)
                .map(|s| s.trim_end().to_string())
                .map_err(|e| missing(format!("secret file `{path}` cannot be read: {}", e.kind())));
        }
        Ok(self.0.clone())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_reference() {
            write!(f, "{:?}", self.0)
        } else {
            f.write_str("\"<redacted>\"")
        }
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.is_reference() {
            s.serialize_str(&self.0)
        } else {
            s.serialize_str("<redacted>")
        }
    }
}

/// One `[stores.<name>]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreOptions {
    /// `s3`, `azure`, `gcs` or `http`.
    pub kind: StoreKind,
    /// Endpoint URL (S3-compatible servers, Azure account URLs and emulators, GCS base URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region (S3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Access key id (S3) or storage account name (Azure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// Secret access key (S3) or account key (Azure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<Secret>,
    /// Service-account key file (GCS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_path: Option<String>,
    /// Allow plain `http://` endpoints (test servers only).
    #[serde(default)]
    pub allow_http: bool,
    /// Timeout of each request, in seconds (default 30). Transient errors are retried with
    /// exponential backoff by `object_store`.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Further `object_store` options for this kind, passed as they are (e.g.
    /// `aws_virtual_hosted_style_request = "true"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, Secret>,
}

fn default_timeout() -> u64 {
    30
}

impl StoreOptions {
    /// Whether this store reads locations of `scheme`.
    pub fn reads(&self, scheme: crate::location::Scheme) -> bool {
        self.kind.schemes().contains(&scheme.as_str())
    }

    /// Refuses fields that do not apply to the store's kind: a field silently ignored (a GCS
    /// `endpoint`, an Azure `region`) would send requests somewhere the operator did not mean.
    pub fn validate(&self, name: &str) -> Result<()> {
        let applies: &[&str] = match self.kind {
            StoreKind::S3 => &["endpoint", "region", "access_key_id", "secret_access_key"],
            StoreKind::Azure => &["endpoint", "access_key_id", "secret_access_key"],
            StoreKind::Gcs => &["endpoint", "service_account_path"],
            StoreKind::Http => &[],
        };
        let set = [
            ("endpoint", self.endpoint.is_some()),
            ("region", self.region.is_some()),
            ("access_key_id", self.access_key_id.is_some()),
            ("secret_access_key", self.secret_access_key.is_some()),
            ("service_account_path", self.service_account_path.is_some()),
        ];
        match set.iter().find(|(field, on)| *on && !applies.contains(field)) {
            Some((field, _)) => Err(Error::StoreConfig {
                store: name.to_string(),
                reason: format!("`{field}` does not apply to a {:?} store; remove it", self.kind),
            }),
            None => Ok(()),
        }
    }

    /// The `object_store` builder options, secrets resolved.
    fn builder_options(&self, name: &str) -> Result<Vec<(String, String)>> {
        self.validate(name)?;
        let mut out = vec![
            ("allow_http".to_string(), self.allow_http.to_string()),
            ("timeout".to_string(), format!("{}s", self.timeout_secs.max(1))),
        ];
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                out.push((k.to_string(), v));
            }
        };
        let secret = self.secret_access_key.as_ref().map(|s| s.resolve(name)).transpose()?;
        match self.kind {
            StoreKind::S3 => {
                put("aws_endpoint", self.endpoint.clone());
                put("aws_region", self.region.clone());
                put("aws_access_key_id", self.access_key_id.clone());
                put("aws_secret_access_key", secret);
            }
            StoreKind::Azure => {
                put("azure_storage_endpoint", self.endpoint.clone());
                put("azure_storage_account_name", self.access_key_id.clone());
                put("azure_storage_account_key", secret);
            }
            StoreKind::Gcs => {
                put("google_base_url", self.endpoint.clone());
                put("google_service_account", self.service_account_path.clone());
            }
            StoreKind::Http => {}
        }
        for (k, v) in &self.options {
            out.push((k.clone(), v.resolve(name)?));
        }
        Ok(out)
    }
}

/// The node's object stores: configurations by name, and the registry sessions read from.
#[derive(Debug, Clone)]
pub struct Stores {
    configs: Arc<BTreeMap<String, StoreOptions>>,
    registry: Arc<DefaultObjectStoreRegistry>,
    /// Which store serves each bucket: the registry keys clients by bucket, so one bucket can
    /// only be read with one set of credentials.
    owners: Arc<std::sync::Mutex<BTreeMap<String, String>>>,
}

impl Default for Stores {
    fn default() -> Self {
        Self::new(BTreeMap::new())
    }
}

impl Stores {
    /// Stores from the configuration's `[stores]` table.
    pub fn new(configs: BTreeMap<String, StoreOptions>) -> Self {
        let registry = DefaultObjectStoreRegistry::new();
        // Local files are read through links never (see `local`), replacing DataFusion's default.
        if let Ok(file) = Url::parse("file://") {
            registry.register_store(&file, Arc::new(crate::local::ConfinedFileSystem::default()));
        }
        Self {
            configs: Arc::new(configs),
            registry: Arc::new(registry),
            owners: Arc::default(),
        }
    }

    /// The registry to build every session's runtime with.
    pub fn registry(&self) -> Arc<dyn ObjectStoreRegistry> {
        Arc::clone(&self.registry) as Arc<dyn ObjectStoreRegistry>
    }

    /// The same configuration with an empty registry: registration validates a source through
    /// it, so a refused registration leaves nothing behind in the node's shared registry.
    pub fn isolated(&self) -> Self {
        Self::new(self.configs.as_ref().clone())
    }

    /// Makes the store a source reads from available to every session: checks that the
    /// manifest names a configured store of the location's kind and registers its client for
    /// the location's bucket (once). Local files need no store.
    pub fn prepare(&self, spec: &SourceSpec) -> Result<()> {
        let location = spec.normalised_location()?;
        let url = Url::parse(&location).map_err(|e| Error::InvalidLocation {
            location: location.clone(),
            reason: e.to_string(),
        })?;
        if url.scheme() == "file" {
            if let Some(store) = &spec.store {
                return Err(Error::InvalidLocation {
                    location,
                    reason: format!("local files need no store; remove `store = \"{store}\"`"),
                });
            }
            return Ok(());
        }
        let name = spec.store.as_deref().ok_or_else(|| Error::InvalidLocation {
            location: location.clone(),
            reason: "name the store that holds it: `store = \"<name>\"`, a [stores.<name>] section of the node's configuration".into(),
        })?;
        let opts = self.configs.get(name).ok_or_else(|| Error::StoreConfig {
            store: name.to_string(),
            reason: "no such [stores.<name>] section in this node's configuration".into(),
        })?;
        if !opts.kind.schemes().contains(&url.scheme()) {
            return Err(Error::StoreConfig {
                store: name.to_string(),
                reason: format!(
                    "it is a {:?} store and cannot read `{}://` locations",
                    opts.kind,
                    url.scheme()
                ),
            });
        }
        // Keyed like the registry: scheme, host and port.
        let bucket = format!(
            "{}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.port().map(|p| format!(":{p}")).unwrap_or_default()
        );
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        match owners.get(&bucket) {
            Some(owner) if owner == name => return Ok(()),
            Some(owner) => {
                return Err(Error::StoreConfig {
                    store: name.to_string(),
                    reason: format!("`{bucket}` is already read through store `{owner}`; use that store for it"),
                });
            }
            None => {}
        }
        let (store, _) = object_store::parse_url_opts(&url, opts.builder_options(name)?).map_err(|e| {
            // object_store's configuration errors name keys, never values.
            Error::StoreConfig {
                store: name.to_string(),
                reason: e.to_string(),
            }
        })?;
        self.registry.register_store(&url, Arc::from(store));
        owners.insert(bucket, name.to_string());
        tracing::info!(
            store = name,
            scheme = url.scheme(),
            host = url.host_str().unwrap_or(""),
            "object store registered"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Format;

    fn s3() -> StoreOptions {
        StoreOptions {
            kind: StoreKind::S3,
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            access_key_id: Some("id".into()),
            secret_access_key: Some(Secret::new("super-secret-value")),
            service_account_path: None,
            allow_http: true,
            timeout_secs: 5,
            options: BTreeMap::new(),
        }
    }

    #[test]
    fn secrets_never_print() {
        let o = s3();
        assert!(!format!("{o:?}").contains("super-secret-value"));
        let json = serde_json::to_string(&o).unwrap_or_default();
        assert!(
            !json.contains("super-secret-value") && json.contains("<redacted>"),
            "{json}"
        );
        let by_ref = Secret::new("env:LAKE_SECRET");
        assert!(format!("{by_ref:?}").contains("env:LAKE_SECRET"));
    }

    #[test]
    fn stores_are_named_checked_and_registered_once() {
        let stores = Stores::new([("lake".to_string(), s3())].into_iter().collect());
        let spec = |loc: &str, store: Option<&str>| SourceSpec {
            location: loc.into(),
            format: Format::Parquet,
            store: store.map(str::to_string),
            csv: None,
        };
        stores.prepare(&spec("s3://bucket/p/", Some("lake"))).unwrap();
        stores.prepare(&spec("s3://bucket/q/", Some("lake"))).unwrap();
        let url = Url::parse("s3://bucket/p/").unwrap();
        assert!(stores.registry().get_store(&url).is_ok());
        let e = stores.prepare(&spec("s3://bucket/p/", None)).unwrap_err().to_string();
        assert!(e.contains("store = "), "{e}");
        let e = stores
            .prepare(&spec("s3://bucket/p/", Some("nope")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`nope`"), "{e}");
        let e = stores
            .prepare(&spec("gs://bucket/p/", Some("lake")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read `gs://`"), "{e}");
        stores.prepare(&spec("/abs/file.parquet", None)).unwrap();
        // A second store may not take over a bucket the first one serves.
        let two = Stores::new(
            [("lake".to_string(), s3()), ("other".to_string(), s3())]
                .into_iter()
                .collect(),
        );
        two.prepare(&spec("s3://bucket/p/", Some("lake"))).unwrap();
        let e = two
            .prepare(&spec("s3://bucket/q/", Some("other")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("already read through store `lake`"), "{e}");
    }
}
