//! The libvirt domain XML of a VM, built by a pure function from the
//! [`VmSpec`] and the backend's decisions (unit-tested on exact snippets).
//!
//! The machine is `pc` (libvirt does not manage `microvm`): direct kernel
//! boot of the image's kernel + initramfs, the serial console into a file,
//! the control channel as a virtio-serial port whose host end is a UNIX
//! socket QEMU listens on (`mode='bind'`), one small qcow2 attached as a
//! virtio disk (internal snapshots need a qcow2 to hold the VM state; the
//! guest never mounts it), no graphics, no balloon, no USB. A guest reboot
//! (kernel panic with `panic=1`) or crash destroys the domain, which is how a
//! crashed guest is detected.
//!
//! `<title>agentvm</title>` and an `<agentvm:vm>` metadata element carrying
//! the owner's pid + start time let [`super::LibvirtBackend::sweep`] find domains left behind
//! by dead processes.

use std::fmt::Write as _;
use std::path::Path;

use crate::backend::qemu::accel::ResolvedAccel;
use crate::backend::qemu::argv::{kernel_cmdline, CTL_PORT_NAME, ROOTFS_SERIAL};
use crate::spec::{NetworkMode, VmSpec};

/// The `<title>` of every domain this backend creates.
pub const DOMAIN_TITLE: &str = "agentvm";
/// Every domain name starts with this.
pub const DOMAIN_PREFIX: &str = "agentvm-";
/// Namespace URI of the metadata element.
pub const METADATA_NS: &str = "https://agentvm.dev/xmlns/libvirt/vm/1";
/// Namespace prefix of the metadata element.
pub const METADATA_PREFIX: &str = "agentvm";
/// The libvirt NAT network of `nat-filtered` (created by `agentvm setup-network`).
pub const NAT_NETWORK: &str = "agentvm-nat";
/// The nwfilter of `nat-filtered`.
pub const EGRESS_FILTER: &str = "agentvm-egress";

/// Memory QEMU may use beyond the guest RAM before the kernel OOM-kills it
/// (`<memtune><hard_limit>`): TCG keeps a translation cache of its own.
pub fn memory_overhead_mib(accel: ResolvedAccel) -> u64 {
    match accel {
        ResolvedAccel::Tcg => 1024,
        ResolvedAccel::Kvm => 512,
    }
}

/// Who owns a domain: the host process that created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Its pid.
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (so that a recycled pid is not taken for the owner).
    pub start_time: u64,
}

/// Everything the domain XML depends on.
#[derive(Debug, Clone, Copy)]
pub struct DomainParams<'a> {
    /// Domain name (`agentvm-<pid>-<n>`).
    pub name: &'a str,
    /// What to run.
    pub spec: &'a VmSpec,
    /// The resolved accelerator (`<domain type='kvm'|'qemu'>`).
    pub accel: ResolvedAccel,
    /// Host TSC rate, passed as `tsc_early_khz=` under TCG.
    pub host_tsc_khz: Option<u32>,
    /// The owner (metadata, for the sweep).
    pub owner: Owner,
    /// The machine the owner runs on ([`this_machine`]; metadata, so that
    /// the sweep of a host shared by several machines leaves the others' VMs alone).
    pub machine: &'a str,
    /// The VM's directory (metadata: removed by the sweep).
    pub dir: &'a Path,
    /// The serial console log file; `None` (a remote host): a pty, read
    /// through `virDomainOpenConsole`.
    pub serial_log: Option<&'a Path>,
    /// The host end of the control channel; `None` (a remote host): a
    /// socket path libvirt chooses, reached through `virDomainOpenChannel`.
    pub ctl_socket: Option<&'a Path>,
    /// The qcow2 holding snapshot state.
    pub state_disk: &'a Path,
    /// `<hard_limit>` (QEMU is OOM-killed beyond it) if true, else
    /// `<soft_limit>`: libvirt also raises QEMU's RLIMIT_MEMLOCK to a hard
    /// limit, which fails without CAP_SYS_RESOURCE (as in the containers this
    /// was developed in: "cannot limit locked memory ... Operation not
    /// permitted"); the backend then falls back to the soft limit.
    pub hard_memory_limit: bool,
}

/// Why no XML could be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DomainXmlError {
    /// A path is not valid UTF-8.
    #[error("path is not valid UTF-8: {0}")]
    NonUtf8Path(String),
    /// Resources libvirt cannot use.
    #[error("invalid resources: {0}")]
    InvalidResources(String),
    /// A bridge name that is empty or not a plain interface name.
    #[error("invalid bridge name {0:?}")]
    InvalidBridge(String),
}

/// Escapes text for XML content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn path_str(p: &Path) -> Result<String, DomainXmlError> {
    p.to_str()
        .map(xml_escape)
        .ok_or_else(|| DomainXmlError::NonUtf8Path(p.display().to_string()))
}

/// The `<interface>` element for a network mode (`None` for the modes
/// without a NIC: `isolated`, `gateway`, `allowlist`).
pub fn interface_xml(network: &NetworkMode) -> Result<Option<String>, DomainXmlError> {
    Ok(match network {
        NetworkMode::Isolated | NetworkMode::Gateway | NetworkMode::Allowlist => None,
        NetworkMode::NatFiltered => Some(format!(
            "    <interface type='network'>\n      <source network='{NAT_NETWORK}'/>\n      <model type='virtio'/>\n      <filterref filter='{EGRESS_FILTER}'/>\n    </interface>\n"
        )),
        NetworkMode::Bridge(name) => {
            let valid = !name.is_empty()
                && name.len() <= 15
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid {
                return Err(DomainXmlError::InvalidBridge(name.clone()));
            }
            Some(format!(
                "    <interface type='bridge'>\n      <source bridge='{name}'/>\n      <model type='virtio'/>\n    </interface>\n"
            ))
        }
    })
}

/// The `<metadata>` element naming the owner, its machine and the VM directory.
pub fn metadata_xml(owner: Owner, machine: &str, dir: &str) -> String {
    format!(
        "<{METADATA_PREFIX}:vm xmlns:{METADATA_PREFIX}='{METADATA_NS}'>\
<{METADATA_PREFIX}:owner pid='{}' start='{}'/>\
<{METADATA_PREFIX}:machine>{}</{METADATA_PREFIX}:machine>\
<{METADATA_PREFIX}:dir>{dir}</{METADATA_PREFIX}:dir>\
</{METADATA_PREFIX}:vm>",
        owner.pid,
        owner.start_time,
        xml_escape(machine)
    )
}

/// This machine's identity for the metadata: `/etc/machine-id`, else the
/// host name.
pub fn this_machine() -> String {
    ["/etc/machine-id", "/proc/sys/kernel/hostname"]
        .iter()
        .find_map(|p| {
            let id = std::fs::read_to_string(p).ok()?;
            let id = id.trim();
            (!id.is_empty()).then(|| id.to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Reads the owner's machine back from a domain's XML (`None` for domains
/// made before it was recorded).
pub fn parse_machine(domain_xml: &str) -> Option<String> {
    element_text(domain_xml, &format!("{METADATA_PREFIX}:machine"))
}

/// Reads the owner back from a domain's XML (as libvirt returns it).
pub fn parse_owner(domain_xml: &str) -> Option<Owner> {
    let start = domain_xml.find(&format!("<{METADATA_PREFIX}:owner "))?;
    let element = &domain_xml[start..];
    let element = &element[..element.find("/>")?];
    let attr = |name: &str| -> Option<u64> {
        let key = format!("{name}=");
        let at = element.find(&key)? + key.len();
        let quote = element[at..].chars().next()?;
        let rest = &element[at + 1..];
        rest[..rest.find(quote)?].parse().ok()
    };
    Some(Owner {
        pid: u32::try_from(attr("pid")?).ok()?,
        start_time: attr("start")?,
    })
}

/// Reads the VM directory back from a domain's XML.
pub fn parse_dir(domain_xml: &str) -> Option<String> {
    let open = format!("<{METADATA_PREFIX}:dir>");
    let start = domain_xml.find(&open)? + open.len();
    let end = domain_xml[start..].find('<')?;
    let raw = &domain_xml[start..start + end];
    Some(
        raw.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&apos;", "'")
            .replace("&quot;", "\"")
            .replace("&amp;", "&"),
    )
}

/// The whole domain XML.
pub fn domain_xml(p: &DomainParams<'_>) -> Result<String, DomainXmlError> {
    let vcpus = p.spec.profile.vcpus();
    let memory = p.spec.profile.memory_mib();
    if vcpus == 0 {
        return Err(DomainXmlError::InvalidResources("0 vCPUs".into()));
    }
    if memory < 64 {
        return Err(DomainXmlError::InvalidResources(format!(
            "{memory} MiB of memory (at least 64 needed)"
        )));
    }
    let (domain_type, cpu) = match p.accel {
        ResolvedAccel::Tcg => ("qemu", "<cpu mode='maximum'/>"),
        ResolvedAccel::Kvm => ("kvm", "<cpu mode='host-passthrough'/>"),
    };
    let tsc = match p.accel {
        ResolvedAccel::Tcg => p.host_tsc_khz,
        ResolvedAccel::Kvm => None,
    };
    let cmdline = xml_escape(&kernel_cmdline(&p.spec.image.cmdline, tsc));
    let hard_limit = u64::from(memory) + memory_overhead_mib(p.accel);
    let shares = 1024 * u64::from(vcpus);
    let dir = path_str(p.dir)?;
    let mut x = String::new();
    let _ = write!(
        x,
        "<domain type='{domain_type}'>
  <name>{name}</name>
  <title>{DOMAIN_TITLE}</title>
  <description>agentvm test VM {name} (owner pid {pid}); safe to destroy when that process is gone</description>
  <metadata>{metadata}</metadata>
  <memory unit='MiB'>{memory}</memory>
  <currentMemory unit='MiB'>{memory}</currentMemory>
  <memtune>
    <{limit} unit='MiB'>{hard_limit}</{limit}>
  </memtune>
  <vcpu placement='static'>{vcpus}</vcpu>
  <cputune>
    <shares>{shares}</shares>
  </cputune>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  {cpu}
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe'/>
      <source file='{state}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
{rootfs}    <controller type='usb' model='none'/>
{serial}    <channel type='unix'>
      <source mode='bind'{ctl}/>
      <target type='virtio' name='{CTL_PORT_NAME}'/>
    </channel>
{interface}    <memballoon model='none'/>
  </devices>
</domain>
",
        name = xml_escape(p.name),
        limit = if p.hard_memory_limit { "hard_limit" } else { "soft_limit" },
        pid = p.owner.pid,
        metadata = metadata_xml(p.owner, p.machine, &dir),
        kernel = path_str(&p.spec.image.kernel)?,
        initrd = path_str(&p.spec.image.initramfs)?,
        state = path_str(p.state_disk)?,
        serial = match p.serial_log {
            Some(log) => format!(
                "    <serial type='file'>\n      <source path='{}' append='on'/>\n      <target port='0'/>\n    </serial>\n",
                path_str(log)?
            ),
            None => "    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n".to_owned(),
        },
        ctl = match p.ctl_socket {
            Some(socket) => format!(" path='{}'", path_str(socket)?),
            None => String::new(),
        },
        interface = interface_xml(&p.spec.network)?.unwrap_or_default(),
        rootfs = match &p.spec.image.rootfs {
            Some(path) => rootfs_disk_xml(path)?,
            None => String::new(),
        },
    );
    Ok(x)
}

/// The image's root file system disk: read-only raw, shared by every domain
/// (`<shareable/>` keeps libvirt from locking it to one), left out of
/// snapshots (`snapshot='no'`: the guest never writes it), found by the
/// guest through its serial number.
pub fn rootfs_disk_xml(path: &Path) -> Result<String, DomainXmlError> {
    Ok(format!(
        "    <disk type='file' device='disk' snapshot='no'>
      <driver name='qemu' type='raw'/>
      <source file='{}'/>
      <target dev='vdb' bus='virtio'/>
      <serial>{ROOTFS_SERIAL}</serial>
      <readonly/>
      <shareable/>
    </disk>
",
        path_str(path)?
    ))
}

/// The XML of a domain snapshot with a name and a description.
pub fn snapshot_xml(name: &str, description: &str) -> String {
    format!(
        "<domainsnapshot>\n  <name>{}</name>\n  <description>{}</description>\n  <memory snapshot='internal'/>\n</domainsnapshot>\n",
        xml_escape(name),
        xml_escape(description)
    )
}

/// Extracts the text of the first `<tag>` element (unescaped), if any.
pub fn element_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))?;
    Some(
        xml[start..start + end]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&apos;", "'")
            .replace("&quot;", "\"")
            .replace("&amp;", "&"),
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::spec::{Accel, ImagePaths, ResourceProfile};

    fn spec(network: NetworkMode) -> VmSpec {
        VmSpec {
            image: ImagePaths {
                name: "default".into(),
                kernel: PathBuf::from("/img/vmlinuz"),
                initramfs: PathBuf::from("/img/initramfs.cpio.gz"),
                cmdline: "console=ttyS0 panic=1 quiet".into(),
                rootfs: None,
            },
            profile: ResourceProfile::Minimal,
            network,
            accel: Accel::Auto,
            boot_timeout: Duration::from_secs(30),
        }
    }

    fn xml(spec: &VmSpec, accel: ResolvedAccel) -> String {
        let dir = PathBuf::from("/run/agentvm/libvirt/vms/7-0");
        domain_xml(&DomainParams {
            name: "agentvm-7-0",
            spec,
            accel,
            host_tsc_khz: Some(2_596_120),
            owner: Owner {
                pid: 7,
                start_time: 1234,
            },
            machine: "m1",
            dir: &dir,
            serial_log: Some(&dir.join("serial.log")),
            ctl_socket: Some(&dir.join("ctl.sock")),
            state_disk: &dir.join("state.qcow2"),
            hard_memory_limit: true,
        })
        .unwrap()
    }

    #[test]
    fn rootfs_disk_is_read_only_shared_and_parses() {
        let mut s = spec(NetworkMode::Isolated);
        let x = xml(&s, ResolvedAccel::Tcg);
        assert!(!x.contains("agentvm-rootfs"), "{x}");
        s.image.rootfs = Some(PathBuf::from("/img/agent/rootfs.erofs"));
        let x = xml(&s, ResolvedAccel::Tcg);
        assert_eq!(x.matches("<disk ").count(), 2, "{x}");
        assert!(
            x.contains(
                "    <disk type='file' device='disk' snapshot='no'>
      <driver name='qemu' type='raw'/>
      <source file='/img/agent/rootfs.erofs'/>
      <target dev='vdb' bus='virtio'/>
      <serial>agentvm-rootfs</serial>
      <readonly/>
      <shareable/>
    </disk>
"
            ),
            "{x}"
        );
        // Paths are escaped like the others.
        s.image.rootfs = Some(PathBuf::from("/img/it's/rootfs.erofs"));
        let x = xml(&s, ResolvedAccel::Tcg);
        assert!(
            x.contains("<source file='/img/it&apos;s/rootfs.erofs'/>"),
            "{x}"
        );
    }

    #[test]
    fn tcg_domain() {
        let x = xml(&spec(NetworkMode::Isolated), ResolvedAccel::Tcg);
        for snippet in [
            "<domain type='qemu'>",
            "<name>agentvm-7-0</name>",
            "<title>agentvm</title>",
            "<metadata><agentvm:vm xmlns:agentvm='https://agentvm.dev/xmlns/libvirt/vm/1'><agentvm:owner pid='7' start='1234'/><agentvm:machine>m1</agentvm:machine><agentvm:dir>/run/agentvm/libvirt/vms/7-0</agentvm:dir></agentvm:vm></metadata>",
            "<memory unit='MiB'>256</memory>",
            "<memtune>\n    <hard_limit unit='MiB'>1280</hard_limit>\n  </memtune>",
            "<vcpu placement='static'>1</vcpu>",
            "<cputune>\n    <shares>1024</shares>\n  </cputune>",
            "<kernel>/img/vmlinuz</kernel>",
            "<initrd>/img/initramfs.cpio.gz</initrd>",
            "<cmdline>console=ttyS0 panic=1 quiet tsc_early_khz=2596120</cmdline>",
            "<cpu mode='maximum'/>",
            "<on_reboot>destroy</on_reboot>",
            // Without ACPI the guest's poweroff only halts the CPU.
            "<features>\n    <acpi/>\n  </features>\n  <on_poweroff>destroy</on_poweroff>",
            "<serial type='file'>\n      <source path='/run/agentvm/libvirt/vms/7-0/serial.log' append='on'/>",
            "<channel type='unix'>\n      <source mode='bind' path='/run/agentvm/libvirt/vms/7-0/ctl.sock'/>\n      <target type='virtio' name='org.agentvm.ctl'/>\n    </channel>",
            "<source file='/run/agentvm/libvirt/vms/7-0/state.qcow2'/>",
            "<memballoon model='none'/>",
        ] {
            assert!(x.contains(snippet), "missing {snippet:?} in\n{x}");
        }
        for absent in ["<graphics", "<interface", "<video"] {
            assert!(!x.contains(absent), "{absent} in\n{x}");
        }
    }

    #[test]
    fn kvm_domain_has_no_tsc_hint() {
        let mut s = spec(NetworkMode::Isolated);
        s.profile = ResourceProfile::Standard;
        let x = xml(&s, ResolvedAccel::Kvm);
        assert!(x.contains("<domain type='kvm'>"), "{x}");
        assert!(x.contains("<cpu mode='host-passthrough'/>"), "{x}");
        assert!(
            x.contains("<cmdline>console=ttyS0 panic=1 quiet</cmdline>"),
            "{x}"
        );
        assert!(x.contains("<memory unit='MiB'>2048</memory>"), "{x}");
        assert!(
            x.contains("<hard_limit unit='MiB'>2560</hard_limit>"),
            "{x}"
        );
        assert!(x.contains("<vcpu placement='static'>2</vcpu>"), "{x}");
        assert!(x.contains("<shares>2048</shares>"), "{x}");
    }

    #[test]
    fn soft_memory_limit_fallback() {
        let dir = PathBuf::from("/d");
        let s = spec(NetworkMode::Isolated);
        let x = domain_xml(&DomainParams {
            name: "agentvm-1-0",
            spec: &s,
            accel: ResolvedAccel::Tcg,
            host_tsc_khz: None,
            owner: Owner {
                pid: 1,
                start_time: 1,
            },
            machine: "m1",
            dir: &dir,
            serial_log: Some(&dir),
            ctl_socket: Some(&dir),
            state_disk: &dir,
            hard_memory_limit: false,
        })
        .unwrap();
        assert!(
            x.contains("<memtune>\n    <soft_limit unit='MiB'>1280</soft_limit>\n  </memtune>"),
            "{x}"
        );
    }

    #[test]
    fn network_modes() {
        let x = xml(&spec(NetworkMode::NatFiltered), ResolvedAccel::Tcg);
        assert!(
            x.contains("    <interface type='network'>\n      <source network='agentvm-nat'/>\n      <model type='virtio'/>\n      <filterref filter='agentvm-egress'/>\n    </interface>\n"),
            "{x}"
        );
        let x = xml(&spec(NetworkMode::Bridge("br0".into())), ResolvedAccel::Tcg);
        assert!(
            x.contains("    <interface type='bridge'>\n      <source bridge='br0'/>\n      <model type='virtio'/>\n    </interface>\n"),
            "{x}"
        );
        assert_eq!(
            interface_xml(&NetworkMode::Bridge("br0'/><x".into())),
            Err(DomainXmlError::InvalidBridge("br0'/><x".into()))
        );
        for mode in [
            NetworkMode::Isolated,
            NetworkMode::Gateway,
            NetworkMode::Allowlist,
        ] {
            assert_eq!(interface_xml(&mode), Ok(None), "{mode}");
        }
    }

    #[test]
    fn special_characters_are_escaped() {
        let mut s = spec(NetworkMode::Isolated);
        s.image.cmdline = "quiet x=<a&b>".into();
        s.image.kernel = PathBuf::from("/img/it's/vmlinuz");
        let x = xml(&s, ResolvedAccel::Kvm);
        assert!(
            x.contains("<cmdline>quiet x=&lt;a&amp;b&gt; console=ttyS0 panic=1</cmdline>"),
            "{x}"
        );
        assert!(x.contains("<kernel>/img/it&apos;s/vmlinuz</kernel>"), "{x}");
    }

    #[test]
    fn owner_and_dir_round_trip() {
        let x = xml(&spec(NetworkMode::Isolated), ResolvedAccel::Tcg);
        assert_eq!(
            parse_owner(&x),
            Some(Owner {
                pid: 7,
                start_time: 1234
            })
        );
        assert_eq!(
            parse_dir(&x).as_deref(),
            Some("/run/agentvm/libvirt/vms/7-0")
        );
        // libvirt re-serialises with double quotes.
        let lv = "<metadata>\n    <agentvm:vm xmlns:agentvm=\"https://agentvm.dev/xmlns/libvirt/vm/1\">\n      <agentvm:owner pid=\"42\" start=\"99\"/>\n      <agentvm:dir>/d&amp;e</agentvm:dir>";
        assert_eq!(
            parse_owner(lv),
            Some(Owner {
                pid: 42,
                start_time: 99
            })
        );
        assert_eq!(parse_dir(lv).as_deref(), Some("/d&e"));
        assert_eq!(parse_owner("<domain/>"), None);
        assert_eq!(parse_machine(&x).as_deref(), Some("m1"));
        assert_eq!(parse_machine(lv), None);
    }

    #[test]
    fn remote_domain_has_a_pty_console_and_a_channel_path_of_libvirts_choice() {
        let dir = PathBuf::from("/here/vms/7-0");
        let s = spec(NetworkMode::Isolated);
        let x = domain_xml(&DomainParams {
            name: "agentvm-7-0",
            spec: &s,
            accel: ResolvedAccel::Tcg,
            host_tsc_khz: None,
            owner: Owner {
                pid: 7,
                start_time: 1,
            },
            machine: "m1",
            dir: &dir,
            serial_log: None,
            ctl_socket: None,
            state_disk: Path::new("/var/lib/libvirt/agentvm/agentvm-7-0-state.qcow2"),
            hard_memory_limit: true,
        })
        .unwrap();
        assert!(
            x.contains("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n"),
            "{x}"
        );
        assert!(
            x.contains("<channel type='unix'>\n      <source mode='bind'/>\n      <target type='virtio' name='org.agentvm.ctl'/>"),
            "{x}"
        );
        assert!(
            x.contains("<source file='/var/lib/libvirt/agentvm/agentvm-7-0-state.qcow2'/>"),
            "{x}"
        );
        assert!(!x.contains("/here/vms/7-0/"), "no local file in\n{x}");
    }

    #[test]
    fn invalid_resources() {
        let mut s = spec(NetworkMode::Isolated);
        s.profile = ResourceProfile::Custom {
            vcpus: 0,
            memory_mib: 256,
        };
        let dir = PathBuf::from("/d");
        let params = DomainParams {
            name: "agentvm-1-0",
            spec: &s,
            accel: ResolvedAccel::Tcg,
            host_tsc_khz: None,
            owner: Owner {
                pid: 1,
                start_time: 1,
            },
            machine: "m1",
            dir: &dir,
            serial_log: Some(&dir),
            ctl_socket: Some(&dir),
            state_disk: &dir,
            hard_memory_limit: true,
        };
        assert!(matches!(
            domain_xml(&params),
            Err(DomainXmlError::InvalidResources(_))
        ));
    }

    #[test]
    fn snapshot_xml_and_element_text() {
        let x = snapshot_xml("golden", "after boot & hello");
        assert_eq!(
            x,
            "<domainsnapshot>\n  <name>golden</name>\n  <description>after boot &amp; hello</description>\n  <memory snapshot='internal'/>\n</domainsnapshot>\n"
        );
        assert_eq!(
            element_text(&x, "description").as_deref(),
            Some("after boot & hello")
        );
        assert_eq!(element_text(&x, "creationTime"), None);
    }
}
