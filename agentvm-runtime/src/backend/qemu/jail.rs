//! The jail around each QEMU: the guest is hostile, and a QEMU escape must
//! land somewhere that can do little.
//!
//! * **seccomp** — every QEMU runs with `-sandbox on` and every optional
//!   deny group ([`sandbox_args`]): no obsolete syscalls, no privilege
//!   elevation, no spawning processes, no changing scheduling or NUMA policy.
//! * **an unprivileged user** — when the harness runs as root, QEMU runs as
//!   the dedicated user [`QEMU_USER`] (created by `scripts/install-deps.sh`;
//!   `AGENT_VM_QEMU_USER` names another). Its VM directory and state disk
//!   are chowned to that user; the image files must be readable by others.
//!   Where that user does not exist or cannot read the image, QEMU runs as
//!   root and [`Jail::describe`] (and `agentvm doctor`) says why.
//! * **a cgroup v2** per VM (`<cgroup root>/agentvm/<vm-id>`) with the
//!   profile's memory, pids and CPU limits, where the host delegates the
//!   memory, pids and cpu controllers to us ([`CgroupParent::detect`]).

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The user QEMU runs as when the harness runs as root.
pub const QEMU_USER: &str = "agentvm-qemu";
/// Environment variable naming another user for QEMU.
pub const QEMU_USER_ENV: &str = "AGENT_VM_QEMU_USER";

/// `-sandbox on,...` with every deny group.
pub fn sandbox_args() -> Vec<String> {
    vec![
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
    ]
}

/// A user from `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuUser {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// Finds `name` in the text of an `/etc/passwd` file.
pub fn find_user(passwd: &str, name: &str) -> Option<QemuUser> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let login = fields.next()?;
        if login != name {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some(QemuUser {
            name: login.to_owned(),
            uid,
            gid,
        })
    })
}

/// The first of `path` and its ancestors that a user who is neither its
/// owner nor in its group cannot reach (`None`: readable by anyone).
pub fn first_unreadable_by_others(path: &Path) -> Option<PathBuf> {
    let meta = fs::metadata(path).ok()?;
    if meta.mode() & 0o004 == 0 {
        return Some(path.to_path_buf());
    }
    path.ancestors().skip(1).find_map(|dir| {
        let mode = fs::metadata(dir).map(|m| m.mode()).unwrap_or(0);
        (mode & 0o001 == 0).then(|| dir.to_path_buf())
    })
}

/// The cgroup v2 directory under which each VM gets its own cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupParent {
    /// `<cgroup2 mount>/agentvm`.
    pub dir: PathBuf,
}

impl CgroupParent {
    /// `Ok` when `/sys/fs/cgroup` is a cgroup v2 hierarchy whose root
    /// offers the memory, pids and cpu controllers and lets us create
    /// `agentvm/` with them enabled; `Err(why not)` otherwise.
    pub fn detect() -> Result<Self, String> {
        Self::detect_at(Path::new("/sys/fs/cgroup"))
    }

    /// [`CgroupParent::detect`] with another mount point (tests).
    pub fn detect_at(mount: &Path) -> Result<Self, String> {
        let controllers = fs::read_to_string(mount.join("cgroup.controllers")).map_err(|_| {
            format!(
                "{} is not a cgroup v2 hierarchy (no cgroup.controllers)",
                mount.display()
            )
        })?;
        let missing: Vec<&str> = NEEDED_CONTROLLERS
            .iter()
            .copied()
            .filter(|c| !controllers.split_whitespace().any(|have| have == *c))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the cgroup v2 root does not offer the {} controller(s)",
                missing.join(", ")
            ));
        }
        let dir = mount.join("agentvm");
        let enable = |at: &Path| {
            fs::write(
                at.join("cgroup.subtree_control"),
                NEEDED_CONTROLLERS.map(|c| format!("+{c}")).join(" "),
            )
        };
        enable(mount).map_err(|e| format!("cannot delegate controllers: {e}"))?;
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
        enable(&dir).map_err(|e| format!("cannot enable controllers in {}: {e}", dir.display()))?;
        Ok(Self { dir })
    }

    /// Creates the VM's cgroup with `limits` and moves `pid` into it.
    pub fn confine(&self, vm_id: &str, limits: &CgroupLimits, pid: u32) -> io::Result<PathBuf> {
        let dir = self.dir.join(vm_id);
        fs::create_dir(&dir)?;
        for (file, value) in limits.files() {
            fs::write(dir.join(file), value)?;
        }
        fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        Ok(dir)
    }
}

/// Removes a VM's cgroup once its processes are gone (best effort).
pub fn remove_cgroup(dir: &Path) {
    let _ = fs::remove_dir(dir);
}

const NEEDED_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// A VM's cgroup limits, from its profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Guest memory in MiB; QEMU may use this plus [`QEMU_OVERHEAD_MIB`].
    pub guest_memory_mib: u32,
    /// vCPUs: QEMU may use this many host CPUs' worth of time.
    pub vcpus: u32,
}

/// Memory QEMU needs beyond the guest's RAM (code, TCG translation cache,
/// device state, snapshot buffers).
pub const QEMU_OVERHEAD_MIB: u64 = 256;
/// Most threads and processes one QEMU may have.
pub const QEMU_PIDS_MAX: u32 = 256;

impl CgroupLimits {
    /// The control files and their contents.
    pub fn files(&self) -> Vec<(&'static str, String)> {
        let memory = (u64::from(self.guest_memory_mib) + QEMU_OVERHEAD_MIB) << 20;
        const PERIOD_US: u64 = 100_000;
        vec![
            ("memory.max", memory.to_string()),
            ("pids.max", QEMU_PIDS_MAX.to_string()),
            (
                "cpu.max",
                format!("{} {PERIOD_US}", u64::from(self.vcpus.max(1)) * PERIOD_US),
            ),
        ]
    }
}

/// What this host's QEMUs run under, decided once per backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// The user QEMU runs as (`None`: the harness's own user).
    pub user: Option<QemuUser>,
    /// Why QEMU runs as root, when the harness is root and it does.
    pub user_unavailable: Option<String>,
    /// Where VM cgroups are made.
    pub cgroup: Result<CgroupParent, String>,
}

impl Jail {
    /// Looks at this host: the harness's uid, the QEMU user, cgroups.
    pub fn detect() -> Self {
        let is_root = rustix::process::getuid().is_root();
        let wanted = std::env::var(QEMU_USER_ENV).unwrap_or_else(|_| QEMU_USER.to_owned());
        let (user, user_unavailable) = if !is_root {
            (None, None)
        } else {
            match fs::read_to_string("/etc/passwd")
                .ok()
                .and_then(|passwd| find_user(&passwd, &wanted))
            {
                Some(user) if user.uid == 0 => (None, Some(format!("user {wanted} is root"))),
                Some(user) => (Some(user), None),
                None => (
                    None,
                    Some(format!(
                        "no user {wanted}: create it with `useradd --system --no-create-home \
                         --shell /usr/sbin/nologin {wanted}` (scripts/install-deps.sh does)"
                    )),
                ),
            }
        };
        let cgroup = if is_root {
            CgroupParent::detect()
        } else {
            Err("cgroups are managed only when the harness runs as root".into())
        };
        Self {
            user,
            user_unavailable,
            cgroup,
        }
    }

    /// Whether `files` can be opened by the QEMU user (when there is one):
    /// `Err(path)` names the first one it cannot reach.
    pub fn check_readable(&self, files: &[&Path]) -> Result<(), PathBuf> {
        if self.user.is_none() {
            return Ok(());
        }
        match files.iter().find_map(|f| first_unreadable_by_others(f)) {
            Some(path) => Err(path),
            None => Ok(()),
        }
    }

    /// One line per layer: what is in force and why not where it is not.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = vec!["seccomp: -sandbox on with every deny group".to_owned()];
        lines.push(match (&self.user, &self.user_unavailable) {
            (Some(u), _) => format!("user: QEMU runs as {} (uid {})", u.name, u.uid),
            (None, Some(why)) => format!("user: QEMU runs as root: {why}"),
            (None, None) => "user: QEMU runs as the harness's own (unprivileged) user".to_owned(),
        });
        lines.push(match &self.cgroup {
            Ok(parent) => format!(
                "cgroup: each VM in {}/<vm> with memory, pids and cpu limits",
                parent.dir.display()
            ),
            Err(why) => format!("cgroup: not used: {why}"),
        });
        lines
    }
}

/// Makes `dir` (and its contents, one level) owned by `user`.
pub fn hand_over(dir: &Path, user: &QemuUser) -> io::Result<()> {
    let owner = |p: &Path| std::os::unix::fs::chown(p, Some(user.uid), Some(user.gid));
    owner(dir)?;
    for entry in fs::read_dir(dir)? {
        owner(&entry?.path())?;
    }
    Ok(())
}

/// Lets other users pass through `dir` (mode 0711), so the QEMU user
/// reaches its own VM directory below a root-owned runtime directory.
pub fn allow_traversal(dir: &Path) -> io::Result<()> {
    let mut perms = fs::metadata(dir)?.permissions();
    if perms.mode() & 0o011 != 0o011 {
        perms.set_mode(perms.mode() | 0o011);
        fs::set_permissions(dir, perms)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_found_by_name() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      agentvm-qemu:x:998:997::/nonexistent:/usr/sbin/nologin\n\
                      broken:x:notanumber:1::/:/bin/false\n";
        assert_eq!(
            find_user(passwd, "agentvm-qemu"),
            Some(QemuUser {
                name: "agentvm-qemu".into(),
                uid: 998,
                gid: 997
            })
        );
        assert_eq!(find_user(passwd, "agentvm"), None);
        assert_eq!(find_user(passwd, "broken"), None);
    }

    #[test]
    fn sandbox_denies_every_group() {
        let args = sandbox_args();
        assert_eq!(args[0], "-sandbox");
        for group in ["obsolete", "elevateprivileges", "spawn", "resourcecontrol"] {
            assert!(args[1].contains(&format!("{group}=deny")), "{group}");
        }
    }

    #[test]
    fn cgroup_limits_follow_the_profile() {
        let files = CgroupLimits {
            guest_memory_mib: 512,
            vcpus: 2,
        }
        .files();
        assert_eq!(
            files,
            [
                ("memory.max", ((512 + 256) << 20).to_string()),
                ("pids.max", "256".to_string()),
                ("cpu.max", "200000 100000".to_string()),
            ]
        );
    }

    #[test]
    fn unreadable_paths_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private");
        fs::create_dir(&private).unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
        let file = private.join("vmlinuz");
        fs::write(&file, b"k").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(first_unreadable_by_others(&file), Some(private.clone()));
        fs::set_permissions(&private, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        // The temp dir's own ancestors (/tmp) are traversable.
        assert_eq!(first_unreadable_by_others(&file), None);
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(first_unreadable_by_others(&file), Some(file.clone()));
    }

    #[test]
    fn cgroup_v1_or_missing_controllers_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let err = CgroupParent::detect_at(dir.path()).unwrap_err();
        assert!(err.contains("not a cgroup v2 hierarchy"), "{err}");
        fs::write(dir.path().join("cgroup.controllers"), "cpu io\n").unwrap();
        let err = CgroupParent::detect_at(dir.path()).unwrap_err();
        assert!(err.contains("memory, pids"), "{err}");
    }
}
