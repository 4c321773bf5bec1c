use agentvm_test::{agent_vm_test, Vm};

#[agent_vm_test]
async fn no_vm() {}

#[agent_vm_test]
async fn two_arguments(_vm: &mut Vm, _extra: u32) {}

#[agent_vm_test]
async fn by_value(_vm: Vm) {}

fn main() {}
