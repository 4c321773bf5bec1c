use agentvm_test::{agent_vm_test, Vm};

#[agent_vm_test(fixtures("Cargo.toml", "tests/fixtures/does-not-exist"))]
async fn missing(_vm: &mut Vm) {}

fn main() {}
