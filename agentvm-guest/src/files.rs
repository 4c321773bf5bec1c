//! Paths and file transfer: resolving request paths inside the served roots,
//! writing uploaded files (PutFile) and reading files out (GetFile).
//!
//! A request path is relative (to the workspace root) or absolute, and must
//! end up inside the workspace root or the staging root: `..` is resolved
//! lexically and may not climb out, and the deepest existing ancestor is
//! canonicalized so a symlink cannot lead out either.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use agentvm_runtime::protocol::{
    path_text, ErrorKind, ErrorReply, FileDataChunk, GetFileRequest, Message, PutFileChunk,
    FILE_CHUNK_LEN,
};
use tokio::sync::mpsc;

use crate::server::{error_reply, Outbox};

/// Prefix of the temporary files uploads are written to (hidden from change lists).
pub const TEMP_PREFIX: &str = ".agentvm-put-";

/// The directories the agent serves.
#[derive(Debug, Clone)]
pub struct Roots {
    /// Workspace root (canonical).
    pub workspace: PathBuf,
    /// Staging root (canonical when it exists).
    pub staging: PathBuf,
}

impl Roots {
    /// Creates the roots when missing and canonicalizes them.
    pub fn new(workspace: &Path, staging: &Path) -> Self {
        Self {
            workspace: prepare_root(workspace),
            staging: prepare_root(staging),
        }
    }

    fn contains(&self, path: &Path) -> bool {
        path.starts_with(&self.workspace) || path.starts_with(&self.staging)
    }
}

fn prepare_root(root: &Path) -> PathBuf {
    if let Err(e) = fs::create_dir_all(root) {
        log!("cannot create {}: {e}", root.display());
    }
    let absolute = if root.is_absolute() {
        root.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(root)
    };
    fs::canonicalize(&absolute)
        .unwrap_or_else(|_| normalize_absolute(&absolute).unwrap_or(absolute))
}

/// Why a request path was refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The path leads outside both roots.
    #[error("path {0:?} is outside the workspace and staging roots")]
    Outside(String),
    /// The path cannot be used at all.
    #[error("invalid path {0:?}: {1}")]
    Invalid(String, &'static str),
}

impl From<PathError> for ErrorReply {
    fn from(e: PathError) -> Self {
        let kind = match e {
            PathError::Outside(_) => ErrorKind::PathOutsideWorkspace,
            PathError::Invalid(..) => ErrorKind::BadRequest,
        };
        error_reply(kind, e)
    }
}

/// Lexically normalizes an absolute path: drops `.`, applies `..`. `None`
/// if `..` would climb above `/` or the path is not absolute.
pub fn normalize_absolute(path: &Path) -> Option<PathBuf> {
    if !path.has_root() {
        return None;
    }
    normalize_components(path).map(|relative| Path::new("/").join(relative))
}

/// Lexically normalizes a relative path. `None` if `..` would climb above
/// its start or the path is absolute.
pub fn normalize_relative(path: &Path) -> Option<PathBuf> {
    if path.has_root() {
        return None;
    }
    normalize_components(path)
}

/// The path's components below its root with `.` dropped and `..` applied;
/// `None` if `..` would climb above the start.
fn normalize_components(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    let mut depth = 0usize;
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return None;
                }
                out.pop();
                depth -= 1;
            }
            Component::Normal(name) => {
                out.push(name);
                depth += 1;
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Resolves a request path to a path inside one of the roots, with every
/// existing component canonicalized (no symlink left in it except possibly a
/// dangling one as the last component).
pub fn resolve(roots: &Roots, requested: &str) -> Result<PathBuf, PathError> {
    let raw = path_text::decode(requested);
    if raw.contains(&0) {
        return Err(PathError::Invalid(requested.into(), "contains a NUL byte"));
    }
    let path = Path::new(std::ffi::OsStr::from_bytes(&raw));
    let lexical = if path.is_absolute() {
        normalize_absolute(path).ok_or_else(|| PathError::Outside(requested.into()))?
    } else {
        let relative =
            normalize_relative(path).ok_or_else(|| PathError::Outside(requested.into()))?;
        roots.workspace.join(relative)
    };

    // Split into the deepest existing ancestor and the missing rest.
    let mut existing = lexical.clone();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    while fs::symlink_metadata(&existing).is_err() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_owned());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut resolved = match fs::canonicalize(&existing) {
        Ok(canonical) => canonical,
        // A dangling symlink as the last component: it is replaced (put) or
        // fails to open (get), never followed out.
        Err(_)
            if rest.is_empty() && existing.parent().is_some() && existing.file_name().is_some() =>
        {
            let parent = existing.parent().unwrap_or(Path::new("/"));
            let name = existing.file_name().unwrap_or_default();
            fs::canonicalize(parent)
                .map_err(|_| PathError::Outside(requested.into()))?
                .join(name)
        }
        Err(_) => return Err(PathError::Outside(requested.into())),
    };
    if !roots.contains(&resolved) {
        return Err(PathError::Outside(requested.into()));
    }
    for name in rest.iter().rev() {
        resolved.push(name);
    }
    Ok(resolved)
}

/// Maps an I/O error on `path` to a reply.
pub fn io_error(what: &str, path: &Path, e: &io::Error) -> ErrorReply {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        _ => ErrorKind::Io,
    };
    error_reply(kind, format!("{what} {}: {e}", path.display()))
}

/// Who owns uploaded files and the directories made for them: the user
/// commands run as by default (`--default-user`, the agent image's `agent`),
/// so an unprivileged agent can change its task files; else the agent itself.
fn put_owner() -> Option<(u32, u32)> {
    crate::exec::DEFAULT_USER.get().copied()
}

/// A file being uploaded: chunks go to a temporary file next to the target,
/// which is renamed into place after the last chunk.
#[derive(Debug)]
pub struct Upload {
    request_path: String,
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    written: u64,
}

impl Upload {
    /// Starts an upload with its first chunk (offset 0); creates the parent directories.
    pub fn begin(roots: &Roots, request_id: u64, first: &PutFileChunk) -> Result<Self, ErrorReply> {
        if first.offset != 0 {
            return Err(error_reply(
                ErrorKind::BadRequest,
                format!(
                    "first PutFile chunk of {:?} has offset {} (expected 0)",
                    first.path, first.offset
                ),
            ));
        }
        let target = resolve(roots, &first.path)?;
        let (Some(parent), Some(_)) = (target.parent(), target.file_name()) else {
            return Err(error_reply(
                ErrorKind::BadRequest,
                format!("{:?} names no file", first.path),
            ));
        };
        let created: Vec<&Path> = parent.ancestors().take_while(|d| !d.exists()).collect();
        fs::create_dir_all(parent).map_err(|e| io_error("cannot create directory", parent, &e))?;
        if let Some((uid, gid)) = put_owner() {
            for dir in created {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                    .map_err(|e| io_error("cannot change the owner of", dir, &e))?;
            }
        }
        let temp = parent.join(format!("{TEMP_PREFIX}{}-{request_id}", std::process::id()));
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| io_error("cannot create", &temp, &e))?;
        Ok(Self {
            request_path: first.path.clone(),
            target,
            temp,
            file: Some(file),
            written: 0,
        })
    }

    /// Appends a chunk; it must continue where the previous one ended.
    pub fn write(&mut self, chunk: &PutFileChunk) -> Result<(), ErrorReply> {
        if chunk.path != self.request_path {
            return Err(error_reply(
                ErrorKind::BadRequest,
                format!(
                    "PutFile chunk for {:?} inside the upload of {:?}",
                    chunk.path, self.request_path
                ),
            ));
        }
        if chunk.offset != self.written {
            return Err(error_reply(
                ErrorKind::BadRequest,
                format!(
                    "PutFile chunk of {:?} at offset {}, expected {} (chunks must arrive in order)",
                    chunk.path, chunk.offset, self.written
                ),
            ));
        }
        let Some(file) = self.file.as_mut() else {
            return Err(error_reply(
                ErrorKind::BadRequest,
                "upload already finished",
            ));
        };
        file.write_all(&chunk.data)
            .map_err(|e| io_error("cannot write", &self.temp, &e))?;
        self.written += chunk.data.len() as u64;
        Ok(())
    }

    /// Sets the mode and renames the file into place.
    pub fn finish(mut self, mode: u32) -> Result<(), ErrorReply> {
        let Some(file) = self.file.take() else {
            return Err(error_reply(
                ErrorKind::BadRequest,
                "upload already finished",
            ));
        };
        if let Some((uid, gid)) = put_owner() {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(|e| io_error("cannot change the owner of", &self.temp, &e))?;
        }
        file.set_permissions(fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| io_error("cannot set the mode of", &self.temp, &e))?;
        drop(file);
        fs::rename(&self.temp, &self.target)
            .map_err(|e| io_error("cannot move into place", &self.target, &e))?;
        self.temp = PathBuf::new();
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Serves one upload on a blocking thread: `first` and then the chunks from
/// `rx` until the last one. Replies Ok after the last chunk, or one Error at
/// the first failure (later chunks of that upload are then dropped).
pub fn upload_worker(
    roots: &Roots,
    request_id: u64,
    first: PutFileChunk,
    mut rx: mpsc::Receiver<PutFileChunk>,
    out: &Outbox,
) {
    let mut last = first.last;
    let result = (|| {
        let mut upload = Upload::begin(roots, request_id, &first)?;
        upload.write(&first)?;
        let mut mode = first.mode;
        while !last {
            let Some(chunk) = rx.blocking_recv() else {
                // Connection gone: the Drop removes the temporary file.
                return Err(error_reply(ErrorKind::Io, "upload interrupted"));
            };
            last = chunk.last;
            mode = chunk.mode;
            upload.write(&chunk)?;
        }
        upload.finish(mode)
    })();
    match result {
        Ok(()) => {
            out.blocking_send(request_id, Message::Ok(Default::default()));
        }
        Err(reply) => {
            out.blocking_send(request_id, Message::Error(reply));
            // Drop the rest of this upload's chunks.
            while !last {
                match rx.blocking_recv() {
                    Some(chunk) => last = chunk.last,
                    None => break,
                }
            }
        }
    }
}

/// Serves a GetFile on a blocking thread: FileData chunks of at most
/// [`FILE_CHUNK_LEN`] bytes, or one Error.
pub fn send_file(roots: &Roots, request_id: u64, request: &GetFileRequest, out: &Outbox) {
    if let Err(reply) = try_send_file(roots, request_id, request, out) {
        out.blocking_send(request_id, Message::Error(reply));
    }
}

fn try_send_file(
    roots: &Roots,
    request_id: u64,
    request: &GetFileRequest,
    out: &Outbox,
) -> Result<(), ErrorReply> {
    let path = resolve(roots, &request.path)?;
    // O_NONBLOCK: opening a FIFO must not hang; it changes nothing for regular files.
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| io_error("cannot open", &path, &e))?;
    let meta = file
        .metadata()
        .map_err(|e| io_error("cannot stat", &path, &e))?;
    if meta.is_dir() {
        return Err(error_reply(
            ErrorKind::BadRequest,
            format!("{} is a directory", path.display()),
        ));
    }
    if !meta.is_file() {
        return Err(error_reply(
            ErrorKind::BadRequest,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    let total_size = meta.len();
    let mut offset = 0u64;
    loop {
        let want = (total_size - offset).min(FILE_CHUNK_LEN as u64) as usize;
        let mut data = vec![0u8; want];
        let n = read_full(&mut file, &mut data).map_err(|e| io_error("cannot read", &path, &e))?;
        data.truncate(n);
        // The file may shrink while it is read: stop at its end.
        let last = n < want || offset + n as u64 >= total_size;
        let chunk = FileDataChunk {
            mode,
            total_size,
            offset,
            data,
            last,
        };
        if !out.blocking_send(request_id, Message::FileData(chunk)) {
            return Ok(());
        }
        offset += n as u64;
        if last {
            return Ok(());
        }
    }
}

/// Reads until `buf` is full or the end of the file.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_lexically() {
        assert_eq!(
            normalize_absolute(Path::new("/a/./b/../c")),
            Some(PathBuf::from("/a/c"))
        );
        assert_eq!(normalize_absolute(Path::new("/..")), None);
        assert_eq!(normalize_absolute(Path::new("/a/../..")), None);
        assert_eq!(normalize_absolute(Path::new("a")), None);
        assert_eq!(
            normalize_relative(Path::new("a/b/../c/.")),
            Some(PathBuf::from("a/c"))
        );
        assert_eq!(normalize_relative(Path::new("")), Some(PathBuf::new()));
        assert_eq!(normalize_relative(Path::new("../x")), None);
        assert_eq!(normalize_relative(Path::new("a/../../x")), None);
        assert_eq!(normalize_relative(Path::new("/x")), None);
    }

    fn roots() -> (tempfile::TempDir, Roots) {
        let dir = tempfile::tempdir().unwrap();
        let roots = Roots::new(&dir.path().join("ws"), &dir.path().join("staging"));
        (dir, roots)
    }

    #[test]
    fn resolves_inside_the_roots() {
        let (_dir, roots) = roots();
        fs::create_dir(roots.workspace.join("sub")).unwrap();
        assert_eq!(
            resolve(&roots, "sub/f").unwrap(),
            roots.workspace.join("sub/f")
        );
        assert_eq!(
            resolve(&roots, "new/dir/f").unwrap(),
            roots.workspace.join("new/dir/f")
        );
        assert_eq!(
            resolve(&roots, "sub/../g").unwrap(),
            roots.workspace.join("g")
        );
        assert_eq!(resolve(&roots, "").unwrap(), roots.workspace);
        let staged = roots.staging.join("bin/agent");
        assert_eq!(resolve(&roots, staged.to_str().unwrap()).unwrap(), staged);
        let absolute = roots.workspace.join("sub/x");
        assert_eq!(
            resolve(&roots, absolute.to_str().unwrap()).unwrap(),
            absolute
        );
    }

    #[test]
    fn refuses_escapes() {
        let (dir, roots) = roots();
        let outside = |r: Result<PathBuf, PathError>| matches!(r, Err(PathError::Outside(_)));
        assert!(outside(resolve(&roots, "../x")));
        assert!(outside(resolve(&roots, "a/../../x")));
        assert!(outside(resolve(&roots, "/etc/passwd")));
        assert!(outside(resolve(&roots, "/")));
        let sibling = dir.path().join("ws2/file");
        assert!(
            outside(resolve(&roots, sibling.to_str().unwrap())),
            "prefix match is not containment"
        );
        let dotdot = format!("{}/../x", roots.workspace.display());
        assert!(outside(resolve(&roots, &dotdot)));
        assert!(matches!(
            resolve(&roots, "a\0b"),
            Err(PathError::Invalid(..))
        ));
    }

    #[test]
    fn refuses_symlink_escapes() {
        let (dir, roots) = roots();
        std::os::unix::fs::symlink("/etc", roots.workspace.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", roots.workspace.join("pw")).unwrap();
        std::os::unix::fs::symlink(dir.path(), roots.workspace.join("up")).unwrap();
        let outside = |r: Result<PathBuf, PathError>| matches!(r, Err(PathError::Outside(_)));
        assert!(outside(resolve(&roots, "etc/passwd")));
        assert!(outside(resolve(&roots, "etc/new/file")));
        assert!(outside(resolve(&roots, "pw")));
        assert!(outside(resolve(&roots, "up/ws/../x")));
        // A dangling symlink in the middle could be followed by mkdir -p.
        std::os::unix::fs::symlink("/nonexistent-agentvm", roots.workspace.join("dangling"))
            .unwrap();
        assert!(outside(resolve(&roots, "dangling/sub/file")));
        // As the last component it is the entry itself.
        assert_eq!(
            resolve(&roots, "dangling").unwrap(),
            roots.workspace.join("dangling")
        );
        // A symlink that stays inside is fine and is resolved.
        fs::create_dir(roots.workspace.join("real")).unwrap();
        std::os::unix::fs::symlink("real", roots.workspace.join("alias")).unwrap();
        assert_eq!(
            resolve(&roots, "alias/f").unwrap(),
            roots.workspace.join("real/f")
        );
    }
}
