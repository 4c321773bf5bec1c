//! Which libvirt host a new VM goes to ([`place`], a pure function), and
//! which hosts share this machine's files ([`is_local_uri`]).

use std::time::Duration;

/// What a host reported just before a VM is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLoad {
    /// Whether the host answers (a host that went away is skipped).
    pub reachable: bool,
    /// Running `agentvm-*` domains on it (of any process), plus VMs this
    /// process is placing there right now.
    pub running: u32,
    /// Its CPUs (`virNodeGetInfo`).
    pub cpus: u32,
    /// Its free memory in MiB (`virNodeGetFreeMemory`).
    pub free_mib: u64,
}

/// Memory a host must have free beyond the guest's RAM to take one more VM
/// (QEMU itself, TCG's translation cache, the host's own needs).
pub const MEMORY_RESERVE_MIB: u64 = 512;

/// The host for the next VM of `vm_mib` MiB: among the reachable hosts with
/// room for it (free memory ≥ `vm_mib` + [`MEMORY_RESERVE_MIB`]), the one
/// with the fewest running VMs per CPU; ties go to the host with more free
/// memory, then to the one listed first. `None`: no host can take it.
pub fn place(hosts: &[HostLoad], vm_mib: u64) -> Option<usize> {
    hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| h.reachable && h.free_mib >= vm_mib + MEMORY_RESERVE_MIB)
        .min_by(|(ia, a), (ib, b)| {
            // running / cpus compared without division: a.r * b.c vs b.r * a.c.
            let load_a = u64::from(a.running) * u64::from(b.cpus.max(1));
            let load_b = u64::from(b.running) * u64::from(a.cpus.max(1));
            load_a
                .cmp(&load_b)
                .then(b.free_mib.cmp(&a.free_mib))
                .then(ia.cmp(ib))
        })
        .map(|(i, _)| i)
}

/// Whether a host that went away is due for another try: `lost_for` since
/// it was last found unreachable, against the back-off `retry_after`.
pub fn due_for_retry(lost_for: Duration, retry_after: Duration) -> bool {
    lost_for >= retry_after
}

/// Whether the libvirt daemon at `uri` runs on this machine and its QEMUs
/// see this machine's files: a URI with no transport (`+…`), no host name
/// and no query (such as `socket=`), like `qemu:///system` or
/// `qemu:///session`. Every other host is treated as remote: the image is
/// uploaded through the storage API and the control channel and console go
/// through libvirt streams, even when it happens to be on this machine.
pub fn is_local_uri(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return false;
    };
    !scheme.contains('+') && rest.starts_with('/') && !rest.contains('?')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(running: u32, cpus: u32, free_mib: u64) -> HostLoad {
        HostLoad {
            reachable: true,
            running,
            cpus,
            free_mib,
        }
    }

    #[test]
    fn fewest_vms_per_cpu_wins() {
        let hosts = [host(2, 2, 8000), host(1, 2, 8000)];
        assert_eq!(place(&hosts, 256), Some(1));
        // 4 VMs on 8 CPUs is less loaded than 1 VM on 1 CPU.
        let hosts = [host(1, 1, 8000), host(4, 8, 8000)];
        assert_eq!(place(&hosts, 256), Some(1));
    }

    #[test]
    fn ties_go_to_more_free_memory_then_to_the_first_listed() {
        assert_eq!(place(&[host(0, 2, 4000), host(0, 2, 9000)], 256), Some(1));
        assert_eq!(place(&[host(1, 2, 4000), host(1, 2, 4000)], 256), Some(0));
    }

    #[test]
    fn a_pool_of_two_over_two_equal_hosts_uses_both() {
        let mut hosts = [host(0, 2, 8000), host(0, 2, 8000)];
        let first = place(&hosts, 256).unwrap();
        hosts[first].running += 1;
        let second = place(&hosts, 256).unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn unreachable_and_full_hosts_are_skipped() {
        let mut gone = host(0, 64, 100_000);
        gone.reachable = false;
        assert_eq!(place(&[gone, host(5, 2, 8000)], 256), Some(1));
        // 700 MiB free cannot take a 256 MiB guest plus the reserve.
        assert_eq!(place(&[host(0, 2, 700), host(3, 2, 8000)], 256), Some(1));
        assert_eq!(place(&[host(0, 2, 700)], 256), None);
        assert_eq!(place(&[gone], 256), None);
        assert_eq!(place(&[], 256), None);
    }

    #[test]
    fn zero_cpus_reported_counts_as_one() {
        assert_eq!(place(&[host(1, 0, 8000), host(1, 4, 8000)], 256), Some(1));
    }

    #[test]
    fn retry_back_off() {
        let after = Duration::from_secs(30);
        assert!(!due_for_retry(Duration::from_secs(29), after));
        assert!(due_for_retry(Duration::from_secs(30), after));
    }

    #[test]
    fn local_and_remote_uris() {
        for local in ["qemu:///system", "qemu:///session", "test:///default"] {
            assert!(is_local_uri(local), "{local}");
        }
        for remote in [
            "qemu+ssh://ci@host.example/system",
            "qemu+unix:///system?socket=/run/agentvm-libvirt2/libvirt-sock",
            "qemu://host.example/system",
            "qemu+tcp://10.0.0.2/system",
            "qemu:///system?socket=/run/other/libvirt-sock",
            "garbage",
        ] {
            assert!(!is_local_uri(remote), "{remote}");
        }
    }
}
