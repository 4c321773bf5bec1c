//! Building the guest agent as a static x86-64 binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::elf;
use crate::util::show_command;

pub const TARGET: &str = "x86_64-unknown-linux-gnu";
pub const PACKAGE: &str = "agentvm-guest";
pub const BIN: &str = "agentvm-guest";

/// `cargo build --release -p agentvm-guest --target x86_64-unknown-linux-gnu`
/// with `+crt-static`, in its own target dir so that the host's dependencies
/// (built without those flags) are not rebuilt back and forth.
pub fn build(workspace: &Path, target_dir: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args([
            "build",
            "--release",
            "-p",
            PACKAGE,
            "--bin",
            BIN,
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        // Exactly these flags: CARGO_ENCODED_RUSTFLAGS would take precedence.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    let shown = show_command(&cmd);
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{shown}`"))?;
    if !status.success() {
        bail!(
            "building the guest agent failed ({status}): \
             RUSTFLAGS='-C target-feature=+crt-static' {shown}\n\
             (to pack a prebuilt static binary instead, pass --guest-bin PATH)"
        );
    }
    let bin = target_dir.join(TARGET).join("release").join(BIN);
    check(&bin)?;
    Ok(bin)
}

/// Checks that `bin` is a static x86-64 executable (the initramfs has no
/// dynamic loader or libc).
pub fn check(bin: &Path) -> Result<()> {
    let data = std::fs::read(bin).with_context(|| format!("read {}", bin.display()))?;
    elf::check_static_x86_64(&data).with_context(|| {
        format!(
            "{} cannot run in the guest: the image has no libc or dynamic loader; \
             build it with RUSTFLAGS='-C target-feature=+crt-static' --target {TARGET}",
            bin.display()
        )
    })
}
