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

/// How the VM reaches the network.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    /// No network interface at all (the default for tests).
    #[default]
    Isolated,
    /// A NIC on the libvirt `agentvm-nat` network behind the `agentvm-egress` filter.
    NatFiltered,
    /// A NIC on a user-named host bridge (advanced).
    Bridge(String),
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
