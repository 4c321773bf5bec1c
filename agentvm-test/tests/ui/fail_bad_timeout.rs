use agentvm_test::{agent_vm_test, Vm};

#[agent_vm_test(timeout = "30 seconds")]
async fn spaces(_vm: &mut Vm) {}

#[agent_vm_test(timeout = "0s")]
async fn zero(_vm: &mut Vm) {}

#[agent_vm_test(timeout = 30)]
async fn not_a_string(_vm: &mut Vm) {}

fn main() {}
