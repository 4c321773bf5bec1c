//! `agentvm-lease-bench`: the pool daemon's lease round trip, for `cargo
//! xtask bench`.
//!
//! ```text
//! agentvm-lease-bench --json out.json [--leases 100]
//! ```
//!
//! Starts a pool daemon of one VM (this program again, `serve`, detached as
//! the test harness starts it) on a socket of its own, waits until its VM is
//! warm, then `--leases` times: acquire a lease over the socket (connect,
//! the daemon's pool acquire, the spliced channel, the `Vm` handle) and
//! release it (the daemon reverts the VM and reports; this is the time the
//! test process waits after its test). Between samples it waits, untimed,
//! until the VM is back in the pool, so every acquire finds it warm. Each
//! lease also pings the guest agent a few times (the control channel as
//! the test process has it, through the daemon's splice). Writes
//! the samples (seconds) as JSON; stops the daemon (no VM outlives it).
//! Progress goes to stderr as `@phase` / `@note` lines, like `agentvm-bench`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentvm_runtime::config::AgentVmConfig;
use agentvm_runtime::daemon::client;
use agentvm_runtime::daemon::protocol::{LeaseRequest, PoolShape};
use agentvm_runtime::daemon::server::{serve, ServeOptions};
use agentvm_runtime::daemon::{fingerprint, DaemonPaths};
use agentvm_runtime::image::locate_image;
use agentvm_runtime::pool::ReleaseOutcome;
use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Version of the output read by `cargo xtask bench`.
const RAW_FORMAT: u32 = 1;
/// The daemon's own artifacts directory (its socket and log), set by the
/// measuring process for the daemon it starts.
const DIR_ENV: &str = "AGENT_VM_ARTIFACTS_DIR";
/// Pings per lease (the channel through the daemon; untimed in the lease).
const PINGS: usize = 5;

#[derive(Serialize)]
struct Samples {
    format: u32,
    /// Lease granted and the `Vm` attached, seconds.
    acquire_s: Vec<f64>,
    /// Release until the daemon reported the revert, seconds.
    release_s: Vec<f64>,
    /// The daemon's revert, as it reported it, seconds.
    revert_s: Vec<f64>,
    /// A ping answered by the guest agent through the daemon's splice, seconds.
    ping_s: Vec<f64>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().map(String::as_str) == Some("serve") {
        serve_daemon()
    } else {
        measure(&args)
    };
    if let Err(e) = result {
        eprintln!("agentvm-lease-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn serve_daemon() -> Result<()> {
    let config = AgentVmConfig::load().context("configuration error")?;
    let options = ServeOptions {
        paths: DaemonPaths::for_config(&config),
        idle_timeout: Duration::from_secs(60),
        log_leases: false,
    };
    runtime()?.block_on(serve(config, options))?;
    Ok(())
}

fn measure(args: &[String]) -> Result<()> {
    let mut json = None;
    let mut leases = 100usize;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--json" => json = Some(PathBuf::from(value)),
            "--leases" => leases = value.parse().context("--leases")?,
            other => bail!("unknown argument {other}"),
        }
    }
    let json = json.context("--json PATH is required")?;
    let dir = tempfile::tempdir()?;
    let mut config = AgentVmConfig::load().context("configuration error")?;
    config.artifacts_dir = dir.path().to_path_buf();
    let paths = DaemonPaths::for_config(&config);
    let image = locate_image(&config.image, &config.image_dir)?;
    let mut spec = config.vm_spec(image);
    spec.network = spec.network.vm_attachment();
    let request = LeaseRequest {
        fingerprint: fingerprint(&config),
        shape: PoolShape {
            image: config.image.clone(),
            profile: spec.profile,
            network: spec.network.clone(),
        },
        acquire_timeout: Duration::from_secs(300),
        client: "agentvm-lease-bench".into(),
    };
    eprintln!("@phase pool daemon: {leases} leases over its socket (acquire, release with revert)");
    client::ensure_daemon(&paths, || {
        let mut command = std::process::Command::new(std::env::current_exe()?);
        command
            .arg("serve")
            .env(DIR_ENV, dir.path())
            .env("AGENT_VM_POOL_MIN_SIZE", "1")
            .env("AGENT_VM_POOL_MAX_SIZE", "1");
        client::spawn_detached(command, &paths.log)
    })?;
    let runtime = runtime()?;
    let result = runtime.block_on(async {
        // The first lease waits for the boot: not a sample.
        let warm = client::lease(&paths.socket, request.clone(), spec.clone()).await?;
        eprintln!("@note VM {} warm after {:.1?}", warm.id(), warm.waited());
        warm.release().await?;
        let mut samples = Samples {
            format: RAW_FORMAT,
            acquire_s: Vec::new(),
            release_s: Vec::new(),
            revert_s: Vec::new(),
            ping_s: Vec::new(),
        };
        for _ in 0..leases {
            wait_warm(&paths.socket).await?;
            let started = Instant::now();
            let lease = client::lease(&paths.socket, request.clone(), spec.clone()).await?;
            samples.acquire_s.push(started.elapsed().as_secs_f64());
            let mut lease = lease;
            for _ in 0..PINGS {
                samples.ping_s.push(lease.ping().await?.as_secs_f64());
            }
            let released = Instant::now();
            let outcome = lease.release().await?;
            samples.release_s.push(released.elapsed().as_secs_f64());
            match outcome {
                ReleaseOutcome::Reverted(t) => samples.revert_s.push(t.total.as_secs_f64()),
                other => bail!("the daemon did not revert the VM: {other:?}"),
            }
        }
        anyhow::Ok(samples)
    });
    let _ = runtime.block_on(client::stop(&paths.socket));
    // The daemon shuts its VM down before it exits; wait for that.
    let deadline = Instant::now() + Duration::from_secs(60);
    while client::is_listening(&paths.socket) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let samples = result?;
    std::fs::write(&json, serde_json::to_string(&samples)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    Ok(())
}

/// Waits until the daemon's VM is back in its pool.
async fn wait_warm(socket: &std::path::Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = client::status(socket).await?;
        if status
            .pools
            .iter()
            .all(|p| p.available >= 1 && p.reverting == 0)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the VM did not come back: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
