//! [`Agent`] (what runs) and [`Task`] (what it is asked to do).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentvm_gateway::Model;

use crate::redact::Secrets;

/// Guest directory the agent's files are copied into.
pub const AGENT_DIR: &str = "/opt/agentvm/agent";
/// Guest directory of the task files.
pub const TASK_DIR: &str = "/opt/agentvm/task";
/// Guest path of the prompt file.
pub const PROMPT_FILE: &str = "/opt/agentvm/task/prompt.txt";
/// The guest workspace: the agent's working directory.
pub const WORKSPACE: &str = "/workspace";
/// Default cap on captured bytes of each of stdout and stderr of an agent run.
pub const DEFAULT_AGENT_OUTPUT_LIMIT: u64 = 1024 * 1024;
/// Guest loopback port of the model gateway (tunnelled to the host).
pub const MODEL_PORT: u16 = 8787;
/// Guest loopback port of the egress proxy (tunnelled to the host) in the
/// `gateway` and `allowlist` network modes; agents find it through
/// `HTTP_PROXY`/`HTTPS_PROXY`.
pub const PROXY_PORT: u16 = 3128;
/// The API key the agent presets give the agent: the gateway ignores it,
/// and no real key ever enters the guest.
pub const GATEWAY_API_KEY: &str = "sk-agentvm-gateway-not-a-real-key";
/// The presets' default timeout: a real agent's first start reads and
/// translates hundreds of MB of code, which takes tens of seconds under
/// QEMU's software emulation (TCG).
pub const REAL_AGENT_TIMEOUT: Duration = Duration::from_secs(300);

/// The gateway's URL as the guest sees it ([`MODEL_PORT`]).
const MODEL_BASE_URL: &str = "http://127.0.0.1:8787";

/// A [`Model`] shared by clones of an [`Agent`] (equal when it is the same).
#[derive(Clone)]
pub(crate) struct ModelSlot(pub(crate) Arc<Model>);

impl PartialEq for ModelSlot {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ModelSlot {}

/// Where the agent comes from.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum AgentSource {
    /// A host file copied to `/opt/agentvm/agent/<file name>`.
    Script(PathBuf),
    /// A host directory copied to `/opt/agentvm/agent/`; `entry` is run.
    Dir { dir: PathBuf, entry: String },
    /// A program already in the guest image.
    Command(Vec<String>),
}

/// A coding agent to run in the VM: a program, its arguments and environment.
///
/// ```
/// use std::time::Duration;
/// use agentvm_test::Agent;
///
/// let agent = Agent::script("examples/agents/hello.sh")
///     .arg("--verbose")
///     .env("AGENT_MODE", "test")
///     .secret_env("API_KEY", "sk-not-in-logs")
///     .timeout(Duration::from_secs(30));
/// assert!(!format!("{agent:?}").contains("sk-not-in-logs"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Agent {
    pub(crate) source: AgentSource,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) secrets: Vec<(String, String)>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) output_limit: u64,
    pub(crate) model: Option<ModelSlot>,
    pub(crate) allow: Vec<String>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match &self.source {
            AgentSource::Script(path) => format!("script {}", path.display()),
            AgentSource::Dir { dir, entry } => format!("dir {} (entry {entry})", dir.display()),
            AgentSource::Command(argv) => format!("command {argv:?}"),
        };
        let secrets: Vec<String> = self
            .secrets
            .iter()
            .map(|(k, _)| format!("{k}={}", crate::redact::placeholder(k)))
            .collect();
        f.debug_struct("Agent")
            .field("source", &source)
            .field("args", &self.args)
            .field("env", &self.env)
            .field("secret_env", &secrets)
            .field("timeout", &self.timeout)
            .field("output_limit", &self.output_limit)
            .field("model", &self.model.as_ref().map(|m| &m.0))
            .field("allow", &self.allow)
            .finish()
    }
}

impl Agent {
    fn new(source: AgentSource) -> Self {
        Self {
            source,
            args: Vec::new(),
            env: Vec::new(),
            secrets: Vec::new(),
            timeout: None,
            output_limit: DEFAULT_AGENT_OUTPUT_LIMIT,
            model: None,
            allow: Vec::new(),
        }
    }

    /// The real Claude Code CLI (`claude`, installed in the `agent` image
    /// by the `claude-code` recipe), pointed at the model gateway and kept
    /// quiet: `claude -p "$AGENT_PROMPT" --dangerously-skip-permissions
    /// --bare` with `ANTHROPIC_BASE_URL` on the tunnelled gateway port, a
    /// fake key, telemetry, auto-update and non-essential traffic off and no
    /// retries (an unreachable API fails at once instead of retrying for
    /// minutes). Give it a [`Model`] with [`Agent::model`].
    pub fn claude_code() -> Self {
        Self::command([
            "sh",
            "-c",
            "exec claude -p \"$AGENT_PROMPT\" --dangerously-skip-permissions --bare </dev/null",
        ])
        .env("ANTHROPIC_BASE_URL", MODEL_BASE_URL)
        .env("ANTHROPIC_API_KEY", GATEWAY_API_KEY)
        .env("DISABLE_TELEMETRY", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("CLAUDE_CODE_MAX_RETRIES", "0")
        // Lets it skip permissions when a test runs it as root.
        .env("IS_SANDBOX", "1")
        .timeout(REAL_AGENT_TIMEOUT)
    }

    /// The real OpenAI Codex CLI (`codex`, from the `codex` recipe), on a
    /// custom model provider at the gateway (Codex ignores
    /// `OPENAI_BASE_URL`) with the Responses wire API, analytics, plugins
    /// and apps off (they delay exit or reach out), approvals and its own
    /// sandbox bypassed (the VM is the sandbox). Give it a [`Model`].
    pub fn codex() -> Self {
        Self::command([
            "sh",
            "-c",
            concat!(
                "exec codex exec --skip-git-repo-check --dangerously-bypass-approvals-and-sandbox ",
                "--disable plugins --disable remote_plugin --disable apps ",
                "-c analytics.enabled=false -m gpt-agentvm -c model_provider=agentvm ",
                "-c 'model_providers.agentvm={name=\"agentvm\",base_url=\"http://127.0.0.1:8787/v1\",",
                "env_key=\"OPENAI_API_KEY\",wire_api=\"responses\"}' ",
                "\"$AGENT_PROMPT\" </dev/null"
            ),
        ])
        .env("OPENAI_API_KEY", GATEWAY_API_KEY)
        .timeout(REAL_AGENT_TIMEOUT)
    }

    /// Lets this agent's runs reach `pattern` (`host`, `host:port` or
    /// `*.domain[:port]`) through the egress proxy, in addition to the
    /// test's and the configuration's `allow` lists. Only in the `gateway`
    /// and `allowlist` network modes (the others have no proxy); a bad
    /// pattern fails the run with [`AgentError::Invalid`](crate::AgentError::Invalid).
    pub fn allow(mut self, pattern: impl Into<String>) -> Self {
        self.allow.push(pattern.into());
        self
    }

    /// [Aider](https://aider.chat) (`aider`, from the `aider` recipe), one
    /// non-interactive chat turn against the gateway's Chat Completions API:
    /// `aider --model openai/gpt-agentvm --message "$AGENT_PROMPT"
    /// --yes-always --no-git …` with `OPENAI_API_BASE` on the tunnelled
    /// gateway port and a fake key. It is kept offline and quiet: a model
    /// metadata file written to `~/.aider/` before it starts (else it
    /// fetches a price list from the internet at every start), litellm's
    /// bundled cost map, no update check, analytics, release notes, URL
    /// scraping or browser; its chat and input histories go to `~/.aider/`
    /// instead of the workspace.
    ///
    /// Extra [`Agent::arg`]s go to `aider` after these flags: file names to
    /// add to the chat (`.arg("notes.txt")`), `--edit-format diff` (the
    /// default for this unknown model is `whole`), or `--git` to let it
    /// commit in a repository. The gateway answers in the edit format the
    /// request asks for (see [`agentvm_gateway::script`]). Aider runs a
    /// shell command the model suggests (diff format only) only on an
    /// explicit yes, which `--yes-always` never gives, so a scripted shell
    /// turn is shown but not run. Give it a [`Model`].
    pub fn aider() -> Self {
        Self::command([
            "sh",
            "-c",
            concat!(
                "command -v aider >/dev/null || { echo 'agentvm: aider is not in this image; ",
                "build it with: agentvm image build agent --with claude-code,codex,aider' >&2; ",
                "exit 127; }\n",
                "mkdir -p \"$HOME/.aider\" && printf '%s\\n' '{\"openai/gpt-agentvm\": {",
                "\"litellm_provider\": \"openai\", \"mode\": \"chat\", \"max_input_tokens\": 128000, ",
                "\"max_output_tokens\": 8192, \"input_cost_per_token\": 0, \"output_cost_per_token\": 0}}' ",
                "> \"$HOME/.aider/agentvm-model.json\" || exit 1\n",
                "exec aider --model openai/gpt-agentvm --model-metadata-file \"$HOME/.aider/agentvm-model.json\" ",
                "--message \"$AGENT_PROMPT\" --yes-always --no-git --no-check-update --no-analytics ",
                "--no-show-release-notes --no-show-model-warnings --no-pretty --no-fancy-input --no-detect-urls ",
                "--chat-history-file \"$HOME/.aider/chat.history.md\" ",
                "--input-history-file \"$HOME/.aider/input.history\" \"$@\" </dev/null",
            ),
            // `$0` of the script; the agent's args follow as "$@".
            "aider",
        ])
        .env("OPENAI_API_BASE", format!("{MODEL_BASE_URL}/v1"))
        .env("OPENAI_API_KEY", GATEWAY_API_KEY)
        // litellm's bundled cost map instead of a download at import.
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        // `--yes-always` says yes to "Open URL?": a browser that does nothing.
        .env("BROWSER", "true")
        .timeout(REAL_AGENT_TIMEOUT)
    }

    /// Answers the agent's model requests with `model` — scripted turns, a
    /// replayed cassette or a recording — through the model gateway on the
    /// guest's `127.0.0.1:8787` (`MODEL_PORT`). What the agent asked and
    /// got is in [`AgentRun::transcript`](crate::AgentRun::transcript); a
    /// request the model cannot answer (script ran out, no cassette match)
    /// fails the run with the gateway's message.
    pub fn model(mut self, model: Model) -> Self {
        self.model = Some(ModelSlot(Arc::new(model)));
        self
    }

    /// A script or binary on the host, copied into the guest as
    /// `/opt/agentvm/agent/<file name>` (mode 0755) and run there. A script
    /// needs a `#!` line the guest can run (the minimal image has busybox
    /// `sh`, no bash).
    ///
    /// A relative path is looked up in the current directory (cargo runs
    /// tests in the package's directory), then in the workspace root.
    pub fn script(path: impl Into<PathBuf>) -> Self {
        Self::new(AgentSource::Script(path.into()))
    }

    /// A whole host directory, copied recursively into `/opt/agentvm/agent/`
    /// (files executable on the host get mode 0755, others 0644, as git
    /// records them; empty directories are not copied);
    /// `entry` is the path of the program to run relative to that directory.
    /// Relative `dir` paths are looked up like [`Agent::script`]'s.
    pub fn dir(dir: impl Into<PathBuf>, entry: impl Into<String>) -> Self {
        Self::new(AgentSource::Dir {
            dir: dir.into(),
            entry: entry.into(),
        })
    }

    /// A program already in the guest image, with its first arguments
    /// (`argv[0]` is looked up in the guest's `PATH`), e.g.
    /// `Agent::command(["sh", "-c", "echo hi > hi.txt"])`. Nothing is copied.
    pub fn command<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::new(AgentSource::Command(
            argv.into_iter().map(Into::into).collect(),
        ))
    }

    /// Appends an argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the agent.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets an environment variable whose value is secret (an API key): the
    /// agent sees it, but the value is replaced by `[secret:KEY]` in
    /// everything agentvm captures and keeps (output, file texts and diffs,
    /// snapshots, artifacts, failure messages). See [`crate::redact`].
    pub fn secret_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.secrets.push((key.into(), value.into()));
        self
    }

    /// How long the agent may run before its process tree is killed (and the
    /// run reports `timed_out`). Default: the configured exec timeout
    /// (`exec_timeout`, 60 s unless configured).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Most bytes of each of stdout and stderr kept (the rest is counted and
    /// dropped; the run says it was truncated). Default 1 MiB.
    pub fn output_limit(mut self, bytes: u64) -> Self {
        self.output_limit = bytes;
        self
    }

    /// The secrets of this agent, for redaction.
    pub(crate) fn secrets(&self) -> Secrets {
        let mut secrets = Secrets::new();
        for (k, v) in &self.secrets {
            secrets.add(k.clone(), v.clone());
        }
        secrets
    }

    /// The configured timeout, if any.
    pub fn get_timeout(&self) -> Option<Duration> {
        self.timeout
    }
}

impl AsRef<Agent> for Agent {
    fn as_ref(&self) -> &Agent {
        self
    }
}

/// What the agent is asked to do: a prompt and files in its workspace.
///
/// ```
/// use agentvm_test::Task;
///
/// let task = Task::prompt("add a README")
///     .file("src/main.rs", "fn main() {}\n")
///     .fixture("tests/fixtures/repo");
/// assert_eq!(task.get_prompt(), Some("add a README"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Task {
    pub(crate) prompt: Option<String>,
    pub(crate) files: Vec<(String, Vec<u8>)>,
    pub(crate) fixtures: Vec<PathBuf>,
}

impl Task {
    /// A task without a prompt or files.
    pub fn new() -> Self {
        Self::default()
    }

    /// A task with a prompt. The prompt is written to
    /// `/opt/agentvm/task/prompt.txt`, whose path the agent gets in
    /// `AGENT_TASK_FILE`; the text itself is in `AGENT_PROMPT`.
    pub fn prompt(text: impl Into<String>) -> Self {
        Self {
            prompt: Some(text.into()),
            ..Self::default()
        }
    }

    /// Adds a file to the workspace before the agent starts (`path` relative
    /// to `/workspace`; parent directories are created). It is part of the
    /// baseline, so it shows up in the run's changes only if the agent
    /// changes it.
    pub fn file(
        mut self,
        path_in_workspace: impl Into<String>,
        content: impl Into<Vec<u8>>,
    ) -> Self {
        self.files.push((path_in_workspace.into(), content.into()));
        self
    }

    /// Copies a host directory's contents recursively into `/workspace`
    /// before the agent starts (files executable on the host get mode 0755,
    /// others 0644, as git records them, so a checkout's umask does not show
    /// in snapshots; empty directories are not copied). Part of the baseline like [`Task::file`]. Relative
    /// paths are looked up in the current directory, then in the workspace
    /// root.
    pub fn fixture(mut self, host_dir: impl Into<PathBuf>) -> Self {
        self.fixtures.push(host_dir.into());
        self
    }

    /// The prompt, if any.
    pub fn get_prompt(&self) -> Option<&str> {
        self.prompt.as_deref()
    }
}

impl AsRef<Task> for Task {
    fn as_ref(&self) -> &Task {
        self
    }
}

/// Resolves a host path given by a user: absolute as is; relative against the
/// current directory, then the workspace root. Returns the candidates tried
/// when none exists.
pub(crate) fn resolve_host_path(path: &Path) -> Result<PathBuf, Vec<PathBuf>> {
    if path.is_absolute() {
        return if path.exists() {
            Ok(path.to_path_buf())
        } else {
            Err(vec![path.to_path_buf()])
        };
    }
    let mut tried = Vec::new();
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let candidate = cwd.join(path);
    if candidate.exists() {
        return Ok(candidate);
    }
    tried.push(candidate);
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or(cwd);
    if let Some(root) = agentvm_runtime::config::find_workspace_root(&start) {
        let candidate = root.join(path);
        if candidate.exists() {
            return Ok(candidate);
        }
        tried.push(candidate);
    }
    Err(tried)
}
