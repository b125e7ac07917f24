//! Canonical locations, and the storage locations a node's configuration gives to controllers.
//!
//! One file or prefix has many spellings (`/srv/a/../b`, `file:///proc/self/root/srv/b`, a
//! symlink, `s3a://B/%70`, `abfss://c/…`): comparing location text lets a steward register
//! another controller's data under a weaker policy. Every location is therefore reduced to one
//! [`CanonicalLocation`] before it is checked, stored, compared or audited:
//!
//! - files: resolved on disk (symlinks, `.`, `..`, repeated `/`), pseudo-filesystems refused;
//! - object stores: one scheme per kind (`s3`, `az`, `gs`), bucket in lower case, the path
//!   percent-decoded as the reader decodes it, empty segments dropped, `.`/`..` refused;
//! - http(s): host in lower case, default port dropped, the path as above.
//!
//! [`Locations`] holds the `[locations.<name>]` sections: with any declared, a dataset registers
//! only inside one naming its controller (and the store that location names).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where canonical locations are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    /// Local files.
    File,
    /// S3 and S3-compatible servers (`s3`, `s3a`).
    S3,
    /// Azure Blob Storage (`az`, `azure`, `abfs`, `abfss`, `adl`).
    Azure,
    /// Google Cloud Storage (`gs`, `gcs`).
    Gcs,
    /// Plain HTTP.
    Http,
    /// HTTPS.
    Https,
}

impl Scheme {
    fn parse(scheme: &str) -> Option<Self> {
        Some(match scheme {
            "file" => Self::File,
            "s3" | "s3a" => Self::S3,
            "az" | "azure" | "abfs" | "abfss" | "adl" => Self::Azure,
            "gs" | "gcs" => Self::Gcs,
            "http" => Self::Http,
            "https" => Self::Https,
            _ => return None,
        })
    }

    /// The one spelling stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::S3 => "s3",
            Self::Azure => "az",
            Self::Gcs => "gs",
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// A location in its one canonical spelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalLocation {
    scheme: Scheme,
    /// Bucket, container or `host[:port]`; empty for files.
    authority: String,
    /// Decoded path segments, without the glob.
    segments: Vec<String>,
    /// A glob over file names in the last segment (`visits-*.csv`).
    glob: Option<String>,
    /// Whether the location names a directory or prefix (written with a trailing `/`).
    prefix: bool,
}

/// Path prefixes of pseudo-filesystems: reading them reveals the node's memory, processes and
/// devices, or reaches any file again through `/proc/<pid>/root`.
const PSEUDO_ROOTS: &[&str] = &["/proc", "/sys", "/dev"];

fn has_glob(segment: &str) -> bool {
    segment.contains(['*', '?', '['])
}

impl CanonicalLocation {
    /// Canonicalises a location without touching storage: the path is resolved lexically
    /// (`.`, `..`, repeated `/`), so a file location may still pass through symlinks.
    /// [`CanonicalLocation::resolve`] completes it for files.
    pub fn lexical(location: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidLocation {
            location: location.to_string(),
            reason: reason.to_string(),
        };
        if location.is_empty() || location != location.trim() {
            return Err(invalid("write the location without surrounding spaces"));
        }
        if location.chars().any(char::is_control) {
            return Err(invalid("control characters are not allowed"));
        }
        let (scheme, rest) = if location.starts_with('/') {
            (Scheme::File, location)
        } else {
            let (scheme, rest) = location.split_once("://").ok_or_else(|| {
                invalid("use an absolute path or a URL such as file:///abs/path or s3://bucket/prefix/")
            })?;
            let parsed = Scheme::parse(&scheme.to_ascii_lowercase()).ok_or_else(|| {
                invalid(&format!(
                    "scheme `{scheme}` is not supported; use file://, s3://, gs://, az:// (or abfs://) or https://"
                ))
            })?;
            (parsed, rest)
        };
        if !location.starts_with('/') && rest.contains(['?', '#']) {
            return Err(invalid("a location URL has no query or fragment (`?`, `#`)"));
        }
        let (authority, path) = match scheme {
            Scheme::File => {
                let path = match location.strip_prefix("file://") {
                    Some(p) if p.starts_with('/') => p,
                    Some(_) => return Err(invalid("file URLs must be absolute: file:///abs/path")),
                    None if location.starts_with('/') => location,
                    None => return Err(invalid("file URLs must be absolute: file:///abs/path")),
                };
                (String::new(), path)
            }
            _ => {
                let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
                if authority.is_empty() {
                    return Err(invalid(&format!(
                        "name the bucket or host: {}://<bucket>/<prefix>/",
                        scheme.as_str()
                    )));
                }
                if authority.contains('@') {
                    return Err(invalid(
                        "credentials or accounts do not go in a location (`user@`, `container@account`): \
                         write az://<container>/<path>, the store names the account",
                    ));
                }
                (canonical_authority(scheme, authority).map_err(|r| invalid(&r))?, path)
            }
        };
        // A URL path is read percent-decoded (object_store's `Path::from_url_path`), so decode
        // it here, as the reader will: `%61php` is `aphp`. An absolute path is read as it is.
        let decoded = match (scheme, location.starts_with('/')) {
            (Scheme::File, true) => path.to_string(),
            _ => percent_encoding::percent_decode_str(path)
                .decode_utf8()
                .map_err(|_| invalid("the path is not UTF-8 once percent-decoded"))?
                .into_owned(),
        };
        if decoded.chars().any(char::is_control) {
            return Err(invalid("control characters are not allowed"));
        }
        let prefix = decoded.ends_with('/') || decoded.is_empty();
        let mut raw: Vec<&str> = decoded.split('/').filter(|s| !s.is_empty()).collect();
        let glob = match raw.last() {
            Some(last) if has_glob(last) => {
                let g = (*last).to_string();
                raw.pop();
                Some(g)
            }
            _ => None,
        };
        if raw.iter().any(|s| has_glob(s)) {
            return Err(invalid(
                "a glob may only appear in the file name, e.g. s3://bucket/exports/*.parquet",
            ));
        }
        let mut segments: Vec<String> = Vec::with_capacity(raw.len());
        for s in raw {
            match (s, scheme) {
                (".", Scheme::File) => {}
                ("..", Scheme::File) => {
                    segments.pop();
                }
                // Object stores have no directories to walk up: `..` would be a key of its own
                // to some readers and the parent to others.
                (".." | ".", _) => return Err(invalid("`.` and `..` are not allowed in an object-store path")),
                _ => segments.push(s.to_string()),
            }
        }
        Ok(Self {
            scheme,
            authority,
            segments,
            prefix: prefix && glob.is_none(),
            glob,
        })
    }

    /// Resolves a file location on disk (symlinks included) and refuses pseudo-filesystems;
    /// other locations are returned as they are. The file or directory must exist.
    pub fn resolve(self) -> Result<Self> {
        if self.scheme != Scheme::File {
            return Ok(self);
        }
        let shown = self.to_string();
        let on_disk = self.fs_path();
        let resolved = std::fs::canonicalize(&on_disk).map_err(|e| Error::InvalidLocation {
            location: shown.clone(),
            reason: format!("cannot be read: {}", e.kind()),
        })?;
        refuse_pseudo_filesystem(&resolved).map_err(|reason| Error::InvalidLocation {
            location: shown.clone(),
            reason,
        })?;
        let segments = path_segments(&resolved).ok_or_else(|| Error::InvalidLocation {
            location: shown,
            reason: "the resolved path is not UTF-8".into(),
        })?;
        Ok(Self { segments, ..self })
    }

    /// Both steps: [`CanonicalLocation::lexical`] then [`CanonicalLocation::resolve`].
    pub fn canonicalise(location: &str) -> Result<Self> {
        Self::lexical(location)?.resolve()
    }

    /// The scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The path on disk this file location names (its directory for a glob).
    fn fs_path(&self) -> PathBuf {
        let mut p = PathBuf::from("/");
        p.extend(&self.segments);
        p
    }

    /// The segments a location can read: a prefix's, a file's own, a glob's directory.
    fn extent(&self) -> &[String] {
        &self.segments
    }

    /// Whether everything `other` can read lies under this location, read as a prefix.
    pub fn contains(&self, other: &CanonicalLocation) -> bool {
        self.scheme == other.scheme
            && self.authority == other.authority
            && self.glob.is_none()
            && other.extent().starts_with(self.extent())
    }

    /// Whether two locations can read a common object.
    pub fn overlaps(&self, other: &CanonicalLocation) -> bool {
        self.scheme == other.scheme
            && self.authority == other.authority
            && (other.extent().starts_with(self.extent()) || self.extent().starts_with(other.extent()))
    }

    /// `scheme://authority`, the unit one store reads with one set of credentials.
    pub fn bucket(&self) -> String {
        format!("{}://{}", self.scheme.as_str(), self.authority)
    }
}

impl fmt::Display for CanonicalLocation {
    /// The stored spelling: a URL whose path segments are percent-encoded, so that reading it
    /// (which decodes) names exactly these segments.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
            .add(b' ')
            .add(b'"')
            .add(b'#')
            .add(b'%')
            .add(b'/')
            .add(b'<')
            .add(b'>')
            .add(b'?')
            .add(b'`')
            .add(b'{')
            .add(b'}')
            .add(b'\\')
            .add(b'^')
            .add(b'|');
        write!(f, "{}://{}", self.scheme.as_str(), self.authority)?;
        for s in &self.segments {
            write!(f, "/{}", percent_encoding::utf8_percent_encode(s, SEGMENT))?;
        }
        match &self.glob {
            Some(g) => write!(f, "/{g}"),
            None if self.prefix => f.write_str("/"),
            None => Ok(()),
        }
    }
}

fn canonical_authority(scheme: Scheme, authority: &str) -> std::result::Result<String, String> {
    match scheme {
        Scheme::Http | Scheme::Https => {
            let url = url::Url::parse(&format!("{}://{authority}/", scheme.as_str())).map_err(|e| e.to_string())?;
            let host = url.host_str().ok_or("name the host")?;
            Ok(match url.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_string(),
            })
        }
        _ => {
            let bucket = authority.to_ascii_lowercase();
            let valid = bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if valid {
                Ok(bucket)
            } else {
                Err(format!("`{authority}` is not a bucket or container name"))
            }
        }
    }
}

fn path_segments(path: &Path) -> Option<Vec<String>> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_str().map(str::to_string)),
            _ => None,
        })
        .collect()
}

fn refuse_pseudo_filesystem(resolved: &Path) -> std::result::Result<(), String> {
    if PSEUDO_ROOTS.iter().any(|root| resolved.starts_with(root)) {
        return Err(format!(
            "`{}` is a pseudo-filesystem of the node (process, device or kernel state), not data",
            resolved.display()
        ));
    }
    Ok(())
}

/// Whether a file the reader is about to open is exactly where its listed path says: no symlink
/// anywhere on the way, and not a pseudo-filesystem. Datasets are stored canonical, so a file
/// that passes lies inside its dataset's location, whatever links appear there later.
pub fn is_plain_file_path(path: &Path) -> bool {
    match std::fs::canonicalize(path) {
        Ok(real) => real == path && refuse_pseudo_filesystem(&real).is_ok(),
        Err(_) => false,
    }
}

/// One `[locations.<name>]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocationOptions {
    /// A directory or object-store prefix: `file:///srv/aphp/`, `s3://bucket/p/`, `az://…`,
    /// `gs://…`, `https://host/base/`.
    pub url: String,
    /// Organisations whose datasets may live under it.
    pub controllers: Vec<String>,
    /// The `[stores.<name>]` entry that reads an object-store location (none for files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// The declared storage locations, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locations(BTreeMap<String, LocationOptions>);

/// Why a location is not the caller's; deliberately vague, so that a refusal reveals nothing of
/// what lies at the path or whom it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotInALocation;

impl Locations {
    /// The sections, checked: each URL a prefix (no glob), at least one controller, a store
    /// exactly for object-store locations, and no two locations overlapping.
    pub fn new(sections: BTreeMap<String, LocationOptions>) -> Result<Self> {
        let bad = |name: &str, reason: String| Error::InvalidLocation {
            location: format!("[locations.{name}]"),
            reason,
        };
        let mut parsed: Vec<(&str, CanonicalLocation)> = Vec::new();
        for (name, opts) in &sections {
            let loc = CanonicalLocation::lexical(&opts.url).map_err(|e| bad(name, e.to_string()))?;
            if loc.glob.is_some() {
                return Err(bad(name, "`url` is a directory or prefix, without a glob".into()));
            }
            if opts.controllers.is_empty()
                || opts
                    .controllers
                    .iter()
                    .any(|c| c.trim().is_empty() || c.contains(['*', '/', ',']))
            {
                return Err(bad(
                    name,
                    "`controllers` lists the organisations whose data lives there, e.g. [\"aphp\"]".into(),
                ));
            }
            match (loc.scheme == Scheme::File, &opts.store) {
                (true, Some(_)) => return Err(bad(name, "a file location needs no `store`; remove it".into())),
                (false, None) => {
                    return Err(bad(
                        name,
                        "name the [stores.<name>] entry that reads it: `store = \"<name>\"`".into(),
                    ));
                }
                _ => {}
            }
            // The registry keeps one client per bucket: one bucket, one store.
            if let Some((other, _)) = parsed.iter().find(|(n, l)| {
                l.scheme != Scheme::File && l.bucket() == loc.bucket() && sections[*n].store != opts.store
            }) {
                return Err(bad(
                    name,
                    format!("[locations.{other}] reads the same bucket through another store; one bucket, one store"),
                ));
            }
            if let Some((other, _)) = parsed.iter().find(|(_, l)| l.overlaps(&loc)) {
                return Err(bad(
                    name,
                    format!("it overlaps [locations.{other}]; a path belongs to one location"),
                ));
            }
            parsed.push((name, loc));
        }
        Ok(Self(sections))
    }

    /// Whether no location is declared (the embedded default).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The sections.
    pub fn sections(&self) -> &BTreeMap<String, LocationOptions> {
        &self.0
    }

    /// The location, among those naming `controller`, that contains `dataset`, if its `store`
    /// is the dataset's. File locations are resolved on disk first when `resolve` is set (the
    /// dataset's own location must then be resolved too).
    pub fn admit(
        &self,
        controller: &str,
        dataset: &CanonicalLocation,
        store: Option<&str>,
        resolve: bool,
    ) -> std::result::Result<&str, NotInALocation> {
        self.0
            .iter()
            .filter(|(_, o)| o.controllers.iter().any(|c| c == controller) && o.store.as_deref() == store)
            .find(|(_, o)| {
                let loc = match CanonicalLocation::lexical(&o.url) {
                    Ok(l) if resolve => l.resolve(),
                    other => other,
                };
                loc.is_ok_and(|l| l.contains(dataset))
            })
            .map(|(name, _)| name.as_str())
            .ok_or(NotInALocation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> String {
        CanonicalLocation::lexical(s)
            .map(|l| l.to_string())
            .unwrap_or_else(|e| format!("ERR {e}"))
    }

    #[test]
    fn one_spelling_per_object_store_location() {
        for (a, b) in [
            ("s3a://Bucket/p//q/", "s3://bucket/p/q/"),
            ("s3://bucket/%70/x.parquet", "s3://bucket/p/x.parquet"),
            ("s3://bucket/a%2Fb/", "s3://bucket/a/b/"),
            ("abfss://container/p/", "az://container/p/"),
            ("azure://container/p/", "az://container/p/"),
            ("adl://container/p/", "az://container/p/"),
            ("gcs://bucket/p/", "gs://bucket/p/"),
            ("HTTPS://Example.EU:443/a//b/", "https://example.eu/a/b/"),
            ("http://example.eu:8080/%61/", "http://example.eu:8080/a/"),
            ("s3://bucket/exports/export-*.csv", "s3://bucket/exports/export-*.csv"),
            ("s3://bucket", "s3://bucket/"),
        ] {
            assert_eq!(canon(a), b, "{a}");
        }
        for bad in [
            "s3://bucket/../other/",
            "s3://bucket/./p",
            "s3://bucket/p?x=1",
            "https://user:pw@host/p",
            "abfss://fs@account.dfs.core.windows.net/p",
            "s3://b/a*/x.csv",
            "ftp://host/x",
            "relative/path",
            "file://relative",
            " /srv/x",
        ] {
            assert!(canon(bad).starts_with("ERR"), "{bad}: {}", canon(bad));
        }
    }

    #[test]
    fn file_locations_resolve_dots_links_and_refuse_pseudo_filesystems() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("aphp")).unwrap();
        std::fs::create_dir_all(root.join("evil")).unwrap();
        std::fs::write(root.join("aphp/hiv.parquet"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("aphp/hiv.parquet"), root.join("evil/link.parquet")).unwrap();
        let r = root.display();
        let target = format!("file://{r}/aphp/hiv.parquet");
        for spelling in [
            format!("{r}/evil/../aphp/hiv.parquet"),
            format!("file://{r}//aphp/./hiv.parquet"),
            format!("{r}/evil/link.parquet"),
            format!("/proc/self/root{r}/aphp/hiv.parquet"),
        ] {
            let l = CanonicalLocation::canonicalise(&spelling).unwrap();
            assert_eq!(l.to_string(), target, "{spelling}");
        }
        let e = CanonicalLocation::canonicalise("/proc/self/environ")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pseudo-filesystem"), "{e}");
        assert!(CanonicalLocation::canonicalise("file:///sys/kernel/").is_err());
        assert!(is_plain_file_path(&root.join("aphp/hiv.parquet")));
        assert!(!is_plain_file_path(&root.join("evil/link.parquet")));
        // A directory keeps its trailing slash; a glob resolves its directory.
        let d = CanonicalLocation::canonicalise(&format!("{r}/evil/../aphp/")).unwrap();
        assert_eq!(d.to_string(), format!("file://{r}/aphp/"));
        let g = CanonicalLocation::canonicalise(&format!("{r}/evil/../aphp/*.parquet")).unwrap();
        assert_eq!(g.to_string(), format!("file://{r}/aphp/*.parquet"));
        // A file named with `%` or `#` is stored encoded, so reading it names the same file.
        let odd = CanonicalLocation::lexical(&format!("{r}/aphp/50% #1.csv")).unwrap();
        assert!(odd.to_string().ends_with("/aphp/50%25%20%231.csv"), "{odd}");
        assert_eq!(CanonicalLocation::lexical(&odd.to_string()).unwrap(), odd);
    }

    #[test]
    fn containment_and_overlap_are_by_segment() {
        let l = |s: &str| CanonicalLocation::lexical(s).unwrap();
        assert!(l("s3://b/aphp/").contains(&l("s3a://B/aphp/x/y.parquet")));
        assert!(!l("s3://b/aphp/").contains(&l("s3://b/aphp2/x.parquet")));
        assert!(!l("s3://b/aphp/").contains(&l("gs://b/aphp/x.parquet")));
        assert!(l("file:///srv/aphp/").contains(&l("/srv/aphp/v-*.csv")));
        assert!(l("/srv/aphp/v-*.csv").overlaps(&l("/srv/aphp/other.csv")));
        assert!(!l("/srv/aphp/").overlaps(&l("/srv/aphpx/")));
        assert!(l("https://h/base/").contains(&l("https://H:443/base/f.parquet")));
        assert!(!l("https://h/base/").contains(&l("https://h:8443/base/f.parquet")));
    }

    #[test]
    fn declared_locations_are_checked_and_admit_by_controller_and_store() {
        let opts = |url: &str, c: &[&str], store: Option<&str>| LocationOptions {
            url: url.into(),
            controllers: c.iter().map(|s| s.to_string()).collect(),
            store: store.map(str::to_string),
        };
        let locs = Locations::new(
            [
                ("a".to_string(), opts("file:///srv/aphp/", &["aphp"], None)),
                ("l".to_string(), opts("s3://lake/aphp/", &["aphp"], Some("lake"))),
            ]
            .into_iter()
            .collect(),
        )
        .unwrap();
        let l = |s: &str| CanonicalLocation::lexical(s).unwrap();
        assert_eq!(locs.admit("aphp", &l("/srv/aphp/x/"), None, false), Ok("a"));
        assert_eq!(locs.admit("evil", &l("/srv/aphp/x/"), None, false), Err(NotInALocation));
        assert_eq!(
            locs.admit("aphp", &l("s3://lake/aphp/p/"), Some("lake"), false),
            Ok("l")
        );
        assert_eq!(
            locs.admit("aphp", &l("s3://lake/aphp/p/"), Some("other"), false),
            Err(NotInALocation)
        );
        assert_eq!(
            locs.admit("aphp", &l("s3://lake/other/"), Some("lake"), false),
            Err(NotInALocation)
        );
        for bad in [
            vec![
                ("x", opts("file:///srv/", &["a"], None)),
                ("y", opts("/srv/b/", &["b"], None)),
            ],
            vec![("x", opts("s3://b/p/", &["a"], None))],
            vec![("x", opts("/srv/", &["a"], Some("lake")))],
            vec![("x", opts("/srv/", &[], None))],
            vec![
                ("x", opts("s3://b/p/", &["a"], Some("s1"))),
                ("y", opts("s3://b/q/", &["b"], Some("s2"))),
            ],
            vec![("x", opts("/srv/*.csv", &["a"], None))],
        ] {
            let sections = bad.into_iter().map(|(n, o)| (n.to_string(), o)).collect();
            assert!(Locations::new(sections).is_err());
        }
    }
}
