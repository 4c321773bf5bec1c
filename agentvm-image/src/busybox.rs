//! The static busybox that provides the guest's shell and tools.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::elf;
use crate::util::{run_captured, sha256_hex};

const INSTALL_HINT: &str = "busybox-static is not installed: apt-get install busybox-static";

pub struct Busybox {
    pub path: PathBuf,
    pub data: Vec<u8>,
    pub sha256: String,
    /// First line of `busybox --help`, e.g. `BusyBox v1.35.0 (Debian ...)`.
    pub version: String,
    /// Applet paths relative to `/` (e.g. `bin/sh`, `usr/bin/awk`), sorted.
    pub applets: Vec<String>,
}

/// Finds the static busybox (`explicit`, else where busybox-static installs
/// it) and asks it for its version and applet list.
pub fn locate(explicit: Option<&Path>) -> Result<Busybox> {
    let path = match explicit {
        Some(p) if p.is_file() => p.to_path_buf(),
        Some(p) => bail!("busybox {} does not exist", p.display()),
        None => ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .context(INSTALL_HINT)?,
    };
    let data = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    if let Err(e) = elf::check_static_x86_64(&data) {
        bail!(
            "{} is not a static x86-64 busybox ({e:#}): the image has no libc; \
             apt-get install busybox-static (the `busybox` package is dynamically linked)",
            path.display()
        );
    }
    let help = run_captured(Command::new(&path).arg("--help"));
    // `busybox --help` exits 0 on Debian; be lenient if a build exits 1.
    let help_text = match help {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => bail!("running {} failed: {e:#}", path.display()),
    };
    let version = help_text.lines().next().unwrap_or("").trim().to_string();
    let list = run_captured(Command::new(&path).arg("--list-full"))
        .with_context(|| format!("{} --list-full (needs FEATURE_INSTALLER)", path.display()))?;
    let applets = parse_applets(&String::from_utf8_lossy(&list.stdout));
    if !applets.iter().any(|a| a == "bin/sh") {
        bail!("{} has no `sh` applet", path.display());
    }
    Ok(Busybox {
        sha256: sha256_hex(&data),
        path,
        data,
        version,
        applets,
    })
}

/// Parses `busybox --list-full` output: one relative path per line.
/// Drops anything odd (absolute, `..`, the busybox binary itself).
pub fn parse_applets(list: &str) -> Vec<String> {
    let mut v: Vec<String> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('/'))
        .filter(|l| !Path::new(l).components().any(|c| c.as_os_str() == ".."))
        .filter(|l| *l != "bin/busybox")
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_applet_list() {
        let l =
            parse_applets("usr/bin/[\nsbin/insmod\n\nbin/sh\n/abs\n../x\nbin/busybox\nbin/sh\n");
        assert_eq!(l, ["bin/sh", "sbin/insmod", "usr/bin/["]);
    }
}
