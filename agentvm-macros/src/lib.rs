//! `#[agent_vm_test]`: registers an async test that runs against a VM. Use it
//! through the `agentvm-test` crate, which re-exports it.
//!
//! This crate is a thin shell: argument parsing and validation live in
//! `args` and code generation in `expand`, as
//! plain functions over `proc_macro2` tokens that are unit tested.
#![forbid(unsafe_code)]

use proc_macro::TokenStream;

mod args;
mod expand;

/// Registers an `async fn` as an agent VM test.
///
/// ```ignore
/// use agentvm_test::{agent_vm_test, registry::TestResult, Vm};
///
/// #[agent_vm_test(timeout = "30s", profile = "light", network = "isolated")]
/// async fn agent_creates_hello(vm: &mut Vm) -> TestResult {
///     // ...
///     Ok(())
/// }
/// ```
///
/// The function must be `async`, non-generic, and take exactly one argument,
/// `&mut Vm` (the VM leased to the test). It returns `()` or `Result<(), E>`
/// where `E` converts into `agentvm_test::registry::TestFailure` (any
/// `std::error::Error + Send + Sync`, `anyhow::Error`, `String`, `&str`). The
/// function itself is kept as written; the macro adds its registration in
/// `agentvm_test::registry::TESTS`, which the harness runs.
///
/// Arguments (all optional, each at most once; unset ones come from
/// `.config/agentvm.toml`, environment variables or defaults):
///
/// | argument | value |
/// |---|---|
/// | `timeout = "30s"` | how long the test may run: a number and a unit (`ms`, `s`, `m`, `h`), or several largest first (`"1m30s"`); more than zero |
/// | `profile = "light"` | the VM resource profile: `"minimal"`, `"light"`, `"standard"` or `"intensive"` |
/// | `image = "default"` | the guest image: a non-empty name of ASCII letters, digits, `.`, `_`, `-` |
/// | `network = "gateway"` | `"gateway"` (no NIC; the model gateway, and an egress proxy that refuses and logs everything else), `"allowlist"` (the proxy lets `allow` through), `"isolated"` (no path out at all), `"nat-filtered"` (libvirt) or `"bridge:NAME"` |
/// | `allow = ["api.example.com:443"]` | `host[:port]` patterns (`*.example.com`: any subdomain) the egress proxy lets through, added to the configured `allow` |
/// | `memory_mib = 512` | guest memory in MiB, 64 to 65536 |
/// | `vcpus = 2` | guest CPUs, 1 to 64 |
/// | `ignore` / `ignore = "reason"` | do not run the test unless ignored tests are requested |
/// | `fixtures("tests/fixtures/repo1", ...)` | files or directories relative to the crate's directory (`CARGO_MANIFEST_DIR`); checked to exist at compile time and recorded as absolute paths |
///
/// A bad argument is a compile error pointing at it.
#[proc_macro_attribute]
pub fn agent_vm_test(args: TokenStream, item: TokenStream) -> TokenStream {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_default();
    expand::expand(args.into(), item.into(), &manifest_dir).into()
}
