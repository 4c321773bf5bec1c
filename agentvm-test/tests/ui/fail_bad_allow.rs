use agentvm_test::prelude::*;

#[agent_vm_test(allow = ["api.example.com:https"])]
async fn port_is_not_a_number(_vm: &mut Vm) -> TestResult {
    Ok(())
}

#[agent_vm_test(allow = "api.example.com")]
async fn not_a_list(_vm: &mut Vm) -> TestResult {
    Ok(())
}

#[agent_vm_test(network = "nat")]
async fn unknown_network(_vm: &mut Vm) -> TestResult {
    Ok(())
}

fn main() {}
