//! An example agentvm test suite. Everything is in `tests/agents.rs`, which
//! runs the fake agents of `examples/agents/` in VMs:
//!
//! ```text
//! cargo xtask build-image                  # once: the guest image
//! cargo test -p agent-suite                # or: cargo nextest run -p agent-suite
//! INSTA_UPDATE=always cargo test -p agent-suite   # record new snapshots, then review the diff
//! ```
#![forbid(unsafe_code)]
