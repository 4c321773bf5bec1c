//! Accelerator selection: KVM only where it really works, TCG everywhere else.
//!
//! `/dev/kvm` alone is not trusted: on the machines this project was measured
//! on, `/dev/kvm` exists but is a nested PVM hypervisor that hangs stock guest
//! kernels, and `/proc/cpuinfo` shows no `vmx`/`svm` flag. So KVM is chosen
//! automatically only when the device opens read-write *and* the CPU
//! advertises hardware virtualisation. `AGENT_VM_ACCEL=kvm|tcg|auto`
//! overrides the automatic choice.
//!
//! [`decide`] is pure (unit-tested); [`detect`] reads the system.

use std::fmt;

use crate::spec::Accel;

/// The environment variable that overrides automatic detection.
pub const ACCEL_ENV: &str = "AGENT_VM_ACCEL";

/// The accelerator QEMU is actually started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedAccel {
    /// Hardware virtualisation (`-accel kvm -cpu host`).
    Kvm,
    /// Software emulation (`-accel tcg -cpu max`).
    Tcg,
}

impl ResolvedAccel {
    /// The name QEMU uses (`kvm`, `tcg`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

impl fmt::Display for ResolvedAccel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An accelerator choice and why it was made (for logs and `doctor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    /// The choice.
    pub accel: ResolvedAccel,
    /// Human-readable reason.
    pub reason: String,
}

/// Parses an accelerator name (`kvm`, `tcg`, `auto`; case and surrounding
/// blanks ignored). `None` for anything else.
pub fn parse_accel(value: &str) -> Option<Accel> {
    match value.trim().to_ascii_lowercase().as_str() {
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        "auto" | "" => Some(Accel::Auto),
        _ => None,
    }
}

/// Whether `/proc/cpuinfo` text advertises hardware virtualisation
/// (`vmx` for Intel VT-x, `svm` for AMD-V) on a `flags` line.
pub fn cpu_has_virtualization(cpuinfo: &str) -> bool {
    cpuinfo.lines().any(|line| {
        let Some((key, value)) = line.split_once(':') else {
            return false;
        };
        key.trim() == "flags"
            && value
                .split_whitespace()
                .any(|flag| flag == "vmx" || flag == "svm")
    })
}

/// Decides the accelerator.
///
/// * `requested`: what the [`VmSpec`](crate::spec::VmSpec) asks for; an explicit
///   `Kvm`/`Tcg` wins over everything (it is the per-test setting).
/// * `env`: the value of [`ACCEL_ENV`], if set; an explicit value wins over detection.
/// * `cpuinfo`: the text of `/proc/cpuinfo`.
/// * `kvm_usable`: whether `/dev/kvm` could be opened read-write.
pub fn decide(
    requested: Accel,
    env: Option<&str>,
    cpuinfo: &str,
    kvm_usable: bool,
) -> AccelDecision {
    match requested {
        Accel::Kvm => {
            return AccelDecision {
                accel: ResolvedAccel::Kvm,
                reason: "requested by the VM spec".into(),
            };
        }
        Accel::Tcg => {
            return AccelDecision {
                accel: ResolvedAccel::Tcg,
                reason: "requested by the VM spec".into(),
            };
        }
        Accel::Auto => {}
    }
    let mut note = String::new();
    if let Some(value) = env {
        match parse_accel(value) {
            Some(Accel::Kvm) => {
                return AccelDecision {
                    accel: ResolvedAccel::Kvm,
                    reason: format!("{ACCEL_ENV}={value}"),
                };
            }
            Some(Accel::Tcg) => {
                return AccelDecision {
                    accel: ResolvedAccel::Tcg,
                    reason: format!("{ACCEL_ENV}={value}"),
                };
            }
            Some(Accel::Auto) => {}
            None => {
                note =
                    format!(" (ignored invalid {ACCEL_ENV}={value:?}; expected kvm, tcg or auto)")
            }
        }
    }
    let has_flags = cpu_has_virtualization(cpuinfo);
    let (accel, why) = match (kvm_usable, has_flags) {
        (true, true) => (ResolvedAccel::Kvm, "/dev/kvm usable and CPU has vmx/svm"),
        (true, false) => (
            ResolvedAccel::Tcg,
            "/dev/kvm present but CPU lacks vmx/svm (nested/paravirtual KVM that may hang guests)",
        ),
        (false, true) => (
            ResolvedAccel::Tcg,
            "CPU has vmx/svm but /dev/kvm is not usable",
        ),
        (false, false) => (ResolvedAccel::Tcg, "no usable /dev/kvm"),
    };
    AccelDecision {
        accel,
        reason: format!("auto: {why}{note}"),
    }
}

/// The host's TSC frequency in kHz, from `/proc/cpuinfo` text: the first
/// `cpu MHz` value, trusted only when the CPU has `constant_tsc` (then that
/// value is the TSC rate, not a momentary core clock).
///
/// Under TCG the guest TSC ticks at the host TSC rate, and the guest kernel
/// calibrates it against the emulated PIT. On a loaded host (two cores
/// shared by several VMs and a compiler) that calibration fails ("Fast TSC
/// calibration failed", "Unable to calibrate against PIT") and the boot
/// stalls; measured here: 2 of 2 boots stuck for 45 s without the hint, 2 of
/// 2 up in ~21 s with `tsc_early_khz=` set. So the backend passes this value.
pub fn host_tsc_khz(cpuinfo: &str) -> Option<u32> {
    let constant = cpuinfo.lines().any(|line| {
        line.split_once(':').is_some_and(|(k, v)| {
            k.trim() == "flags" && v.split_whitespace().any(|f| f == "constant_tsc")
        })
    });
    if !constant {
        return None;
    }
    let mhz: f64 = cpuinfo.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == "cpu MHz").then(|| v.trim().parse().ok())?
    })?;
    let khz = (mhz * 1000.0).round();
    (khz >= 1.0 && khz < f64::from(u32::MAX)).then_some(khz as u32)
}

/// Reads [`host_tsc_khz`] from `/proc/cpuinfo`.
pub fn detect_host_tsc_khz() -> Option<u32> {
    host_tsc_khz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// Whether `/dev/kvm` opens read-write for this process.
pub fn kvm_device_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Reads the environment, `/proc/cpuinfo` and `/dev/kvm`, decides, and logs the choice.
pub fn detect(requested: Accel) -> AccelDecision {
    let env = std::env::var(ACCEL_ENV).ok();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let decision = decide(requested, env.as_deref(), &cpuinfo, kvm_device_usable());
    tracing::info!(accel = %decision.accel, reason = %decision.reason, "qemu accelerator chosen");
    decision
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &str =
        "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse vmx ssse3\n";
    const AMD: &str = "processor\t: 0\nflags\t\t: fpu svm sse2\n";
    const NONE: &str =
        "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr hypervisor\nbugs\t\t: vmx_bug\n";

    #[test]
    fn cpu_flags_detection() {
        assert!(cpu_has_virtualization(INTEL));
        assert!(cpu_has_virtualization(AMD));
        assert!(!cpu_has_virtualization(NONE));
        assert!(!cpu_has_virtualization(""));
        // A word merely containing "vmx" is not the flag.
        assert!(!cpu_has_virtualization("flags : vmxnet avx\n"));
    }

    #[test]
    fn parse_names() {
        assert_eq!(parse_accel("kvm"), Some(Accel::Kvm));
        assert_eq!(parse_accel(" TCG \n"), Some(Accel::Tcg));
        assert_eq!(parse_accel("auto"), Some(Accel::Auto));
        assert_eq!(parse_accel(""), Some(Accel::Auto));
        assert_eq!(parse_accel("hvf"), None);
    }

    #[test]
    fn auto_needs_both_device_and_flags() {
        assert_eq!(
            decide(Accel::Auto, None, INTEL, true).accel,
            ResolvedAccel::Kvm
        );
        // This machine: /dev/kvm exists (PVM) but no flags.
        let d = decide(Accel::Auto, None, NONE, true);
        assert_eq!(d.accel, ResolvedAccel::Tcg);
        assert!(d.reason.contains("lacks vmx/svm"), "{}", d.reason);
        assert_eq!(
            decide(Accel::Auto, None, INTEL, false).accel,
            ResolvedAccel::Tcg
        );
        assert_eq!(
            decide(Accel::Auto, None, NONE, false).accel,
            ResolvedAccel::Tcg
        );
    }

    #[test]
    fn env_overrides_detection() {
        assert_eq!(
            decide(Accel::Auto, Some("kvm"), NONE, false).accel,
            ResolvedAccel::Kvm
        );
        assert_eq!(
            decide(Accel::Auto, Some("tcg"), INTEL, true).accel,
            ResolvedAccel::Tcg
        );
        assert_eq!(
            decide(Accel::Auto, Some("auto"), INTEL, true).accel,
            ResolvedAccel::Kvm
        );
        let d = decide(Accel::Auto, Some("fast"), INTEL, true);
        assert_eq!(d.accel, ResolvedAccel::Kvm);
        assert!(d.reason.contains("ignored invalid"), "{}", d.reason);
    }

    #[test]
    fn tsc_rate_from_cpuinfo() {
        let host = "model name\t: AMD EPYC\ncpu MHz\t\t: 2596.120\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n";
        assert_eq!(host_tsc_khz(host), Some(2_596_120));
        let varying = "cpu MHz\t\t: 1200.000\nflags\t\t: fpu tsc\n";
        assert_eq!(host_tsc_khz(varying), None);
        assert_eq!(host_tsc_khz("flags : constant_tsc\n"), None);
        assert_eq!(
            host_tsc_khz("cpu MHz : nan-ish\nflags : constant_tsc\n"),
            None
        );
    }

    #[test]
    fn explicit_spec_wins_over_env() {
        assert_eq!(
            decide(Accel::Tcg, Some("kvm"), INTEL, true).accel,
            ResolvedAccel::Tcg
        );
        assert_eq!(
            decide(Accel::Kvm, Some("tcg"), NONE, false).accel,
            ResolvedAccel::Kvm
        );
    }
}
