//! 40 trivial agent tests for the suite-throughput measurement of
//! `cargo xtask bench`: each runs a small agent that writes a file and exits,
//! and checks that the file was created.
//!
//! `cargo xtask bench` runs this binary with a warm pool of 2 VMs
//! (`AGENT_VM_POOL_MIN_SIZE=2 AGENT_VM_POOL_MAX_SIZE=2`), then booting a
//! fresh VM per test (`AGENT_VM_POOL_MIN_SIZE=0 AGENT_VM_MAX_USES=1`) with 2
//! test threads and with 1, and compares the wall times. Fewer tests: `--exact --skip trivial_39 ...`.
//! `cargo test --workspace` skips this target (`test = false`); run it by
//! hand with `cargo test -p bench-suite --test trivial --release`.

use agentvm_test::prelude::*;

/// The body every test runs.
async fn writes_a_file(vm: &mut Vm) -> TestResult {
    let agent = Agent::command(["sh", "-c", "echo done > out.txt"]);
    let run = vm.run_agent(&agent, Task::prompt("write out.txt")).await?;
    assert!(run.success(), "{run:#?}");
    assert_eq!(run.created(), ["out.txt"], "{run:#?}");
    assert_eq!(run.file_text("out.txt"), Some("done\n"));
    Ok(())
}

/// One `#[agent_vm_test]` per name, all running [`writes_a_file`].
macro_rules! trivial_tests {
    ($($name:ident)*) => {
        $(
            #[agent_vm_test(timeout = "60s")]
            async fn $name(vm: &mut Vm) -> TestResult {
                writes_a_file(vm).await
            }
        )*
    };
}

trivial_tests! {
    trivial_00 trivial_01 trivial_02 trivial_03 trivial_04
    trivial_05 trivial_06 trivial_07 trivial_08 trivial_09
    trivial_10 trivial_11 trivial_12 trivial_13 trivial_14
    trivial_15 trivial_16 trivial_17 trivial_18 trivial_19
    trivial_20 trivial_21 trivial_22 trivial_23 trivial_24
    trivial_25 trivial_26 trivial_27 trivial_28 trivial_29
    trivial_30 trivial_31 trivial_32 trivial_33 trivial_34
    trivial_35 trivial_36 trivial_37 trivial_38 trivial_39
}

agentvm_test::main!();
