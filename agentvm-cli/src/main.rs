//! `agentvm`: run a command in a throwaway VM (`exec`), open a shell in one
//! (`shell`), check that this host can run VMs (`doctor`), or rebuild a
//! suite run's HTML report from its artifacts (`report`).
#![forbid(unsafe_code)]

mod doctor;
mod session;

use std::process::ExitCode;

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
    /// Guest image name (built by `cargo xtask build-image [--name N]`).
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
    /// Rebuild DIR/report.html from a suite run's artifacts and print its path.
    Report {
        /// The artifacts directory (default: the configured `artifacts_dir`,
        /// target/agentvm).
        dir: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Report { dir } = &cli.command {
        return report(dir.clone());
    }
    let verbose = match &cli.command {
        Command::Exec { vm, .. } | Command::Shell { vm } => vm.verbose,
        Command::Doctor { .. } | Command::Report { .. } => false,
    };
    init_logging(verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("agentvm: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Exec {
                vm,
                timeout,
                command,
            } => session::exec(&vm, timeout.as_deref(), command).await,
            Command::Shell { vm } => session::shell(&vm).await,
            Command::Doctor { boot } => doctor::run(boot).await,
            Command::Report { .. } => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentvm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `agentvm report [DIR]`: writes DIR/report.html and prints its path.
fn report(dir: Option<std::path::PathBuf>) -> ExitCode {
    let dir = match dir {
        Some(dir) => dir,
        None => match agentvm_runtime::config::AgentVmConfig::load() {
            Ok(config) => config.artifacts_dir,
            Err(e) => {
                eprintln!("agentvm: configuration error: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    match agentvm_report::write_report(&dir) {
        Ok(path) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agentvm: {e}");
            ExitCode::FAILURE
        }
    }
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
