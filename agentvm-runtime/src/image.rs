//! Finding a guest image built by `agentvm image build` (or, in the agentvm
//! repository, `cargo xtask build-image`), and saying how to build a missing
//! one ([`build_hint`]).
//!
//! An image `<name>` lives in `<images_dir>/<name>/`: `vmlinuz`,
//! `initramfs.cpio.gz` and `manifest.json`. The builder writes the manifest
//! last, so a directory with a manifest holds a complete image. From the
//! manifest this module reads the kernel command line (`"cmdline"`) and,
//! when present, the file names of the kernel and initramfs
//! (`"vmlinuz": {"file": ...}`, `"initramfs": {"file": ...}`), and the
//! read-only root file system disk of images that have one
//! (`"rootfs": {"file": ..., "size": ...}`, the `agent` image); every other
//! field is ignored.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backend::BackendError;
use crate::config::is_valid_image_name;
use crate::spec::ImagePaths;

/// File name of an image's manifest.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Default file name of the kernel in an image directory.
pub const KERNEL_FILE: &str = "vmlinuz";
/// Default file name of the initramfs in an image directory.
pub const INITRAMFS_FILE: &str = "initramfs.cpio.gz";

#[derive(Debug, Deserialize)]
struct Manifest {
    cmdline: String,
    #[serde(default)]
    vmlinuz: Option<FileRef>,
    #[serde(default)]
    initramfs: Option<FileRef>,
    #[serde(default)]
    rootfs: Option<FileRef>,
}

#[derive(Debug, Deserialize)]
struct FileRef {
    file: String,
    #[serde(default)]
    size: Option<u64>,
}

/// The agentvm checkout this crate was compiled from: the CLI is installed
/// from there, and images under it may also be built with `cargo xtask`.
fn agentvm_checkout() -> &'static Path {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir)
}

/// `path` as one shell word.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The command of the installable `agentvm` CLI that builds image `name`
/// into `images_dir` (the directory the harness looks in), from any crate.
pub fn build_command(name: &str, images_dir: &Path) -> String {
    let name_arg = if name == "default" {
        String::new()
    } else {
        format!(" {name}")
    };
    format!(
        "agentvm image build{name_arg} --out {}",
        shell_word(images_dir)
    )
}

/// The same build with `cargo xtask`, which only the agentvm repository has.
pub fn xtask_build_command(name: &str, images_dir: &Path) -> String {
    let name_arg = if name == "default" {
        String::new()
    } else {
        format!(" --name {name}")
    };
    format!(
        "cargo xtask build-image{name_arg} --out {}",
        shell_word(images_dir)
    )
}

/// What to run to build image `name` into `images_dir` (`extra`: more
/// flags, e.g. `--force`): the [`build_command`], how to install that CLI,
/// and, when `images_dir` is inside the agentvm checkout, the
/// [`xtask_build_command`] too.
pub fn build_hint(name: &str, images_dir: &Path, extra: &str) -> String {
    let checkout = agentvm_checkout();
    let mut hint = format!(
        "`{}{extra}` (the agentvm CLI; install it with `cargo install --path {}`",
        build_command(name, images_dir),
        shell_word(&checkout.join("agentvm-cli"))
    );
    if images_dir.starts_with(checkout) {
        hint.push_str(&format!(
            "; or, in the agentvm repository, `{}{extra}`",
            xtask_build_command(name, images_dir)
        ));
    }
    hint.push(')');
    hint
}

/// [`build_hint`] for an image found missing at `path` (its directory or
/// a file in it): the images directory is the parent of the directory named
/// after the image.
pub fn build_hint_for_missing(name: &str, path: &Path, extra: &str) -> String {
    let images_dir = path
        .ancestors()
        .find(|dir| dir.file_name() == Some(std::ffi::OsStr::new(name)))
        .and_then(Path::parent)
        .unwrap_or(path);
    build_hint(name, images_dir, extra)
}

/// Finds image `name` under `images_dir` and reads its manifest.
///
/// A missing image directory, manifest, kernel or initramfs is
/// [`BackendError::MissingImage`], whose message says what to run
/// ([`build_hint`]). A manifest that cannot be parsed, or an invalid
/// image name, is [`BackendError::Io`] (its message says to rebuild too).
pub fn locate_image(name: &str, images_dir: &Path) -> Result<ImagePaths, BackendError> {
    if !is_valid_image_name(name) {
        return Err(BackendError::Io {
            context: format!(
                "invalid guest image name {name:?} (use ASCII letters, digits, '.', '_', '-')"
            ),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    }
    let dir = images_dir.join(name);
    let manifest_path = dir.join(MANIFEST_FILE);
    let missing = |path: PathBuf| BackendError::MissingImage {
        name: name.to_string(),
        path,
    };
    let text = match std::fs::read_to_string(&manifest_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing(manifest_path)),
        Err(source) => {
            return Err(BackendError::Io {
                context: format!(
                    "cannot read guest image manifest {}",
                    manifest_path.display()
                ),
                source,
            })
        }
    };
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| BackendError::Io {
        context: format!(
            "invalid guest image manifest {} (rebuild the image with {})",
            manifest_path.display(),
            build_hint(name, images_dir, " --force")
        ),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    let file = |entry: Option<FileRef>, default: &str| -> Result<PathBuf, BackendError> {
        let file_name = entry.map_or_else(|| default.to_string(), |f| f.file);
        locate_file(name, &dir, &manifest_path, file_name)
    };
    let kernel = file(manifest.vmlinuz, KERNEL_FILE)?;
    let initramfs = file(manifest.initramfs, INITRAMFS_FILE)?;
    let rootfs = match manifest.rootfs {
        Some(r) => {
            let path = locate_file(name, &dir, &manifest_path, r.file)?;
            if let Some(expected) = r.size {
                check_size(name, &path, expected)?;
            }
            Some(path)
        }
        None => None,
    };
    Ok(ImagePaths {
        name: name.to_string(),
        kernel,
        initramfs,
        cmdline: manifest.cmdline,
        rootfs,
    })
}

/// A file the manifest names: inside the image directory, and present.
fn locate_file(
    name: &str,
    dir: &Path,
    manifest_path: &Path,
    file_name: String,
) -> Result<PathBuf, BackendError> {
    // The manifest is written by our builder, but keep it inside the image dir.
    let plain = Path::new(&file_name)
        .file_name()
        .is_some_and(|n| n == file_name.as_str());
    if !plain {
        return Err(BackendError::Io {
            context: format!(
                "guest image manifest {} names a file outside the image: {file_name:?}",
                manifest_path.display()
            ),
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        });
    }
    let path = dir.join(&file_name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(BackendError::MissingImage {
            name: name.to_string(),
            path,
        })
    }
}

/// A root file system disk whose size is not the manifest's was truncated
/// or replaced: booting it would fail in the guest, so say so here.
fn check_size(name: &str, path: &Path, expected: u64) -> Result<(), BackendError> {
    let actual = std::fs::metadata(path)
        .map_err(|source| BackendError::Io {
            context: format!("cannot read guest image file {}", path.display()),
            source,
        })?
        .len();
    if actual == expected {
        return Ok(());
    }
    Err(BackendError::Io {
        context: format!(
            "guest image file {} is {actual} bytes but its manifest says {expected}: \
             it is truncated or was replaced (rebuild it with {})",
            path.display(),
            build_hint_for_missing(name, path, " --force")
        ),
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("agentvm-image-test-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write_image(images: &Path, name: &str, manifest: &str) -> PathBuf {
        let dir = images.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(KERNEL_FILE), b"kernel").unwrap();
        std::fs::write(dir.join(INITRAMFS_FILE), b"initramfs").unwrap();
        std::fs::write(dir.join(MANIFEST_FILE), manifest).unwrap();
        dir
    }

    #[test]
    fn finds_a_complete_image() {
        let tmp = TempDir::new("ok");
        let dir = write_image(
            &tmp.0,
            "default",
            r#"{"name": "default", "cmdline": "console=ttyS0 panic=1", "vmlinuz": {"file": "vmlinuz", "size": 6}, "other": [1, 2]}"#,
        );
        let image = locate_image("default", &tmp.0).unwrap();
        assert_eq!(
            image,
            ImagePaths {
                name: "default".into(),
                kernel: dir.join("vmlinuz"),
                initramfs: dir.join("initramfs.cpio.gz"),
                cmdline: "console=ttyS0 panic=1".into(),
                rootfs: None,
            }
        );
    }

    #[test]
    fn missing_image_says_how_to_build_it() {
        let tmp = TempDir::new("missing");
        let e = locate_image("default", &tmp.0).unwrap_err();
        assert!(matches!(e, BackendError::MissingImage { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "build it with `agentvm image build --out {}` (the agentvm CLI; install it \
                 with `cargo install --path {}/agentvm-cli`)",
                tmp.0.display(),
                agentvm_checkout().display()
            )),
            "{msg}"
        );
        assert!(
            msg.contains(&tmp.0.join("default/manifest.json").display().to_string()),
            "{msg}"
        );
        // Outside the agentvm checkout there is no xtask to mention.
        assert!(!msg.contains("xtask"), "{msg}");
    }

    #[test]
    fn missing_kernel_is_a_missing_image() {
        let tmp = TempDir::new("nokernel");
        let dir = write_image(&tmp.0, "x", r#"{"cmdline": ""}"#);
        std::fs::remove_file(dir.join(KERNEL_FILE)).unwrap();
        let e = locate_image("x", &tmp.0).unwrap_err();
        assert!(
            matches!(&e, BackendError::MissingImage { path, .. } if path == &dir.join(KERNEL_FILE)),
            "{e:?}"
        );
    }

    #[test]
    fn bad_manifests_and_names() {
        let tmp = TempDir::new("bad");
        write_image(&tmp.0, "nocmd", r#"{"name": "nocmd"}"#);
        let e = locate_image("nocmd", &tmp.0).unwrap_err().to_string();
        assert!(
            e.contains("invalid guest image manifest")
                && e.contains(&format!(
                    "`agentvm image build nocmd --out {} --force`",
                    tmp.0.display()
                )),
            "{e}"
        );
        write_image(
            &tmp.0,
            "escape",
            r#"{"cmdline": "", "vmlinuz": {"file": "../../etc/passwd"}}"#,
        );
        let e = locate_image("escape", &tmp.0).unwrap_err().to_string();
        assert!(e.contains("outside the image"), "{e}");
        let e = locate_image("../x", &tmp.0).unwrap_err().to_string();
        assert!(e.contains("invalid guest image name"), "{e}");
    }

    #[test]
    fn rootfs_disk_is_located_and_size_checked() {
        let tmp = TempDir::new("rootfs");
        let dir = write_image(
            &tmp.0,
            "agent",
            r#"{"cmdline": "", "rootfs": {"file": "rootfs.erofs", "size": 4, "fs_type": "erofs"}}"#,
        );
        // Missing disk: a missing image.
        let e = locate_image("agent", &tmp.0).unwrap_err();
        assert!(
            matches!(&e, BackendError::MissingImage { path, .. } if path == &dir.join("rootfs.erofs")),
            "{e:?}"
        );
        std::fs::write(dir.join("rootfs.erofs"), b"abcd").unwrap();
        let image = locate_image("agent", &tmp.0).unwrap();
        assert_eq!(image.rootfs, Some(dir.join("rootfs.erofs")));
        // Truncated disk: a clear error that says how to rebuild.
        std::fs::write(dir.join("rootfs.erofs"), b"ab").unwrap();
        let e = locate_image("agent", &tmp.0).unwrap_err().to_string();
        assert!(
            e.contains("is 2 bytes but its manifest says 4")
                && e.contains(&format!(
                    "`agentvm image build agent --out {} --force`",
                    tmp.0.display()
                )),
            "{e}"
        );
        // Images without a disk have none.
        write_image(&tmp.0, "default", r#"{"cmdline": ""}"#);
        assert_eq!(locate_image("default", &tmp.0).unwrap().rootfs, None);
    }

    #[test]
    fn build_commands_name_the_output_directory() {
        let dir = Path::new("/srv/images");
        assert_eq!(
            build_command("default", dir),
            "agentvm image build --out /srv/images"
        );
        assert_eq!(
            build_command("rich", dir),
            "agentvm image build rich --out /srv/images"
        );
        assert_eq!(
            xtask_build_command("rich", dir),
            "cargo xtask build-image --name rich --out /srv/images"
        );
        assert_eq!(
            build_command("rich", Path::new("/srv/my images")),
            "agentvm image build rich --out '/srv/my images'"
        );
        let install = format!(
            "install it with `cargo install --path {}/agentvm-cli`",
            agentvm_checkout().display()
        );
        assert_eq!(
            build_hint_for_missing("rich", Path::new("/srv/images/rich/vmlinuz"), ""),
            format!("`agentvm image build rich --out /srv/images` (the agentvm CLI; {install})")
        );
        // Images inside the agentvm checkout: the xtask form too.
        let inside = agentvm_checkout().join("target/agentvm/images");
        assert_eq!(
            build_hint("default", &inside, " --force"),
            format!(
                "`agentvm image build --out {dir} --force` (the agentvm CLI; {install}; or, in \
                 the agentvm repository, `cargo xtask build-image --out {dir} --force`)",
                dir = inside.display()
            )
        );
    }
}
