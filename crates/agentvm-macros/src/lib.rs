//! `#[agent_vm_test]`: registers an async test that runs against a VM. Use it
//! through the `agentvm-test` crate, which re-exports it.
#![forbid(unsafe_code)]
