//! `cargo xtask`: project automation (guest image, set-up, benchmarks).

mod bench;
mod image;
mod network;
mod report_check;
mod tasks;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "agentvm project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the guest image (kernel + initramfs) into target/agentvm/images/NAME/.
    BuildImage(Box<image::BuildImageArgs>),
    /// Install missing system packages (QEMU, busybox-static) and build the guest image.
    Setup(tasks::SetupArgs),
    /// Set up (also libvirtd and its network), then run every test of the
    /// workspace, the libvirt backend's included, and the example suite on
    /// libvirt (extra args go to `cargo test --workspace`).
    Test(tasks::TestArgs),
    /// Measure real-VM costs on this machine (boot, snapshot, revert, acquire,
    /// exec, files, suite throughput, pool warm-up, memory) and print a table.
    Bench(bench::BenchArgs),
    /// Define and start the libvirt network `agentvm-nat` and nwfilter
    /// `agentvm-egress` used by `network = "nat-filtered"` (idempotent).
    SetupNetwork(network::SetupNetworkArgs),
    /// Check the suite run's report.html in headless Chromium (every test
    /// listed, transcripts, one timeline lane per VM, nothing injected runs)
    /// and take screenshots of it.
    ReportCheck(report_check::ReportCheckArgs),
    /// Set up, then run the example agent suite in real VMs.
    Demo {
        /// Arguments passed to the suite's test binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let res = match Cli::parse().command {
        Command::BuildImage(args) => image::run(*args),
        Command::Setup(args) => tasks::setup(&args),
        Command::Test(args) => tasks::test(&args),
        Command::Demo { args } => tasks::demo(&args),
        Command::Bench(args) => bench::run(args),
        Command::SetupNetwork(args) => network::run(&args),
        Command::ReportCheck(args) => report_check::run(&args),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain, not a backtrace: these errors say what to do.
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["xtask", "build-image", "--name", "x", "--force"]).unwrap();
        let Command::BuildImage(a) = cli.command else {
            panic!("parsed as build-image")
        };
        assert_eq!(a.name, "x");
        assert!(a.force);
        assert_eq!(a.kernel_package, "linux-image-cloud-amd64");
        assert!(!a.wants_rootfs());
        let cli = Cli::try_parse_from([
            "xtask",
            "build-image",
            "--image",
            "agent",
            "--with",
            "claude-code,codex",
        ])
        .unwrap();
        let Command::BuildImage(a) = cli.command else {
            panic!("parsed as build-image")
        };
        assert_eq!(a.name, "agent");
        assert_eq!(a.with, ["claude-code", "codex"]);
        assert!(a.wants_rootfs());
        assert_eq!(a.rootfs_format, agentvm_image::RootfsFormat::Erofs);
        // The name as an argument, as `agentvm image build agent` takes it.
        let cli = Cli::try_parse_from(["xtask", "build-image", "agent"]).unwrap();
        let Command::BuildImage(a) = cli.command else {
            panic!("parsed as build-image")
        };
        assert_eq!(a.image_name(), "agent");
        assert!(a.wants_rootfs());
        assert!(Cli::try_parse_from(["xtask", "build-image", "a", "--name", "b"]).is_err());
        let cli = Cli::try_parse_from([
            "xtask",
            "build-image",
            "--name",
            "sq",
            "--rootfs",
            "--rootfs-format",
            "squashfs",
        ])
        .unwrap();
        let Command::BuildImage(a) = cli.command else {
            panic!("parsed as build-image")
        };
        assert!(a.wants_rootfs());
        assert_eq!(a.rootfs_format, agentvm_image::RootfsFormat::Squashfs);
        let cli = Cli::try_parse_from(["xtask", "bench", "--quick", "--json", "out.json"]).unwrap();
        let Command::Bench(b) = cli.command else {
            panic!("parsed as bench")
        };
        assert!(b.quick);
        assert_eq!(b.backend, bench::BackendArg::Qemu);
        assert_eq!(b.json.as_deref(), Some(std::path::Path::new("out.json")));
        let cli = Cli::try_parse_from(["xtask", "bench", "--backend", "libvirt"]).unwrap();
        let Command::Bench(b) = cli.command else {
            panic!("parsed as bench")
        };
        assert_eq!(b.backend, bench::BackendArg::Libvirt);
        assert!(Cli::try_parse_from(["xtask", "bench", "--backend", "xen"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "bench", "--suite-tests", "41"]).is_err());
        let cli =
            Cli::try_parse_from(["xtask", "test", "--no-libvirt", "--", "--skip", "x"]).unwrap();
        let Command::Test(t) = cli.command else {
            panic!("parsed as test")
        };
        assert!(t.no_libvirt);
        assert_eq!(t.args, ["--skip", "x"]);
    }
}
