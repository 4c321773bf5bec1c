//! Black-box end-to-end suites of agentvm. Everything is in `tests/`, and
//! uses only what a user of `agentvm-test` has (the prelude, `#[agent_vm_test]`,
//! `AgentError` and the `VmError` it carries):
//!
//! ```text
//! cargo xtask build-image                    # once: the default guest image
//! cargo test -p agentvm-e2e                  # the suites, in real VMs
//! ```
//!
//! `tests/misbehaving.rs` runs agents that crash the guest, fill its memory or
//! disk, print binary output, leave children holding stdout, read stdin, hang
//! past their timeout, write unicode and non-UTF-8 file names, plant symlinks
//! out of the workspace and create 10 000 files, and checks what a user
//! expects of each: a typed error or a faithful record within a bounded time,
//! a clean VM for the next test, and nothing written on the host outside the
//! artifact directory.
#![forbid(unsafe_code)]
