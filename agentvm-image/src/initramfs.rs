//! The initramfs tree: what goes where, then packed as a gzip'd newc cpio.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{bail, Result};
use flate2::{Compression, GzBuilder};

use super::cpio::CpioWriter;

/// Every entry gets this mtime: the archive depends only on its contents.
pub const MTIME: u32 = 0;
/// gzip level: 9 saves ~1% over 6 and costs more than twice the time.
const GZIP_LEVEL: u32 = 6;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { perm: u32 },
    File { perm: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { perm: u32, major: u32, minor: u32 },
}

/// Paths are relative to `/` (no leading slash), `/`-separated.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `path`, creating missing parent directories (0755). Adding a
    /// directory that exists updates its permissions; any other clash is an
    /// error (two inputs claiming one path).
    pub fn add(&mut self, path: &str, node: Node) -> Result<()> {
        let path = path.trim_start_matches('/');
        if path.is_empty()
            || path.ends_with('/')
            || path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            bail!("bad initramfs path {path:?}");
        }
        let mut parent = String::new();
        let comps: Vec<&str> = path.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            match self.nodes.get(&parent) {
                None => {
                    self.nodes.insert(parent.clone(), Node::Dir { perm: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => bail!("initramfs: {parent} is not a directory (needed for {path})"),
            }
        }
        match (self.nodes.get(path), &node) {
            (None, _) | (Some(Node::Dir { .. }), Node::Dir { .. }) => {
                self.nodes.insert(path.to_string(), node);
                Ok(())
            }
            (Some(_), _) => bail!("initramfs: {path} added twice"),
        }
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> Result<()> {
        self.add(path, Node::Dir { perm })
    }

    pub fn file(&mut self, path: &str, perm: u32, data: impl Into<Vec<u8>>) -> Result<()> {
        self.add(
            path,
            Node::File {
                perm,
                data: data.into(),
            },
        )
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.add(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.add(path, Node::CharDev { perm, major, minor })
    }

    #[cfg(test)]
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The uncompressed newc archive, entries in sorted path order (parents
    /// before children, since a prefix sorts first).
    pub fn to_cpio(&self) -> Result<Vec<u8>> {
        let mut w = CpioWriter::new(Vec::new(), MTIME);
        for (path, node) in &self.nodes {
            match node {
                Node::Dir { perm } => w.dir(path, *perm)?,
                Node::File { perm, data } => w.file(path, *perm, data)?,
                Node::Symlink { target } => w.symlink(path, target)?,
                Node::CharDev { perm, major, minor } => w.char_dev(path, *perm, *major, *minor)?,
            }
        }
        Ok(w.finish()?)
    }
}

/// gzip with no file name and mtime 0 in the header (reproducible).
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut gz = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::new(GZIP_LEVEL));
    gz.write_all(data)?;
    Ok(gz.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample() -> Tree {
        let mut t = Tree::new();
        t.file("usr/bin/agentvm-guest", 0o755, b"guest".to_vec())
            .unwrap();
        t.file("bin/busybox", 0o755, b"bb".to_vec()).unwrap();
        t.symlink("bin/sh", "/bin/busybox").unwrap();
        t.dir("tmp", 0o1777).unwrap();
        t.char_dev("dev/console", 0o600, 5, 1).unwrap();
        t.file("init", 0o755, b"#!/bin/sh\n".to_vec()).unwrap();
        t
    }

    #[test]
    fn creates_parents_and_sorts() {
        let t = sample();
        assert_eq!(t.get("usr"), Some(&Node::Dir { perm: 0o755 }));
        assert_eq!(t.get("usr/bin"), Some(&Node::Dir { perm: 0o755 }));
        let paths: Vec<&str> = t.nodes.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "tmp",
                "usr",
                "usr/bin",
                "usr/bin/agentvm-guest"
            ]
        );
    }

    #[test]
    fn rejects_clashes_and_bad_paths() {
        let mut t = sample();
        assert!(t.file("bin/sh", 0o755, b"x".to_vec()).is_err());
        assert!(t.file("init/x", 0o644, b"x".to_vec()).is_err());
        assert!(t.file("a/../b", 0o644, b"x".to_vec()).is_err());
        assert!(t.file("", 0o644, b"x".to_vec()).is_err());
        assert!(t.file("a//b", 0o644, b"x".to_vec()).is_err());
        // Re-adding a directory just sets its mode.
        t.dir("usr", 0o700).unwrap();
        assert_eq!(t.get("usr"), Some(&Node::Dir { perm: 0o700 }));
        // Leading slashes are accepted and dropped.
        t.file("/etc/hostname", 0o644, b"agentvm\n".to_vec())
            .unwrap();
        assert!(t.get("etc/hostname").is_some());
    }

    #[test]
    fn packing_is_reproducible_and_gunzips() {
        let a = gzip(&sample().to_cpio().unwrap()).unwrap();
        let b = gzip(&sample().to_cpio().unwrap()).unwrap();
        assert_eq!(a, b);
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&a[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(raw, sample().to_cpio().unwrap());
        // gzip header: magic, deflate, no flags, mtime 0.
        assert_eq!(&a[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
    }
}
