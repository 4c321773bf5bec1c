//! Control-channel transport selection: virtio-serial or virtio-vsock.
//!
//! virtio-serial (a `virtserialport` backed by a host UNIX socket) works on
//! every host. virtio-vsock needs `/dev/vhost-vsock` on the host: QEMU gets
//! a `vhost-vsock-device` with a per-VM guest CID, the guest's init starts
//! the agent on vsock port [`super::argv::VSOCK_PORT`] (`agentvm.vsock=` on
//! the kernel command line), and the host connects with tokio-vsock. The
//! golden cache needs virtio-serial (a restored VM keeps its saved CID).

use std::fmt;
use std::path::Path;

/// The environment variable that overrides the transport (`serial`, `vsock`, `auto`).
pub const TRANSPORT_ENV: &str = "AGENT_VM_TRANSPORT";

/// Whether this build can connect to a guest over vsock.
pub const VSOCK_CONNECT_SUPPORTED: bool = true;

/// The host device that vhost-vsock needs.
pub const VHOST_VSOCK_DEVICE: &str = "/dev/vhost-vsock";

/// How host and guest agent talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `virtserialport` named `org.agentvm.ctl`, host end a UNIX socket.
    VirtioSerial,
    /// `vhost-vsock-device` with a per-VM guest CID.
    Vsock,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::VirtioSerial => "virtio-serial",
            Self::Vsock => "vsock",
        })
    }
}

/// A transport choice and why it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportDecision {
    /// The choice.
    pub transport: Transport,
    /// Human-readable reason.
    pub reason: String,
}

/// Chooses the transport.
///
/// * `vhost_vsock_present`: whether the host has [`VHOST_VSOCK_DEVICE`].
/// * `vsock_supported`: whether this build can connect over vsock
///   (normally [`VSOCK_CONNECT_SUPPORTED`]).
/// * `override_value`: the value of [`TRANSPORT_ENV`], if set. An explicit
///   `vsock` is honoured even without the device (QEMU then fails loudly).
pub fn choose_transport(
    vhost_vsock_present: bool,
    vsock_supported: bool,
    override_value: Option<&str>,
) -> TransportDecision {
    let mut note = String::new();
    if let Some(value) = override_value {
        match value.trim().to_ascii_lowercase().as_str() {
            "serial" | "virtio-serial" => {
                return TransportDecision {
                    transport: Transport::VirtioSerial,
                    reason: format!("{TRANSPORT_ENV}={value}"),
                };
            }
            "vsock" => {
                return TransportDecision {
                    transport: Transport::Vsock,
                    reason: format!("{TRANSPORT_ENV}={value}"),
                };
            }
            "auto" | "" => {}
            _ => {
                note = format!(
                    " (ignored invalid {TRANSPORT_ENV}={value:?}; expected serial, vsock or auto)"
                )
            }
        }
    }
    let (transport, why) = match (vhost_vsock_present, vsock_supported) {
        (true, true) => (Transport::Vsock, "auto: /dev/vhost-vsock present"),
        (true, false) => (
            Transport::VirtioSerial,
            "auto: /dev/vhost-vsock present but this build has no vsock client",
        ),
        (false, _) => (Transport::VirtioSerial, "auto: no /dev/vhost-vsock"),
    };
    TransportDecision {
        transport,
        reason: format!("{why}{note}"),
    }
}

/// Reads the environment and the host device, decides, and logs the choice.
pub fn detect_transport() -> TransportDecision {
    let env = std::env::var(TRANSPORT_ENV).ok();
    let decision = choose_transport(
        Path::new(VHOST_VSOCK_DEVICE).exists(),
        VSOCK_CONNECT_SUPPORTED,
        env.as_deref(),
    );
    tracing::info!(transport = %decision.transport, reason = %decision.reason, "control channel transport chosen");
    decision
}

/// A guest CID for vhost-vsock: unique per (host process, VM counter) in
/// practice, and never one of the reserved CIDs 0–2 or `u32::MAX`.
pub fn guest_cid(host_pid: u32, vm_counter: u64) -> u32 {
    // 3 ..= u32::MAX - 1
    let span = u64::from(u32::MAX) - 3;
    let mixed = (u64::from(host_pid) << 20) ^ vm_counter;
    (3 + mixed % span) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_serial_without_device() {
        assert_eq!(
            choose_transport(false, true, None).transport,
            Transport::VirtioSerial
        );
        assert_eq!(
            choose_transport(false, false, None).transport,
            Transport::VirtioSerial
        );
    }

    #[test]
    fn auto_uses_vsock_only_when_device_and_build_support_it() {
        assert_eq!(
            choose_transport(true, true, None).transport,
            Transport::Vsock
        );
        let d = choose_transport(true, false, Some("auto"));
        assert_eq!(d.transport, Transport::VirtioSerial);
        assert!(d.reason.contains("no vsock client"), "{}", d.reason);
    }

    #[test]
    fn override_wins() {
        assert_eq!(
            choose_transport(true, true, Some("serial")).transport,
            Transport::VirtioSerial
        );
        assert_eq!(
            choose_transport(true, true, Some("virtio-serial")).transport,
            Transport::VirtioSerial
        );
        assert_eq!(
            choose_transport(false, false, Some("VSOCK")).transport,
            Transport::Vsock
        );
        let d = choose_transport(false, false, Some("carrier-pigeon"));
        assert_eq!(d.transport, Transport::VirtioSerial);
        assert!(d.reason.contains("ignored invalid"), "{}", d.reason);
    }

    #[test]
    fn guest_cids_avoid_reserved_values() {
        for pid in [0, 1, 4242, u32::MAX] {
            for n in [0, 1, 2, u64::MAX] {
                let cid = guest_cid(pid, n);
                assert!((3..u32::MAX).contains(&cid), "{cid}");
            }
        }
        assert_ne!(guest_cid(100, 0), guest_cid(100, 1));
    }
}
