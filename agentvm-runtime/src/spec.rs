//! What a VM should look like: resource profile, image, network, accelerator.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Named resource profiles from the original specification, plus custom sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceProfile {
    /// The smallest VM that runs the minimal image well: 1 vCPU, 256 MiB. The default.
    #[default]
    Minimal,
    /// 1 vCPU, 1024 MiB.
    Light,
    /// 2 vCPUs, 2048 MiB.
    Standard,
    /// 4 vCPUs, 4096 MiB.
    Intensive,
    /// Explicit sizes.
    Custom {
        /// Virtual CPUs.
        vcpus: u32,
        /// Memory in MiB.
        memory_mib: u32,
    },
}

impl ResourceProfile {
    /// Number of virtual CPUs.
    pub fn vcpus(self) -> u32 {
        match self {
            Self::Minimal | Self::Light => 1,
            Self::Standard => 2,
            Self::Intensive => 4,
            Self::Custom { vcpus, .. } => vcpus,
        }
    }

    /// Memory in MiB.
    pub fn memory_mib(self) -> u32 {
        match self {
            Self::Minimal => 256,
            Self::Light => 1024,
            Self::Standard => 2048,
            Self::Intensive => 4096,
            Self::Custom { memory_mib, .. } => memory_mib,
        }
    }

    /// Parses a profile name (`minimal`, `light`, `standard`, `intensive`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "minimal" => Some(Self::Minimal),
            "light" => Some(Self::Light),
            "standard" => Some(Self::Standard),
            "intensive" => Some(Self::Intensive),
            _ => None,
        }
    }
}

/// How the guest reaches the network.
///
/// `isolated`, `gateway` and `allowlist` give the VM no NIC at all: in
/// `gateway` and `allowlist` the only paths out are streams tunnelled over
/// the control channel to the host (the model gateway, and an egress proxy
/// the test harness offers through `HTTPS_PROXY`), so such VMs are
/// interchangeable and [`NetworkMode::vm_attachment`] maps all three to
/// [`NetworkMode::Isolated`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    /// No path out at all: no NIC, no model gateway, no proxy.
    Isolated,
    /// No NIC; the model gateway, and an egress proxy that refuses and logs
    /// every other connection (the default).
    #[default]
    Gateway,
    /// No NIC; the model gateway, and an egress proxy that lets the
    /// allowlisted `host[:port]` patterns through and logs every connection.
    Allowlist,
    /// A NIC on the libvirt `agentvm-nat` network behind the `agentvm-egress` filter.
    NatFiltered,
    /// A NIC on a user-named host bridge (advanced).
    Bridge(String),
}

impl NetworkMode {
    /// Whether the VM gets a network interface.
    pub fn has_nic(&self) -> bool {
        matches!(self, Self::NatFiltered | Self::Bridge(_))
    }

    /// What the hypervisor must attach: the modes without a NIC all become
    /// [`NetworkMode::Isolated`], so their tests share VMs.
    pub fn vm_attachment(&self) -> NetworkMode {
        if self.has_nic() {
            self.clone()
        } else {
            Self::Isolated
        }
    }

    /// Whether the guest may reach the model gateway (every mode but `isolated`).
    pub fn reaches_model_gateway(&self) -> bool {
        *self != Self::Isolated
    }

    /// Whether the harness offers the egress proxy (`gateway`, `allowlist`).
    pub fn offers_egress_proxy(&self) -> bool {
        matches!(self, Self::Gateway | Self::Allowlist)
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Isolated => f.write_str("isolated"),
            Self::Gateway => f.write_str("gateway"),
            Self::Allowlist => f.write_str("allowlist"),
            Self::NatFiltered => f.write_str("nat-filtered"),
            Self::Bridge(name) => write!(f, "bridge:{name}"),
        }
    }
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where it really works, else TCG.
    #[default]
    Auto,
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation (always works, slower).
    Tcg,
}

/// A guest image on disk: kernel + initramfs built by `agentvm image build`
/// (`cargo xtask build-image` in the agentvm repository).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePaths {
    /// Image name (`default`, ...).
    pub name: String,
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The initramfs (gzip'd newc cpio).
    pub initramfs: PathBuf,
    /// Extra kernel command line for this image.
    pub cmdline: String,
    /// The read-only root file system disk (the `agent` image), attached
    /// read-only to every VM (shared, never copied) as the first virtio disk.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
}

impl ImagePaths {
    /// Every file QEMU reads: the kernel, the initramfs and the root file
    /// system disk when there is one.
    pub fn files(&self) -> Vec<&std::path::Path> {
        let mut files = vec![self.kernel.as_path(), self.initramfs.as_path()];
        files.extend(self.rootfs.as_deref());
        files
    }
}

/// Everything needed to launch one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// The guest image.
    pub image: ImagePaths,
    /// CPU and memory.
    pub profile: ResourceProfile,
    /// Network attachment.
    pub network: NetworkMode,
    /// Accelerator choice.
    pub accel: Accel,
    /// How long boot may take until the guest agent says Hello.
    pub boot_timeout: Duration,
}
