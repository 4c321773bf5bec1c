//! [`VmExt`]: running agents on a [`Vm`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentvm_runtime::client::ExecOutput;
use agentvm_runtime::command::Command;
use agentvm_runtime::protocol::{ExitReport, ExitStatus, ListChangesRequest};
use agentvm_runtime::spec::NetworkMode;
use agentvm_runtime::vm::{Vm, VmError};

use crate::agent::{
    resolve_host_path, Agent, AgentSource, Task, AGENT_DIR, PROMPT_FILE, WORKSPACE,
};
use crate::context::{record_phase, RunInfo};
use crate::report::PhaseKind;
use crate::run::AgentRun;

/// Why an agent could not be run (an agent that fails or times out is not an
/// error: that is in the [`AgentRun`]).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A host file or directory to copy into the guest does not exist.
    #[error("{what} {path} not found (tried {})", tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    HostPathNotFound {
        /// What it is (agent script, fixture, ...).
        what: &'static str,
        /// The path as given.
        path: PathBuf,
        /// The absolute paths looked at.
        tried: Vec<PathBuf>,
    },
    /// A host file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    ReadHost {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The agent or task is malformed.
    #[error("invalid {what}: {message}")]
    Invalid {
        /// Agent, task file, ...
        what: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The model gateway could not start (a cassette that does not load, a
    /// missing script, record mode in CI).
    #[error("model gateway: {0}")]
    ModelSetup(#[from] agentvm_gateway::SetupError),
    /// The model could not answer the agent: the script ran out, a turn
    /// needs a tool the agent does not have, or no cassette entry matches
    /// (the message shows the diff against the nearest one).
    #[error("the model gateway could not answer the agent:\n{}", .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n---\n"))]
    Model {
        /// Every error, in order.
        errors: Vec<agentvm_gateway::GatewayError>,
        /// The run as far as it went (its transcript included).
        run: Box<AgentRun>,
    },
    /// A VM operation failed (the guest crashed or hung, or refused a file).
    #[error("{step}: {source}")]
    VmOperation {
        /// What was being done.
        step: &'static str,
        /// The VM error.
        #[source]
        source: VmError,
    },
}

impl AgentError {
    fn vm(step: &'static str) -> impl FnOnce(VmError) -> Self {
        move |source| Self::VmOperation { step, source }
    }
}

/// The output of a shell command run with [`VmExt::sh`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellOutput {
    /// Exit code (`None` when killed by a signal).
    pub exit_code: Option<i32>,
    /// Stdout, lossy UTF-8.
    pub stdout: String,
    /// Stderr, lossy UTF-8.
    pub stderr: String,
}

impl ShellOutput {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

impl From<ExecOutput> for ShellOutput {
    fn from(out: ExecOutput) -> Self {
        Self {
            exit_code: match out.report.status {
                ExitStatus::Code(code) => Some(code),
                ExitStatus::Signal(_) => None,
            },
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Agent operations on a [`Vm`] (the test function's `&mut Vm`).
pub trait VmExt {
    /// Runs `agent` on `task`:
    ///
    /// 1. copies the agent into `/opt/agentvm/agent/` (for [`Agent::script`]
    ///    and [`Agent::dir`]), the prompt into `/opt/agentvm/task/prompt.txt`,
    ///    and the task's files and fixtures into `/workspace`;
    /// 2. makes the workspace the baseline, so the injected files do not count
    ///    as changes;
    /// 3. runs the agent in `/workspace` with its timeout and output limit,
    ///    with `AGENT_PROMPT`, `AGENT_TASK_FILE` (when there is a prompt),
    ///    `AGENT_WORKSPACE=/workspace` and its own environment;
    /// 4. lists the workspace changes (with texts and diffs of small text
    ///    files) and returns the [`AgentRun`], secrets redacted.
    ///
    /// Under the test harness the run is also kept for the test's artifacts.
    fn run_agent<'a>(
        &'a mut self,
        agent: &'a Agent,
        task: impl AsRef<Task> + Send + 'a,
    ) -> impl Future<Output = Result<AgentRun, AgentError>> + Send + 'a;

    /// Copies a host directory's files recursively into the guest workspace
    /// (relative to `/workspace`; `into` empty for the workspace root). Does
    /// not reset the change baseline.
    fn copy_dir_into_workspace<'a>(
        &'a mut self,
        host_dir: &'a Path,
        into: &'a str,
    ) -> impl Future<Output = Result<(), AgentError>> + Send + 'a;

    /// Runs `sh -c script` in `/workspace` (timeout 60 s) and returns its output.
    fn sh<'a>(
        &'a mut self,
        script: &'a str,
    ) -> impl Future<Output = Result<ShellOutput, AgentError>> + Send + 'a;
}

impl VmExt for Vm {
    async fn run_agent<'a>(
        &'a mut self,
        agent: &'a Agent,
        task: impl AsRef<Task> + Send + 'a,
    ) -> Result<AgentRun, AgentError> {
        run_agent(self, agent, task.as_ref()).await
    }

    async fn copy_dir_into_workspace<'a>(
        &'a mut self,
        host_dir: &'a Path,
        into: &'a str,
    ) -> Result<(), AgentError> {
        let dir = resolve(host_dir, "fixture directory")?;
        let prefix = into.trim_matches('/');
        for (rel, data, mode) in read_tree(&dir)? {
            let path = if prefix.is_empty() {
                rel
            } else {
                format!("{prefix}/{rel}")
            };
            self.write_file(&path, &data, mode)
                .await
                .map_err(AgentError::vm("copying a fixture into the workspace"))?;
        }
        Ok(())
    }

    async fn sh<'a>(&'a mut self, script: &'a str) -> Result<ShellOutput, AgentError> {
        let out = self
            .exec(Command::shell(script).current_dir(WORKSPACE))
            .await
            .map_err(AgentError::vm("running a shell command"))?;
        Ok(out.into())
    }
}

async fn run_agent(vm: &mut Vm, agent: &Agent, task: &Task) -> Result<AgentRun, AgentError> {
    let secrets = agent.secrets();
    crate::audit::remember_secrets(&secrets);
    let context = crate::context::current();
    if let Some(context) = &context {
        context
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .secrets
            .extend(&secrets);
    }
    let inject_started = std::time::Instant::now();
    // 1. Agent files.
    let program = match &agent.source {
        AgentSource::Script(path) => {
            let path = resolve(path, "agent script")?;
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| AgentError::Invalid {
                    what: "agent script",
                    message: format!("{} has no UTF-8 file name", path.display()),
                })?
                .to_string();
            let data = std::fs::read(&path).map_err(|source| AgentError::ReadHost {
                path: path.clone(),
                source,
            })?;
            let guest = format!("{AGENT_DIR}/{name}");
            vm.write_file(&guest, &data, 0o755)
                .await
                .map_err(AgentError::vm("copying the agent into the guest"))?;
            vec![guest]
        }
        AgentSource::Dir { dir, entry } => {
            let dir = resolve(dir, "agent directory")?;
            let entry = clean_relative(entry).ok_or_else(|| AgentError::Invalid {
                what: "agent entry",
                message: format!("{entry:?} must be a relative path inside the agent directory"),
            })?;
            let files = read_tree(&dir)?;
            if !files.iter().any(|(rel, _, _)| *rel == entry) {
                return Err(AgentError::Invalid {
                    what: "agent entry",
                    message: format!("{entry} is not a file in {}", dir.display()),
                });
            }
            for (rel, data, mode) in files {
                let mode = if rel == entry { mode | 0o755 } else { mode };
                vm.write_file(&format!("{AGENT_DIR}/{rel}"), &data, mode)
                    .await
                    .map_err(AgentError::vm("copying the agent into the guest"))?;
            }
            vec![format!("{AGENT_DIR}/{entry}")]
        }
        AgentSource::Command(argv) => {
            if argv.is_empty() {
                return Err(AgentError::Invalid {
                    what: "agent",
                    message: "Agent::command needs at least the program name".into(),
                });
            }
            argv.clone()
        }
    };
    // 1b. Task files.
    if let Some(prompt) = &task.prompt {
        vm.write_file(PROMPT_FILE, prompt.as_bytes(), 0o644)
            .await
            .map_err(AgentError::vm("writing the prompt file"))?;
    }
    for fixture in &task.fixtures {
        vm.copy_dir_into_workspace(fixture, "").await?;
    }
    for (path, data) in &task.files {
        let rel = workspace_path(path).ok_or_else(|| AgentError::Invalid {
            what: "task file",
            message: format!("{path:?} must be a path inside the workspace"),
        })?;
        vm.write_file(&rel, data, 0o644)
            .await
            .map_err(AgentError::vm("writing a task file"))?;
    }
    // 2. Baseline.
    vm.reset_workspace_baseline()
        .await
        .map_err(AgentError::vm("recording the workspace baseline"))?;
    // 3. Run.
    let timeout = agent
        .timeout
        .or_else(|| {
            context
                .as_ref()
                .map(|c| c.lock().unwrap_or_else(|e| e.into_inner()).exec_timeout)
        })
        .unwrap_or(agentvm_runtime::command::DEFAULT_EXEC_TIMEOUT);
    let argv: Vec<String> = program
        .iter()
        .chain(&agent.args)
        .map(|a| secrets.redact(a).into_owned())
        .collect();
    let mut command = Command::from_argv(program)
        .args(agent.args.iter().cloned())
        .current_dir(WORKSPACE)
        .timeout(timeout)
        .output_limit(agent.output_limit)
        .env("AGENT_WORKSPACE", WORKSPACE);
    if let Some(prompt) = &task.prompt {
        command = command
            .env("AGENT_TASK_FILE", PROMPT_FILE)
            .env("AGENT_PROMPT", prompt.clone());
    }
    for (k, v) in agent.env.iter().chain(&agent.secrets) {
        command = command.env(k.clone(), v.clone());
    }
    let (network, allow) = match &context {
        Some(c) => {
            let c = c.lock().unwrap_or_else(|e| e.into_inner());
            (c.network.clone(), c.allow.clone())
        }
        None => (
            vm.spec().network.clone(),
            agentvm_gateway::Allowlist::default(),
        ),
    };
    let allowlist = run_allowlist(&network, allow, &agent.allow)?;
    if agent.model.is_some() && !network.reaches_model_gateway() {
        return Err(AgentError::Invalid {
            what: "network",
            message: "the agent has a model, but network = \"isolated\" gives the guest no \
                      path to the model gateway: use network = \"gateway\" (the default)"
                .into(),
        });
    }
    let model = match &agent.model {
        Some(slot) => Some(ModelSession::start(vm, &slot.0).await?),
        None => None,
    };
    let egress = match allowlist {
        Some(allowlist) => {
            let session = EgressSession::start(vm, allowlist).await?;
            command = EgressSession::proxy_env(command);
            Some(session)
        }
        None => None,
    };
    let run_started = std::time::Instant::now();
    record_phase(context.as_ref(), PhaseKind::Inject, inject_started);
    let output = vm.exec(command).await;
    let capture_started = std::time::Instant::now();
    record_phase(context.as_ref(), PhaseKind::Run, run_started);
    let connections = match egress {
        Some(session) => session.finish(vm).await,
        None => Vec::new(),
    };
    let (transcript, model_errors) = match model {
        Some(session) => session.finish(vm).await,
        None => (Vec::new(), Vec::new()),
    };
    let output = output.map_err(AgentError::vm("running the agent"))?;
    let test = context
        .as_ref()
        .map(|c| c.lock().unwrap_or_else(|e| e.into_inner()).test.clone())
        .unwrap_or_default();
    for connection in &connections {
        emit_connection(&test, vm.id(), connection);
    }
    // 4. Changes, in the workspace and outside it.
    let changes = vm
        .changes(ListChangesRequest {
            include_text: true,
            outside_workspace: true,
        })
        .await
        .map_err(AgentError::vm("listing the workspace changes"));
    let outside = changes.as_ref().ok().map(|c| c.outside_workspace.len());
    record_phase(context.as_ref(), PhaseKind::Capture, capture_started);
    let info = RunInfo {
        agent: agent_name(&argv),
        argv: argv.clone(),
        prompt: task
            .prompt
            .as_deref()
            .map(|p| secrets.redact(p).into_owned()),
        task_files: task
            .files
            .iter()
            .map(|(path, _)| secrets.redact(path).into_owned())
            .collect(),
    };
    emit_execution(test, vm.id(), argv, &output.report, outside);
    let run = AgentRun::from_changes(output, changes?, &secrets)
        .with_transcript(transcript)
        .with_network(connections);
    // Kept also when the model failed: its transcript shows how far it got.
    if let Some(context) = &context {
        let mut context = context.lock().unwrap_or_else(|e| e.into_inner());
        context.runs.push(run.clone());
        context.infos.push(info);
    }
    if !model_errors.is_empty() {
        return Err(AgentError::Model {
            errors: model_errors,
            run: Box::new(run),
        });
    }
    Ok(run)
}

/// The model gateway serving one agent run over the tunnelled model port.
struct ModelSession {
    gateway: agentvm_gateway::Gateway,
    server: tokio::task::JoinHandle<()>,
}

impl ModelSession {
    async fn start(vm: &mut Vm, model: &agentvm_gateway::Model) -> Result<Self, AgentError> {
        let gateway =
            agentvm_gateway::Gateway::new(agentvm_gateway::GatewayConfig::new(model.clone()))?;
        let serving = gateway.clone();
        let server = serve_tunnelled(
            vm,
            crate::agent::MODEL_PORT,
            "opening the model port in the guest",
            move |stream| {
                let gateway = serving.clone();
                async move { gateway.serve_connection(stream).await }
            },
        )
        .await?;
        Ok(Self { gateway, server })
    }

    /// Stops serving; the transcript and the errors of the run.
    async fn finish(
        self,
        vm: &mut Vm,
    ) -> (
        Vec<agentvm_gateway::Exchange>,
        Vec<agentvm_gateway::GatewayError>,
    ) {
        self.server.abort();
        let _ = vm.client().tunnel_unlisten(crate::agent::MODEL_PORT).await;
        (self.gateway.transcript(), self.gateway.take_errors())
    }
}

/// Serves every connection guest processes make to `port` on its own task,
/// until the returned task is aborted.
async fn serve_tunnelled<F, Fut>(
    vm: &mut Vm,
    port: u16,
    step: &'static str,
    serve: F,
) -> Result<tokio::task::JoinHandle<()>, AgentError>
where
    F: Fn(agentvm_runtime::tunnel::TunnelStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut listener = vm.tunnel_listen(port).await.map_err(AgentError::vm(step))?;
    Ok(tokio::spawn(async move {
        while let Ok(stream) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    }))
}

/// The egress proxy's allowlist for a run in `network` mode (`None`: the mode
/// has no proxy): the test's list and the agent's own patterns.
fn run_allowlist(
    network: &NetworkMode,
    test_allow: agentvm_gateway::Allowlist,
    agent_allow: &[String],
) -> Result<Option<agentvm_gateway::Allowlist>, AgentError> {
    if !network.offers_egress_proxy() {
        if !agent_allow.is_empty() {
            return Err(AgentError::Invalid {
                what: "network",
                message: format!(
                    "Agent::allow({agent_allow:?}) needs network = \"gateway\" or \"allowlist\"; \
                     network = \"{network}\" has no egress proxy"
                ),
            });
        }
        return Ok(None);
    }
    agentvm_gateway::Allowlist::parse(agent_allow)
        .map(|agent| Some(test_allow.extended(agent)))
        .map_err(|e| AgentError::Invalid {
            what: "allowlist",
            message: e.to_string(),
        })
}

/// The egress proxy serving one agent run over the tunnelled proxy port.
struct EgressSession {
    proxy: agentvm_gateway::EgressProxy,
    server: tokio::task::JoinHandle<()>,
}

impl EgressSession {
    /// How long a run's last connections may take to be logged after it
    /// ended (its sockets close as its processes exit).
    const SETTLE: Duration = Duration::from_secs(2);

    async fn start(vm: &mut Vm, allowlist: agentvm_gateway::Allowlist) -> Result<Self, AgentError> {
        let proxy = agentvm_gateway::EgressProxy::new(allowlist);
        let serving = proxy.clone();
        let server = serve_tunnelled(
            vm,
            crate::agent::PROXY_PORT,
            "opening the egress proxy port in the guest",
            move |stream| {
                let proxy = serving.clone();
                async move { proxy.serve_connection(stream).await }
            },
        )
        .await?;
        Ok(Self { proxy, server })
    }

    /// `command` with the proxy in the variables that curl, git, pip, Python,
    /// Node's fetch (with `NODE_USE_ENV_PROXY`) and Rust's reqwest read; the
    /// model gateway on loopback is not proxied.
    fn proxy_env(command: Command) -> Command {
        let url = format!("http://127.0.0.1:{}", crate::agent::PROXY_PORT);
        let mut command = command;
        for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            command = command.env(key, url.clone());
        }
        for key in ["NO_PROXY", "no_proxy"] {
            command = command.env(key, "127.0.0.1,localhost,::1");
        }
        command.env("NODE_USE_ENV_PROXY", "1")
    }

    /// Stops serving; every connection of the run.
    async fn finish(self, vm: &mut Vm) -> Vec<agentvm_gateway::ConnectionRecord> {
        let _ = vm.client().tunnel_unlisten(crate::agent::PROXY_PORT).await;
        self.proxy.settle(Self::SETTLE).await;
        self.server.abort();
        self.proxy.connections()
    }
}

/// Emits the [`Event::Connection`](agentvm_runtime::events::Event::Connection)
/// of one proxied connection.
fn emit_connection(test: &str, vm: &str, record: &agentvm_gateway::ConnectionRecord) {
    agentvm_runtime::events::emit(agentvm_runtime::events::Event::Connection(
        agentvm_runtime::events::Connection {
            test: test.to_string(),
            vm: vm.to_string(),
            host: record.host.clone(),
            port: record.port,
            kind: record.kind.as_str().to_string(),
            allowed: record.allowed,
            bytes_up: record.bytes_up,
            bytes_down: record.bytes_down,
            duration_seconds: record.duration.as_secs_f64(),
            error: record.error.clone(),
        },
    ));
}

/// The agent's name: its program's file name.
fn agent_name(argv: &[String]) -> String {
    argv.first()
        .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
        .unwrap_or_default()
}

/// Emits the [`Event::Execution`](agentvm_runtime::events::Event::Execution) of a run.
fn emit_execution(
    test: String,
    vm: &str,
    argv: Vec<String>,
    report: &ExitReport,
    outside_workspace_paths: Option<usize>,
) {
    let resources = &report.resources;
    let cpu = match (resources.user_cpu, resources.system_cpu) {
        (None, None) => None,
        (u, s) => Some(u.unwrap_or_default().as_secs_f64() + s.unwrap_or_default().as_secs_f64()),
    };
    agentvm_runtime::events::emit(agentvm_runtime::events::Event::Execution(
        agentvm_runtime::events::Execution {
            test,
            vm: vm.to_string(),
            agent: agent_name(&argv),
            argv,
            exit_code: match report.status {
                ExitStatus::Code(code) => Some(code),
                ExitStatus::Signal(_) => None,
            },
            signal: match report.status {
                ExitStatus::Signal(signal) => Some(signal),
                ExitStatus::Code(_) => None,
            },
            timed_out: report.timed_out,
            duration_seconds: report.duration.as_secs_f64(),
            stdout_bytes: report.stdout_bytes,
            stderr_bytes: report.stderr_bytes,
            output_truncated: report.stdout_truncated || report.stderr_truncated,
            peak_rss_bytes: resources.peak_rss_bytes,
            cpu_seconds: cpu,
            processes_started: resources.processes_started,
            peak_processes: resources.peak_processes,
            unroutable_packets: resources.unroutable_packets,
            outside_workspace_paths,
        },
    ));
}

fn resolve(path: &Path, what: &'static str) -> Result<PathBuf, AgentError> {
    resolve_host_path(path).map_err(|tried| AgentError::HostPathNotFound {
        what,
        path: path.to_path_buf(),
        tried,
    })
}

/// `path` without `.`/empty components, if it stays relative and inside (no `..`).
fn clean_relative(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    (!path.starts_with('/') && !parts.is_empty()).then(|| parts.join("/"))
}

/// A task file path as a workspace-relative path (`/workspace/x` allowed).
fn workspace_path(path: &str) -> Option<String> {
    let rel = match path.strip_prefix(WORKSPACE) {
        Some(rest) if rest.starts_with('/') => rest.trim_start_matches('/'),
        _ => path,
    };
    clean_relative(rel)
}

/// Permission bits as git records them: 0755 when any execute bit is set,
/// else 0644 (so that a checkout's umask does not change snapshots).
fn git_mode(mode: u32) -> u32 {
    if mode & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// Every regular file under `dir` (symlinks followed), as (relative path,
/// content, permission bits normalized by [`git_mode`]), sorted by path.
fn read_tree(dir: &Path) -> Result<Vec<(String, Vec<u8>, u32)>, AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AgentError::ReadHost { path, source }
    };
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        let meta = std::fs::metadata(&path).map_err(read_err(&path))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(read_err(&path))? {
                let entry = entry.map_err(read_err(&path))?;
                let name = entry.file_name();
                let name = name.to_str().ok_or_else(|| AgentError::Invalid {
                    what: "host file name",
                    message: format!("{} is not UTF-8", entry.path().display()),
                })?;
                let child_rel = if rel.is_empty() {
                    name.to_string()
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((entry.path(), child_rel));
            }
        } else if meta.is_file() {
            if rel.is_empty() {
                // `dir` itself is a file: copy it under its own name.
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("file")
                    .to_string();
                let data = std::fs::read(&path).map_err(read_err(&path))?;
                out.push((name, data, git_mode(meta.permissions().mode())));
            } else {
                let data = std::fs::read(&path).map_err(read_err(&path))?;
                out.push((rel, data, git_mode(meta.permissions().mode())));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(clean_relative("a/./b//c").as_deref(), Some("a/b/c"));
        assert_eq!(clean_relative("../x"), None);
        assert_eq!(clean_relative("a/../../x"), None);
        assert_eq!(clean_relative("/etc/passwd"), None);
        assert_eq!(clean_relative(""), None);
        assert_eq!(
            workspace_path("/workspace/src/x.rs").as_deref(),
            Some("src/x.rs")
        );
        assert_eq!(workspace_path("src/x.rs").as_deref(), Some("src/x.rs"));
        assert_eq!(workspace_path("/workspaces/x"), None);
        assert_eq!(workspace_path("/etc/x"), None);
    }

    #[test]
    fn trees_are_read_sorted_with_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("b/c")).unwrap();
        std::fs::create_dir_all(dir.path().join("empty")).unwrap();
        std::fs::write(dir.path().join("b/c/run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            dir.path().join("b/c/run.sh"),
            std::fs::Permissions::from_mode(0o744),
        )
        .unwrap();
        std::fs::write(dir.path().join("a.txt"), "a").unwrap();
        std::fs::set_permissions(
            dir.path().join("a.txt"),
            std::fs::Permissions::from_mode(0o664),
        )
        .unwrap();
        let tree = read_tree(dir.path()).unwrap();
        let summary: Vec<(&str, u32)> = tree.iter().map(|(p, _, m)| (p.as_str(), *m)).collect();
        assert_eq!(summary, [("a.txt", 0o644), ("b/c/run.sh", 0o755)]);
        let single = read_tree(&dir.path().join("a.txt")).unwrap();
        assert_eq!(single[0].0, "a.txt");
    }

    #[test]
    fn missing_host_paths_list_what_was_tried() {
        let e = resolve(Path::new("no/such/agent.sh"), "agent script")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("agent script no/such/agent.sh not found (tried /"),
            "{e}"
        );
    }
}
