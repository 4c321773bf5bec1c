//! Parsing and validation of the `#[agent_vm_test(...)]` arguments.
//!
//! Everything here works on `proc_macro2` tokens so it can be unit tested.
//! Every error is a `syn::Error` spanned at the offending argument or value,
//! and all argument errors are reported at once.

use std::path::{Path, PathBuf};

use proc_macro2::TokenStream;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Lit, LitStr, Meta, Token};

/// The names `#[agent_vm_test]` accepts, in documentation order.
pub const KNOWN_ARGS: &[&str] = &[
    "timeout",
    "profile",
    "image",
    "network",
    "allow",
    "memory_mib",
    "vcpus",
    "ignore",
    "fixtures",
];

/// Resource profiles accepted by `profile = "..."`.
pub const PROFILES: &[&str] = &["minimal", "light", "standard", "intensive"];

/// Range accepted by `memory_mib = N`.
pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = 64..=65536;

/// Range accepted by `vcpus = N`.
pub const VCPUS: std::ops::RangeInclusive<u64> = 1..=64;

/// The longest Linux network interface name (IFNAMSIZ - 1).
const MAX_BRIDGE_NAME: usize = 15;

/// The validated arguments of one `#[agent_vm_test(...)]`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TestArgs {
    /// `timeout = "..."`, in milliseconds (> 0).
    pub timeout_ms: Option<u64>,
    /// `profile = "..."`, one of [`PROFILES`].
    pub profile: Option<String>,
    /// `image = "..."`.
    pub image: Option<String>,
    /// `network = "..."`: `gateway`, `allowlist`, `isolated`,
    /// `nat-filtered` (or `nat_filtered`) or `bridge:NAME`.
    pub network: Option<String>,
    /// `allow = ["host:port", ...]`: egress allowlist patterns.
    pub allow: Option<Vec<String>>,
    /// `memory_mib = N`.
    pub memory_mib: Option<u32>,
    /// `vcpus = N`.
    pub vcpus: Option<u32>,
    /// `ignore` (`Some(None)`) or `ignore = "reason"` (`Some(Some(reason))`).
    pub ignore: Option<Option<String>>,
    /// `fixtures(...)`: absolute paths, checked to exist.
    pub fixtures: Option<Vec<String>>,
}

/// Parses and validates the attribute's arguments. Relative fixture paths are
/// resolved against `manifest_dir` (the test crate's `CARGO_MANIFEST_DIR`).
pub fn parse_args(tokens: TokenStream, manifest_dir: &Path) -> syn::Result<TestArgs> {
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(tokens)?;
    let mut args = TestArgs::default();
    let mut errors = Errors::default();
    let mut seen: Vec<String> = Vec::new();
    for meta in metas {
        // A repeated known argument is reported as such, whatever its value.
        if let Some(ident) = meta.path().get_ident() {
            let name = ident.to_string();
            if seen.contains(&name) {
                errors.push(syn::Error::new(
                    ident.span(),
                    format!("duplicate argument `{name}`: it may be given only once"),
                ));
                continue;
            }
            if KNOWN_ARGS.contains(&name.as_str()) {
                seen.push(name);
            }
        }
        if let Err(e) = apply(&mut args, &meta, manifest_dir) {
            errors.push(e);
        }
    }
    errors.finish()?;
    Ok(args)
}

/// Collects several errors into one `syn::Error`.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub(crate) fn finish(self) -> syn::Result<()> {
        match self.0 {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn apply(args: &mut TestArgs, meta: &Meta, manifest_dir: &Path) -> syn::Result<()> {
    let path = meta.path();
    let Some(ident) = path.get_ident() else {
        return Err(syn::Error::new_spanned(
            path,
            format!(
                "expected an argument name, one of: {}",
                KNOWN_ARGS.join(", ")
            ),
        ));
    };
    let name = ident.to_string();
    let span = ident.span();
    match name.as_str() {
        "timeout" => {
            let lit = string_value(meta, &name, "\"30s\"")?;
            args.timeout_ms = Some(
                parse_duration_ms(&lit.value()).map_err(|msg| syn::Error::new(lit.span(), msg))?,
            );
        }
        "profile" => {
            let lit = string_value(meta, &name, "\"light\"")?;
            let value = lit.value();
            if !PROFILES.contains(&value.as_str()) {
                return Err(syn::Error::new(
                    lit.span(),
                    format!(
                        "unknown profile `{value}`: expected one of {}",
                        quoted_list(PROFILES)
                    ),
                ));
            }
            args.profile = Some(value);
        }
        "image" => {
            let lit = string_value(meta, &name, "\"default\"")?;
            let value = lit.value();
            if value.is_empty() || !value.chars().all(is_name_char) {
                return Err(syn::Error::new(
                    lit.span(),
                    format!(
                        "invalid image name {value:?}: expected a non-empty name made of \
                         ASCII letters, digits, `.`, `_` and `-`"
                    ),
                ));
            }
            args.image = Some(value);
        }
        "network" => {
            let lit = string_value(meta, &name, "\"isolated\"")?;
            let value = lit.value();
            validate_network(&value).map_err(|msg| syn::Error::new(lit.span(), msg))?;
            args.network = Some(value);
        }
        "allow" => {
            let array = match meta {
                Meta::NameValue(syn::MetaNameValue {
                    value: Expr::Array(array),
                    ..
                }) => array,
                _ => {
                    return Err(syn::Error::new_spanned(
                        meta,
                        "`allow` takes a list of host[:port] patterns: \
                         `allow = [\"api.example.com:443\", \"*.example.org\"]`",
                    ))
                }
            };
            let mut entries = Vec::with_capacity(array.elems.len());
            let mut errors = Errors::default();
            for elem in &array.elems {
                let lit = match expect_str(elem, "allow", "[\"api.example.com:443\"]") {
                    Ok(lit) => lit,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                };
                match validate_allow_entry(&lit.value()) {
                    Ok(()) => entries.push(lit.value()),
                    Err(msg) => errors.push(syn::Error::new(lit.span(), msg)),
                }
            }
            errors.finish()?;
            if entries.is_empty() {
                return Err(syn::Error::new_spanned(
                    array,
                    "`allow = []` allows nothing: leave it out, or list host[:port] patterns",
                ));
            }
            args.allow = Some(entries);
        }
        "memory_mib" => {
            let value = int_value(meta, &name, "512", MEMORY_MIB, " MiB")?;
            args.memory_mib = Some(value);
        }
        "vcpus" => {
            let value = int_value(meta, &name, "2", VCPUS, "")?;
            args.vcpus = Some(value);
        }
        "ignore" => {
            let reason = match meta {
                Meta::Path(_) => None,
                Meta::NameValue(nv) => {
                    let lit = expect_str(&nv.value, &name, "\"needs network\"")?;
                    let reason = lit.value();
                    if reason.trim().is_empty() {
                        return Err(syn::Error::new(
                            lit.span(),
                            "empty ignore reason: write plain `ignore`, or give a reason \
                             like `ignore = \"needs network\"`",
                        ));
                    }
                    Some(reason)
                }
                Meta::List(list) => {
                    return Err(syn::Error::new(
                        list.delimiter.span().join(),
                        "`ignore` takes no list: write `ignore` or `ignore = \"reason\"`",
                    ));
                }
            };
            args.ignore = Some(reason);
        }
        "fixtures" => {
            let Meta::List(list) = meta else {
                return Err(syn::Error::new_spanned(
                    meta,
                    "`fixtures` takes a list of paths: `fixtures(\"tests/fixtures/repo1\", ...)`",
                ));
            };
            let paths = Punctuated::<LitStr, Token![,]>::parse_terminated
                .parse2(list.tokens.clone())
                .map_err(|e| {
                    syn::Error::new(
                        e.span(),
                        "expected string literals: `fixtures(\"tests/fixtures/repo1\", ...)`",
                    )
                })?;
            if paths.is_empty() {
                return Err(syn::Error::new(
                    list.delimiter.span().join(),
                    "`fixtures(...)` needs at least one path, like \
                     `fixtures(\"tests/fixtures/repo1\")`",
                ));
            }
            let mut resolved = Vec::with_capacity(paths.len());
            let mut errors = Errors::default();
            for lit in &paths {
                match resolve_fixture(&lit.value(), manifest_dir) {
                    Ok(path) if resolved.contains(&path) => errors.push(syn::Error::new(
                        lit.span(),
                        format!("fixture {:?} is listed twice", lit.value()),
                    )),
                    Ok(path) => resolved.push(path),
                    Err(msg) => errors.push(syn::Error::new(lit.span(), msg)),
                }
            }
            errors.finish()?;
            args.fixtures = Some(resolved);
        }
        _ => {
            let mut msg = format!("unknown argument `{name}`");
            if let Some(closest) = closest_known(&name) {
                msg.push_str(&format!(": did you mean `{closest}`?"));
            }
            msg.push_str(&format!(" (known arguments: {})", KNOWN_ARGS.join(", ")));
            return Err(syn::Error::new(span, msg));
        }
    }
    Ok(())
}

/// The string literal of `name = "..."`, or an error saying how to write it.
fn string_value(meta: &Meta, name: &str, example: &str) -> syn::Result<LitStr> {
    match meta {
        Meta::NameValue(nv) => expect_str(&nv.value, name, example),
        _ => Err(syn::Error::new_spanned(
            meta,
            format!("`{name}` needs a value: `{name} = {example}`"),
        )),
    }
}

fn expect_str(value: &Expr, name: &str, example: &str) -> syn::Result<LitStr> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => Ok(s.clone()),
        other => Err(syn::Error::new(
            other.span(),
            format!("`{name}` expects a string literal, like `{name} = {example}`"),
        )),
    }
}

/// The integer of `name = N`, checked to be in `range`.
fn int_value(
    meta: &Meta,
    name: &str,
    example: &str,
    range: std::ops::RangeInclusive<u64>,
    unit: &str,
) -> syn::Result<u32> {
    let (lo, hi) = (range.start(), range.end());
    let expected = format!("`{name}` expects an integer from {lo} to {hi}{unit}");
    let value = match meta {
        Meta::NameValue(nv) => &nv.value,
        _ => {
            return Err(syn::Error::new_spanned(
                meta,
                format!("`{name}` needs a value: `{name} = {example}`"),
            ))
        }
    };
    let Expr::Lit(ExprLit {
        lit: Lit::Int(int), ..
    }) = value
    else {
        return Err(syn::Error::new(
            value.span(),
            format!("{expected}, like `{name} = {example}`"),
        ));
    };
    if !matches!(int.suffix(), "" | "u32" | "u64" | "usize") {
        return Err(syn::Error::new(
            int.span(),
            format!("{expected} (without a `{}` suffix)", int.suffix()),
        ));
    }
    match int.base10_parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(n as u32),
        _ => Err(syn::Error::new(
            int.span(),
            format!(
                "{name} = {} is out of range: {expected}",
                int.base10_digits()
            ),
        )),
    }
}

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"2h"` and combinations in decreasing
/// unit order like `"1m30s"` or `"1h5m"` into milliseconds (> 0).
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    const HELP: &str = "expected a duration like \"500ms\", \"30s\", \"5m\", \"2h\" or \"1m30s\" \
                        (units ms, s, m, h, largest first)";
    let bad = |why: &str| format!("invalid timeout {text:?}: {why}; {HELP}");
    if text.is_empty() {
        return Err(bad("it is empty"));
    }
    let mut rest = text;
    let mut total: u64 = 0;
    // Rank of the previous unit (h = 3 ... ms = 0); units must strictly decrease.
    let mut last_rank = u8::MAX;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad(&format!("expected a number at {rest:?}")));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| bad("the number is too large"))?;
        rest = &rest[digits..];
        if rest.starts_with(['.', ',']) {
            return Err(bad(
                "fractions are not supported (use a smaller unit, like \"1500ms\")",
            ));
        }
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let (rank, millis_per_unit) = match &rest[..unit_len] {
            "h" => (3, 3_600_000),
            "m" => (2, 60_000),
            "s" => (1, 1_000),
            "ms" => (0, 1),
            "" => return Err(bad(&format!("the number {number} has no unit"))),
            other => return Err(bad(&format!("unknown unit `{other}`"))),
        };
        if rank >= last_rank {
            return Err(bad("units must appear once each, largest first"));
        }
        last_rank = rank;
        rest = &rest[unit_len..];
        total = number
            .checked_mul(millis_per_unit)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(|| bad("it is too large"))?;
    }
    if total == 0 {
        return Err(bad("it must be greater than zero"));
    }
    Ok(total)
}

/// The shape of one `host[:port]` allowlist pattern (the egress proxy
/// parses it fully when the test starts).
fn validate_allow_entry(entry: &str) -> Result<(), String> {
    let (host, port) = match entry.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (entry, None),
    };
    let host = host.strip_prefix("*.").unwrap_or(host);
    if host.is_empty() || !host.chars().all(|c| is_name_char(c) && c != '_') {
        return Err(format!(
            "invalid allowlist entry {entry:?}: expected host, host:port or *.domain[:port], \
             like \"api.example.com:443\""
        ));
    }
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(format!(
            "invalid port in allowlist entry {entry:?}: expected a number 0-65535"
        ));
    }
    Ok(())
}

fn validate_network(value: &str) -> Result<(), String> {
    const HELP: &str =
        "expected \"gateway\", \"allowlist\", \"isolated\", \"nat-filtered\" or \"bridge:NAME\"";
    match value {
        "isolated" | "gateway" | "allowlist" | "nat-filtered" | "nat_filtered" => Ok(()),
        _ => match value.strip_prefix("bridge:") {
            Some(bridge)
                if !bridge.is_empty()
                    && bridge.len() <= MAX_BRIDGE_NAME
                    && bridge.chars().all(is_name_char) =>
            {
                Ok(())
            }
            Some(bridge) => Err(format!(
                "invalid bridge name {bridge:?}: expected 1 to {MAX_BRIDGE_NAME} ASCII letters, \
                 digits, `.`, `_` or `-` after `bridge:`, like \"bridge:br0\""
            )),
            None => Err(format!("unknown network mode {value:?}: {HELP}")),
        },
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Resolves a fixture path against the manifest directory and checks it exists.
fn resolve_fixture(path: &str, manifest_dir: &Path) -> Result<String, String> {
    if path.is_empty() {
        return Err(
            "empty fixture path: expected a path relative to the crate's directory \
                    (CARGO_MANIFEST_DIR), like \"tests/fixtures/repo1\""
                .to_owned(),
        );
    }
    let full: PathBuf = manifest_dir.join(path);
    if !full.exists() {
        return Err(format!(
            "fixture path {path:?} does not exist (fixture paths are relative to the \
             crate's directory, CARGO_MANIFEST_DIR)"
        ));
    }
    full.into_os_string()
        .into_string()
        .map_err(|_| format!("fixture path {path:?} is not valid UTF-8 once made absolute"))
}

/// The known argument closest to `name`, if it is close enough to be a typo.
pub fn closest_known(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    // `memory` for `memory_mib`, `fixture` for `fixtures`...
    if name.len() >= 3 {
        if let Some(known) = KNOWN_ARGS.iter().find(|k| k.starts_with(&name)) {
            return Some(known);
        }
    }
    KNOWN_ARGS
        .iter()
        .map(|known| (edit_distance(&name, known), *known))
        .filter(|(d, known)| *d <= 2.max(known.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, known)| known)
}

/// Levenshtein distance between two strings (by chars).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

fn quoted_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.join(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn manifest_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn parse(tokens: TokenStream) -> syn::Result<TestArgs> {
        parse_args(tokens, &manifest_dir())
    }

    fn err(tokens: TokenStream) -> String {
        parse(tokens).unwrap_err().to_string()
    }

    /// All messages of a (possibly combined) error.
    fn errs(tokens: TokenStream) -> Vec<String> {
        parse(tokens)
            .unwrap_err()
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn no_arguments() {
        assert_eq!(parse(quote!()).unwrap(), TestArgs::default());
    }

    #[test]
    fn every_argument() {
        let args = parse(quote!(
            timeout = "1m30s",
            profile = "light",
            image = "default-1.2_x",
            network = "bridge:br0",
            allow = ["api.example.com:443", "*.example.org"],
            memory_mib = 512,
            vcpus = 2,
            ignore = "needs network",
            fixtures("src", "Cargo.toml"),
        ))
        .unwrap();
        let dir = manifest_dir();
        assert_eq!(
            args,
            TestArgs {
                timeout_ms: Some(90_000),
                profile: Some("light".into()),
                image: Some("default-1.2_x".into()),
                network: Some("bridge:br0".into()),
                allow: Some(vec!["api.example.com:443".into(), "*.example.org".into()]),
                memory_mib: Some(512),
                vcpus: Some(2),
                ignore: Some(Some("needs network".into())),
                fixtures: Some(vec![
                    dir.join("src").to_str().unwrap().to_owned(),
                    dir.join("Cargo.toml").to_str().unwrap().to_owned(),
                ]),
            }
        );
    }

    #[test]
    fn allowlists() {
        assert!(err(quote!(allow = "a.example")).contains("`allow` takes a list"));
        assert!(err(quote!(allow = [])).contains("allows nothing"));
        assert!(err(quote!(allow = [1])).contains("`allow` expects a string literal"));
        assert!(err(quote!(allow = ["a.example:https"])).contains("invalid port"));
        let messages = errs(quote!(allow = ["user@a.example", "a b", "a/b:80"]));
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(messages
            .iter()
            .all(|m| m.contains("invalid allowlist entry")));
    }

    #[test]
    fn ignore_without_reason() {
        assert_eq!(parse(quote!(ignore)).unwrap().ignore, Some(None));
        assert!(err(quote!(ignore = "")).contains("empty ignore reason"));
        assert!(err(quote!(ignore("x"))).contains("`ignore` takes no list"));
        assert!(err(quote!(ignore = 1)).contains("`ignore` expects a string literal"));
    }

    #[test]
    fn profiles_and_networks() {
        for p in PROFILES {
            assert_eq!(
                parse(quote!(profile = #p)).unwrap().profile.as_deref(),
                Some(*p)
            );
        }
        for n in [
            "isolated",
            "gateway",
            "allowlist",
            "nat-filtered",
            "nat_filtered",
            "bridge:virbr0",
            "bridge:br-lan.1",
        ] {
            assert_eq!(
                parse(quote!(network = #n)).unwrap().network.as_deref(),
                Some(n)
            );
        }
        let e = err(quote!(profile = "heavy"));
        assert!(e.contains("unknown profile `heavy`"), "{e}");
        assert!(
            e.contains("\"minimal\", \"light\", \"standard\" or \"intensive\""),
            "{e}"
        );
        let e = err(quote!(network = "nat"));
        assert!(e.contains("unknown network mode \"nat\""), "{e}");
        assert!(
            e.contains("\"isolated\", \"nat-filtered\" or \"bridge:NAME\""),
            "{e}"
        );
        for bad in ["bridge:", "bridge:a b", "bridge:abcdefghijklmnop"] {
            assert!(
                err(quote!(network = #bad)).contains("invalid bridge name"),
                "{bad}"
            );
        }
    }

    #[test]
    fn images() {
        assert!(err(quote!(image = "")).contains("invalid image name"));
        assert!(err(quote!(image = "a/b")).contains("invalid image name \"a/b\""));
        assert!(err(quote!(image = default)).contains("`image` expects a string literal"));
    }

    #[test]
    fn integers() {
        assert_eq!(parse(quote!(memory_mib = 64)).unwrap().memory_mib, Some(64));
        assert_eq!(
            parse(quote!(memory_mib = 65536)).unwrap().memory_mib,
            Some(65536)
        );
        assert_eq!(
            parse(quote!(memory_mib = 1_024u32)).unwrap().memory_mib,
            Some(1024)
        );
        assert_eq!(parse(quote!(vcpus = 1)).unwrap().vcpus, Some(1));
        assert_eq!(parse(quote!(vcpus = 64)).unwrap().vcpus, Some(64));
        let e = err(quote!(memory_mib = 63));
        assert!(e.contains("memory_mib = 63 is out of range"), "{e}");
        assert!(e.contains("from 64 to 65536 MiB"), "{e}");
        assert!(err(quote!(memory_mib = 65537)).contains("out of range"));
        assert!(err(quote!(memory_mib = 99999999999999999999999)).contains("out of range"));
        assert!(err(quote!(vcpus = 0)).contains("vcpus = 0 is out of range"));
        assert!(err(quote!(vcpus = 65)).contains("from 1 to 64"));
        assert!(err(quote!(vcpus = -1)).contains("`vcpus` expects an integer"));
        assert!(err(quote!(vcpus = "2")).contains("`vcpus` expects an integer"));
        assert!(err(quote!(vcpus = 2.0)).contains("`vcpus` expects an integer"));
        assert!(err(quote!(vcpus = 2i8)).contains("without a `i8` suffix"));
        assert!(err(quote!(vcpus)).contains("`vcpus` needs a value: `vcpus = 2`"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("1m30s"), Ok(90_000));
        assert_eq!(parse_duration_ms("1h2m3s4ms"), Ok(3_723_004));
        assert_eq!(parse_duration_ms("0m1s"), Ok(1_000));
        for (bad, why) in [
            ("", "it is empty"),
            ("30", "has no unit"),
            ("0s", "greater than zero"),
            ("30sec", "unknown unit `sec`"),
            ("1.5s", "fractions are not supported"),
            ("1s.", "expected a number at \".\""),
            ("s", "expected a number"),
            ("30s1m", "largest first"),
            ("1s1s", "largest first"),
            (" 30s", "expected a number"),
            ("99999999999999999999h", "too large"),
            ("9999999999999999h", "too large"),
        ] {
            let e = parse_duration_ms(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(e.contains("units ms, s, m, h"), "{bad:?}: {e}");
        }
        assert_eq!(
            parse(quote!(timeout = "30s")).unwrap().timeout_ms,
            Some(30_000)
        );
        assert!(err(quote!(timeout = "soon")).contains("invalid timeout \"soon\""));
        assert!(err(quote!(timeout = 30))
            .contains("`timeout` expects a string literal, like `timeout = \"30s\"`"));
        assert!(err(quote!(timeout)).contains("`timeout` needs a value"));
        assert!(err(quote!(timeout("30s"))).contains("`timeout` needs a value"));
    }

    #[test]
    fn fixtures() {
        let e = err(quote!(fixtures("tests/fixtures/does-not-exist")));
        assert!(
            e.contains("fixture path \"tests/fixtures/does-not-exist\" does not exist"),
            "{e}"
        );
        assert!(e.contains("CARGO_MANIFEST_DIR"), "{e}");
        assert!(err(quote!(fixtures())).contains("needs at least one path"));
        assert!(err(quote!(fixtures(""))).contains("empty fixture path"));
        assert!(err(quote!(fixtures(src))).contains("expected string literals"));
        assert!(err(quote!(fixtures = "src")).contains("`fixtures` takes a list of paths"));
        assert!(err(quote!(fixtures("src", "src"))).contains("listed twice"));
        let both = errs(quote!(fixtures("nope1", "src", "nope2")));
        assert_eq!(both.len(), 2, "{both:?}");
    }

    #[test]
    fn duplicates() {
        for tokens in [
            quote!(timeout = "1s", timeout = "2s"),
            quote!(profile = "light", profile = "light"),
            quote!(image = "a", image = "b"),
            quote!(network = "isolated", network = "isolated"),
            quote!(memory_mib = 64, memory_mib = 128),
            quote!(vcpus = 1, vcpus = 2),
            quote!(ignore, ignore = "why"),
            quote!(fixtures("src"), fixtures("src")),
            quote!(timeout = "1s", timeout = "not a duration"),
        ] {
            let e = err(tokens.clone());
            assert!(e.starts_with("duplicate argument `"), "{tokens}: {e}");
            assert!(e.ends_with("`: it may be given only once"), "{e}");
        }
    }

    #[test]
    fn unknown_arguments() {
        let e = err(quote!(timout = "30s"));
        assert!(
            e.starts_with("unknown argument `timout`: did you mean `timeout`?"),
            "{e}"
        );
        assert!(
            e.contains("known arguments: timeout, profile, image"),
            "{e}"
        );
        assert!(err(quote!(memory = 512)).contains("did you mean `memory_mib`?"));
        assert!(err(quote!(cpus = 2)).contains("did you mean `vcpus`?"));
        assert!(err(quote!(fixture("src"))).contains("did you mean `fixtures`?"));
        assert!(err(quote!(ignored)).contains("did you mean `ignore`?"));
        let e = err(quote!(frobnicate = 1));
        assert!(!e.contains("did you mean"), "{e}");
        assert!(err(quote!(a::b = 1)).contains("expected an argument name"));
    }

    #[test]
    fn all_errors_are_reported() {
        let all = errs(quote!(timeout = "x", profile = "y", vcpus = 0, bogus));
        assert_eq!(all.len(), 4, "{all:?}");
    }

    #[test]
    fn malformed_syntax() {
        assert!(parse(quote!(timeout = )).is_err());
        assert!(parse(quote!("30s")).is_err());
        assert!(parse(quote!(timeout = "1s" profile = "light")).is_err());
    }

    #[test]
    fn errors_point_at_the_offending_token() {
        // Columns need proc-macro2's `span-locations` (enabled for tests).
        fn column(src: &str) -> usize {
            parse(src.parse().unwrap())
                .unwrap_err()
                .span()
                .start()
                .column
        }
        assert_eq!(column(r#"timeout = "nope""#), 10);
        assert_eq!(column(r#"vcpus = 1, vcpus = 2"#), 11);
        assert_eq!(column(r#"profile = "light", timout = "1s""#), 19);
        assert_eq!(column(r#"memory_mib = 1"#), 13);
        assert_eq!(column(r#"fixtures("src", "nope")"#), 16);
    }

    #[test]
    fn closest() {
        assert_eq!(closest_known("TIMEOUT"), Some("timeout"));
        assert_eq!(closest_known("networks"), Some("network"));
        assert_eq!(closest_known("xyz"), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
