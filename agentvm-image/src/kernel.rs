//! Fetching and unpacking the Debian cloud kernel package.
//!
//! `linux-image-cloud-amd64` is a metapackage; it depends on the versioned
//! package (`linux-image-<abi>-cloud-amd64`) which holds `boot/vmlinuz-*` and
//! `lib/modules/<release>/`. Both names and the version come from the local
//! apt lists (`apt-cache show`), so an up-to-date check needs no network.
//! The unpacked package is cached under `<cache>/kernel/<package>_<version>`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::progress::Progress;
use crate::util::{is_root, require_tool, run_captured, sha256_file};

pub const DEFAULT_PACKAGE: &str = "linux-image-cloud-amd64";
const DEB_SHA256: &str = ".deb-sha256";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageInfo {
    pub package: String,
    pub version: String,
}

pub struct Kernel {
    /// SHA-256 of the downloaded .deb (recorded in the cache at download).
    pub deb_sha256: Option<String>,
    /// `uname -r` of this kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked package.
    pub modules_dir: PathBuf,
}

/// Resolves `package` (a metapackage or a versioned kernel package) to the
/// versioned package and its candidate version. One `apt-cache show` when
/// the metapackage pins the version (`Depends: linux-image-X (= V)`).
pub fn resolve(package: &str) -> Result<PackageInfo> {
    require_tool(
        "apt-cache",
        "this xtask needs a Debian/Ubuntu host with apt",
    )?;
    let show = apt_show(package)?;
    let depends = field(&show, "Depends").unwrap_or_default();
    let (concrete, version) = match kernel_dependency(&depends) {
        Some((dep, Some(pinned))) => (dep, pinned),
        Some((dep, None)) => {
            let version = field(&apt_show(&dep)?, "Version")
                .with_context(|| format!("apt-cache show {dep}: no Version field"))?;
            (dep, version)
        }
        None => {
            let version = field(&show, "Version")
                .with_context(|| format!("apt-cache show {package}: no Version field"))?;
            (package.to_string(), version)
        }
    };
    Ok(PackageInfo {
        package: concrete,
        version,
    })
}

/// Returns the unpacked kernel for `info`, downloading and unpacking it into
/// `cache` first if needed.
pub fn fetch(info: &PackageInfo, cache: &Path, progress: &Progress<'_>) -> Result<Kernel> {
    let dir = cache.join("kernel").join(format!(
        "{}_{}",
        info.package,
        info.version.replace(':', "%3a")
    ));
    if !dir.join(".complete").is_file() {
        progress.step(format!(
            "downloading kernel {}={} (apt-get download)",
            info.package, info.version
        ));
        require_tool("apt-get", "this xtask needs a Debian/Ubuntu host with apt")?;
        require_tool("dpkg-deb", "apt-get install dpkg")?;
        let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        let deb_sha256 = match download_and_unpack(info, &tmp, progress) {
            Ok(h) => h,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let _ = fs::remove_dir_all(&dir);
        fs::rename(tmp.join("root"), &dir)
            .with_context(|| format!("rename into {}", dir.display()))?;
        let _ = fs::remove_dir_all(&tmp);
        fs::write(dir.join(DEB_SHA256), format!("{deb_sha256}\n"))?;
        // Written last: marks the unpacked tree as complete.
        fs::write(dir.join(".complete"), format!("{}\n", info.version))?;
    } else {
        progress.step(format!(
            "kernel {}={} already unpacked in {}",
            info.package,
            info.version,
            dir.display()
        ));
    }
    locate(info, &dir)
}

/// Downloads the .deb into `tmp`, unpacks it to `tmp/root`, returns its SHA-256.
fn download_and_unpack(info: &PackageInfo, tmp: &Path, progress: &Progress<'_>) -> Result<String> {
    let spec = format!("{}={}", info.package, info.version);
    run_captured(
        Command::new("apt-get")
            .args(["download", "-q", &spec])
            .current_dir(tmp),
    )
    .map_err(|e| apt_error(e, &format!("apt-get download {spec}")))?;
    let deb = fs::read_dir(tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {spec} produced no .deb"))?;
    progress.note(format!(
        "downloaded {} ({:.1} MiB); unpacking with dpkg-deb -x",
        deb.file_name().unwrap_or_default().to_string_lossy(),
        fs::metadata(&deb)?.len() as f64 / (1 << 20) as f64
    ));
    let sha256 = sha256_file(&deb)?;
    let root = tmp.join("root");
    run_captured(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    fs::remove_file(&deb)?;
    Ok(sha256)
}

/// Finds `boot/vmlinuz-<release>` and `lib/modules/<release>` in an unpacked
/// kernel package.
fn locate(info: &PackageInfo, dir: &Path) -> Result<Kernel> {
    let boot = dir.join("boot");
    let mut images: Vec<PathBuf> = fs::read_dir(&boot)
        .with_context(|| {
            format!(
                "read {} (is {} a kernel package?)",
                boot.display(),
                info.package
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    images.sort();
    let [vmlinuz] = images.as_slice() else {
        bail!(
            "expected exactly one boot/vmlinuz-* in {}, found {}",
            dir.display(),
            images.len()
        );
    };
    let release = vmlinuz
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    let modules_dir = dir.join("lib/modules").join(&release);
    if !modules_dir.is_dir() {
        bail!("{} is missing", modules_dir.display());
    }
    let deb_sha256 = fs::read_to_string(dir.join(DEB_SHA256))
        .ok()
        .map(|s| s.trim().to_string());
    Ok(Kernel {
        deb_sha256,
        release,
        vmlinuz: vmlinuz.clone(),
        modules_dir,
    })
}

fn apt_show(package: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .output()
        .context("failed to run apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.trim().is_empty() {
        let err = anyhow::anyhow!(
            "`apt-cache show {package}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return Err(apt_error(err, &format!("apt-cache show {package}")));
    }
    Ok(text)
}

/// Adds the likely fix to an apt failure: missing or stale package lists.
fn apt_error(err: anyhow::Error, what: &str) -> anyhow::Error {
    let update = if is_root() {
        "run `apt-get update`".to_string()
    } else {
        "run `sudo apt-get update` (updating the package lists needs root; \
         `apt-get download` itself does not)"
            .to_string()
    };
    let lists = apt_lists_dir();
    if !has_package_lists(&lists) {
        err.context(format!(
            "{what}: the apt package lists are missing ({} has no *_Packages \
             files): {update}",
            lists.display()
        ))
    } else {
        err.context(format!(
            "{what} failed; if the package is unknown or the download 404s, the \
             package lists may be stale: {update}"
        ))
    }
}

/// Where apt keeps its package lists (`Dir::State::lists`).
fn apt_lists_dir() -> PathBuf {
    Command::new("apt-config")
        .args(["shell", "L", "Dir::State::lists/d"])
        .output()
        .ok()
        .and_then(|o| {
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            let v = out
                .trim()
                .strip_prefix("L='")?
                .strip_suffix('\'')?
                .to_string();
            (!v.is_empty()).then(|| PathBuf::from(v))
        })
        .unwrap_or_else(|| PathBuf::from("/var/lib/apt/lists"))
}

fn has_package_lists(dir: &Path) -> bool {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false)
}

/// The value of `name:` in the first stanza of deb822 text (continuation
/// lines joined with spaces).
pub fn field(text: &str, name: &str) -> Option<String> {
    let mut value: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            break; // end of the first stanza
        }
        if let Some(v) = value.as_mut() {
            if line.starts_with([' ', '\t']) {
                v.push(' ');
                v.push_str(line.trim());
                continue;
            }
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k == name {
                value = Some(v.trim().to_string());
            }
        }
    }
    value
}

/// The versioned kernel package a metapackage's `Depends` names, if any,
/// with its pinned version: `linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)`
/// gives the name and `Some("6.1.192-2")`.
pub fn kernel_dependency(depends: &str) -> Option<(String, Option<String>)> {
    depends
        .split(',')
        .flat_map(|alt| alt.split('|'))
        .map(str::trim)
        .find_map(|d| {
            let (name, rest) = d.split_once(' ').unwrap_or((d, ""));
            if !name.starts_with("linux-image-") || !name.chars().any(|c| c.is_ascii_digit()) {
                return None;
            }
            let pinned = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .and_then(|r| r.trim().strip_prefix('='))
                .map(|v| v.trim().to_string());
            Some((name.to_string(), pinned))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = "Package: linux-image-cloud-amd64\n\
        Source: linux-signed-amd64 (6.1.192+2)\n\
        Version: 6.1.192-2\n\
        Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\n\
        Description: Linux for x86-64 cloud (meta-package)\n\
        \x20This package depends on the latest Linux kernel\n\
        \x20and modules for use on cloud platforms.\n\
        \n\
        Package: linux-image-cloud-amd64\n\
        Version: 6.12.0-1\n";

    #[test]
    fn reads_deb822_fields() {
        assert_eq!(field(META, "Version").as_deref(), Some("6.1.192-2"));
        assert_eq!(
            field(META, "Description").as_deref(),
            Some(
                "Linux for x86-64 cloud (meta-package) This package depends on the latest \
                 Linux kernel and modules for use on cloud platforms."
            )
        );
        assert_eq!(field(META, "SHA256"), None);
    }

    #[test]
    fn finds_the_versioned_kernel_package() {
        let d = field(META, "Depends").unwrap();
        assert_eq!(
            kernel_dependency(&d),
            Some((
                "linux-image-6.1.0-56-cloud-amd64".to_string(),
                Some("6.1.192-2".to_string())
            ))
        );
        // The versioned package's own Depends name no kernel image.
        assert_eq!(
            kernel_dependency(
                "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool"
            ),
            None
        );
        assert_eq!(
            kernel_dependency("foo | linux-image-6.12.9-cloud-amd64-unsigned"),
            Some(("linux-image-6.12.9-cloud-amd64-unsigned".to_string(), None))
        );
        // Only an exact pin counts as the version.
        assert_eq!(
            kernel_dependency("linux-image-6.1.0-9-amd64 (>= 6.1)"),
            Some(("linux-image-6.1.0-9-amd64".to_string(), None))
        );
    }
}
