//! agentvm-test: the crate users depend on to write agent behaviour tests that
//! run inside VMs (`#[agent_vm_test]`, the test harness, snapshot helpers).
#![forbid(unsafe_code)]
