//! The `agent` image's root file system disk through the QEMU backend, with
//! the real guest: it boots (Hello) with the disk attached read-only, and a
//! corrupt or absent disk fails the boot promptly with the guest init's
//! message from the serial console instead of hanging.
//!
//! These need the agent image (hundreds of MiB, minutes to build), so they
//! are `#[ignore]`d; `cargo xtask test` builds the image and runs them with
//! `--ignored`. By hand:
//! `cargo xtask build-image --name agent && cargo test -p agentvm-runtime --test agent_image -- --ignored`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentvm_runtime::backend::qemu::{QemuBackend, QemuConfig};
use agentvm_runtime::image::locate_image;
use agentvm_runtime::spec::{Accel, NetworkMode, ResourceProfile, VmSpec};
use agentvm_runtime::vm::Vm;

const NEEDS_IMAGE: &str = "needs the agent image: cargo xtask build-image --name agent";

fn images_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t).join("agentvm/images"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/agentvm/images"),
    }
}

/// The image under test: `agent`, or `AGENTVM_TEST_AGENT_IMAGE` (e.g. an
/// image built with `--rootfs-format squashfs`, to compare).
fn image_name() -> String {
    std::env::var("AGENTVM_TEST_AGENT_IMAGE").unwrap_or_else(|_| "agent".into())
}

fn spec() -> VmSpec {
    let image = locate_image(&image_name(), &images_dir())
        .unwrap_or_else(|e| panic!("{e} ({NEEDS_IMAGE})"));
    VmSpec {
        image,
        profile: ResourceProfile::Light,
        network: NetworkMode::Isolated,
        accel: Accel::Auto,
        boot_timeout: Duration::from_secs(120),
    }
}

fn backend() -> QemuBackend {
    // No golden cache: every boot here is a cold boot.
    QemuBackend::new(QemuConfig::default()).unwrap()
}

#[tokio::test]
#[ignore = "needs the agent image: cargo xtask build-image --name agent"]
async fn boots_with_the_read_only_disk_and_reverts() {
    let backend = backend();
    let spec = spec();
    let t = Instant::now();
    let mut vm = Vm::boot(&backend, spec).await.unwrap();
    println!(
        "timing: cold boot to Hello + golden snapshot {:.2} s ({:?})",
        t.elapsed().as_secs_f64(),
        vm.boot_timings()
    );
    println!(
        "image {} (rootfs {:?})",
        image_name(),
        vm.spec().image.rootfs
    );
    let serial = vm.serial_tail(50);
    println!(
        "{}",
        serial
            .lines()
            .filter(|l| l.contains("agentvm-init"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        serial.contains("root file system erofs") || serial.contains("root file system squashfs"),
        "{serial}"
    );
    let out = vm
        .exec(agentvm_runtime::command::Command::shell("cat /proc/mounts"))
        .await
        .unwrap();
    let mounts = String::from_utf8_lossy(&out.stdout);
    assert!(mounts.contains("overlay / overlay"), "{mounts}");
    // Cold (first) and warm runs of a few programs, and their peak RSS.
    for (what, script) in [
        ("git --version", "git --version"),
        ("python3 -c pass", "python3 -c pass"),
        ("node -e 0", "node -e 0"),
        (
            "claude --version",
            "command -v claude >/dev/null || exit 0; claude --version",
        ),
    ] {
        let mut line = format!("timing: {what}:");
        for run in ["cold", "warm"] {
            let out = vm
                .exec(agentvm_runtime::command::Command::shell(script))
                .await
                .unwrap();
            assert_eq!(
                out.report.status,
                agentvm_runtime::protocol::ExitStatus::Code(0),
                "{what}: {out:?}"
            );
            line.push_str(&format!(
                " {run} {:.3} s (peak RSS {:.0} MiB)",
                out.report.duration.as_secs_f64(),
                out.report.resources.peak_rss_bytes.unwrap_or(0) as f64 / 1048576.0
            ));
        }
        println!("{line}");
    }
    // exec `true` p50: as the default user (through the run-as helper) and as root.
    for (who, command) in [
        ("agent", agentvm_runtime::command::Command::new("true")),
        (
            "root",
            agentvm_runtime::command::Command::new("true").as_root(),
        ),
    ] {
        let mut times = Vec::new();
        for _ in 0..21 {
            let t = Instant::now();
            let out = vm.exec(command.clone()).await.unwrap();
            times.push(t.elapsed());
            assert_eq!(
                out.report.status,
                agentvm_runtime::protocol::ExitStatus::Code(0)
            );
        }
        times.sort();
        println!(
            "timing: exec true as {who} p50 {:.1} ms",
            times[10].as_secs_f64() * 1000.0
        );
    }
    let mut reverts = Vec::new();
    for _ in 0..5 {
        let out = vm
            .exec(agentvm_runtime::command::Command::shell(
                "head -c 50000000 /dev/zero > /tmp/fill && echo x > /home/agent/f",
            ))
            .await
            .unwrap();
        assert_eq!(
            out.report.status,
            agentvm_runtime::protocol::ExitStatus::Code(0)
        );
        let t = Instant::now();
        vm.revert().await.unwrap();
        reverts.push(t.elapsed());
    }
    reverts.sort();
    println!(
        "timing: revert after writing 50 MB p50 {:.3} s",
        reverts[2].as_secs_f64()
    );
    let out = vm
        .exec(agentvm_runtime::command::Command::shell(
            "test ! -e /tmp/fill && test ! -e /home/agent/f",
        ))
        .await
        .unwrap();
    assert_eq!(
        out.report.status,
        agentvm_runtime::protocol::ExitStatus::Code(0)
    );
    vm.destroy().await.unwrap();
}

/// A root file system disk that does not mount (garbage, or a truncated
/// image the manifest check did not see) fails the boot with the init's
/// FATAL line, quickly.
#[tokio::test]
#[ignore = "needs the agent image: cargo xtask build-image --name agent"]
async fn corrupt_disk_fails_the_boot_with_the_init_message() {
    let backend = backend();
    let mut spec = spec();
    let bad = std::env::temp_dir().join(format!("agentvm-bad-rootfs-{}.img", std::process::id()));
    std::fs::write(&bad, vec![0x5a; 4 << 20]).unwrap();
    spec.image.rootfs = Some(bad.clone());
    let t = Instant::now();
    let err = match Vm::boot(&backend, spec).await {
        Ok(_) => panic!("booted from a garbage root file system"),
        Err(e) => e.to_string(),
    };
    std::fs::remove_file(&bad).unwrap();
    println!(
        "timing: corrupt disk -> boot error in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert!(
        err.contains("FATAL: cannot mount the root file system") && err.contains("--force"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(90), "{err}");
}

/// An agent image booted without its disk says which disk is missing.
#[tokio::test]
#[ignore = "needs the agent image: cargo xtask build-image --name agent"]
async fn missing_disk_fails_the_boot_with_the_init_message() {
    let backend = backend();
    let mut spec = spec();
    spec.image.rootfs = None;
    let err = match Vm::boot(&backend, spec).await {
        Ok(_) => panic!("booted without the root file system disk"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("no disk with serial agentvm-rootfs"), "{err}");
}
