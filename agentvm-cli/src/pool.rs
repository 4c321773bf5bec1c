//! `agentvm pool serve|status|stop`: the pool daemon that leases warm VMs to
//! test processes ([`agentvm_runtime::daemon`]). Test harnesses start it on
//! their own under cargo-nextest; this is for running it by hand (in the
//! foreground, with its log) and for stopping it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agentvm_runtime::config::{parse_duration, AgentVmConfig};
use agentvm_runtime::daemon::server::{serve, ServeOptions};
use agentvm_runtime::daemon::{client, DaemonError, DaemonPaths};
use anyhow::{anyhow, Context};

/// How long `stop` waits for the daemon to shut its VMs down and exit.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(90);

/// The pool daemon's subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PoolCommand {
    /// Serve warm VMs to test processes over a UNIX socket until idle.
    Serve {
        #[command(flatten)]
        socket: SocketArg,
        /// Exit after this long without a connection (e.g. 60s, 10m),
        /// shutting the VMs down (the default is
        /// `agentvm_runtime::daemon::DEFAULT_IDLE_TIMEOUT`).
        #[arg(long, default_value = "60s", value_parser = duration)]
        idle_timeout: std::time::Duration,
        /// Print a line per lease and release.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Show the daemon's pools, leases and VMs.
    Status {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Stop the daemon (its VMs are shut down).
    Stop {
        #[command(flatten)]
        socket: SocketArg,
    },
}

/// Which daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArg {
    /// The daemon's socket (default: `<artifacts_dir>/pool.sock`, where the
    /// test harness looks for it).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

fn duration(text: &str) -> Result<std::time::Duration, String> {
    parse_duration(text).ok_or_else(|| format!("{text:?} is not a duration (60, 500ms, 30s, 2m)"))
}

fn paths(config: &AgentVmConfig, socket: &SocketArg) -> DaemonPaths {
    match &socket.socket {
        Some(path) => DaemonPaths::with_socket(&config.artifacts_dir, path.clone()),
        None => DaemonPaths::for_config(config),
    }
}

/// Runs a pool subcommand.
pub async fn run(command: PoolCommand) -> anyhow::Result<ExitCode> {
    let config = AgentVmConfig::load().context("configuration error")?;
    match command {
        PoolCommand::Serve {
            socket,
            idle_timeout,
            verbose,
        } => {
            let options = ServeOptions {
                paths: paths(&config, &socket),
                idle_timeout,
                log_leases: verbose,
            };
            serve(config, options).await?;
            Ok(ExitCode::SUCCESS)
        }
        PoolCommand::Status { socket } => {
            let paths = paths(&config, &socket);
            let status = match client::status(&paths.socket).await {
                Err(DaemonError::NotRunning { .. }) => {
                    println!("no pool daemon on {}", paths.socket.display());
                    return Ok(ExitCode::FAILURE);
                }
                other => other?,
            };
            println!(
                "pool daemon pid {} on {} (backend {}, images {}, idle timeout {:?}); {} open lease{}",
                status.pid,
                paths.socket.display(),
                status.fingerprint.backend,
                status.fingerprint.image_dir.display(),
                status.idle_timeout,
                status.open_leases,
                if status.open_leases == 1 { "" } else { "s" }
            );
            for pool in &status.pools {
                println!(
                    "  {}: {} available, {} leased, {} booting, {} reverting; {} leases so far on {}",
                    pool.key,
                    pool.available,
                    pool.leased,
                    pool.booting,
                    pool.reverting,
                    pool.leases,
                    pool.vms.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        PoolCommand::Stop { socket } => {
            let paths = paths(&config, &socket);
            let pid = client::status(&paths.socket).await.ok().map(|s| s.pid);
            match client::stop(&paths.socket).await {
                Ok(()) => {
                    // It shuts its VMs down before it exits: wait for that.
                    let gone = || match pid {
                        Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
                        None => true,
                    };
                    let deadline = std::time::Instant::now() + STOP_WAIT;
                    while !gone() && std::time::Instant::now() < deadline {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    if !gone() {
                        return Err(anyhow!(
                            "the pool daemon on {} (pid {pid:?}) still runs {STOP_WAIT:?} after Stop",
                            paths.socket.display()
                        ));
                    }
                    println!("pool daemon on {} stopped", paths.socket.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(DaemonError::NotRunning { .. }) => {
                    println!("no pool daemon on {}", paths.socket.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(anyhow!(e)),
            }
        }
    }
}
