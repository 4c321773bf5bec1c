// Errors the type checker finds point at the user's code, not at the macro.
use agentvm_test::{agent_vm_test, Vm};

struct NotAVm;

#[agent_vm_test]
async fn wrong_vm_type(_vm: &mut NotAVm) {}

#[agent_vm_test]
async fn wrong_return_type(_vm: &mut Vm) -> u32 {
    1
}

fn main() {}
