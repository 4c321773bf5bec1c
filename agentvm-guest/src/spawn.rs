//! Starting a command with `posix_spawn` (glibc: `clone(CLONE_VM|CLONE_VFORK)`).
//!
//! The standard library's `Command::spawn` falls back to a full `fork` in a
//! statically linked binary (it cannot look up the glibc version or
//! `posix_spawn_file_actions_addchdir_np` through `dlsym` there). Forking the
//! multi-threaded agent copies its page tables and takes copy-on-write faults
//! until the child execs: about 4-5 ms per command under TCG. This module
//! calls glibc's `posix_spawn` directly, which shares the address space until
//! `execve` and reports exec failures (`ENOENT`, `EACCES`, ...) as errors.
//!
//! The child gets: its own process group, an empty signal mask and default
//! signal dispositions (the agent ignores SIGPIPE and handles SIGCHLD), the
//! given environment, working directory and stdio (pipes or `/dev/null`).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `PATH` used for the program lookup when the command's environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to start.
#[derive(Debug, Clone)]
pub struct SpawnSpec<'a> {
    /// Program name (looked up in the command's `PATH` unless it contains a `/`).
    pub program: &'a str,
    /// Arguments after the program name.
    pub args: &'a [String],
    /// The whole environment of the command.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory.
    pub cwd: &'a Path,
    /// Give the command a stdin pipe (else `/dev/null`).
    pub stdin_pipe: bool,
    /// Run as this (uid, gid) instead of the agent's own user. posix_spawn
    /// cannot change credentials, so the agent's own binary is spawned in
    /// its [`RUN_AS_ARG`] mode, which drops to the user and execs the program.
    pub user: Option<(u32, u32)>,
    /// Start the command inside this cgroup (a directory under
    /// `/sys/fs/cgroup`). posix_spawn cannot place a child in a cgroup, and
    /// moving it after the spawn misses what it forked in between, so the
    /// [`RUN_AS_ARG`] helper joins the cgroup itself before it execs.
    pub cgroup: Option<&'a Path>,
}

/// First argument that makes `agentvm-guest` a tiny `setpriv`: join a cgroup
/// and/or drop to a uid/gid (no supplementary groups), then exec a program;
/// see [`run_as_main`].
pub const RUN_AS_ARG: &str = "--agentvm-run-as";

/// Written for "no change" in the helper's user and cgroup arguments.
const KEEP: &str = "-";

/// The argv of the run-as helper:
/// `[RUN_AS_ARG, "uid:gid" | "-", cgroup | "-", path, argv0, args...]`.
pub fn run_as_argv(
    user: Option<(u32, u32)>,
    cgroup: Option<&Path>,
    program: &Path,
    argv0: &str,
    args: &[String],
) -> Vec<Vec<u8>> {
    let mut v = vec![
        RUN_AS_ARG.as_bytes().to_vec(),
        user.map_or_else(|| KEEP.into(), |(uid, gid)| format!("{uid}:{gid}"))
            .into_bytes(),
        cgroup.map_or_else(
            || KEEP.as_bytes().to_vec(),
            |c| c.as_os_str().as_bytes().to_vec(),
        ),
        program.as_os_str().as_bytes().to_vec(),
        argv0.as_bytes().to_vec(),
    ];
    v.extend(args.iter().map(|a| a.as_bytes().to_vec()));
    v
}

/// Parses `uid:gid`.
pub fn parse_user(s: &str) -> Option<(u32, u32)> {
    let (u, g) = s.split_once(':')?;
    Some((u.parse().ok()?, g.parse().ok()?))
}

/// When this process was started as the run-as helper: drops privileges and
/// execs the program; on failure prints why and returns exit code 127 (126
/// for a credentials failure). Returns `None` for a normal start.
pub fn run_as_main() -> Option<i32> {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).map(|a| a.as_bytes()) != Some(RUN_AS_ARG.as_bytes()) {
        return None;
    }
    let fail = |code: i32, what: String| {
        eprintln!("agentvm-guest: {what}");
        Some(code)
    };
    let (Some(user), Some(cgroup), Some(path), Some(_argv0)) =
        (args.get(2), args.get(3), args.get(4), args.get(5))
    else {
        return fail(
            127,
            format!("{RUN_AS_ARG} needs uid:gid, a cgroup, a path and argv"),
        );
    };
    if cgroup.as_bytes() != KEEP.as_bytes() {
        // "0" is the writing process: this one, before it execs.
        if let Err(e) = std::fs::write(Path::new(cgroup).join("cgroup.procs"), "0") {
            return fail(
                126,
                format!("cannot join cgroup {}: {e}", Path::new(cgroup).display()),
            );
        }
    }
    if user.as_bytes() != KEEP.as_bytes() {
        let Some((uid, gid)) = user.to_str().and_then(parse_user) else {
            return fail(127, format!("{RUN_AS_ARG}: bad uid:gid {user:?}"));
        };
        // SAFETY: plain syscalls with valid arguments (a NULL list with size 0).
        let dropped = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setgid(gid) == 0
                && libc::setuid(uid) == 0
        };
        if !dropped {
            return fail(
                126,
                format!(
                    "cannot switch to uid {uid} gid {gid}: {}",
                    io::Error::last_os_error()
                ),
            );
        }
    }
    let Ok(c_path) = CString::new(path.as_bytes()) else {
        return fail(127, "program path holds a NUL byte".into());
    };
    let Ok(c_args) = args[5..]
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
    else {
        return fail(127, "an argument holds a NUL byte".into());
    };
    let ptrs: Vec<*const libc::c_char> = c_args
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // The program must start as posix_spawn would start it: Rust's runtime
    // set SIGPIPE to "ignore" in this helper, and ignored signals survive
    // execv (`yes | head` then never ends: `yes` is not killed by SIGPIPE).
    // SAFETY: resetting dispositions to SIG_DFL has no preconditions;
    // SIGKILL and SIGSTOP are refused with EINVAL, which is harmless.
    unsafe {
        for signal in 1..libc::SIGRTMIN() {
            libc::signal(signal, libc::SIG_DFL);
        }
    }
    // SAFETY: NUL-terminated strings and a NULL-terminated array that live
    // across the call; execv only returns on failure.
    unsafe { libc::execv(c_path.as_ptr(), ptrs.as_ptr()) };
    let e = io::Error::last_os_error();
    let code = if e.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    fail(
        code,
        format!("cannot run {}: {e}", Path::new(path).display()),
    )
}

/// A started command: its pid and the parent's ends of its pipes.
#[derive(Debug)]
pub struct SpawnedChild {
    /// Process id (also its process group id).
    pub pid: libc::pid_t,
    /// Write end of stdin, when asked for.
    pub stdin: Option<OwnedFd>,
    /// Read end of stdout.
    pub stdout: OwnedFd,
    /// Read end of stderr.
    pub stderr: OwnedFd,
}

/// The environment a command gets: the agent's own (unless `clear`), then
/// `PWD` = `cwd` unless the request sets it, then the request's variables.
pub fn command_env(
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    clear: bool,
    cwd: &Path,
    request: &[(String, String)],
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = if clear {
        Vec::new()
    } else {
        inherited.into_iter().collect()
    };
    let mut set = |key: OsString, value: OsString| match env.iter_mut().find(|(k, _)| *k == key) {
        Some(entry) => entry.1 = value,
        None => env.push((key, value)),
    };
    if !request.iter().any(|(k, _)| k == "PWD") {
        set("PWD".into(), cwd.as_os_str().to_owned());
    }
    for (k, v) in request {
        set(k.into(), v.into());
    }
    env
}

/// Where `program` is: itself when it contains a `/` (relative to the
/// command's working directory), else the first executable regular file of
/// that name in `path` (`PATH` syntax; empty entries mean `cwd`).
pub fn find_program(program: &str, path: Option<&OsStr>, cwd: &Path) -> io::Result<PathBuf> {
    if program.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "empty program name",
        ));
    }
    if program.contains('/') {
        // Checked here, not left to the exec: a command started through the
        // run-as helper would report a missing program as exit code 127
        // instead of a spawn error.
        // What the agent itself cannot see (another user's files) is left
        // to the exec as that user.
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(cwd.join(program)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
            Ok(m) if !m.is_file() || m.permissions().mode() & 0o111 == 0 => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{program:?} is not an executable file"),
                ))
            }
            _ => return Ok(PathBuf::from(program)),
        }
    }
    let path = path.unwrap_or(OsStr::new(DEFAULT_PATH));
    for dir in path.as_bytes().split(|&b| b == b':') {
        let dir = if dir.is_empty() {
            cwd.to_path_buf()
        } else {
            cwd.join(OsStr::from_bytes(dir))
        };
        let candidate = dir.join(program);
        if is_executable_file(&candidate) {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{program:?} not found in PATH {}",
            String::from_utf8_lossy(path.as_bytes())
        ),
    ))
}

fn is_executable_file(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: c_path is a valid NUL-terminated string for the call.
    let executable = unsafe { libc::access(c_path.as_ptr(), libc::X_OK) } == 0;
    executable && path.metadata().is_ok_and(|m| m.is_file())
}

fn c_string(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// A pipe whose both ends are close-on-exec (the child's end is `dup2`ed
/// onto 0/1/2, which clears the flag on the copy).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Turns a posix_spawn* return value (an errno, not -1) into a Result.
fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(ret))
    }
}

/// `posix_spawn_file_actions_t`, destroyed on drop.
struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<Self> {
        // SAFETY: an all-zero value is what init overwrites; init is called at once.
        let mut raw: libc::posix_spawn_file_actions_t = unsafe { std::mem::zeroed() };
        // SAFETY: raw is valid for writes.
        check(unsafe { libc::posix_spawn_file_actions_init(&mut raw) })?;
        Ok(Self(raw))
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised in new.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// `posix_spawnattr_t`, destroyed on drop.
struct Attributes(libc::posix_spawnattr_t);

impl Attributes {
    fn new() -> io::Result<Self> {
        // SAFETY: as for FileActions.
        let mut raw: libc::posix_spawnattr_t = unsafe { std::mem::zeroed() };
        // SAFETY: raw is valid for writes.
        check(unsafe { libc::posix_spawnattr_init(&mut raw) })?;
        Ok(Self(raw))
    }
}

impl Drop for Attributes {
    fn drop(&mut self) {
        // SAFETY: initialised in new.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// The agent's own (uid, gid).
fn current_user() -> (u32, u32) {
    // SAFETY: getuid/getgid cannot fail.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// Starts the command. Returns once it runs its program (or the exec failed).
pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<SpawnedChild> {
    let path_var = spec
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_os_str());
    let argv0 = c_string(spec.program.as_bytes(), "the program name")?;
    let program = find_program(spec.program, path_var, spec.cwd)?;
    let user = spec.user.filter(|&user| user != current_user());
    let (c_program, argv) = match (user, spec.cgroup) {
        (None, None) => {
            let mut argv = vec![argv0];
            for arg in spec.args {
                argv.push(c_string(arg.as_bytes(), "an argument")?);
            }
            (
                c_string(program.as_os_str().as_bytes(), "the program path")?,
                argv,
            )
        }
        (user, cgroup) => {
            let mut argv = vec![c_string(b"agentvm-guest", "the program name")?];
            for a in run_as_argv(user, cgroup, &program, spec.program, spec.args) {
                argv.push(c_string(&a, "an argument")?);
            }
            (c_string(b"/proc/self/exe", "the helper path")?, argv)
        }
    };
    let mut envp = Vec::with_capacity(spec.env.len());
    for (k, v) in &spec.env {
        let mut entry = k.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(v.as_bytes());
        envp.push(c_string(&entry, "an environment variable")?);
    }
    let c_cwd = c_string(spec.cwd.as_os_str().as_bytes(), "the working directory")?;
    let argv_ptrs: Vec<*mut libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect();
    let envp_ptrs: Vec<*mut libc::c_char> = envp
        .iter()
        .map(|e| e.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect();

    let stdin = if spec.stdin_pipe { Some(pipe()?) } else { None };
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;

    let mut actions = FileActions::new()?;
    let a = &mut actions.0;
    // SAFETY (this block): `a` is an initialised file-actions object; the
    // descriptors are open and stay open until posix_spawn returned; the
    // strings outlive the calls (glibc copies them).
    unsafe {
        match &stdin {
            Some((read, _)) => check(libc::posix_spawn_file_actions_adddup2(
                a,
                read.as_raw_fd(),
                0,
            ))?,
            None => check(libc::posix_spawn_file_actions_addopen(
                a,
                0,
                c"/dev/null".as_ptr(),
                libc::O_RDONLY,
                0,
            ))?,
        }
        check(libc::posix_spawn_file_actions_adddup2(
            a,
            stdout_write.as_raw_fd(),
            1,
        ))?;
        check(libc::posix_spawn_file_actions_adddup2(
            a,
            stderr_write.as_raw_fd(),
            2,
        ))?;
        check(libc::posix_spawn_file_actions_addchdir_np(
            a,
            c_cwd.as_ptr(),
        ))?;
    }

    let mut attributes = Attributes::new()?;
    let at = &mut attributes.0;
    // SAFETY (this block): `at` is an initialised attributes object; the
    // signal sets are valid for the calls.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        check(libc::posix_spawnattr_setsigmask(at, &empty))?;
        check(libc::posix_spawnattr_setsigdefault(at, &all))?;
        check(libc::posix_spawnattr_setpgroup(at, 0))?;
        check(libc::posix_spawnattr_setflags(
            at,
            (libc::POSIX_SPAWN_SETPGROUP
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
        ))?;
    }

    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid and NUL-terminated / NULL-terminated as
    // posix_spawn requires, and lives until it returns.
    check(unsafe {
        libc::posix_spawn(
            &mut pid,
            c_program.as_ptr(),
            &actions.0,
            &attributes.0,
            argv_ptrs.as_ptr(),
            envp_ptrs.as_ptr(),
        )
    })?;
    // The child's ends close here (dropped); the parent keeps its own.
    drop((stdout_write, stderr_write));
    Ok(SpawnedChild {
        pid,
        stdin: stdin.map(|(_, write)| write),
        stdout: stdout_read,
        stderr: stderr_read,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn env_of(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    #[test]
    fn env_inherits_sets_pwd_and_lets_the_request_win() {
        let inherited = env_of(&[("PATH", "/bin"), ("HOME", "/root"), ("PWD", "/")]);
        let cwd = Path::new("/workspace");
        let env = command_env(
            inherited.clone(),
            false,
            cwd,
            &[("HOME".into(), "/h".into()), ("X".into(), "1".into())],
        );
        assert_eq!(
            env,
            env_of(&[
                ("PATH", "/bin"),
                ("HOME", "/h"),
                ("PWD", "/workspace"),
                ("X", "1")
            ])
        );
        let env = command_env(inherited, true, cwd, &[("PWD".into(), "/p".into())]);
        assert_eq!(env, env_of(&[("PWD", "/p")]));
    }

    #[test]
    fn program_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let tool = bin.join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        let plain = bin.join("plain");
        std::fs::write(&plain, "").unwrap();
        std::fs::create_dir(bin.join("adir")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = OsString::from(format!("/nonexistent:{}", bin.display()));
        assert_eq!(find_program("tool", Some(&path), dir.path()).unwrap(), tool);
        for missing in ["plain", "adir", "nothing"] {
            let e = find_program(missing, Some(&path), dir.path()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{missing}: {e}");
        }
        // Relative PATH entries and names with a slash are relative to the cwd.
        assert_eq!(
            find_program("tool", Some(OsStr::new("bin")), dir.path()).unwrap(),
            tool
        );
        assert_eq!(
            find_program("./bin/tool", None, dir.path()).unwrap(),
            PathBuf::from("./bin/tool")
        );
        // A path that is missing or not executable is an error here, not an
        // exit code of the exec.
        let e = find_program("./x/y", None, dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let e = find_program("./bin/plain", None, dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(find_program("", None, dir.path()).is_err());
    }

    #[test]
    fn spawns_with_cwd_env_group_and_pipes() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = std::fs::canonicalize(dir.path()).unwrap();
        let args = vec![
            "-c".to_string(),
            "pwd; echo \"$GREETING\"; echo err >&2; [ \"$(ps -o pgid= -p $$ | tr -d ' ')\" = $$ ] && echo own-group; read line; echo \"got $line\"".to_string(),
        ];
        let env = command_env(
            std::env::vars_os(),
            false,
            &cwd,
            &[("GREETING".into(), "hello".into())],
        );
        let child = spawn(&SpawnSpec {
            program: "sh",
            args: &args,
            env,
            cwd: &cwd,
            stdin_pipe: true,
            user: None,
            cgroup: None,
        })
        .unwrap();
        let mut stdin = std::fs::File::from(child.stdin.unwrap());
        std::io::Write::write_all(&mut stdin, b"input\n").unwrap();
        drop(stdin);
        let mut out = String::new();
        std::fs::File::from(child.stdout)
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        std::fs::File::from(child.stderr)
            .read_to_string(&mut err)
            .unwrap();
        let mut status = 0;
        // SAFETY: status is valid for writes; the pid is our child.
        assert_eq!(
            unsafe { libc::waitpid(child.pid, &mut status, 0) },
            child.pid
        );
        assert_eq!(
            out,
            format!("{}\nhello\nown-group\ngot input\n", cwd.display())
        );
        assert_eq!(err, "err\n");
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn run_as_helper_argv_and_user_parsing() {
        let strings = |argv: Vec<Vec<u8>>| -> Vec<String> {
            argv.into_iter()
                .map(|a| String::from_utf8(a).unwrap())
                .collect()
        };
        let argv = run_as_argv(
            Some((1000, 1001)),
            None,
            Path::new("/usr/bin/git"),
            "git",
            &["init".into()],
        );
        assert_eq!(
            strings(argv),
            [RUN_AS_ARG, "1000:1001", "-", "/usr/bin/git", "git", "init"]
        );
        let argv = run_as_argv(
            None,
            Some(Path::new("/sys/fs/cgroup/agentvm-cmd-1-0")),
            Path::new("/bin/true"),
            "true",
            &[],
        );
        assert_eq!(
            strings(argv),
            [
                RUN_AS_ARG,
                "-",
                "/sys/fs/cgroup/agentvm-cmd-1-0",
                "/bin/true",
                "true"
            ]
        );
        assert_eq!(parse_user("1000:1000"), Some((1000, 1000)));
        assert_eq!(parse_user("0:0"), Some((0, 0)));
        for bad in ["", "1000", "a:b", "1:", ":1", "-1:0"] {
            assert_eq!(parse_user(bad), None, "{bad}");
        }
    }

    #[test]
    fn missing_programs_and_nul_bytes_are_errors() {
        let cwd = std::env::temp_dir();
        let spec = |program| SpawnSpec {
            program,
            args: &[],
            env: Vec::new(),
            cwd: &cwd,
            stdin_pipe: false,
            user: None,
            cgroup: None,
        };
        let e = spawn(&spec("/no/such/program")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let e = spawn(&spec("no-such-program-anywhere")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let e = spawn(&spec("a\0b")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }
}
