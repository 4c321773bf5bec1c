use agentvm_test::{agent_vm_test, Vm};

#[agent_vm_test(timout = "30s")]
async fn typo(_vm: &mut Vm) {}

#[agent_vm_test(frobnicate)]
async fn unknown(_vm: &mut Vm) {}

fn main() {}
