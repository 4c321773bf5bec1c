//! The `qemu-system-x86_64` command line, built by pure functions.
//!
//! The machine is a `microvm` (no PCI, no firmware tables to speak of; boots
//! the Debian cloud kernel to userspace in ~2.4 s under TCG). Devices:
//!
//! * the ISA serial port, written to `serial.log` (the guest console);
//! * `virtio-serial-device` (virtio-mmio) with one `virtserialport` named
//!   [`CTL_PORT_NAME`] whose host end is a listening UNIX socket — or a
//!   `vhost-vsock-device` for the vsock transport;
//! * QMP on a second UNIX socket;
//! * a small qcow2 attached with `if=none` (no guest device), so that HMP
//!   `savevm`/`loadvm` have somewhere to store the VM state;
//! * for images with a root file system (`agent`), that file as a read-only
//!   raw `virtio-blk-device` (`/dev/vda`), shared by every VM: QEMU skips
//!   read-only drives in `savevm`/`loadvm`, and the guest writes only to its
//!   tmpfs overlay, so the memory snapshot is the whole state.
//!
//! `-no-reboot` turns a guest reboot (a kernel panic with `panic=1`) into a
//! QEMU exit, which is how a crashed guest is detected.

use std::path::Path;

use super::accel::ResolvedAccel;
use super::rundir::VmPaths;
use super::state_io::StateIo;
use super::transport::Transport;
use crate::spec::{NetworkMode, VmSpec};

/// Name of the control-channel port the guest agent opens
/// (`/sys/class/virtio-ports/*/name` in the guest).
pub const CTL_PORT_NAME: &str = "org.agentvm.ctl";

/// The `-M` value. `x-option-roms=off` must *not* be used: it drops the
/// linuxboot option ROM, and a bzImage kernel then does not boot ("No
/// bootable device"). `isa-serial=on` gives the guest its ttyS0 console;
/// `rtc=on` a clock.
pub const MACHINE: &str = "microvm,isa-serial=on,rtc=on";

/// The longest UNIX socket path (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Why a command line could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgvError {
    /// A path is not valid UTF-8 (QEMU option strings are built as text).
    #[error("path is not valid UTF-8: {0}")]
    NonUtf8Path(String),
    /// A UNIX socket path is longer than the kernel accepts.
    #[error("socket path {path} is {len} bytes, longer than {MAX_SOCKET_PATH}: use a shorter runtime directory")]
    SocketPathTooLong {
        /// The path.
        path: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The network mode needs a backend that can create networks (libvirt).
    #[error("network mode {0} needs a NIC, which the QEMU backend does not attach (use the libvirt backend, or `gateway`, `allowlist` or `isolated`)")]
    UnsupportedNetwork(NetworkMode),
    /// A resource value QEMU cannot use.
    #[error("invalid resources: {0}")]
    InvalidResources(String),
}

/// The control-channel device and its host end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelConfig {
    /// virtio-serial to the VM's `ctl.sock`.
    VirtioSerial,
    /// vhost-vsock with this guest CID.
    Vsock {
        /// The guest's context id (≥ 3, unique on the host).
        guest_cid: u32,
    },
}

impl ChannelConfig {
    /// The transport this configuration implements.
    pub fn transport(self) -> Transport {
        match self {
            Self::VirtioSerial => Transport::VirtioSerial,
            Self::Vsock { .. } => Transport::Vsock,
        }
    }
}

/// Everything the command line depends on.
#[derive(Debug, Clone, Copy)]
pub struct LaunchArgs<'a> {
    /// VM id (shown by `-name`).
    pub vm_id: &'a str,
    /// What to run.
    pub spec: &'a VmSpec,
    /// The resolved accelerator.
    pub accel: ResolvedAccel,
    /// The VM's files.
    pub paths: &'a VmPaths,
    /// The control channel.
    pub channel: ChannelConfig,
    /// The host TSC rate ([`super::accel::host_tsc_khz`]); under TCG it is
    /// passed to the guest as `tsc_early_khz=` so that boot does not depend
    /// on calibrating against the emulated PIT.
    pub host_tsc_khz: Option<u32>,
    /// Start with the vCPUs stopped (`-S`), e.g. to load a snapshot first.
    pub start_paused: bool,
    /// How QEMU does I/O on the state disk.
    pub state_io: StateIo,
}

/// The full argument list (without the program name).
pub fn build_argv(a: &LaunchArgs<'_>) -> Result<Vec<String>, ArgvError> {
    if a.spec.network.has_nic() {
        return Err(ArgvError::UnsupportedNetwork(a.spec.network.clone()));
    }
    let mut argv = vec!["-name".to_owned(), a.vm_id.to_owned()];
    argv.extend(machine_args());
    argv.extend(accel_args(a.accel));
    argv.extend(resource_args(
        a.spec.profile.vcpus(),
        a.spec.profile.memory_mib(),
    )?);
    argv.extend(isolation_args());
    argv.extend(super::jail::sandbox_args());
    let tsc_khz = match a.accel {
        ResolvedAccel::Tcg => a.host_tsc_khz,
        ResolvedAccel::Kvm => None,
    };
    let mut cmdline = kernel_cmdline(&a.spec.image.cmdline, tsc_khz);
    if let Some(word) = channel_cmdline(a.channel) {
        cmdline = format!("{cmdline} {word}");
    }
    argv.extend(kernel_args(
        &a.spec.image.kernel,
        &a.spec.image.initramfs,
        &cmdline,
    )?);
    argv.extend(serial_console_args(&a.paths.serial_log)?);
    argv.extend(channel_args(a.channel, &a.paths.ctl_socket)?);
    argv.extend(qmp_args(&a.paths.qmp_socket)?);
    argv.extend(state_drive_args(&a.paths.state_disk, a.state_io)?);
    if let Some(rootfs) = &a.spec.image.rootfs {
        argv.extend(rootfs_drive_args(rootfs)?);
    }
    if a.start_paused {
        argv.push("-S".into());
    }
    Ok(argv)
}

/// `-M microvm,...`.
pub fn machine_args() -> Vec<String> {
    vec!["-M".into(), MACHINE.into()]
}

/// `-accel tcg -cpu max` or `-accel kvm -cpu host`.
pub fn accel_args(accel: ResolvedAccel) -> Vec<String> {
    let cpu = match accel {
        ResolvedAccel::Kvm => "host",
        ResolvedAccel::Tcg => "max",
    };
    vec![
        "-accel".into(),
        accel.as_str().into(),
        "-cpu".into(),
        cpu.into(),
    ]
}

/// `-m <mib>M -smp <n>`.
pub fn resource_args(vcpus: u32, memory_mib: u32) -> Result<Vec<String>, ArgvError> {
    if vcpus == 0 {
        return Err(ArgvError::InvalidResources("0 vCPUs".into()));
    }
    if memory_mib < 64 {
        return Err(ArgvError::InvalidResources(format!(
            "{memory_mib} MiB of memory (at least 64 needed)"
        )));
    }
    Ok(vec![
        "-m".into(),
        format!("{memory_mib}M"),
        "-smp".into(),
        vcpus.to_string(),
    ])
}

/// No default devices, no config files, no display, and a reboot is an exit.
pub fn isolation_args() -> Vec<String> {
    ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]
        .map(String::from)
        .to_vec()
}

/// `-kernel`, `-initrd`, `-append`.
pub fn kernel_args(
    kernel: &Path,
    initramfs: &Path,
    cmdline: &str,
) -> Result<Vec<String>, ArgvError> {
    Ok(vec![
        "-kernel".into(),
        utf8(kernel)?.to_owned(),
        "-initrd".into(),
        utf8(initramfs)?.to_owned(),
        "-append".into(),
        cmdline.to_owned(),
    ])
}

/// The image's kernel command line, completed with what the backend relies
/// on: `console=ttyS0` (the serial log) unless a console is set, and
/// `panic=1` (a panic reboots, `-no-reboot` makes QEMU exit) unless a panic
/// policy is set; and `tsc_early_khz=<tsc_khz>` when given (TCG) unless set.
pub fn kernel_cmdline(image_cmdline: &str, tsc_khz: Option<u32>) -> String {
    let mut words: Vec<String> = image_cmdline.split_whitespace().map(String::from).collect();
    let has = |words: &[String], key: &str| words.iter().any(|w| w.starts_with(key));
    if !has(&words, "console=") {
        words.push("console=ttyS0".into());
    }
    if !has(&words, "panic=") {
        words.push("panic=1".into());
    }
    if let Some(khz) = tsc_khz {
        if !has(&words, "tsc_early_khz=") {
            words.push(format!("tsc_early_khz={khz}"));
        }
    }
    words.join(" ")
}

/// The vsock port the guest agent listens on (vsock transport).
pub const VSOCK_PORT: u32 = 1024;

/// What the guest's init needs on the kernel command line to serve this
/// channel: `agentvm.vsock=<port>` for vsock (virtio-serial is the default).
pub fn channel_cmdline(channel: ChannelConfig) -> Option<String> {
    match channel {
        ChannelConfig::VirtioSerial => None,
        ChannelConfig::Vsock { .. } => Some(format!("agentvm.vsock={VSOCK_PORT}")),
    }
}

/// The serial console into a file.
pub fn serial_console_args(log: &Path) -> Result<Vec<String>, ArgvError> {
    Ok(vec![
        "-chardev".into(),
        format!("file,id=serial0,path={}", opt_value(utf8(log)?)),
        "-serial".into(),
        "chardev:serial0".into(),
    ])
}

/// The control-channel device.
pub fn channel_args(channel: ChannelConfig, ctl_socket: &Path) -> Result<Vec<String>, ArgvError> {
    Ok(match channel {
        ChannelConfig::VirtioSerial => vec![
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!(
                "socket,id=ctl,path={},server=on,wait=off",
                opt_value(socket_path(ctl_socket)?)
            ),
            "-device".into(),
            format!("virtserialport,chardev=ctl,name={CTL_PORT_NAME}"),
        ],
        ChannelConfig::Vsock { guest_cid } => {
            vec![
                "-device".into(),
                format!("vhost-vsock-device,guest-cid={guest_cid}"),
            ]
        }
    })
}

/// QMP on a listening UNIX socket.
pub fn qmp_args(qmp_socket: &Path) -> Result<Vec<String>, ArgvError> {
    Ok(vec![
        "-chardev".into(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            opt_value(socket_path(qmp_socket)?)
        ),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
    ])
}

/// The snapshot-state qcow2, attached to no guest device, read and written
/// with `io` ([`super::state_io`]).
pub fn state_drive_args(state_disk: &Path, io: StateIo) -> Result<Vec<String>, ArgvError> {
    Ok(vec![
        "-drive".into(),
        format!(
            "file={},if=none,id=state,format=qcow2,aio={}",
            opt_value(utf8(state_disk)?),
            io.aio()
        ),
    ])
}

/// Serial number of the root file system disk: the guest's init finds the
/// disk by it (`/sys/block/vd*/serial`), whatever name the kernel gives it.
pub const ROOTFS_SERIAL: &str = "agentvm-rootfs";

/// The image's root file system: a read-only raw drive on a virtio-mmio block
/// device with serial [`ROOTFS_SERIAL`]. `readonly=on` lets every VM share the
/// one file and keeps it out of `savevm`/`loadvm`; the file lock is shared.
pub fn rootfs_drive_args(rootfs: &Path) -> Result<Vec<String>, ArgvError> {
    Ok(vec![
        "-drive".into(),
        format!(
            "file={},if=none,id=rootfs,format=raw,readonly=on",
            opt_value(utf8(rootfs)?)
        ),
        "-device".into(),
        format!("virtio-blk-device,drive=rootfs,serial={ROOTFS_SERIAL}"),
    ])
}

/// The `qemu-img` arguments that create the state disk.
pub fn state_disk_create_args(state_disk: &Path, size_mib: u32) -> Result<Vec<String>, ArgvError> {
    Ok(vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        utf8(state_disk)?.to_owned(),
        format!("{size_mib}M"),
    ])
}

/// Escapes a value inside a QEMU `key=value,...` option string (`,` → `,,`).
pub fn opt_value(value: &str) -> String {
    value.replace(',', ",,")
}

fn utf8(path: &Path) -> Result<&str, ArgvError> {
    path.to_str()
        .ok_or_else(|| ArgvError::NonUtf8Path(path.display().to_string()))
}

fn socket_path(path: &Path) -> Result<&str, ArgvError> {
    let s = utf8(path)?;
    if s.len() > MAX_SOCKET_PATH {
        return Err(ArgvError::SocketPathTooLong {
            path: s.to_owned(),
            len: s.len(),
        });
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::spec::{Accel, ImagePaths, ResourceProfile};

    fn spec() -> VmSpec {
        VmSpec {
            image: ImagePaths {
                name: "default".into(),
                kernel: PathBuf::from("/img/vmlinuz"),
                initramfs: PathBuf::from("/img/initramfs.cpio.gz"),
                cmdline: "console=ttyS0 panic=1 quiet".into(),
                rootfs: None,
            },
            profile: ResourceProfile::Minimal,
            network: NetworkMode::Isolated,
            accel: Accel::Auto,
            boot_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn full_tcg_virtio_serial_argv() {
        let spec = spec();
        let paths = VmPaths::new("/run/agentvm/vms/7-0");
        let argv = build_argv(&LaunchArgs {
            vm_id: "7-0",
            spec: &spec,
            accel: ResolvedAccel::Tcg,
            paths: &paths,
            channel: ChannelConfig::VirtioSerial,
            host_tsc_khz: Some(2_596_120),
            start_paused: false,
            state_io: StateIo::IoUring,
        })
        .unwrap();
        let expected = [
            "-name",
            "7-0",
            "-M",
            "microvm,isa-serial=on,rtc=on",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "256M",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-kernel",
            "/img/vmlinuz",
            "-initrd",
            "/img/initramfs.cpio.gz",
            "-append",
            "console=ttyS0 panic=1 quiet tsc_early_khz=2596120",
            "-chardev",
            "file,id=serial0,path=/run/agentvm/vms/7-0/serial.log",
            "-serial",
            "chardev:serial0",
            "-device",
            "virtio-serial-device",
            "-chardev",
            "socket,id=ctl,path=/run/agentvm/vms/7-0/ctl.sock,server=on,wait=off",
            "-device",
            "virtserialport,chardev=ctl,name=org.agentvm.ctl",
            "-chardev",
            "socket,id=qmp,path=/run/agentvm/vms/7-0/qmp.sock,server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-drive",
            "file=/run/agentvm/vms/7-0/state.qcow2,if=none,id=state,format=qcow2,aio=io_uring",
        ];
        assert_eq!(argv, expected);
    }

    #[test]
    fn rootfs_disk_is_a_shared_read_only_virtio_disk() {
        let mut spec = spec();
        spec.image.rootfs = Some(PathBuf::from("/img/agent,1/rootfs.erofs"));
        let paths = VmPaths::new("/run/agentvm/vms/7-0");
        let argv = build_argv(&LaunchArgs {
            vm_id: "7-0",
            spec: &spec,
            accel: ResolvedAccel::Tcg,
            paths: &paths,
            channel: ChannelConfig::VirtioSerial,
            host_tsc_khz: None,
            start_paused: false,
            state_io: StateIo::IoUring,
        })
        .unwrap();
        assert_eq!(
            &argv[argv.len() - 4..],
            [
                "-drive",
                "file=/img/agent,,1/rootfs.erofs,if=none,id=rootfs,format=raw,readonly=on",
                "-device",
                "virtio-blk-device,drive=rootfs,serial=agentvm-rootfs"
            ]
        );
        // The state disk stays the only writable drive (savevm stores there).
        assert_eq!(
            argv.iter().filter(|a| a.starts_with("file=")).count(),
            2,
            "{argv:?}"
        );
    }

    #[test]
    fn kvm_uses_host_cpu() {
        assert_eq!(
            accel_args(ResolvedAccel::Kvm),
            ["-accel", "kvm", "-cpu", "host"]
        );
        assert_eq!(
            accel_args(ResolvedAccel::Tcg),
            ["-accel", "tcg", "-cpu", "max"]
        );
    }

    #[test]
    fn profiles_map_to_m_and_smp() {
        let p = ResourceProfile::Standard;
        assert_eq!(
            resource_args(p.vcpus(), p.memory_mib()).unwrap(),
            ["-m", "2048M", "-smp", "2"]
        );
        assert!(matches!(
            resource_args(0, 256),
            Err(ArgvError::InvalidResources(_))
        ));
        assert!(matches!(
            resource_args(1, 16),
            Err(ArgvError::InvalidResources(_))
        ));
    }

    #[test]
    fn vsock_channel() {
        let args = channel_args(
            ChannelConfig::Vsock { guest_cid: 42 },
            Path::new("/x/ctl.sock"),
        )
        .unwrap();
        assert_eq!(args, ["-device", "vhost-vsock-device,guest-cid=42"]);
        assert_eq!(
            channel_cmdline(ChannelConfig::Vsock { guest_cid: 42 }).as_deref(),
            Some("agentvm.vsock=1024")
        );
        assert_eq!(channel_cmdline(ChannelConfig::VirtioSerial), None);
        assert_eq!(
            ChannelConfig::Vsock { guest_cid: 3 }.transport(),
            Transport::Vsock
        );
    }

    #[test]
    fn cmdline_gets_console_panic_and_tsc() {
        assert_eq!(kernel_cmdline("", None), "console=ttyS0 panic=1");
        assert_eq!(kernel_cmdline("quiet", None), "quiet console=ttyS0 panic=1");
        assert_eq!(
            kernel_cmdline("console=hvc0  panic=5 quiet", None),
            "console=hvc0 panic=5 quiet"
        );
        assert_eq!(
            kernel_cmdline("quiet", Some(1000)),
            "quiet console=ttyS0 panic=1 tsc_early_khz=1000"
        );
        assert_eq!(
            kernel_cmdline("tsc_early_khz=5", Some(1000)),
            "tsc_early_khz=5 console=ttyS0 panic=1"
        );
    }

    #[test]
    fn kvm_gets_no_tsc_hint() {
        let spec = spec();
        let paths = VmPaths::new("/r/vms/1-0");
        let argv = build_argv(&LaunchArgs {
            vm_id: "1-0",
            spec: &spec,
            accel: ResolvedAccel::Kvm,
            paths: &paths,
            channel: ChannelConfig::VirtioSerial,
            host_tsc_khz: Some(2_596_120),
            start_paused: false,
            state_io: StateIo::IoUring,
        })
        .unwrap();
        let append = argv.iter().position(|a| a == "-append").unwrap();
        assert_eq!(argv[append + 1], "console=ttyS0 panic=1 quiet");
    }

    #[test]
    fn paused_start_adds_dash_s_at_the_end() {
        let spec = spec();
        let paths = VmPaths::new("/r/vms/1-0");
        let args = |start_paused| {
            build_argv(&LaunchArgs {
                vm_id: "1-0",
                spec: &spec,
                accel: ResolvedAccel::Tcg,
                paths: &paths,
                channel: ChannelConfig::VirtioSerial,
                host_tsc_khz: None,
                start_paused,
                state_io: StateIo::IoUring,
            })
            .unwrap()
        };
        let (running, paused) = (args(false), args(true));
        assert!(!running.iter().any(|a| a == "-S"));
        assert_eq!(paused.last().map(String::as_str), Some("-S"));
        assert_eq!(paused[..paused.len() - 1], running[..]);
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        assert_eq!(opt_value("/a,b/c"), "/a,,b/c");
        let args = state_drive_args(Path::new("/tmp/a,b/state.qcow2"), StateIo::Threads).unwrap();
        assert_eq!(
            args[1],
            "file=/tmp/a,,b/state.qcow2,if=none,id=state,format=qcow2,aio=threads"
        );
    }

    #[test]
    fn long_socket_paths_are_rejected() {
        let long = PathBuf::from(format!("/{}/qmp.sock", "d".repeat(110)));
        assert!(matches!(
            qmp_args(&long),
            Err(ArgvError::SocketPathTooLong { .. })
        ));
    }

    #[test]
    fn only_modes_without_a_nic_are_accepted() {
        let paths = VmPaths::new("/r/vms/1-0");
        let argv_for = |network: NetworkMode| {
            let mut spec = spec();
            spec.network = network;
            build_argv(&LaunchArgs {
                vm_id: "1-0",
                spec: &spec,
                accel: ResolvedAccel::Tcg,
                paths: &paths,
                channel: ChannelConfig::VirtioSerial,
                host_tsc_khz: None,
                start_paused: false,
                state_io: StateIo::IoUring,
            })
        };
        for mode in [
            NetworkMode::Isolated,
            NetworkMode::Gateway,
            NetworkMode::Allowlist,
        ] {
            let argv = argv_for(mode.clone()).unwrap();
            // `-nodefaults` and no `-netdev`/`-nic`: the guest has no NIC.
            assert!(argv.contains(&"-nodefaults".to_owned()), "{mode}: {argv:?}");
            assert!(
                !argv
                    .iter()
                    .any(|a| a == "-netdev" || a == "-nic" || a.contains("net-pci")),
                "{mode}: {argv:?}"
            );
        }
        let err = argv_for(NetworkMode::NatFiltered).unwrap_err();
        assert_eq!(err, ArgvError::UnsupportedNetwork(NetworkMode::NatFiltered));
        assert!(
            err.to_string().contains("nat-filtered needs a NIC"),
            "{err}"
        );
    }

    #[test]
    fn qemu_img_args() {
        assert_eq!(
            state_disk_create_args(Path::new("/d/state.qcow2"), 32).unwrap(),
            ["create", "-q", "-f", "qcow2", "/d/state.qcow2", "32M"]
        );
    }
}
