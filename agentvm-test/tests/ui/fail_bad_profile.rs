use agentvm_test::{agent_vm_test, Vm};

#[agent_vm_test(profile = "heavy")]
async fn heavy(_vm: &mut Vm) {}

fn main() {}
