//! Bringing a restored guest back to the present: after `loadvm` the kernel's
//! wall clock and its random number generator are exactly as they were when
//! the golden snapshot was taken, in every VM started from it. The host sends
//! its time and fresh random bytes ([`ReseedRequest`]); this module sets
//! `CLOCK_REALTIME`, credits the bytes to the kernel's input pool
//! (`RNDADDENTROPY`) and forces a CRNG reseed (`RNDRESEEDCRNG`), so the next
//! read of `/dev/urandom` in any process differs from every other VM's.
//!
//! Only the agent that owns the machine (PID 1) does this: an agent run on a
//! developer's host for tests must never touch the host's clock.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use agentvm_runtime::protocol::{ReseedRequest, MAX_RESEED_ENTROPY};

/// `_IOW('R', 0x03, int[2])` from `<linux/random.h>`: add entropy with credit.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)` from `<linux/random.h>`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Why a reseed could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ReseedError {
    /// This agent is not PID 1, so the clock and RNG are not its own.
    #[error("the guest agent is not PID 1 and leaves the system clock and RNG alone")]
    NotSystemOwner,
    /// Too many entropy bytes.
    #[error("{0} entropy bytes is more than the {MAX_RESEED_ENTROPY} allowed")]
    TooMuchEntropy(usize),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Applies `request` to the running kernel (PID 1 only).
pub fn apply(request: &ReseedRequest) -> Result<(), ReseedError> {
    if std::process::id() != 1 {
        return Err(ReseedError::NotSystemOwner);
    }
    if request.entropy.len() > MAX_RESEED_ENTROPY {
        return Err(ReseedError::TooMuchEntropy(request.entropy.len()));
    }
    set_realtime(request.unix_time)?;
    if !request.entropy.is_empty() {
        add_entropy(&request.entropy)?;
    }
    Ok(())
}

fn set_realtime(since_epoch: std::time::Duration) -> Result<(), ReseedError> {
    let ts = libc::timespec {
        tv_sec: since_epoch.as_secs() as libc::time_t,
        tv_nsec: since_epoch.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec that outlives the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(sys("clock_settime(CLOCK_REALTIME)"));
    }
    Ok(())
}

/// The `struct rand_pool_info` argument of `RNDADDENTROPY`: entropy in bits,
/// buffer size in bytes, then the buffer.
fn rand_pool_info(bytes: &[u8]) -> Vec<u8> {
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    info
}

fn add_entropy(bytes: &[u8]) -> Result<(), ReseedError> {
    let random = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|source| ReseedError::Sys {
            what: "open /dev/urandom",
            source,
        })?;
    let fd = random.as_raw_fd();
    let info = rand_pool_info(bytes);
    // SAFETY: `info` is a complete rand_pool_info (header + buf_size bytes)
    // that lives across the call; the kernel only reads it.
    if unsafe { libc::ioctl(fd, RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(sys("ioctl(RNDADDENTROPY)"));
    }
    // Crediting alone leaves an initialised CRNG on its old key until its
    // next scheduled reseed (up to a minute): force it now.
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(fd, RNDRESEEDCRNG as _) } != 0 {
        return Err(sys("ioctl(RNDRESEEDCRNG)"));
    }
    Ok(())
}

fn sys(what: &'static str) -> ReseedError {
    ReseedError::Sys {
        what,
        source: std::io::Error::last_os_error(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_info_has_bits_size_and_bytes() {
        let info = rand_pool_info(&[1, 2, 3, 4]);
        assert_eq!(&info[0..4], &32i32.to_ne_bytes());
        assert_eq!(&info[4..8], &4i32.to_ne_bytes());
        assert_eq!(&info[8..], &[1, 2, 3, 4]);
    }

    #[test]
    fn ioctl_numbers_match_linux_random_h() {
        // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr
        let ioc = |dir: libc::c_ulong, nr: libc::c_ulong, size: libc::c_ulong| {
            dir << 30 | size << 16 | (b'R' as libc::c_ulong) << 8 | nr
        };
        assert_eq!(RNDADDENTROPY, ioc(1, 0x03, 8));
        assert_eq!(RNDRESEEDCRNG, ioc(0, 0x07, 0));
    }

    #[test]
    fn an_agent_that_is_not_pid_1_changes_nothing() {
        let request = ReseedRequest {
            unix_time: std::time::Duration::from_secs(0),
            entropy: vec![0; 16],
        };
        assert!(matches!(apply(&request), Err(ReseedError::NotSystemOwner)));
    }
}
