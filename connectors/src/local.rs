//! Local files, read only and never through a symlink.
//!
//! `object_store`'s `LocalFileSystem` follows symlinks when it lists and opens files. A steward
//! who can write into its own dataset's directory could then place a link to another
//! controller's file there and have it served under its own policy. Datasets are stored with
//! canonical locations, so refusing every file whose path is not already its real path keeps
//! each read inside the location that was checked at registration. Writes are refused: sources
//! are never written.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult,
};

use crate::location::is_plain_file_path;

/// A read-only local filesystem that refuses files reached through a symlink or lying on a
/// pseudo-filesystem.
#[derive(Debug, Clone)]
pub struct ConfinedFileSystem {
    inner: Arc<LocalFileSystem>,
}

impl Default for ConfinedFileSystem {
    fn default() -> Self {
        Self {
            inner: Arc::new(LocalFileSystem::new()),
        }
    }
}

impl fmt::Display for ConfinedFileSystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConfinedFileSystem({})", self.inner)
    }
}

fn refused(location: &Path) -> object_store::Error {
    object_store::Error::PermissionDenied {
        path: location.to_string(),
        source:
            "the file is reached through a symbolic link (or is not a regular data file); Passerelle reads no links"
                .into(),
    }
}

fn read_only(operation: &str) -> object_store::Error {
    object_store::Error::NotSupported {
        source: format!("sources are read only ({operation})").into(),
    }
}

impl ConfinedFileSystem {
    fn check(&self, location: &Path) -> object_store::Result<()> {
        let path = self.inner.path_to_filesystem(location)?;
        if is_plain_file_path(&path) {
            Ok(())
        } else {
            Err(refused(location))
        }
    }
}

#[async_trait]
impl ObjectStore for ConfinedFileSystem {
    async fn put_opts(&self, _: &Path, _: PutPayload, _: PutOptions) -> object_store::Result<PutResult> {
        Err(read_only("put"))
    }

    async fn put_multipart_opts(
        &self,
        _: &Path,
        _: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(read_only("put"))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.check(location)?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<bytes::Bytes>> {
        self.check(location)?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        locations.map(|_| Err(read_only("delete"))).boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let this = self.clone();
        self.inner
            .list(prefix)
            .map(move |meta| {
                let meta = meta?;
                this.check(&meta.location)?;
                Ok(meta)
            })
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let listed = self.inner.list_with_delimiter(prefix).await?;
        for meta in &listed.objects {
            self.check(&meta.location)?;
        }
        Ok(listed)
    }

    async fn copy_opts(&self, _: &Path, _: &Path, _: CopyOptions) -> object_store::Result<()> {
        Err(read_only("copy"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;

    #[tokio::test]
    async fn links_are_refused_when_listed_and_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("theirs")).unwrap();
        std::fs::create_dir_all(root.join("mine")).unwrap();
        std::fs::write(root.join("theirs/secret.csv"), b"secret\n").unwrap();
        std::fs::write(root.join("mine/ok.csv"), b"a\n1\n").unwrap();
        let fs = ConfinedFileSystem::default();
        let mine = Path::from_filesystem_path(root.join("mine")).unwrap();
        let listed: Vec<ObjectMeta> = fs.list(Some(&mine)).try_collect().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            fs.get(&listed[0].location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .as_ref(),
            b"a\n1\n"
        );

        std::os::unix::fs::symlink(root.join("theirs/secret.csv"), root.join("mine/link.csv")).unwrap();
        let err = fs.list(Some(&mine)).try_collect::<Vec<_>>().await.unwrap_err();
        assert!(matches!(err, object_store::Error::PermissionDenied { .. }), "{err}");
        // As listed (`from_filesystem_path` would resolve the link itself).
        let at = |rel: &str| Path::parse(format!("{}/{rel}", root.display()).trim_start_matches('/')).unwrap();
        let link = at("mine/link.csv");
        assert!(fs.get(&link).await.is_err());
        assert!(fs.get_range(&link, 0..3).await.is_err());
        assert!(fs.head(&link).await.is_err());
        // A linked directory is refused too.
        std::fs::remove_file(root.join("mine/link.csv")).unwrap();
        std::os::unix::fs::symlink(root.join("theirs"), root.join("mine/dir")).unwrap();
        let through = at("mine/dir/secret.csv");
        assert!(fs.get(&through).await.is_err());
        assert!(fs.list(Some(&mine)).try_collect::<Vec<_>>().await.is_err());
        // Nothing is written.
        assert!(fs.put(&Path::from("x"), PutPayload::from_static(b"x")).await.is_err());
    }
}
