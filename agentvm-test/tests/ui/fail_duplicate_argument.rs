use agentvm_test::{agent_vm_test, Vm};

#[agent_vm_test(timeout = "30s", profile = "light", timeout = "1m")]
async fn twice(_vm: &mut Vm) {}

fn main() {}
