//! Files whose changes the supervisor applies without a reload: the services' CRLs.
//!
//! inotify (through the `notify` crate) watches the directory of each file rather than the
//! file: tools replace such files by writing a new one and renaming it over the old (a new
//! inode the old watch would never see), and a directory watch sees that rename as well as an
//! edit in place. Events for other files of the directory are ignored here.
//!
//! The supervisor re-applies its configuration a moment after the last event (a file is often
//! written in several steps), which reads and validates every file again: a CRL that does not
//! parse is refused and the previous one stays in force.

use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Watched files, by the canonical path of their directory.
type Files = HashMap<PathBuf, HashSet<OsString>>;

pub struct Watch {
    watcher: RecommendedWatcher,
    files: Arc<Mutex<Files>>,
}

impl Watch {
    /// A watcher of no file yet, and where it tells which watched files changed.
    pub fn new() -> notify::Result<(Watch, mpsc::UnboundedReceiver<PathBuf>)> {
        let files: Arc<Mutex<Files>> = Arc::default();
        let (tx, changed) = mpsc::unbounded_channel();
        let watched = Arc::clone(&files);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if event.kind.is_access() {
                return;
            }
            let files = watched.lock().unwrap_or_else(|e| e.into_inner());
            for path in event.paths {
                let ours = match (path.parent(), path.file_name()) {
                    (Some(dir), Some(name)) => files.get(dir).is_some_and(|n| n.contains(name)),
                    _ => false,
                };
                if ours {
                    let _ = tx.send(path);
                }
            }
        })?;
        Ok((Watch { watcher, files }, changed))
    }

    /// Watches exactly `paths` from now on. Returns a warning for each that cannot be watched
    /// (its directory is missing, say): a change to it then needs a reload.
    pub fn set<'a>(&mut self, paths: impl IntoIterator<Item = &'a Path>) -> Vec<String> {
        let mut warnings = Vec::new();
        let mut next = Files::new();
        for path in paths {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let dir = dir.unwrap_or(Path::new("."));
            match (dir.canonicalize(), path.file_name()) {
                (Ok(dir), Some(name)) => {
                    next.entry(dir).or_default().insert(name.to_owned());
                }
                (Err(e), _) => warnings.push(format!(
                    "cannot watch {}: {e}; changes to it need `relay reload`",
                    path.display()
                )),
                (_, None) => {}
            }
        }
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        for gone in files.keys().filter(|d| !next.contains_key(*d)) {
            let _ = self.watcher.unwatch(gone);
        }
        for dir in next.keys().filter(|d| !files.contains_key(*d)) {
            if let Err(e) = self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                warnings.push(format!(
                    "cannot watch {}: {e}; changes there need `relay reload`",
                    dir.display()
                ));
            }
        }
        *files = next;
        warnings
    }
}
