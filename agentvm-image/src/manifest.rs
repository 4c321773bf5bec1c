//! The image manifest (`manifest.json`) and the content-addressed cache key.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::util::sha256_hex;

/// Bump when the image layout changes in a way the inputs do not capture
/// (initramfs tree, cpio/gzip settings, the kernel's patched boot header,
/// manifest semantics). Part of the key.
pub const FORMAT_VERSION: u32 = 3;

/// Everything that determines the image's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    pub format_version: u32,
    pub guest_sha256: String,
    pub kernel_package: String,
    pub kernel_version: String,
    pub busybox_sha256: String,
    pub init_sha256: String,
    /// Module names in load order.
    pub modules: Vec<String>,
    pub cmdline: String,
    /// Key of the root file system ([`super::rootfs::RootfsInputs::key`]);
    /// only images with a root file system (`agent`) have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_key: Option<String>,
    /// Helper scripts packed beside the init, as `path=sha256` (e.g. the
    /// DHCP wrapper `usr/local/sbin/agentvm-dhcp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub helpers: Vec<String>,
}

impl Inputs {
    /// SHA-256 over a canonical `key=value` line rendering of the inputs.
    /// Lines are fixed in order and values may not hold newlines, so the
    /// rendering is unambiguous and independent of serde or field order.
    pub fn key(&self) -> String {
        let lines = [
            ("format_version", self.format_version.to_string()),
            ("guest_sha256", self.guest_sha256.clone()),
            ("kernel_package", self.kernel_package.clone()),
            ("kernel_version", self.kernel_version.clone()),
            ("busybox_sha256", self.busybox_sha256.clone()),
            ("init_sha256", self.init_sha256.clone()),
            ("modules", self.modules.join(",")),
            ("cmdline", self.cmdline.clone()),
        ];
        let mut s = String::from("agentvm-image-key\n");
        let rootfs = self.rootfs_key.clone().map(|k| ("rootfs_key", k));
        let helpers = (!self.helpers.is_empty()).then(|| ("helpers", self.helpers.join(",")));
        for (k, v) in lines.into_iter().chain(rootfs).chain(helpers) {
            s.push_str(k);
            s.push('=');
            s.push_str(&v.replace('\\', "\\\\").replace('\n', "\\n"));
            s.push('\n');
        }
        sha256_hex(s.as_bytes())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub package: String,
    pub version: String,
    /// `uname -r` in the guest.
    pub release: String,
    pub deb_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusyboxInfo {
    pub version: String,
    pub sha256: String,
    pub applets: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Path inside the guest.
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleInfo {
    pub name: String,
    pub depends: Vec<String>,
}

/// The root file system disk of an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootfsManifest {
    /// File name in the image directory (attached read-only as a virtio
    /// disk with serial `agentvm-rootfs`).
    pub file: String,
    pub size: u64,
    /// `erofs` or `squashfs`.
    pub fs_type: String,
    pub suite: String,
    pub mirror: String,
    pub key: String,
    pub unpacked_bytes: u64,
    pub mmdebstrap_seconds: f64,
    pub pack_seconds: f64,
    /// Every Debian package with its version.
    pub packages: Vec<super::rootfs::DebPackage>,
    /// Installed agent recipes with every package's version and hash.
    pub agents: Vec<super::recipe::Installed>,
}

/// A guest user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub format_version: u32,
    /// The cache key: [`Inputs::key`].
    pub key: String,
    /// Kernel command line to boot with (`-append`).
    pub cmdline: String,
    /// The virtio-serial port name the guest agent listens on.
    pub virtio_port: String,
    pub kernel: KernelInfo,
    pub busybox: BusyboxInfo,
    pub guest: GuestInfo,
    /// Loaded by /init in this order.
    pub modules: Vec<ModuleInfo>,
    /// Wanted modules this kernel has built in.
    pub modules_builtin: Vec<String>,
    /// Optional modules this kernel lacks.
    pub modules_unavailable: Vec<String>,
    pub vmlinuz: FileInfo,
    pub initramfs: FileInfo,
    /// The read-only root file system disk (`agent` image only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RootfsManifest>,
    /// The user commands run as unless a request says otherwise (`None`: root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<UserInfo>,
    pub inputs: Inputs,
    /// RFC 3339 UTC.
    pub built_at: String,
    pub build_seconds: f64,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("manifest serialises");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            format_version: 1,
            guest_sha256: "aa".repeat(32),
            kernel_package: "linux-image-6.1.0-56-cloud-amd64".into(),
            kernel_version: "6.1.192-2".into(),
            busybox_sha256: "bb".repeat(32),
            init_sha256: "cc".repeat(32),
            modules: vec![
                "virtio_ring".into(),
                "virtio".into(),
                "virtio_console".into(),
            ],
            cmdline: "console=ttyS0 panic=1 quiet".into(),
            rootfs_key: None,
            helpers: Vec::new(),
        }
    }

    #[test]
    fn key_is_stable() {
        // A golden value: if this changes, every built image is rebuilt.
        // Only update it together with a deliberate FORMAT_VERSION bump.
        assert_eq!(
            inputs().key(),
            "6615e32c891866a4d03cc0cbe4b29db08c9449d17e053cd6f300750b9356fba0"
        );
        assert_eq!(inputs().key(), inputs().key());
    }

    #[test]
    fn key_changes_with_every_input() {
        let base = inputs().key();
        let variants: [fn(&mut Inputs); 11] = [
            |i| i.format_version += 1,
            |i| i.guest_sha256 = "ab".repeat(32),
            |i| i.kernel_package.push('x'),
            |i| i.kernel_version = "6.1.193-1".into(),
            |i| i.busybox_sha256 = "ba".repeat(32),
            |i| i.init_sha256 = "cd".repeat(32),
            |i| i.modules.swap(0, 1),
            |i| {
                i.modules.pop();
            },
            |i| i.cmdline.push_str(" debug"),
            |i| i.rootfs_key = Some("ee".repeat(32)),
            |i| i.helpers = vec![format!("usr/local/sbin/agentvm-dhcp={}", "ff".repeat(32))],
        ];
        for (n, change) in variants.iter().enumerate() {
            let mut i = inputs();
            change(&mut i);
            assert_ne!(i.key(), base, "variant {n} did not change the key");
        }
    }

    #[test]
    fn escaping_keeps_values_distinct() {
        // A newline and a literal backslash-n must not render the same.
        let mut c = inputs();
        c.cmdline = "a\nb".into();
        let mut d = inputs();
        d.cmdline = r"a\nb".into();
        assert_ne!(c.key(), d.key());
    }

    #[test]
    fn manifest_round_trips_through_json() {
        let m = Manifest {
            name: "default".into(),
            format_version: FORMAT_VERSION,
            key: inputs().key(),
            cmdline: "console=ttyS0".into(),
            virtio_port: "org.agentvm.ctl".into(),
            kernel: KernelInfo {
                package: "p".into(),
                version: "1".into(),
                release: "r".into(),
                deb_sha256: None,
            },
            busybox: BusyboxInfo {
                version: "BusyBox".into(),
                sha256: "bb".into(),
                applets: 3,
            },
            guest: GuestInfo {
                path: "/usr/bin/agentvm-guest".into(),
                sha256: "aa".into(),
                size: 1,
            },
            modules: vec![ModuleInfo {
                name: "virtio".into(),
                depends: vec![],
            }],
            modules_builtin: vec![],
            modules_unavailable: vec![],
            vmlinuz: FileInfo {
                file: "vmlinuz".into(),
                size: 2,
                sha256: "cc".into(),
            },
            initramfs: FileInfo {
                file: "initramfs.cpio.gz".into(),
                size: 3,
                sha256: "dd".into(),
            },
            rootfs: None,
            default_user: None,
            inputs: inputs(),
            built_at: "1970-01-01T00:00:00Z".into(),
            build_seconds: 1.5,
        };
        let back: Manifest = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(back, m);
    }
}
