//! The local copy of the cluster state this gateway applied: its services, the revision they
//! are from, and the sealed ticket keys (sealed as in etcd: the file never holds a key in
//! clear). Written atomically (`sys::write_private`: a temporary file, fsync, rename) after
//! each change, so a crash leaves the previous or the next state, never half of one; read once
//! at start, so a gateway that starts while etcd is down serves what the cluster last said.

use std::{
    collections::BTreeMap,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::warn;

use crate::config::Service;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cached {
    pub revision: i64,
    pub services: BTreeMap<String, Service>,
    /// Each service's etcd revision (its key's last change).
    #[serde(default)]
    pub revisions: BTreeMap<String, i64>,
    /// The sealed ticket keys, hex.
    pub tickets: Option<String>,
}

/// Where inline PEM from the cluster is written: beside the cache, so it outlives restarts too.
pub fn pem_dir(cache: &Path) -> PathBuf {
    cache.parent().unwrap_or(Path::new(".")).join("cluster-pem")
}

pub fn create_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))
}

/// The cache at `path`; `None` when there is none yet.
pub fn load(path: &Path) -> anyhow::Result<Option<Cached>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("cluster cache {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cluster cache {}", path.display())),
    }
}

pub fn store(path: &Path, cached: &Cached) -> anyhow::Result<()> {
    crate::sys::write_private(path, &serde_json::to_vec_pretty(cached)?)
}

/// A task that writes the newest state it is given, off the supervisor's loop; states given
/// while one is being written are folded into the next write.
pub fn writer(path: PathBuf) -> watch::Sender<Cached> {
    let (tx, mut rx) = watch::channel(Cached::default());
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let state = rx.borrow_and_update().clone();
            let path = path.clone();
            let result = tokio::task::spawn_blocking(move || store(&path, &state)).await;
            if let Ok(Err(e)) = result {
                warn!("cluster cache not written: {e:#}");
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_state_loads_back_and_a_missing_cache_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cluster.json");
        assert_eq!(load(&path).unwrap(), None);
        let cached = Cached {
            revision: 42,
            services: BTreeMap::new(),
            revisions: BTreeMap::new(),
            tickets: Some("00ff".into()),
        };
        store(&path, &cached).unwrap();
        assert_eq!(load(&path).unwrap(), Some(cached));
        std::fs::write(&path, b"{ half").unwrap();
        assert!(
            load(&path).is_err(),
            "a damaged cache is an error, not an empty state"
        );
    }
}
