//! The golden cache: golden snapshots kept on disk so that a VM can start from
//! one instead of booting.
//!
//! A cold boot to the guest agent's Hello takes ~2.2 s under TCG; starting
//! QEMU paused and loading a saved golden snapshot takes a few hundred ms. So
//! the first VM of a configuration that boots and takes its golden snapshot
//! also copies its state qcow2 (which holds that internal snapshot) into
//! `<runtime>/golden/<key>/`, and later VMs of the same configuration — in
//! this process or another one, e.g. one test process per test under
//! nextest — copy it into their own directory and `loadvm` it.
//!
//! The key is a hash of everything the saved state depends on: the QEMU
//! command line without the per-VM paths and id, the QEMU binary, and the
//! kernel and initramfs files (size and modification time). A restore that
//! fails removes its entry. Entries are written to a temporary directory and
//! renamed into place, so concurrent writers (several processes booting the
//! same configuration at once) never expose a half-written entry; the first
//! rename wins. At most [`KEEP_ENTRIES`] entries are kept (newest first).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::protocol::Hello;

/// Version of the entry layout; entries of other versions are ignored.
pub const FORMAT: u32 = 1;
/// Entries kept; older ones are removed when a new one is stored.
pub const KEEP_ENTRIES: usize = 4;

const META: &str = "meta.json";
const STATE: &str = "state.qcow2";

/// What identifies a file without reading it: path, size, modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileIdentity {
    /// The path.
    pub path: PathBuf,
    /// Size in bytes.
    pub len: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl FileIdentity {
    /// Reads the metadata of `path`.
    pub fn of(path: &Path) -> io::Result<Self> {
        let meta = fs::metadata(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }
}

/// The cache key: a hash of the per-VM-independent command line and the
/// identities of the files the guest state depends on.
pub fn cache_key(argv: &[String], files: &[FileIdentity]) -> String {
    let mut hash = Sha256::new();
    hash.update(format!("agentvm golden cache format {FORMAT}\n"));
    for arg in argv {
        hash.update((arg.len() as u64).to_le_bytes());
        hash.update(arg.as_bytes());
    }
    for file in files {
        hash.update(format!(
            "\nfile {} {} {}",
            file.path.display(),
            file.len,
            file.mtime_ns
        ));
    }
    hex(&hash.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The metadata of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// [`FORMAT`].
    pub format: u32,
    /// The entry's key.
    pub key: String,
    /// The guest agent's Hello, as it said it before the snapshot.
    pub hello: Hello,
    /// When the entry was stored (seconds since the epoch).
    pub created_unix: u64,
    /// The VM whose snapshot it is.
    pub source_vm: String,
}

/// One entry found in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The qcow2 holding the golden snapshot (copy it; never open it in QEMU).
    pub state_disk: PathBuf,
    /// Its metadata.
    pub meta: Meta,
}

/// A cache directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoldenCache {
    dir: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl GoldenCache {
    /// The cache in `dir` (created when the first entry is stored).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_dir(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The entry for `key`, if there is a complete one of this [`FORMAT`].
    pub fn lookup(&self, key: &str) -> Option<Entry> {
        let dir = self.entry_dir(key);
        let meta: Meta = serde_json::from_slice(&fs::read(dir.join(META)).ok()?).ok()?;
        let state_disk = dir.join(STATE);
        (meta.format == FORMAT && meta.key == key && state_disk.is_file())
            .then_some(Entry { state_disk, meta })
    }

    /// Stores a copy of `state_disk` (whose QEMU must not write to it during
    /// the copy) with `meta`. Returns `false` when an entry for the key was
    /// already there (it is kept).
    pub fn store(&self, state_disk: &Path, meta: &Meta) -> io::Result<bool> {
        let target = self.entry_dir(&meta.key);
        if self.lookup(&meta.key).is_some() {
            return Ok(false);
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let temp = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            fs::DirBuilder::new().mode(0o700).create(&temp)?;
            fs::copy(state_disk, temp.join(STATE))?;
            fs::write(temp.join(META), serde_json::to_vec_pretty(meta)?)?;
            // A half-written entry of a crashed writer is replaced.
            if target.exists() && self.lookup(&meta.key).is_none() {
                fs::remove_dir_all(&target)?;
            }
            fs::rename(&temp, &target)
        })();
        match result {
            Ok(()) => {
                self.evict(&meta.key);
                Ok(true)
            }
            // Another writer renamed its entry into place first.
            Err(_) if self.lookup(&meta.key).is_some() => {
                let _ = fs::remove_dir_all(&temp);
                Ok(false)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&temp);
                Err(e)
            }
        }
    }

    /// Removes the entry for `key` (a restore from it failed).
    pub fn remove(&self, key: &str) {
        let _ = fs::remove_dir_all(self.entry_dir(key));
    }

    /// Keeps the newest [`KEEP_ENTRIES`] entries (and `keep`), removes the rest
    /// and temporary directories of writers that are gone.
    fn evict(&self, keep: &str) {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(u64, String)> = Vec::new();
        for item in dir.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name
                .strip_prefix(".tmp-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = fs::remove_dir_all(item.path());
                }
                continue;
            }
            if name == keep {
                continue;
            }
            let created = self.lookup(&name).map_or(0, |e| e.meta.created_unix);
            entries.push((created, name));
        }
        entries.sort_by(|a, b| b.cmp(a));
        for (_, name) in entries.into_iter().skip(KEEP_ENTRIES.saturating_sub(1)) {
            self.remove(&name);
        }
    }
}

/// Seconds since the epoch, now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PROTOCOL_VERSION;

    fn hello() -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            software: "agentvm-guest test".into(),
            capabilities: vec!["exec".into()],
            workspace_root: Some("/workspace".into()),
            kernel: Some("6.1".into()),
        }
    }

    fn meta(key: &str, created_unix: u64) -> Meta {
        Meta {
            format: FORMAT,
            key: key.into(),
            hello: hello(),
            created_unix,
            source_vm: "1-0".into(),
        }
    }

    #[test]
    fn key_changes_with_argv_and_files() {
        let argv = vec!["-m".to_string(), "256M".to_string()];
        let file = FileIdentity {
            path: "/img/vmlinuz".into(),
            len: 10,
            mtime_ns: 5,
        };
        let key = cache_key(&argv, std::slice::from_ref(&file));
        assert_eq!(key.len(), 64);
        assert_eq!(key, cache_key(&argv, std::slice::from_ref(&file)));
        assert_ne!(
            key,
            cache_key(&["-m".into(), "512M".into()], std::slice::from_ref(&file))
        );
        // Argument boundaries count: ["-m", "256M"] is not ["-m256M"].
        assert_ne!(
            key,
            cache_key(&["-m256M".into()], std::slice::from_ref(&file))
        );
        let touched = FileIdentity {
            mtime_ns: 6,
            ..file.clone()
        };
        assert_ne!(key, cache_key(&argv, &[touched]));
        assert_ne!(key, cache_key(&argv, &[]));
    }

    #[test]
    fn store_lookup_remove() {
        let dir = tempfile::tempdir().unwrap();
        let cache = GoldenCache::new(dir.path().join("golden"));
        let disk = dir.path().join("state.qcow2");
        fs::write(&disk, b"qcow2 bytes").unwrap();
        assert_eq!(cache.lookup("k1"), None);
        assert!(cache.store(&disk, &meta("k1", 1)).unwrap());
        let entry = cache.lookup("k1").unwrap();
        assert_eq!(fs::read(&entry.state_disk).unwrap(), b"qcow2 bytes");
        assert_eq!(entry.meta, meta("k1", 1));
        // A second store keeps the first entry.
        fs::write(&disk, b"other").unwrap();
        assert!(!cache.store(&disk, &meta("k1", 2)).unwrap());
        assert_eq!(fs::read(&entry.state_disk).unwrap(), b"qcow2 bytes");
        cache.remove("k1");
        assert_eq!(cache.lookup("k1"), None);
    }

    #[test]
    fn incomplete_or_foreign_entries_are_not_found_and_get_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let cache = GoldenCache::new(dir.path());
        let disk = dir.path().join("disk");
        fs::write(&disk, b"d").unwrap();
        // A directory without meta.json (a crashed writer's).
        fs::create_dir_all(dir.path().join("k")).unwrap();
        assert_eq!(cache.lookup("k"), None);
        // Metadata of another format.
        let mut old = meta("k", 1);
        old.format = FORMAT + 1;
        fs::write(
            dir.path().join("k").join(META),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        fs::write(dir.path().join("k").join(STATE), b"x").unwrap();
        assert_eq!(cache.lookup("k"), None);
        assert!(cache.store(&disk, &meta("k", 2)).unwrap());
        assert_eq!(cache.lookup("k").unwrap().meta.created_unix, 2);
    }

    #[test]
    fn keeps_the_newest_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = GoldenCache::new(dir.path());
        let disk = dir.path().join("disk");
        fs::write(&disk, b"d").unwrap();
        // A temporary directory of a writer that is gone (pid 999999999).
        fs::create_dir_all(dir.path().join(".tmp-999999999-0")).unwrap();
        for i in 0..(KEEP_ENTRIES as u64 + 2) {
            cache
                .store(&disk, &meta(&format!("k{i}"), 100 + i))
                .unwrap();
        }
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('k'))
            .collect();
        left.sort();
        assert_eq!(left, ["k2", "k3", "k4", "k5"]);
        assert!(!dir.path().join(".tmp-999999999-0").exists());
    }
}
