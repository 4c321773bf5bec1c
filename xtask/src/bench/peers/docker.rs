//! Docker, the baseline most agent harnesses use: a container per test.
//!
//! The bench uses a running Docker daemon when there is one (`DOCKER_HOST`,
//! or `/var/run/docker.sock`), else starts Debian's `dockerd` itself with its
//! own data root under `target/agentvm/peers/docker`, no bridge and no
//! iptables rules (containers run with `--network none`), logging to
//! `target/agentvm/bench/dockerd.log`, and stops it at the end.
//!
//! The image is imported locally (`docker import`, no registry): the root
//! file system of the `agent` image when it is built (the same Debian
//! userland the agent VMs run), else a minimal `mmdebstrap` tarball cached
//! under `target/agentvm/cache/peers/`. Its tag carries the key of what it
//! was made from, so it is imported once.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{row, show_ms, tail, Agentvm, Outcome, Ratio};
use crate::bench::progress::Printer;
use crate::bench::stats::{round3, Summary};

/// Docker's default socket.
const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// What one test of the suite runs in its container: the trivial agent of
/// `examples/bench-suite` (write `out.txt` in the workspace), then reading
/// the file back (agentvm's test checks it the same way).
pub const SUITE_TEST_SCRIPT: &str = "echo done > out.txt && cat out.txt";

/// The Docker rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DockerRows {
    /// `docker version`'s server version.
    pub server_version: String,
    /// `started by the bench` or `already running (<host>)`.
    pub daemon: String,
    pub image: String,
    /// What the image was made from.
    pub image_source: String,
    /// Seconds spent making and importing the image (`null`: already imported).
    pub image_import_s: Option<f64>,
    /// `docker run --rm --network none <image> true`, one fresh container per sample.
    pub run_true_ms: Summary,
    pub run_true_vs_agentvm: Option<Ratio>,
    /// `docker exec <running container> true`.
    pub exec_true_ms: Summary,
    pub exec_true_vs_agentvm: Option<Ratio>,
    /// agentvm's suite shape: each test a fresh container running the trivial agent.
    pub suite: DockerSuite,
    pub suite_vs_agentvm: Option<Ratio>,
}

/// The suite run with a container per test.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DockerSuite {
    pub tests: usize,
    pub concurrency: usize,
    /// What each test's container runs (`sh -c`, in `/workspace`).
    pub script: String,
    /// Start of the first container to the exit of the last.
    pub wall_s: f64,
    pub per_test_ms: Summary,
}

impl DockerRows {
    pub fn compare(&mut self, a: &Agentvm) {
        self.run_true_vs_agentvm = Ratio::of(
            self.run_true_ms.p50,
            a.clean_vm_and_exec_ms(),
            "revert.total_ms.p50 + exec_true_ms.p50 (a clean VM and `true` on it)",
        );
        self.exec_true_vs_agentvm =
            Ratio::of(self.exec_true_ms.p50, a.exec_true_ms, "exec_true_ms.p50");
        self.suite_vs_agentvm = a.suite.and_then(|(tests, wall_s)| {
            if tests == self.suite.tests {
                Ratio::of(self.suite.wall_s, Some(wall_s), "suite.pooled.wall_s")
            } else {
                None
            }
        });
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "docker {} ({}), image {} from {}{}\n",
            self.server_version,
            self.daemon,
            self.image,
            self.image_source,
            match self.image_import_s {
                Some(s) => format!(", imported in {s:.1} s"),
                None => String::new(),
            }
        );
        row(
            &mut out,
            "   docker run --rm <image> true",
            &self.run_true_ms,
            &Ratio::show(&self.run_true_vs_agentvm),
        );
        row(
            &mut out,
            "   docker exec of `true`",
            &self.exec_true_ms,
            &Ratio::show(&self.exec_true_vs_agentvm),
        );
        let s = &self.suite;
        let _ = writeln!(
            out,
            "{:<44} {:>5} {:>10} {:>10}  {} (per test p50 {})",
            format!("   suite: container per test, {} at a time", s.concurrency),
            s.tests,
            format!("{:.2} s", s.wall_s),
            "",
            Ratio::show(&self.suite_vs_agentvm),
            show_ms(s.per_test_ms.p50)
        );
        out
    }
}

/// Sample counts.
fn counts(quick: bool) -> (usize, usize) {
    if quick {
        (5, 20)
    } else {
        (20, 100)
    }
}

/// Measures the Docker rows, or says why not.
pub fn measure(printer: &Printer, root: &Path, quick: bool, tests: usize) -> Outcome<DockerRows> {
    printer.phase("peer: docker (a container per test)");
    match measure_inner(printer, root, quick, tests) {
        Ok(rows) => Outcome::Measured(rows),
        Err(reason) => {
            printer.note(format!("docker skipped: {reason}"));
            Outcome::skipped(reason)
        }
    }
}

fn measure_inner(
    printer: &Printer,
    root: &Path,
    quick: bool,
    tests: usize,
) -> Result<DockerRows, String> {
    let docker = find_tool("docker")
        .ok_or("no `docker` command: apt-get install docker.io (scripts/install-deps.sh does)")?;
    let daemon = Daemon::connect_or_start(printer, root, &docker)?;
    let cli = Cli {
        docker: docker.clone(),
        host: daemon.host.clone(),
    };
    let server_version = cli
        .output(&["version", "--format", "{{.Server.Version}}"])?
        .trim()
        .to_string();
    let source = ImageSource::find(root);
    let tag = source.tag();
    let image_import_s = if cli.output(&["image", "inspect", &tag]).is_ok() {
        printer.note(format!("image {tag} already imported"));
        None
    } else {
        printer.note(format!("importing {} as {tag}", source.describe()));
        let started = Instant::now();
        source.import(root, &cli, &tag)?;
        Some(round3(started.elapsed().as_secs_f64()))
    };
    let (runs, execs) = counts(quick);
    let base = ["run", "--rm", "--network", "none"];

    // One untimed run: the first container of an image sets up its layers.
    cli.output(&[&base[..], &[tag.as_str(), "true"]].concat())?;
    printer.note(format!("docker run --rm {tag} true × {runs}"));
    let mut run_ms = Vec::new();
    for _ in 0..runs {
        run_ms.push(cli.timed(&[&base[..], &[tag.as_str(), "true"]].concat())?);
    }

    printer.note(format!(
        "docker exec true × {execs} into a running container"
    ));
    let name = format!("agentvm-bench-exec-{}", std::process::id());
    cli.output(&[
        "run",
        "-d",
        "--rm",
        "--network",
        "none",
        "--name",
        &name,
        &tag,
        "sleep",
        "infinity",
    ])?;
    let exec_ms: Result<Vec<f64>, String> = (0..execs)
        .map(|_| cli.timed(&["exec", &name, "true"]))
        .collect();
    let _ = cli.output(&["rm", "-f", &name]);
    let exec_ms = exec_ms?;

    let concurrency = 2;
    printer.note(format!(
        "suite: {tests} tests, a fresh container each, {concurrency} at a time"
    ));
    let suite = run_suite(&cli, &tag, tests, concurrency)?;
    printer.note(format!("{:.2} s wall", suite.wall_s));
    let daemon_origin = daemon.origin.clone();
    drop(daemon);
    Ok(DockerRows {
        server_version,
        daemon: daemon_origin,
        image: tag,
        image_source: source.describe(),
        image_import_s,
        run_true_ms: Summary::of(&run_ms).ok_or("no docker run samples")?,
        run_true_vs_agentvm: None,
        exec_true_ms: Summary::of(&exec_ms).ok_or("no docker exec samples")?,
        exec_true_vs_agentvm: None,
        suite,
        suite_vs_agentvm: None,
    })
}

/// `tests` containers, `concurrency` at a time, each running
/// [`SUITE_TEST_SCRIPT`] and checked like agentvm's test checks its VM.
fn run_suite(
    cli: &Cli,
    tag: &str,
    tests: usize,
    concurrency: usize,
) -> Result<DockerSuite, String> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Result<f64, String>>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| {
                while next.fetch_add(1, Ordering::SeqCst) < tests {
                    let t = Instant::now();
                    let result = cli
                        .output(&[
                            "run",
                            "--rm",
                            "--network",
                            "none",
                            "-w",
                            "/workspace",
                            tag,
                            "sh",
                            "-c",
                            SUITE_TEST_SCRIPT,
                        ])
                        .and_then(|out| check_suite_output(&out))
                        .map(|()| t.elapsed().as_secs_f64() * 1000.0);
                    results.lock().expect("results").push(result);
                }
            });
        }
    });
    let wall_s = started.elapsed().as_secs_f64();
    let per_test: Vec<f64> = results
        .into_inner()
        .expect("results")
        .into_iter()
        .collect::<Result<_, _>>()?;
    Ok(DockerSuite {
        tests,
        concurrency,
        script: SUITE_TEST_SCRIPT.into(),
        wall_s: round3(wall_s),
        per_test_ms: Summary::of(&per_test).ok_or("no suite samples")?,
    })
}

/// A suite test passes when the file it wrote reads back as `done`.
pub fn check_suite_output(stdout: &str) -> Result<(), String> {
    if stdout == "done\n" {
        Ok(())
    } else {
        Err(format!(
            "a suite container printed {stdout:?} instead of \"done\\n\""
        ))
    }
}

/// The `docker` CLI pointed at one daemon.
struct Cli {
    docker: PathBuf,
    /// `DOCKER_HOST` (empty: the CLI's default).
    host: String,
}

impl Cli {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.docker);
        c.args(args).stdin(Stdio::null());
        if !self.host.is_empty() {
            c.env("DOCKER_HOST", &self.host);
        }
        c
    }

    /// Runs `docker args…`; its stdout, or an error with its stderr.
    fn output(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command(args)
            .output()
            .map_err(|e| format!("starting docker: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`docker {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Wall time of a successful `docker args…`, in ms.
    fn timed(&self, args: &[&str]) -> Result<f64, String> {
        let t = Instant::now();
        self.output(args)?;
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    }
}

/// The daemon the rows use; stops it on drop when the bench started it.
struct Daemon {
    /// `DOCKER_HOST` for the CLI (empty: the CLI's default).
    host: String,
    /// Whose daemon it is, for the report.
    origin: String,
    /// The pid of the bench's own daemon left by an earlier run.
    leftover_pid: Option<u32>,
    child: Option<Child>,
}

impl Daemon {
    fn connect_or_start(printer: &Printer, root: &Path, docker: &Path) -> Result<Self, String> {
        let answers = |host: &str| {
            Cli {
                docker: docker.to_path_buf(),
                host: host.to_string(),
            }
            .output(&["version", "--format", "{{.Server.Version}}"])
            .is_ok()
        };
        if let Ok(host) = std::env::var("DOCKER_HOST") {
            return if answers(&host) {
                printer.note(format!("using the Docker daemon at DOCKER_HOST={host}"));
                Ok(Self {
                    origin: format!("already running at DOCKER_HOST={host}"),
                    host,
                    child: None,
                    leftover_pid: None,
                })
            } else {
                Err(format!(
                    "DOCKER_HOST={host} is set but no daemon answers there"
                ))
            };
        }
        if Path::new(DEFAULT_SOCKET).exists() && answers("") {
            printer.note(format!(
                "using the running Docker daemon ({DEFAULT_SOCKET})"
            ));
            return Ok(Self {
                host: String::new(),
                origin: format!("already running at {DEFAULT_SOCKET}"),
                child: None,
                leftover_pid: None,
            });
        }
        let dockerd = find_tool("dockerd").ok_or(
            "no Docker daemon running and no `dockerd`: apt-get install docker.io \
             (scripts/install-deps.sh does)",
        )?;
        let dirs = DaemonDirs::new(root);
        let host = format!("unix://{}", dirs.socket.display());
        if answers(&host) {
            // An earlier bench was killed before it could stop its daemon:
            // use it, and stop it at the end as if this run had started it.
            printer.note(format!("reusing the bench's Docker daemon at {host}"));
            let leftover_pid = std::fs::read_to_string(&dirs.pidfile)
                .ok()
                .and_then(|p| p.trim().parse().ok());
            return Ok(Self {
                origin: format!("left running at {host} by an earlier bench, stopped after"),
                host,
                child: None,
                leftover_pid,
            });
        }
        for dir in [&dirs.data_root, &dirs.exec_root] {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        if let Some(parent) = dirs.log.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let log = std::fs::File::create(&dirs.log)
            .map_err(|e| format!("creating {}: {e}", dirs.log.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        printer.note(format!(
            "starting dockerd (data root {}, log {})",
            dirs.data_root.display(),
            dirs.log.display()
        ));
        let child = Command::new(&dockerd)
            .args(dockerd_args(&dirs))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", dockerd.display()))?;
        let mut daemon = Self {
            host: host.clone(),
            origin: format!("started by the bench at {host}, stopped after"),
            child: Some(child),
            leftover_pid: None,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if answers(&host) {
                return Ok(daemon);
            }
            let exited = daemon
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                daemon.child = None;
                return Err(format!(
                    "dockerd exited ({status}) before answering; its log ({}) ends: {}",
                    dirs.log.display(),
                    tail(&dirs.log, 3)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "dockerd did not answer within 60 s; its log ({}) ends: {}",
                    dirs.log.display(),
                    tail(&dirs.log, 3)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM lets dockerd stop its containers and containerd.
        let term = |pid: u32| {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        };
        if let Some(pid) = self.leftover_pid.take() {
            term(pid);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        term(child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Where the bench's own dockerd keeps its state.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonDirs {
    pub data_root: PathBuf,
    /// Short, under /run: the socket paths in it must fit a sockaddr.
    pub exec_root: PathBuf,
    pub socket: PathBuf,
    pub pidfile: PathBuf,
    pub log: PathBuf,
}

impl DaemonDirs {
    pub fn new(root: &Path) -> Self {
        let exec_root = PathBuf::from(format!(
            "/run/agentvm-dockerd-{:08x}",
            fnv1a(root.display().to_string().as_bytes()) as u32
        ));
        Self {
            data_root: root.join("target/agentvm/peers/docker"),
            socket: exec_root.join("docker.sock"),
            pidfile: exec_root.join("docker.pid"),
            exec_root,
            log: root.join("target/agentvm/bench/dockerd.log"),
        }
    }
}

/// The bench's dockerd: its own state, no network set-up beyond `none`.
pub fn dockerd_args(dirs: &DaemonDirs) -> Vec<String> {
    vec![
        format!("--data-root={}", dirs.data_root.display()),
        format!("--exec-root={}", dirs.exec_root.display()),
        format!("--host=unix://{}", dirs.socket.display()),
        format!("--pidfile={}", dirs.pidfile.display()),
        "--bridge=none".into(),
        "--iptables=false".into(),
        "--ip-forward=false".into(),
        "--ip-masq=false".into(),
    ]
}

/// What the image is made from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    /// The `agent` image's root file system (`manifest.json` `rootfs`).
    AgentRootfs {
        file: PathBuf,
        fs_type: String,
        key: String,
    },
    /// `mmdebstrap --variant=minbase` of `suite` from `mirror`.
    Minbase { suite: String, mirror: String },
}

impl ImageSource {
    /// The agent image's root file system when it is built, else minbase.
    pub fn find(root: &Path) -> Self {
        let dir = root.join("target/agentvm/images/agent");
        let manifest = std::fs::read_to_string(dir.join("manifest.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        if let Some(r) = manifest.as_ref().map(|m| &m["rootfs"]) {
            if let (Some(file), Some(fs_type), Some(key)) =
                (r["file"].as_str(), r["fs_type"].as_str(), r["key"].as_str())
            {
                let file = dir.join(file);
                if file.exists() && matches!(fs_type, "erofs" | "squashfs") {
                    return Self::AgentRootfs {
                        file,
                        fs_type: fs_type.into(),
                        key: key.into(),
                    };
                }
            }
        }
        let suite = "bookworm".to_string();
        let mirror = manifest
            .as_ref()
            .and_then(|m| m["rootfs"]["mirror"].as_str())
            .unwrap_or("http://deb.debian.org/debian")
            .to_string();
        Self::Minbase { suite, mirror }
    }

    /// The image tag: names the source and its key, so a new source is
    /// imported and an old one is not imported again.
    pub fn tag(&self) -> String {
        match self {
            Self::AgentRootfs { key, .. } => {
                format!("agentvm-peer/agent-rootfs:{}", &key[..key.len().min(16)])
            }
            Self::Minbase { .. } => format!("agentvm-peer/debian-minbase:{}", self.minbase_key()),
        }
    }

    fn minbase_key(&self) -> String {
        match self {
            Self::Minbase { suite, mirror } => format!(
                "{suite}-{:016x}",
                fnv1a(
                    format!(
                        "{}\n{mirror}",
                        minbase_args(suite, mirror, Path::new("-")).join(" ")
                    )
                    .as_bytes()
                )
            ),
            Self::AgentRootfs { .. } => String::new(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::AgentRootfs { file, .. } => {
                format!("the agent image's root file system ({})", file.display())
            }
            Self::Minbase { suite, mirror } => {
                format!("a minimal Debian {suite} (mmdebstrap minbase from {mirror})")
            }
        }
    }

    /// Makes the tarball and imports it as `tag`.
    fn import(&self, root: &Path, cli: &Cli, tag: &str) -> Result<(), String> {
        match self {
            Self::AgentRootfs { file, fs_type, .. } => {
                let dir = root.join("target/agentvm/peers/agent-rootfs.extract");
                let _ = std::fs::remove_dir_all(&dir);
                let mut extract = if fs_type == "erofs" {
                    let mut c = Command::new("fsck.erofs");
                    c.arg(format!("--extract={}", dir.display())).arg(file);
                    c
                } else {
                    let mut c = Command::new("unsquashfs");
                    c.arg("-q").arg("-d").arg(&dir).arg(file);
                    c
                };
                let result = run_quiet(&mut extract).and_then(|()| import_tree(cli, &dir, tag));
                let _ = std::fs::remove_dir_all(&dir);
                result
            }
            Self::Minbase { suite, mirror } => {
                let cache = root.join("target/agentvm/cache/peers");
                std::fs::create_dir_all(&cache)
                    .map_err(|e| format!("creating {}: {e}", cache.display()))?;
                let tar = cache.join(format!("debian-minbase-{}.tar", self.minbase_key()));
                if !tar.exists() {
                    if find_tool("mmdebstrap").is_none() {
                        return Err("the agent image is not built and there is no mmdebstrap \
                                    for a minimal one: apt-get install mmdebstrap"
                            .into());
                    }
                    let partial = tar.with_extension("tar.partial");
                    run_quiet(
                        Command::new("mmdebstrap").args(minbase_args(suite, mirror, &partial)),
                    )?;
                    std::fs::rename(&partial, &tar).map_err(|e| e.to_string())?;
                }
                let file = std::fs::File::open(&tar).map_err(|e| e.to_string())?;
                let out = cli
                    .command(&["import", "-", tag])
                    .stdin(file)
                    .output()
                    .map_err(|e| e.to_string())?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "docker import failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                }
            }
        }
    }
}

/// `tar -C dir -c . | docker import - tag`.
fn import_tree(cli: &Cli, dir: &Path, tag: &str) -> Result<(), String> {
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting tar: {e}"))?;
    let stdout = tar.stdout.take().expect("piped stdout");
    let out = cli
        .command(&["import", "-", tag])
        .stdin(stdout)
        .output()
        .map_err(|e| e.to_string())?;
    let tar_status = tar.wait().map_err(|e| e.to_string())?;
    if !tar_status.success() {
        return Err(format!("tar of {} failed ({tar_status})", dir.display()));
    }
    if !out.status.success() {
        return Err(format!(
            "docker import failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The mmdebstrap arguments of the minimal image.
pub fn minbase_args(suite: &str, mirror: &str, out: &Path) -> Vec<String> {
    vec![
        "--variant=minbase".into(),
        "--mode=root".into(),
        "--format=tar".into(),
        "--quiet".into(),
        suite.into(),
        out.display().to_string(),
        mirror.into(),
    ]
}

fn run_quiet(command: &mut Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("starting {shown}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let mut err = std::io::stderr();
        let _ = err.write_all(&out.stderr);
        Err(format!(
            "{shown} failed ({}); its messages are above",
            out.status
        ))
    }
}

/// A tool in PATH, or in the sbin directories a non-root PATH may lack.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// FNV-1a, 64 bits: a stable short key (std's hasher may change between releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn daemon_is_kept_apart_and_offline() {
        let dirs = DaemonDirs::new(Path::new("/w/repo"));
        assert_eq!(
            dirs.data_root,
            Path::new("/w/repo/target/agentvm/peers/docker")
        );
        assert!(dirs.exec_root.starts_with("/run"));
        // A sockaddr_un path holds 107 bytes; containerd's socket goes below.
        assert!(dirs.socket.as_os_str().len() < 60, "{dirs:?}");
        assert_ne!(
            DaemonDirs::new(Path::new("/w/other")).exec_root,
            dirs.exec_root
        );
        let args = dockerd_args(&dirs);
        for flag in ["--bridge=none", "--iptables=false", "--ip-forward=false"] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing: {args:?}");
        }
        assert!(args[2].starts_with("--host=unix:///run/agentvm-dockerd-"));
    }

    #[test]
    fn image_source_prefers_the_agent_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let minbase = ImageSource::find(root);
        assert!(
            matches!(minbase, ImageSource::Minbase { .. }),
            "{minbase:?}"
        );
        assert!(minbase
            .tag()
            .starts_with("agentvm-peer/debian-minbase:bookworm-"));
        assert_eq!(minbase.tag(), ImageSource::find(root).tag(), "stable key");

        let image = root.join("target/agentvm/images/agent");
        std::fs::create_dir_all(&image).unwrap();
        std::fs::write(
            image.join("manifest.json"),
            r#"{"rootfs": {"file": "rootfs.erofs", "fs_type": "erofs",
                "key": "0c797ed0c3b302cd51fa153ae6253fecd1f5", "mirror": "http://m.example/debian"}}"#,
        )
        .unwrap();
        // Manifest without its file: minbase, from the manifest's mirror.
        let other = ImageSource::find(root);
        assert_eq!(
            other,
            ImageSource::Minbase {
                suite: "bookworm".into(),
                mirror: "http://m.example/debian".into()
            }
        );
        assert_ne!(other.tag(), minbase.tag());
        std::fs::write(image.join("rootfs.erofs"), b"x").unwrap();
        let agent = ImageSource::find(root);
        assert_eq!(agent.tag(), "agentvm-peer/agent-rootfs:0c797ed0c3b302cd");
        assert!(agent.describe().contains("agent image's root file system"));
    }

    #[test]
    fn suite_output_is_checked() {
        assert_eq!(check_suite_output("done\n"), Ok(()));
        assert!(check_suite_output("").is_err());
        assert!(check_suite_output("done").is_err());
    }

    #[test]
    fn minbase_command() {
        let args = minbase_args("bookworm", "http://m.example/debian", Path::new("/t/x.tar"));
        assert_eq!(
            args[args.len() - 3..],
            ["bookworm", "/t/x.tar", "http://m.example/debian"]
        );
        assert!(args.contains(&"--format=tar".to_string()));
    }

    fn summary(p50: f64) -> Summary {
        Summary::of(&[p50]).unwrap()
    }

    /// Rows as measured by hand on this machine, with a suite of `tests`
    /// taking `wall_s`.
    pub(crate) fn rows(tests: usize, wall_s: f64) -> DockerRows {
        DockerRows {
            server_version: "20.10.24".into(),
            daemon: "unix:///run/x/docker.sock".into(),
            image: "agentvm-peer/agent-rootfs:0c79".into(),
            image_source: "x".into(),
            image_import_s: None,
            run_true_ms: summary(379.0),
            run_true_vs_agentvm: None,
            exec_true_ms: summary(91.0),
            exec_true_vs_agentvm: None,
            suite: DockerSuite {
                tests,
                concurrency: 2,
                script: SUITE_TEST_SCRIPT.into(),
                wall_s,
                per_test_ms: summary(600.0),
            },
            suite_vs_agentvm: None,
        }
    }

    #[test]
    fn compares_with_agentvm() {
        let mut rows = rows(40, 13.9);
        let agentvm = Agentvm {
            exec_true_ms: Some(10.0),
            revert_ms: Some(100.0),
            suite: Some((40, 6.95)),
            ..Agentvm::default()
        };
        rows.compare(&agentvm);
        assert_eq!(rows.run_true_vs_agentvm.as_ref().unwrap().ratio, 3.45);
        assert_eq!(rows.exec_true_vs_agentvm.as_ref().unwrap().ratio, 9.1);
        assert_eq!(rows.suite_vs_agentvm.as_ref().unwrap().ratio, 2.0);
        // A suite of another size is not compared.
        rows.compare(&Agentvm {
            suite: Some((10, 2.0)),
            ..agentvm
        });
        assert_eq!(rows.suite_vs_agentvm, None);
        let table = rows.render();
        for needle in [
            "docker run --rm <image> true",
            "379 ms",
            "91.0 ms",
            "13.90 s",
        ] {
            assert!(table.contains(needle), "{needle:?} not in\n{table}");
        }
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
