//! `agentvm`: run a command in a throwaway VM (`exec`), open a shell in one
//! (`shell`), check that this host can run VMs (`doctor`), build a guest
//! image (`image build`), set up the libvirt network (`setup-network`), or
//! rebuild a suite run's HTML report from its artifacts (`report`), or run
//! the pool daemon that leases warm VMs to test processes (`pool serve`).
#![forbid(unsafe_code)]

mod doctor;
mod image;
mod pool;
mod session;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "agentvm",
    version,
    about = "Run untrusted programs in throwaway VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by the commands that boot a VM.
#[derive(Debug, Clone, clap::Args)]
pub struct VmArgs {
    /// Guest image name (built by `agentvm image build [NAME]`).
    #[arg(long)]
    pub image: Option<String>,
    /// Resource profile: minimal, light, standard, intensive.
    #[arg(long)]
    pub profile: Option<String>,
    /// Log progress (VM boot, snapshot) to stderr.
    #[arg(long, short)]
    pub verbose: bool,
    /// Run commands as root (the `agent` image runs them as its
    /// unprivileged `agent` user by default).
    #[arg(long)]
    pub root: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a VM, run CMD in its /workspace, stream its output, exit with its exit code.
    Exec {
        #[command(flatten)]
        vm: VmArgs,
        /// Kill the command after this long (e.g. 30s, 5m).
        #[arg(long)]
        timeout: Option<String>,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Boot a VM and run shell command lines in it, one at a time (no TTY).
    Shell {
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Check QEMU, the accelerator, the guest image and libvirt; say what to fix.
    Doctor {
        /// Also boot a VM and ping its guest agent.
        #[arg(long)]
        boot: bool,
    },
    /// Guest images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Define and start the libvirt network `agentvm-nat` and nwfilter
    /// `agentvm-egress` used by `network = "nat-filtered"` (idempotent).
    SetupNetwork(agentvm_image::SetupNetworkArgs),
    /// Rebuild DIR/report.html from a suite run's artifacts and print its path.
    Report {
        /// The artifacts directory (default: the configured `artifacts_dir`,
        /// target/agentvm).
        dir: Option<std::path::PathBuf>,
    },
    /// The pool daemon: warm VMs leased to test processes (cargo-nextest).
    Pool {
        #[command(subcommand)]
        command: pool::PoolCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Build a guest image (kernel + initramfs, and a Debian root file
    /// system for `agent`) into OUT/NAME/; does nothing if it is up to
    /// date.
    Build(Box<agentvm_image::BuildImageArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbose = match &cli.command {
        Command::Exec { vm, .. } | Command::Shell { vm } => vm.verbose,
        Command::Doctor { .. }
        | Command::Image { .. }
        | Command::SetupNetwork(_)
        | Command::Report { .. } => false,
        Command::Pool { .. } => true,
    };
    init_logging(verbose);
    let result = match cli.command {
        Command::Exec {
            vm,
            timeout,
            command,
        } => block_on(session::exec(&vm, timeout.as_deref(), command)),
        Command::Shell { vm } => block_on(session::shell(&vm)),
        Command::Doctor { boot } => block_on(doctor::run(boot)),
        Command::Image {
            command: ImageCommand::Build(args),
        } => image::build(*args),
        Command::SetupNetwork(args) => image::setup_network(&args),
        Command::Report { dir } => report(dir),
        Command::Pool { command } => block_on(pool::run(command)),
    };
    finish(result)
}

/// Runs a command that needs the async runtime.
fn block_on(
    command: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(command)
}

fn finish(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentvm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `agentvm report [DIR]`: writes DIR/report.html and prints its path.
fn report(dir: Option<std::path::PathBuf>) -> anyhow::Result<ExitCode> {
    let dir = match dir {
        Some(dir) => dir,
        None => {
            agentvm_runtime::config::AgentVmConfig::load()
                .context("configuration error")?
                .artifacts_dir
        }
    };
    let path = agentvm_report::write_report(&dir)?;
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}

fn init_logging(verbose: bool) {
    let default = if verbose { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "agentvm", "image", "build", "agent", "--with", "codex", "--out", "/x", "--force",
        ])
        .unwrap();
        let Command::Image {
            command: ImageCommand::Build(a),
        } = cli.command
        else {
            panic!("parsed as image build")
        };
        assert_eq!(a.image_name(), "agent");
        assert_eq!(a.with, ["codex"]);
        assert_eq!(a.out.as_deref(), Some(std::path::Path::new("/x")));
        assert!(a.force);
        let cli = Cli::try_parse_from(["agentvm", "image", "build", "--image", "rich"]).unwrap();
        let Command::Image {
            command: ImageCommand::Build(a),
        } = cli.command
        else {
            panic!("parsed as image build")
        };
        assert_eq!(a.image_name(), "rich");
        assert!(a.out.is_none());
        let cli =
            Cli::try_parse_from(["agentvm", "pool", "serve", "--idle-timeout", "5s"]).unwrap();
        let Command::Pool {
            command:
                pool::PoolCommand::Serve {
                    idle_timeout,
                    socket,
                    verbose,
                },
        } = cli.command
        else {
            panic!("parsed as pool serve")
        };
        assert_eq!(idle_timeout, std::time::Duration::from_secs(5));
        assert!(socket.socket.is_none() && !verbose);
        let cli = Cli::try_parse_from(["agentvm", "pool", "serve"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Pool { command: pool::PoolCommand::Serve { idle_timeout, .. } } if idle_timeout == agentvm_runtime::daemon::DEFAULT_IDLE_TIMEOUT
        ));
        assert!(
            Cli::try_parse_from(["agentvm", "pool", "serve", "--idle-timeout", "soon"]).is_err()
        );
        let cli = Cli::try_parse_from(["agentvm", "setup-network", "--teardown"]).unwrap();
        assert!(matches!(cli.command, Command::SetupNetwork(a) if a.teardown && !a.dry_run));
    }
}
