//! A writer for the `newc` cpio format (the one the Linux kernel unpacks as
//! an initramfs), written in Rust rather than driving the `cpio` tool:
//!
//! * no host tool needed, and no root/fakeroot: entries get uid/gid 0 and
//!   device nodes (`/dev/console`) are written without `mknod`;
//! * reproducible by construction: the caller's order (sorted), fixed mtime,
//!   inode numbers assigned sequentially;
//! * the format is ~30 lines (110-byte ASCII header, name, data, each padded
//!   to 4 bytes) and the tests check the output with GNU `cpio -it`.
//!
//! # Why not the `cpio` crate
//!
//! `cpio` 0.4.2 (jcreekmore/cpio-rs, no dependencies) writes the same newc
//! headers (`newc::Builder`: mode, nlink, mtime, rdev; lower-case hex like
//! ours) and would replace only the header formatting and padding here
//! (~40 lines). Everything else stays ours either way: sequential inode
//! numbers, uid/gid 0, the fixed mtime, name checks, the entry kinds. And its
//! `newc::Writer::finish` returns `Ok` without padding when fewer bytes were
//! written than the size declared in the header, which leaves a corrupt
//! archive; here an entry's data is one slice, so the size cannot disagree
//! with it. Hard links are not needed (busybox applets are symlinks) and the
//! crate only offers the raw `nlink` for them anyway. Kept: the crate would
//! add a dependency without removing a risk.

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes newc entries to `W`, then the trailer ([`CpioWriter::finish`]).
pub struct CpioWriter<W: Write> {
    w: W,
    offset: u64,
    next_ino: u32,
    mtime: u32,
}

/// The header fields of one entry that vary.
struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    /// Every entry gets `mtime` (seconds since the epoch).
    pub fn new(w: W, mtime: u32) -> Self {
        Self {
            w,
            offset: 0,
            next_ino: 1,
            mtime,
        }
    }

    /// A directory. `perm` holds the permission bits (e.g. `0o755`).
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(
            Header {
                name,
                mode: S_IFDIR | perm,
                nlink: 2,
                size: 0,
                rdev: (0, 0),
            },
            &[],
        )
    }

    /// A regular file with permission bits `perm` and contents `data`
    /// (at most 4 GiB: the header's size field has 32 bits).
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is over 4 GiB"))
        })?;
        self.entry(
            Header {
                name,
                mode: S_IFREG | perm,
                nlink: 1,
                size,
                rdev: (0, 0),
            },
            data,
        )
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(
            Header {
                name,
                mode: S_IFLNK | 0o777,
                nlink: 1,
                size: target.len() as u32,
                rdev: (0, 0),
            },
            target.as_bytes(),
        )
    }

    /// A character device node `major:minor`.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(
            Header {
                name,
                mode: S_IFCHR | perm,
                nlink: 1,
                size: 0,
                rdev: (major, minor),
            },
            &[],
        )
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.entry(
            Header {
                name: "TRAILER!!!",
                mode: 0,
                nlink: 1,
                size: 0,
                rdev: (0, 0),
            },
            &[],
        )?;
        Ok(self.w)
    }

    fn entry(&mut self, h: Header<'_>, data: &[u8]) -> io::Result<()> {
        if h.name.is_empty() || h.name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {:?}", h.name),
            ));
        }
        let ino = self.next_ino;
        if ino != 0 {
            self.next_ino += 1;
        }
        let mtime = if h.name == "TRAILER!!!" {
            0
        } else {
            self.mtime
        };
        let fields = [
            ino,
            h.mode,
            0, // uid
            0, // gid
            h.nlink,
            mtime,
            h.size,
            0, // devmajor
            0, // devminor
            h.rdev.0,
            h.rdev.1,
            h.name.len() as u32 + 1,
            0, // check (unused in newc)
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(h.name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.offset += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.offset % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample() -> Vec<u8> {
        let mut c = CpioWriter::new(Vec::new(), 0);
        c.dir("bin", 0o755).unwrap();
        c.file("bin/busybox", 0o755, b"\x7fELF fake").unwrap();
        c.symlink("bin/sh", "busybox").unwrap();
        c.dir("dev", 0o755).unwrap();
        c.char_dev("dev/console", 0o600, 5, 1).unwrap();
        c.file("init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        c.file("empty", 0o644, b"").unwrap();
        c.finish().unwrap()
    }

    #[test]
    fn layout_is_aligned_and_ends_with_trailer() {
        let out = sample();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // Walk the archive with an independent reader of the header.
        let mut off = 0;
        let mut names = Vec::new();
        loop {
            let h = std::str::from_utf8(&out[off..off + 110]).unwrap();
            assert_eq!(&h[..6], "070701");
            let field = |i: usize| u32::from_str_radix(&h[6 + 8 * i..14 + 8 * i], 16).unwrap();
            let (size, namesize) = (field(6) as usize, field(11) as usize);
            let name = std::str::from_utf8(&out[off + 110..off + 110 + namesize - 1]).unwrap();
            names.push(name.to_string());
            off = (off + 110 + namesize).next_multiple_of(4);
            off = (off + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                break;
            }
        }
        assert_eq!(off, out.len());
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "empty",
                "TRAILER!!!"
            ]
        );
    }

    #[test]
    fn output_is_deterministic() {
        assert_eq!(sample(), sample());
    }

    #[test]
    fn rejects_bad_names() {
        let mut c = CpioWriter::new(Vec::new(), 0);
        assert!(c.file("", 0o644, b"").is_err());
        assert!(c.file("a\0b", 0o644, b"").is_err());
    }

    /// Round trip through GNU cpio when it is installed.
    #[test]
    fn gnu_cpio_lists_and_extracts_it() {
        if crate::util::find_in_path("cpio").is_none() {
            eprintln!("cpio not installed; skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, sample()).unwrap();

        let out = Command::new("cpio")
            .args(["-itv", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 7, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x"), "{listing}");
        assert!(lines[0].ends_with(" bin"), "{listing}");
        assert!(lines[1].starts_with("-rwxr-xr-x"), "{listing}");
        assert!(lines[2].starts_with("lrwxrwxrwx"), "{listing}");
        assert!(lines[2].ends_with("bin/sh -> busybox"), "{listing}");
        assert!(lines[4].starts_with("crw-------"), "{listing}");
        assert!(lines[4].contains("5,"), "{listing}");

        // Extract the regular files (not the device node: needs root).
        let ex = dir.path().join("x");
        std::fs::create_dir(&ex).unwrap();
        let status = Command::new("cpio")
            .args(["-id", "--quiet", "--no-absolute-filenames", "-F"])
            .arg(&archive)
            .args(["init", "bin/busybox", "bin/sh", "empty"])
            .current_dir(&ex)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(
            std::fs::read(ex.join("init")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            std::fs::read(ex.join("bin/busybox")).unwrap(),
            b"\x7fELF fake"
        );
        assert_eq!(
            std::fs::read_link(ex.join("bin/sh")).unwrap(),
            std::path::Path::new("busybox")
        );
        assert_eq!(std::fs::read(ex.join("empty")).unwrap(), b"");
    }
}
