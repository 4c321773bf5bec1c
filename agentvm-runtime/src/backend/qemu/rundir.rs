//! Per-VM runtime directories, pid files, and the sweep of stale ones.
//!
//! Layout under the runtime root (`$XDG_RUNTIME_DIR/agentvm` or
//! `/tmp/agentvm-<uid>`):
//!
//! ```text
//! vms/<vm-id>/owner.pid    "<pid> <starttime>" of the host process that owns the VM
//!             qemu.pid     pid of the QEMU process
//!             qmp.sock     QMP monitor
//!             ctl.sock     control channel (virtio-serial host end)
//!             serial.log   guest serial console
//!             qemu.log     QEMU's own stdout/stderr
//!             state.qcow2  holds the golden snapshot (attached to no guest device)
//! ```
//!
//! The owner's start time (field 22 of `/proc/<pid>/stat`) is recorded with its
//! pid so that a recycled pid is not mistaken for a live owner. [`sweep_stale`]
//! kills QEMUs whose owner is gone (after checking that the pid still runs a
//! QEMU started for that very directory) and removes their directories.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Directories without an `owner.pid` younger than this are assumed to be
/// being created by another process and left alone.
const UNOWNED_GRACE: Duration = Duration::from_secs(60);

/// The paths of one VM's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    /// The VM directory.
    pub dir: PathBuf,
    /// `owner.pid`.
    pub owner_pid: PathBuf,
    /// `qemu.pid`.
    pub qemu_pid: PathBuf,
    /// `qmp.sock`.
    pub qmp_socket: PathBuf,
    /// `ctl.sock`.
    pub ctl_socket: PathBuf,
    /// `serial.log`.
    pub serial_log: PathBuf,
    /// `qemu.log`.
    pub qemu_log: PathBuf,
    /// `state.qcow2`.
    pub state_disk: PathBuf,
}

impl VmPaths {
    /// The file names inside `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            owner_pid: dir.join("owner.pid"),
            qemu_pid: dir.join("qemu.pid"),
            qmp_socket: dir.join("qmp.sock"),
            ctl_socket: dir.join("ctl.sock"),
            serial_log: dir.join("serial.log"),
            qemu_log: dir.join("qemu.log"),
            state_disk: dir.join("state.qcow2"),
            dir,
        }
    }
}

/// The default runtime root: `$XDG_RUNTIME_DIR/agentvm` when that variable
/// names an existing directory, else `/tmp/agentvm-<uid>`.
pub fn default_root() -> PathBuf {
    let xdg = std::env::var_os("XDG_RUNTIME_DIR");
    let xdg_ok = xdg
        .as_deref()
        .is_some_and(|d| !d.is_empty() && Path::new(d).is_dir());
    root_for(
        if xdg_ok { xdg.as_deref() } else { None },
        rustix::process::getuid().as_raw(),
    )
}

/// Pure part of [`default_root`].
pub fn root_for(xdg_runtime_dir: Option<&OsStr>, uid: u32) -> PathBuf {
    match xdg_runtime_dir {
        Some(dir) if !dir.is_empty() => Path::new(dir).join("agentvm"),
        _ => PathBuf::from(format!("/tmp/agentvm-{uid}")),
    }
}

/// Identity of a process that survives pid reuse: pid + start time in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessStamp {
    /// The pid.
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`.
    pub start_time: u64,
}

impl ProcessStamp {
    /// The stamp of a running process, `None` if it does not exist.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some(Self {
            pid,
            start_time: parse_stat_start_time(&stat)?,
        })
    }

    /// The stamp of this process.
    pub fn current() -> Option<Self> {
        Self::of(std::process::id())
    }

    /// File form: `"<pid> <start_time>\n"`.
    pub fn to_file_string(self) -> String {
        format!("{} {}\n", self.pid, self.start_time)
    }

    /// Parses the file form.
    pub fn parse(text: &str) -> Option<Self> {
        let mut it = text.split_whitespace();
        let pid = it.next()?.parse().ok()?;
        let start_time = it.next()?.parse().ok()?;
        Some(Self { pid, start_time })
    }

    /// Whether the very process this stamp describes still runs.
    pub fn is_alive(self) -> bool {
        Self::of(self.pid).is_some_and(|now| now.start_time == self.start_time)
    }
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line. The command name
/// (field 2) may contain spaces and parentheses, so fields are counted from
/// the last `)`.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // after_comm starts with field 3 (state); starttime is field 22.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Whether a `/proc/<pid>/cmdline` (NUL-separated) is a QEMU started for `vm_dir`:
/// argv\[0\]'s file name contains `qemu` and some argument mentions the directory.
pub fn cmdline_is_qemu_for(cmdline: &[u8], vm_dir: &Path) -> bool {
    let mut args = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty());
    let Some(argv0) = args.next() else {
        return false;
    };
    let program = argv0.rsplit(|b| *b == b'/').next().unwrap_or(argv0);
    if !program.windows(4).any(|w| w == b"qemu") {
        return false;
    }
    let dir = vm_dir.as_os_str().as_encoded_bytes();
    !dir.is_empty() && args.any(|a| a.windows(dir.len()).any(|w| w == dir))
}

fn create_private_dir_all(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Creates `<root>/vms/` (mode 0700 for what it creates) if missing.
pub fn ensure_root(root: &Path) -> io::Result<()> {
    create_private_dir_all(&root.join("vms"))
}

/// Creates `<root>/vms/<id>/` (failing if it exists) and writes `owner.pid`.
pub fn create_vm_dir(root: &Path, id: &str) -> io::Result<VmPaths> {
    ensure_root(root)?;
    let dir = root.join("vms").join(id);
    fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let paths = VmPaths::new(dir);
    let stamp = ProcessStamp::current()
        .ok_or_else(|| io::Error::other("cannot read /proc/self/stat to stamp the VM owner"))?;
    fs::write(&paths.owner_pid, stamp.to_file_string())?;
    Ok(paths)
}

/// Writes `qemu.pid`.
pub fn write_qemu_pid(paths: &VmPaths, pid: u32) -> io::Result<()> {
    fs::write(&paths.qemu_pid, format!("{pid}\n"))
}

/// What [`sweep_stale`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// QEMU pids that were sent SIGKILL.
    pub killed: Vec<u32>,
    /// VM directories removed.
    pub removed: Vec<PathBuf>,
}

/// Kills the QEMUs of VM directories whose owner process is gone and removes
/// those directories. Directories of live owners (other test processes
/// running in parallel included) are left alone. Errors on single entries are
/// logged and skipped.
pub fn sweep_stale(root: &Path) -> SweepReport {
    let mut report = SweepReport::default();
    let Ok(entries) = fs::read_dir(root.join("vms")) else {
        return report;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let paths = VmPaths::new(&dir);
        match fs::read_to_string(&paths.owner_pid)
            .ok()
            .and_then(|t| ProcessStamp::parse(&t))
        {
            Some(owner) if owner.is_alive() => continue,
            Some(_) => {}
            None => {
                // No (readable) owner file: maybe being created right now.
                let young = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .map_or(true, |age| age < UNOWNED_GRACE);
                if young {
                    continue;
                }
            }
        }
        if let Some(pid) = fs::read_to_string(&paths.qemu_pid)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline_is_qemu_for(&cmdline, &dir) {
                if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                    match rustix::process::kill_process(p, rustix::process::Signal::KILL) {
                        Ok(()) => {
                            tracing::warn!(pid, dir = %dir.display(), "killed stale QEMU whose owner is gone");
                            report.killed.push(pid);
                        }
                        Err(e) => tracing::warn!(pid, error = %e, "could not kill stale QEMU"),
                    }
                }
            }
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "removed stale VM directory");
                report.removed.push(dir);
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove stale VM directory")
            }
        }
    }
    report
}

/// Reads at most the last `max_bytes` of a file (lossy UTF-8), or "" if unreadable.
pub fn read_file_tail(path: &Path, max_bytes: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max_bytes && file.seek(SeekFrom::Start(len - max_bytes)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if file.take(max_bytes).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `n` lines of `text`, with `\r` and terminal escape noise removed
/// and trailing blank lines dropped.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<String> = text.lines().map(clean_console_line).collect();
    let end = lines
        .iter()
        .rposition(|l| !l.trim().is_empty())
        .map_or(0, |i| i + 1);
    let start = end.saturating_sub(n);
    lines[start..end].join("\n")
}

/// Markers of a guest kernel crash on the console.
const CRASH_MARKERS: [&str; 5] = [
    "Kernel panic",
    "BUG:",
    "Oops:",
    "general protection fault",
    "Call Trace:",
];

/// The end of a console log for a crash report: the last `min_lines`
/// lines, extended back (up to `max_lines`) so that it starts just before
/// the first crash marker (`Kernel panic`, `BUG:`, ...) in that window —
/// a panic message followed by a long stack trace otherwise falls off.
pub fn crash_excerpt(text: &str, min_lines: usize, max_lines: usize) -> String {
    let wide = last_lines(text, max_lines.max(min_lines));
    let lines: Vec<&str> = wide.lines().collect();
    let default_start = lines.len().saturating_sub(min_lines);
    let start = lines
        .iter()
        .position(|l| CRASH_MARKERS.iter().any(|m| l.contains(m)))
        .map_or(default_start, |i| i.saturating_sub(2).min(default_start));
    lines[start..].join("\n")
}

/// What the end of a console log says about how the guest went away.
pub fn guest_end_hint(console_tail: &str) -> Option<&'static str> {
    if console_tail.contains("Kernel panic") {
        Some("guest kernel panic")
    } else if console_tail.contains("reboot: Power down") {
        Some("guest powered off")
    } else if console_tail.contains("reboot: Restarting system") {
        Some("guest rebooted")
    } else {
        None
    }
}

/// Strips `\r` and ANSI CSI escape sequences (firmware clears the screen on the serial port).
fn clean_console_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // Parameters and intermediates, then one final byte in @..~.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn root_prefers_xdg_runtime_dir() {
        assert_eq!(
            root_for(Some(OsStr::new("/run/user/1000")), 1000),
            PathBuf::from("/run/user/1000/agentvm")
        );
        assert_eq!(root_for(None, 0), PathBuf::from("/tmp/agentvm-0"));
        assert_eq!(
            root_for(Some(OsStr::new("")), 7),
            PathBuf::from("/tmp/agentvm-7")
        );
    }

    #[test]
    fn vm_paths_layout() {
        let p = VmPaths::new("/r/vms/1-0");
        assert_eq!(p.qmp_socket, PathBuf::from("/r/vms/1-0/qmp.sock"));
        assert_eq!(p.ctl_socket, PathBuf::from("/r/vms/1-0/ctl.sock"));
        assert_eq!(p.serial_log, PathBuf::from("/r/vms/1-0/serial.log"));
        assert_eq!(p.state_disk, PathBuf::from("/r/vms/1-0/state.qcow2"));
    }

    #[test]
    fn stat_start_time_survives_odd_comm() {
        let stat =
            "1234 (we ir) d) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat_start_time(stat), Some(987654));
        assert_eq!(parse_stat_start_time("garbage"), None);
        let me = ProcessStamp::current().expect("own stat");
        assert!(me.is_alive());
        assert!(!ProcessStamp {
            start_time: me.start_time + 1,
            ..me
        }
        .is_alive());
    }

    #[test]
    fn stamp_round_trip() {
        let s = ProcessStamp {
            pid: 42,
            start_time: 777,
        };
        assert_eq!(ProcessStamp::parse(&s.to_file_string()), Some(s));
        assert_eq!(ProcessStamp::parse("42"), None);
        assert_eq!(ProcessStamp::parse("x 1"), None);
    }

    #[test]
    fn qemu_cmdline_check() {
        let dir = Path::new("/tmp/agentvm-0/vms/1-0");
        let ok = b"/usr/bin/qemu-system-x86_64\0-name\x001-0\0-chardev\0socket,id=qmp,path=/tmp/agentvm-0/vms/1-0/qmp.sock\0";
        assert!(cmdline_is_qemu_for(ok, dir));
        let other_vm =
            b"qemu-system-x86_64\0-chardev\0socket,path=/tmp/agentvm-0/vms/2-0/qmp.sock\0";
        assert!(!cmdline_is_qemu_for(other_vm, dir));
        let not_qemu = b"/bin/sleep\0/tmp/agentvm-0/vms/1-0\0";
        assert!(!cmdline_is_qemu_for(not_qemu, dir));
        assert!(!cmdline_is_qemu_for(b"", dir));
    }

    #[test]
    fn tail_and_cleaning() {
        let text = "\u{1b}[2J\u{1b}[0mSeaBIOS\r\nline1\r\nline2\nline3\n\n\n";
        assert_eq!(last_lines(text, 2), "line2\nline3");
        assert_eq!(last_lines(text, 10), "SeaBIOS\nline1\nline2\nline3");
        assert_eq!(last_lines("", 3), "");
        assert_eq!(last_lines("a\nb", 0), "");
    }

    #[test]
    fn guest_end_hints() {
        let panic = "[ 1.9] Kernel panic - not syncing: sysrq triggered crash\n[ 2.0] Rebooting in 1 seconds..";
        assert_eq!(guest_end_hint(panic), Some("guest kernel panic"));
        assert_eq!(
            guest_end_hint("[ 3.0] reboot: Power down"),
            Some("guest powered off")
        );
        assert_eq!(
            guest_end_hint("[ 3.0] reboot: Restarting system"),
            Some("guest rebooted")
        );
        assert_eq!(guest_end_hint("all quiet"), None);
    }

    #[test]
    fn crash_excerpt_starts_at_the_panic() {
        let mut log =
            String::from("boot 1\nboot 2\nKernel panic - not syncing: Attempted to kill init!\n");
        for i in 0..50 {
            log.push_str(&format!("trace {i}\n"));
        }
        log.push_str("Rebooting in 1 seconds..\n");
        let ex = crash_excerpt(&log, 10, 200);
        assert!(ex.starts_with("boot 1\nboot 2\nKernel panic"), "{ex}");
        assert!(ex.ends_with("Rebooting in 1 seconds.."));
        // Without a marker: just the last lines.
        assert_eq!(crash_excerpt("a\nb\nc\n", 2, 200), "b\nc");
        // A marker beyond the window is not reached.
        assert_eq!(crash_excerpt(&log, 3, 5).lines().count(), 3);
    }

    #[test]
    fn file_tail_reads_only_the_end() {
        let dir = std::env::temp_dir().join(format!("agentvm-rundir-tail-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("log");
        fs::write(&f, "0123456789").unwrap();
        assert_eq!(read_file_tail(&f, 4), "6789");
        assert_eq!(read_file_tail(&f, 100), "0123456789");
        assert_eq!(read_file_tail(&dir.join("missing"), 4), "");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A directory whose owner is gone gets its "QEMU" killed and is removed;
    /// one whose owner is alive is left alone.
    #[test]
    fn sweep_kills_orphans_only() {
        let root = std::env::temp_dir().join(format!("agentvm-sweep-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let live = create_vm_dir(&root, "live").unwrap();
        let stale = create_vm_dir(&root, "stale").unwrap();
        // Owner with our pid but a different start time: a dead owner whose pid was recycled.
        let me = ProcessStamp::current().unwrap();
        fs::write(
            &stale.owner_pid,
            ProcessStamp {
                start_time: me.start_time + 1,
                ..me
            }
            .to_file_string(),
        )
        .unwrap();
        // A fake QEMU: argv[0] says qemu, an argument names the VM dir.
        let mut fake = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "exec -a qemu-system-x86_64 tail -f {}",
                stale.owner_pid.display()
            ))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = fake.id();
        // Wait until the exec happened (cmdline shows the new argv[0]).
        for _ in 0..200 {
            if fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .starts_with(b"qemu")
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        write_qemu_pid(&stale, pid).unwrap();
        write_qemu_pid(&live, pid).unwrap();

        let report = sweep_stale(&root);
        assert_eq!(report.killed, vec![pid]);
        assert_eq!(report.removed, vec![stale.dir.clone()]);
        let status = fake.wait().unwrap();
        assert!(!status.success());
        assert!(live.dir.is_dir());
        assert!(!stale.dir.exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
