use agentvm_test::{agent_vm_test, Vm};

#[agent_vm_test(timeout = "30s")]
fn not_async(_vm: &mut Vm) {}

fn main() {}
