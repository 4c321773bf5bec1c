//! Parsers of single values (durations, network modes, names, numbers,
//! lists), shared by the file and the environment, and the "expected ..."
//! texts of their error messages. Each parser is pure and returns `None` for
//! a value it does not accept; [`Setter`] turns that into a
//! [`ConfigError::Invalid`] naming where the value came from.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::ConfigError;
use super::settings::{BackendKind, ANOMALY_KINDS};
use crate::spec::{Accel, NetworkMode};

pub(super) const PROFILES: &str = "\"minimal\", \"light\", \"standard\", \"intensive\"";
pub(super) const NETWORKS: &str =
    "\"gateway\", \"allowlist\", \"isolated\", \"nat-filtered\", \"bridge:NAME\"";
pub(super) const ALLOW: &str =
    "host[:port] patterns such as \"api.example.com:443\" or \"*.example.com\"";
pub(super) const ACCELS: &str = "\"auto\", \"kvm\", \"tcg\"";
pub(super) const BACKENDS: &str = "\"qemu\", \"libvirt\", \"mock\"";
pub(super) const DURATIONS: &str =
    "a number of seconds or a duration like \"500ms\", \"30s\", \"2m\", \"1m30s\" (more than zero)";

pub(super) const IMAGE_NAMES: &str = "a non-empty name of ASCII letters, digits, '.', '_', '-'";
pub(super) const BOOLS: &str = "true or false (also 1/0, on/off, yes/no)";
pub(super) const PORTS: &str = "a port number from 1 to 65535";
pub(super) const COUNTS: &str = "a whole number (0 or more)";
pub(super) const POSITIVE: &str = "a whole number, 1 or more";

/// Parses one setting's value; `origin` names where it came from, given
/// the key.
pub(super) struct Setter<'a> {
    pub(super) origin: &'a dyn Fn(&str) -> String,
}

impl Setter<'_> {
    pub(super) fn parse<T>(
        &self,
        key: &'static str,
        value: &str,
        parse: impl FnOnce(&str) -> Option<T>,
        expected: &str,
    ) -> Result<T, ConfigError> {
        parse(value).ok_or_else(|| ConfigError::Invalid {
            origin: (self.origin)(key),
            key,
            value: value.to_string(),
            expected: expected.to_string(),
        })
    }
}

/// Parses a backend name (`qemu`, `libvirt`, `mock`).
pub fn parse_backend(s: &str) -> Option<BackendKind> {
    match s {
        "qemu" => Some(BackendKind::Qemu),
        "mock" => Some(BackendKind::Mock),
        "libvirt" => Some(BackendKind::Libvirt),
        _ => None,
    }
}

/// Parses an accelerator name (`auto`, `kvm`, `tcg`).
pub fn parse_accel(s: &str) -> Option<Accel> {
    match s {
        "auto" => Some(Accel::Auto),
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        _ => None,
    }
}

/// Parses a network mode: `gateway`, `allowlist`, `isolated`, `nat-filtered`
/// (also spelt `nat_filtered`) or `bridge:NAME` (an
/// interface name of at most 15 characters without `/`, `:` or whitespace).
pub fn parse_network(s: &str) -> Option<NetworkMode> {
    match s {
        "isolated" => Some(NetworkMode::Isolated),
        "gateway" => Some(NetworkMode::Gateway),
        "allowlist" => Some(NetworkMode::Allowlist),
        "nat-filtered" | "nat_filtered" => Some(NetworkMode::NatFiltered),
        _ => {
            let name = s.strip_prefix("bridge:")?;
            let ok = !name.is_empty()
                && name.len() <= 15
                && name
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != '/' && c != ':');
            ok.then(|| NetworkMode::Bridge(name.to_string()))
        }
    }
}

/// Whether `name` is a valid image name: ASCII letters, digits, `.`, `_`,
/// `-`, not empty and not `.` or `..`.
pub fn is_valid_image_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

pub(super) fn parse_image_name(s: &str) -> Option<String> {
    is_valid_image_name(s).then(|| s.to_string())
}

pub(super) fn parse_dir(s: &str, base: &Path) -> Option<PathBuf> {
    (!s.is_empty()).then(|| base.join(s))
}

/// What `fail_on` accepts, for error messages: [`ANOMALY_KINDS`], quoted.
pub(super) fn anomaly_kind_list() -> String {
    let kinds: Vec<String> = ANOMALY_KINDS.iter().map(|k| format!("{k:?}")).collect();
    format!("anomaly kinds from {} (comma-separated)", kinds.join(", "))
}

/// A comma-separated list of `host[:port]` patterns (empty entries ignored).
/// Only the shape is checked here: no spaces, `/` or `@`, a numeric port;
/// the harness's egress proxy parses them fully when a test starts.
pub(super) fn parse_allow(s: &str) -> Option<Vec<String>> {
    let mut entries = Vec::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (host, port) = match entry.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (entry, None),
        };
        let bad_host =
            host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@');
        if bad_host || port.is_some_and(|p| p.parse::<u16>().is_err()) {
            return None;
        }
        entries.push(entry.to_string());
    }
    Some(entries)
}

/// What `libvirt.hosts` / `AGENT_VM_LIBVIRT_HOSTS` accept.
pub(super) const HOST_URIS: &str =
    "libvirt connection URIs such as \"qemu:///system\" or \"qemu+ssh://user@host.example/system\" \
     (comma-separated in the variable), each at most once";

/// A comma-separated list of libvirt connection URIs (empty entries
/// ignored): each must look like a URI (`scheme:...`, no whitespace) and
/// appear once.
pub(super) fn parse_host_uris(s: &str) -> Option<Vec<String>> {
    let mut uris: Vec<String> = Vec::new();
    for uri in s.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let scheme = uri.split_once(':')?.0;
        let valid = !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            && !uri.contains(char::is_whitespace);
        if !valid || uris.iter().any(|u| u == uri) {
            return None;
        }
        uris.push(uri.to_string());
    }
    Some(uris)
}

/// A comma-separated list of anomaly kinds (empty entries ignored).
pub(super) fn parse_kinds(s: &str) -> Option<Vec<String>> {
    let mut kinds = Vec::new();
    for kind in s.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        if !ANOMALY_KINDS.contains(&kind) {
            return None;
        }
        if !kinds.iter().any(|k| k == kind) {
            kinds.push(kind.to_string());
        }
    }
    Some(kinds)
}

pub(super) fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        _ => None,
    }
}

pub(super) fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|&p| p > 0)
}

pub(super) fn parse_count(s: &str) -> Option<usize> {
    s.parse::<usize>().ok()
}

pub(super) fn parse_positive(s: &str) -> Option<usize> {
    s.parse::<usize>().ok().filter(|&n| n > 0)
}

/// Parses a duration: a whole number of seconds (`"30"`) or numbers with units
/// largest first (`"500ms"`, `"30s"`, `"2m"`, `"1h"`, `"1m30s"`). Zero is
/// rejected.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().ok()?;
        return (secs > 0).then(|| Duration::from_secs(secs));
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut last_unit_rank = u8::MAX;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit_len, rank, unit) = if rest.starts_with("ms") {
            (2, 0, Duration::from_millis(1))
        } else if rest.starts_with('s') {
            (1, 1, Duration::from_secs(1))
        } else if rest.starts_with('m') {
            (1, 2, Duration::from_secs(60))
        } else if rest.starts_with('h') {
            (1, 3, Duration::from_secs(3600))
        } else {
            return None;
        };
        if rank >= last_unit_rank {
            return None;
        }
        last_unit_rank = rank;
        rest = &rest[unit_len..];
        total = total.checked_add(unit.checked_mul(u32::try_from(number).ok()?)?)?;
    }
    (!total.is_zero()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s| parse_duration(s);
        assert_eq!(d("30"), Some(Duration::from_secs(30)));
        assert_eq!(d("30s"), Some(Duration::from_secs(30)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("2m"), Some(Duration::from_secs(120)));
        assert_eq!(d("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(d("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(d("1s500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(d(" 5s "), Some(Duration::from_secs(5)));
        for bad in [
            "",
            "0",
            "0s",
            "s",
            "5x",
            "30s1m",
            "5s5s",
            "1.5s",
            "-1",
            "5 s",
            "99999999999999h",
        ] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }

    #[test]
    fn host_uris() {
        assert_eq!(
            parse_host_uris(" qemu:///system, qemu+unix:///system?socket=/run/x/sock ,"),
            Some(vec![
                "qemu:///system".to_string(),
                "qemu+unix:///system?socket=/run/x/sock".to_string()
            ])
        );
        assert_eq!(parse_host_uris(""), Some(vec![]));
        for bad in [
            "localhost",
            ":///system",
            "qemu:///system,qemu:///system",
            "qemu+ssh://a b/system",
        ] {
            assert_eq!(parse_host_uris(bad), None, "{bad}");
        }
    }

    #[test]
    fn networks() {
        assert_eq!(parse_network("isolated"), Some(NetworkMode::Isolated));
        assert_eq!(parse_network("gateway"), Some(NetworkMode::Gateway));
        assert_eq!(parse_network("allowlist"), Some(NetworkMode::Allowlist));
        for spelling in ["nat-filtered", "nat_filtered"] {
            assert_eq!(parse_network(spelling), Some(NetworkMode::NatFiltered));
        }
        assert_eq!(
            parse_network("bridge:virbr0"),
            Some(NetworkMode::Bridge("virbr0".into()))
        );
        for bad in [
            "",
            "nat",
            "bridge:",
            "bridge:a/b",
            "bridge:waytoolongname01",
            "bridge:a b",
        ] {
            assert_eq!(parse_network(bad), None, "{bad}");
        }
    }
}
