//! Workspace change tracking: a snapshot of the workspace tree (the baseline)
//! and the difference between two snapshots.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use agentvm_runtime::protocol::{path_text, ChangeKind, FileChange, FileKind, FileState};
use sha2::{Digest, Sha256};

use crate::files::TEMP_PREFIX;

/// Files up to this size that are valid UTF-8 keep their text in a snapshot.
pub const TEXT_LIMIT: u64 = 64 * 1024;

/// The state of every entry of a tree, by path relative to its root
/// (`/` separators), sorted.
pub type Snapshot = BTreeMap<String, FileState>;

/// Records the tree under `root` (not the root itself). Symlinks are recorded,
/// not followed. Entries that vanish while scanning are skipped; unreadable
/// files are recorded without a hash.
pub fn scan(root: &Path) -> Snapshot {
    let mut snapshot = Snapshot::new();
    let mut dirs: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
                continue;
            }
            let relative = format!("{prefix}{}", path_text::encode(name.as_bytes()));
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let state = file_state(&path, &meta);
            if state.kind == FileKind::Dir {
                dirs.push((path, format!("{relative}/")));
            }
            snapshot.insert(relative, state);
        }
    }
    snapshot
}

fn file_state(path: &Path, meta: &fs::Metadata) -> FileState {
    let file_type = meta.file_type();
    let mode = meta.mode() & 0o7777;
    let (kind, size, sha256, text) = if file_type.is_file() {
        let (sha256, text) = match hash_file(path, meta.len()) {
            Ok((sha, text)) => (Some(sha), text),
            Err(_) => (None, None),
        };
        (FileKind::File, meta.len(), sha256, text)
    } else if file_type.is_dir() {
        (FileKind::Dir, 0, None, None)
    } else if file_type.is_symlink() {
        let target = fs::read_link(path).ok();
        let sha = target.map(|t| hex(&Sha256::digest(t.as_os_str().as_bytes())));
        (FileKind::Symlink, 0, sha, None)
    } else {
        (FileKind::Other, 0, None, None)
    };
    FileState {
        kind,
        size,
        mode,
        sha256,
        text,
    }
}

/// Hashes a file; small UTF-8 files also give their text.
fn hash_file(path: &Path, len: u64) -> io::Result<(String, Option<String>)> {
    // O_NONBLOCK: the entry may have been replaced by a FIFO since it was listed.
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if len <= TEXT_LIMIT {
        let mut content = Vec::with_capacity(len as usize);
        file.read_to_end(&mut content)?;
        let sha = hex(&Sha256::digest(&content));
        let text = if content.len() as u64 <= TEXT_LIMIT {
            String::from_utf8(content).ok()
        } else {
            None
        };
        return Ok((sha, text));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((hex(&hasher.finalize()), None))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Whether an entry counts as modified between two states.
fn differs(before: &FileState, after: &FileState) -> bool {
    before.kind != after.kind
        || before.mode != after.mode
        || before.sha256 != after.sha256
        || before.size != after.size
}

/// The changes from `before` to `after`, sorted by path. Texts are kept only
/// when `include_text`.
pub fn diff(before: &Snapshot, after: &Snapshot, include_text: bool) -> Vec<FileChange> {
    let state = |s: &FileState| {
        let mut s = s.clone();
        if !include_text {
            s.text = None;
        }
        s
    };
    let mut changes = Vec::new();
    let mut old = before.iter().peekable();
    let mut new = after.iter().peekable();
    loop {
        let change = match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some((path, b)), None) => {
                let c = deleted(path, state(b));
                old.next();
                c
            }
            (None, Some((path, a))) => {
                let c = created(path, state(a));
                new.next();
                c
            }
            (Some((old_path, b)), Some((new_path, a))) => match old_path.cmp(new_path) {
                std::cmp::Ordering::Less => {
                    let c = deleted(old_path, state(b));
                    old.next();
                    c
                }
                std::cmp::Ordering::Greater => {
                    let c = created(new_path, state(a));
                    new.next();
                    c
                }
                std::cmp::Ordering::Equal => {
                    let c = differs(b, a).then(|| FileChange {
                        path: (*new_path).clone(),
                        change: ChangeKind::Modified,
                        before: Some(state(b)),
                        after: Some(state(a)),
                    });
                    old.next();
                    new.next();
                    match c {
                        Some(c) => c,
                        None => continue,
                    }
                }
            },
        };
        changes.push(change);
    }
    changes
}

fn created(path: &str, after: FileState) -> FileChange {
    FileChange {
        path: path.to_owned(),
        change: ChangeKind::Created,
        before: None,
        after: Some(after),
    }
}

fn deleted(path: &str, before: FileState) -> FileChange {
    FileChange {
        path: path.to_owned(),
        change: ChangeKind::Deleted,
        before: Some(before),
        after: None,
    }
}

/// A point in time as the kernel stamps inodes: `CLOCK_REALTIME_COARSE`
/// (what tmpfs/ramfs use for ctime), so that a change right after it never
/// gets an earlier stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct InodeTime {
    /// Seconds since the epoch.
    pub secs: i64,
    /// Nanoseconds.
    pub nanos: i64,
}

impl InodeTime {
    /// Now.
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is valid for writes; the clock id is a constant.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
        Self {
            secs: ts.tv_sec,
            nanos: ts.tv_nsec,
        }
    }

    fn ctime_of(meta: &fs::Metadata) -> Self {
        Self {
            secs: meta.ctime(),
            nanos: meta.ctime_nsec(),
        }
    }
}

/// Entries visited by [`changed_outside`] at most (an agent that made a
/// million files in /tmp must not stall the answer).
pub const OUTSIDE_VISIT_LIMIT: usize = 200_000;

/// The paths under `root` (absolute, `root` itself included) whose inode
/// changed at or after `since` — written, created, chmod'ed, or a directory
/// an entry was created in or removed from — skipping the trees in
/// `exclude` and everything under `root` named `proc`, `sys` or `dev`
/// (pseudo file systems). Sorted; at most `limit` (the bool: there were more,
/// or the walk stopped at [`OUTSIDE_VISIT_LIMIT`]). Symlinks are not followed.
pub fn changed_outside(
    root: &Path,
    exclude: &[&Path],
    since: InodeTime,
    limit: usize,
) -> (Vec<String>, bool) {
    let pseudo: Vec<PathBuf> = ["proc", "sys", "dev"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    let skipped = |path: &Path| exclude.contains(&path) || pseudo.iter().any(|p| p == path);
    let mut found = Vec::new();
    let mut visited = 0usize;
    let mut truncated = false;
    let mut dirs = vec![root.to_path_buf()];
    if fs::symlink_metadata(root).is_ok_and(|m| InodeTime::ctime_of(&m) >= since) {
        found.push(root.to_path_buf());
    }
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            visited += 1;
            if visited > OUTSIDE_VISIT_LIMIT {
                truncated = true;
                dirs.clear();
                break;
            }
            let path = entry.path();
            if skipped(&path) {
                continue;
            }
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if InodeTime::ctime_of(&meta) >= since {
                found.push(path.clone());
            }
            if meta.is_dir() {
                dirs.push(path);
            }
        }
    }
    found.sort();
    if found.len() > limit {
        found.truncate(limit);
        truncated = true;
    }
    let found = found
        .into_iter()
        .map(|p| path_text::encode(p.as_os_str().as_bytes()))
        .collect();
    (found, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_outside_finds_what_changed_after_the_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for d in ["etc", "ws", "proc", "stage", "empty"] {
            fs::create_dir(root.join(d)).unwrap();
        }
        fs::write(root.join("etc/old"), "old").unwrap();
        fs::write(root.join("etc/keep"), "keep").unwrap();
        // The coarse clock ticks every few ms: make sure the baseline is later.
        std::thread::sleep(std::time::Duration::from_millis(30));
        let since = InodeTime::now();
        std::thread::sleep(std::time::Duration::from_millis(30));
        fs::write(root.join("etc/new"), "new").unwrap();
        fs::remove_file(root.join("etc/old")).unwrap();
        fs::write(root.join("ws/inside"), "x").unwrap();
        fs::write(root.join("stage/task"), "x").unwrap();
        fs::write(root.join("proc/pseudo"), "x").unwrap();
        let (ws, stage) = (root.join("ws"), root.join("stage"));
        let (found, truncated) =
            changed_outside(&root, &[ws.as_path(), stage.as_path()], since, 100);
        let rel: Vec<String> = found
            .iter()
            .map(|p| {
                p.strip_prefix(&*root.to_string_lossy())
                    .unwrap()
                    .to_string()
            })
            .collect();
        // The root's own entries did not change; etc got one and lost one.
        assert_eq!(rel, ["/etc", "/etc/new"], "{found:?}");
        assert!(!truncated);
        let (found, truncated) = changed_outside(&root, &[ws.as_path(), stage.as_path()], since, 1);
        assert_eq!(found.len(), 1);
        assert!(truncated);
        // Excluded trees are not listed even as changed directories.
        let (found, _) = changed_outside(&root, &[], since, 100);
        assert!(found.iter().any(|p| p.ends_with("/ws")), "{found:?}");
        assert!(!found.iter().any(|p| p.contains("/proc")), "{found:?}");
    }

    fn file(content: &str, mode: u32) -> FileState {
        FileState {
            kind: FileKind::File,
            size: content.len() as u64,
            mode,
            sha256: Some(hex(&Sha256::digest(content.as_bytes()))),
            text: Some(content.to_owned()),
        }
    }

    fn dir() -> FileState {
        FileState {
            kind: FileKind::Dir,
            size: 0,
            mode: 0o755,
            sha256: None,
            text: None,
        }
    }

    fn snapshot(entries: &[(&str, FileState)]) -> Snapshot {
        entries
            .iter()
            .map(|(p, s)| (p.to_string(), s.clone()))
            .collect()
    }

    #[test]
    fn diff_finds_created_modified_deleted_in_order() {
        let before = snapshot(&[
            ("a.txt", file("a", 0o644)),
            ("b.txt", file("b", 0o644)),
            ("d", dir()),
            ("d/x", file("x", 0o644)),
            ("mode.sh", file("m", 0o644)),
        ]);
        let after = snapshot(&[
            ("a.txt", file("A", 0o644)),
            ("c.txt", file("c", 0o644)),
            ("d", dir()),
            ("d/x", file("x", 0o644)),
            ("mode.sh", file("m", 0o755)),
            ("n", dir()),
        ]);
        let changes = diff(&before, &after, true);
        let summary: Vec<(&str, ChangeKind)> = changes
            .iter()
            .map(|c| (c.path.as_str(), c.change))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("a.txt", ChangeKind::Modified),
                ("b.txt", ChangeKind::Deleted),
                ("c.txt", ChangeKind::Created),
                ("mode.sh", ChangeKind::Modified),
                ("n", ChangeKind::Created),
            ]
        );
        assert_eq!(
            changes[0].before.as_ref().unwrap().text.as_deref(),
            Some("a")
        );
        assert_eq!(
            changes[0].after.as_ref().unwrap().text.as_deref(),
            Some("A")
        );
        assert!(changes[1].after.is_none());
        assert!(changes[2].before.is_none());
        assert_eq!(changes[4].after.as_ref().unwrap().kind, FileKind::Dir);
    }

    #[test]
    fn diff_without_text_strips_it() {
        let before = snapshot(&[("a", file("1", 0o644))]);
        let after = snapshot(&[("a", file("2", 0o644)), ("b", file("3", 0o644))]);
        for change in diff(&before, &after, false) {
            for state in [&change.before, &change.after].into_iter().flatten() {
                assert_eq!(state.text, None);
                assert!(state.sha256.is_some());
            }
        }
    }

    #[test]
    fn kind_change_is_a_modification() {
        let before = snapshot(&[("p", file("", 0o755))]);
        let after = snapshot(&[("p", dir())]);
        let changes = diff(&before, &after, false);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].change, ChangeKind::Modified);
    }

    #[test]
    fn identical_snapshots_have_no_changes() {
        let s = snapshot(&[("a", file("x", 0o644)), ("d", dir())]);
        assert!(diff(&s, &s, true).is_empty());
    }

    #[test]
    fn scan_records_files_dirs_symlinks_and_text() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("sub/deep")).unwrap();
        fs::write(r.join("sub/deep/t.txt"), "hello\n").unwrap();
        fs::write(r.join("bin"), [0xff, 0xfe, 0]).unwrap();
        fs::write(r.join("big.txt"), "x".repeat(TEXT_LIMIT as usize + 1)).unwrap();
        std::os::unix::fs::symlink("sub", r.join("link")).unwrap();
        fs::write(r.join(format!("{TEMP_PREFIX}1-2")), "partial upload").unwrap();

        let s = scan(r);
        let keys: Vec<&str> = s.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            vec![
                "big.txt",
                "bin",
                "link",
                "sub",
                "sub/deep",
                "sub/deep/t.txt"
            ]
        );
        let t = &s["sub/deep/t.txt"];
        assert_eq!(t.kind, FileKind::File);
        assert_eq!(t.size, 6);
        assert_eq!(t.text.as_deref(), Some("hello\n"));
        assert_eq!(
            t.sha256.as_deref(),
            Some("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03")
        );
        assert_eq!(s["bin"].text, None, "not UTF-8");
        assert_eq!(s["big.txt"].text, None, "too large");
        assert!(s["big.txt"].sha256.is_some());
        assert_eq!(s["link"].kind, FileKind::Symlink);
        assert_eq!(
            s["link"].sha256.as_deref(),
            Some(hex(&Sha256::digest(b"sub")).as_str())
        );
        assert_eq!(s["sub"].kind, FileKind::Dir);
    }
}
