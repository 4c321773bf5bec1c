//! [`Command`]: a builder for a command to run in a guest, like
//! `std::process::Command`.

use std::time::Duration;

use crate::protocol::ExecRequest;

/// Default time a command may run before its process tree is killed.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// Default grace period between SIGTERM and SIGKILL on timeout.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_millis(500);
/// Default cap on captured bytes of each of stdout and stderr.
pub const DEFAULT_OUTPUT_LIMIT: u64 = 4 * 1024 * 1024;

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    request: ExecRequest,
}

impl Command {
    /// A command running `program` (looked up in the guest's `PATH`).
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            request: ExecRequest {
                argv: vec![program.into()],
                env: Vec::new(),
                clear_env: false,
                cwd: None,
                stdin: Vec::new(),
                timeout: Some(DEFAULT_EXEC_TIMEOUT),
                kill_grace: DEFAULT_KILL_GRACE,
                output_limit: DEFAULT_OUTPUT_LIMIT,
                user: None,
            },
        }
    }

    /// `sh -c script`.
    pub fn shell(script: impl Into<String>) -> Self {
        Self::new("sh").arg("-c").arg(script)
    }

    /// A command from a full argv (`argv[0]` is the program). Panics on an empty argv.
    pub fn from_argv<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut argv = argv.into_iter().map(Into::into);
        let program = argv.next().expect("argv must not be empty");
        Self::new(program).args(argv)
    }

    /// Appends an argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.request.argv.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.request.argv.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.env.push((key.into(), value.into()));
        self
    }

    /// Starts from an empty environment.
    pub fn env_clear(mut self) -> Self {
        self.request.clear_env = true;
        self
    }

    /// Working directory (relative paths are under the guest workspace).
    pub fn current_dir(mut self, dir: impl Into<String>) -> Self {
        self.request.cwd = Some(dir.into());
        self
    }

    /// Bytes fed to stdin (then closed).
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.request.stdin = data.into();
        self
    }

    /// Kills the process tree after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.request.timeout = Some(timeout);
        self
    }

    /// Grace period between SIGTERM and SIGKILL when the timeout hits.
    pub fn kill_grace(mut self, grace: Duration) -> Self {
        self.request.kill_grace = grace;
        self
    }

    /// Cap on captured bytes of each of stdout and stderr.
    pub fn output_limit(mut self, bytes: u64) -> Self {
        self.request.output_limit = bytes;
        self
    }

    /// Runs as this uid/gid instead of the guest's default user (the agent
    /// image's default is the unprivileged `agent`, 1000:1000).
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.request.user = Some(crate::protocol::ExecUser { uid, gid });
        self
    }

    /// Runs as root (uid 0), whatever the guest's default user is.
    pub fn as_root(self) -> Self {
        self.user(0, 0)
    }

    /// The program and arguments.
    pub fn argv(&self) -> &[String] {
        &self.request.argv
    }

    /// The timeout, if any.
    pub fn get_timeout(&self) -> Option<Duration> {
        self.request.timeout
    }

    /// The wire request.
    pub fn into_request(self) -> ExecRequest {
        self.request
    }

    /// The wire request, borrowed.
    pub fn request(&self) -> &ExecRequest {
        &self.request
    }
}

impl From<Command> for ExecRequest {
    fn from(command: Command) -> Self {
        command.request
    }
}
