//! The composite commands: `setup` (packages + guest image), `test` (all tests)
//! and `demo` (the example agent suite in real VMs). `test` and `demo` also
//! build the Debian `agent` image with the Claude Code and Codex recipes
//! (cached by content hash: a rerun takes seconds).

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::image::{self, BuildImageArgs};
use crate::util::{find_in_path, is_root, workspace_root, Progress};

/// Host tools the runtime and the image build need, with the package that has each.
const REQUIRED_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-img", "qemu-utils"),
    ("busybox", "busybox-static"),
    ("mmdebstrap", "mmdebstrap"),
    ("mkfs.erofs", "erofs-utils"),
];

/// Recipes the `agent` image of `test` and `demo` is built with.
pub const AGENT_RECIPES: &[&str] = &["claude-code", "codex"];

/// Builds (or finds cached) the `agent` image with [`AGENT_RECIPES`] and
/// reports how long that took.
pub fn build_agent_image(progress: &Progress) -> Result<()> {
    progress.step(format!(
        "agent image (Debian bookworm root file system, recipes {})",
        AGENT_RECIPES.join(",")
    ));
    let started = std::time::Instant::now();
    image::run(BuildImageArgs::agent(AGENT_RECIPES)).context(
        "building the agent image failed (it needs the Debian archive and the npm registry)",
    )?;
    progress.note(format!(
        "agent image ready in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// Do not install missing system packages; only check and build the image.
    #[arg(long)]
    pub no_install: bool,
}

/// Installs missing system packages (scripts/install-deps.sh) and builds the
/// default guest image.
pub fn setup(args: &SetupArgs) -> Result<()> {
    let progress = Progress::new();
    let missing: Vec<_> = REQUIRED_TOOLS
        .iter()
        .filter(|(tool, _)| find_in_path(tool).is_none())
        .collect();
    if missing.is_empty() {
        progress.step("system packages: all present");
    } else if args.no_install {
        let packages: Vec<_> = missing.iter().map(|(_, p)| *p).collect();
        bail!(
            "missing tools {:?}: install them with `bash scripts/install-deps.sh` (packages: {})",
            missing.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            packages.join(" ")
        );
    } else {
        progress.step(format!(
            "installing system packages (missing: {})",
            missing
                .iter()
                .map(|(t, _)| *t)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if !is_root() && find_in_path("sudo").is_none() {
            bail!("installing packages needs root: run `sudo bash scripts/install-deps.sh` first");
        }
        let script = workspace_root().join("scripts/install-deps.sh");
        run(Command::new("bash").arg(&script), "scripts/install-deps.sh")?;
    }
    progress.step("guest image");
    image::run(BuildImageArgs::defaults())
}

/// Arguments of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Leave out the libvirt backend (no libvirtd, no libvirt-dev needed):
    /// only the QEMU backend, the mock and everything without VMs.
    #[arg(long)]
    pub no_libvirt: bool,
    /// Arguments passed to `cargo test --workspace`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// The cargo features that compile the libvirt backend and its tests in.
const LIBVIRT_FEATURES: &str = "agentvm-runtime/libvirt,agentvm-test/libvirt";

/// `cargo xtask test [--no-libvirt] [-- ARGS]`: set-up, then every test of
/// the workspace (the black-box suite `tests/`, package `agentvm-e2e`,
/// included: it runs only there); with libvirt (the default) also starts
/// libvirtd and its network, and runs the example suite on the libvirt
/// backend. The workspace run includes the two-host tests
/// (`agentvm-runtime --test libvirt_hosts`, ~80 s: each starts and stops a
/// second daemon with `scripts/libvirt-host2.sh`).
pub fn test(args: &TestArgs) -> Result<()> {
    setup(&SetupArgs { no_install: false })?;
    let progress = Progress::new();
    build_agent_image(&progress)?;
    if args.no_libvirt {
        progress.step("cargo test --workspace (without libvirt)");
        run(
            cargo().args(["test", "--workspace"]).args(&args.args),
            "cargo test --workspace",
        )?;
        agent_image_boot_tests(&progress)?;
        return outside_crate_test(&progress);
    }
    start_libvirt(&progress)?;
    progress.step(format!(
        "cargo test --workspace --features {LIBVIRT_FEATURES}"
    ));
    run(
        cargo()
            .args(["test", "--workspace", "--features", LIBVIRT_FEATURES])
            .args(&args.args),
        "cargo test --workspace",
    )?;
    progress.step("setup-network against the running libvirtd (an ignored test, run here)");
    run(
        cargo().args([
            "test",
            "-p",
            "agentvm-image",
            "--lib",
            "--",
            "--ignored",
            "--exact",
            "network::tests::setup_against_a_real_daemon",
        ]),
        "cargo test -p agentvm-image -- --ignored",
    )?;
    progress.step("example agent suite on the libvirt backend (AGENT_VM_BACKEND=libvirt)");
    run(
        cargo()
            .args(["test", "-p", "agent-suite", "--test", "agents"])
            .args(["--features", "agentvm-test/libvirt"])
            .env("AGENT_VM_BACKEND", "libvirt"),
        "the example agent suite on libvirt",
    )?;
    progress.step("agent image suite on the libvirt backend (read-only shared disk)");
    run(
        cargo()
            .args(["test", "-p", "agent-suite", "--test", "agent_image"])
            .args(["--features", "agentvm-test/libvirt"])
            .env("AGENT_VM_BACKEND", "libvirt"),
        "the agent image suite on libvirt",
    )?;
    progress.step(
        "agent image on nat-filtered: its DHCP lease by dhclient (an ignored test, run here)",
    );
    run(
        cargo().args([
            "test",
            "-p",
            "agentvm-runtime",
            "--features",
            "libvirt",
            "--test",
            "vm_libvirt",
            "--",
            "--ignored",
            "--exact",
            "agent_image_takes_its_lease_with_dhclient",
        ]),
        "the agent image's DHCP test on libvirt",
    )?;
    agent_image_boot_tests(&progress)?;
    outside_crate_test(&progress)
}

/// A user's crate outside the repository: told how to build its image
/// (`agentvm image build ... --out <its image dir>`), builds it with the
/// CLI, then runs its test in a VM (ignored by a plain `cargo test`).
fn outside_crate_test(progress: &Progress) -> Result<()> {
    progress.step("a crate outside the repository builds its image with `agentvm image build`");
    run(
        cargo().args([
            "test",
            "-p",
            "agentvm-cli",
            "--test",
            "outside_crate",
            "--",
            "--ignored",
        ]),
        "the outside-crate test",
    )
}

/// The agent image's own boot tests (ignored by a plain `cargo test`
/// because they need that image, which is built above).
fn agent_image_boot_tests(progress: &Progress) -> Result<()> {
    progress.step("agent image boot tests (agentvm-runtime --test agent_image --ignored)");
    run(
        cargo().args([
            "test",
            "-p",
            "agentvm-runtime",
            "--test",
            "agent_image",
            "--",
            "--ignored",
        ]),
        "the agent image boot tests",
    )
}

/// Installs and starts libvirtd (scripts/start-libvirtd.sh) and sets up the
/// agentvm network and filter.
fn start_libvirt(progress: &Progress) -> Result<()> {
    progress.step("libvirtd (scripts/start-libvirtd.sh)");
    if is_root() {
        let script = workspace_root().join("scripts/start-libvirtd.sh");
        run(Command::new("sh").arg(&script), "scripts/start-libvirtd.sh")?;
    } else if !crate::network::daemon_answers(None) {
        bail!(
            "the libvirt tests need the system libvirtd, which only root can start: run \
             `sudo sh scripts/start-libvirtd.sh` first, or leave libvirt out with \
             `cargo xtask test --no-libvirt`"
        );
    }
    progress.step("libvirt network agentvm-nat and nwfilter agentvm-egress");
    crate::network::run(&crate::network::SetupNetworkArgs::default())
}

/// `cargo xtask demo [-- ARGS]`: set-up, then the example agent suite in
/// real VMs; prints the path of the HTML report at the end.
pub fn demo(args: &[String]) -> Result<()> {
    setup(&SetupArgs { no_install: false })?;
    let progress = Progress::new();
    build_agent_image(&progress)?;
    progress.step("example agent suite (examples/agent-suite) in real VMs");
    run(
        cargo()
            .args(["test", "-p", "agent-suite", "--test", "agents", "--"])
            .args(args),
        "the example agent suite",
    )?;
    progress.step("agent image suite (examples/agent-suite --test agent_image)");
    run(
        cargo()
            .args(["test", "-p", "agent-suite", "--test", "agent_image", "--"])
            .args(args),
        "the agent image suite",
    )?;
    // Each suite's harness rewrote it; it holds both (AGENT_VM_ARTIFACTS_DIR moves it).
    let artifacts = std::env::var_os("AGENT_VM_ARTIFACTS_DIR")
        .map_or_else(|| workspace_root().join("target/agentvm"), Into::into);
    let report = artifacts.join("report.html");
    if !report.is_file() {
        bail!("the suites ran but wrote no {}", report.display());
    }
    progress.step(format!("report: {}", report.display()));
    println!("{}", report.display());
    Ok(())
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("could not start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
