use agentvm_test::{agent_vm_test, Vm};

#[agent_vm_test(memory_mib = 32)]
async fn too_little(_vm: &mut Vm) {}

#[agent_vm_test(memory_mib = 100000, vcpus = 0)]
async fn too_much(_vm: &mut Vm) {}

fn main() {}
