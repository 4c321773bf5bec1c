//! The vsock control channel against a real VM. It needs `/dev/vhost-vsock`
//! on the host; where that is missing (as on these CI machines, whose
//! nested hypervisor has none) the test is reported as ignored with that
//! reason. The whole real-VM suite also runs over vsock with
//! `AGENT_VM_TRANSPORT=vsock cargo test -p agentvm-runtime --test vm_qemu`
//! on such a host.

use std::path::Path;
use std::time::Duration;

use agentvm_runtime::backend::qemu::transport::{Transport, VHOST_VSOCK_DEVICE};
use agentvm_runtime::backend::qemu::{QemuBackend, QemuConfig};
use agentvm_runtime::command::Command;
use agentvm_runtime::protocol::ExitStatus;
use agentvm_runtime::vm::Vm;
use libtest_mimic::{Arguments, Failed, Trial};

#[path = "vm_suite/mod.rs"]
mod vm_suite;

fn boot_exec_revert_over_vsock() -> Result<(), Failed> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let backend = QemuBackend::new(QemuConfig::default())?;
        if backend.transport().transport != Transport::Vsock {
            return Err(format!("transport is {:?}", backend.transport()).into());
        }
        let mut vm = Vm::boot(&backend, vm_suite::spec()).await?;
        let out = vm
            .exec(Command::shell("echo over vsock").timeout(Duration::from_secs(30)))
            .await?;
        if out.report.status != ExitStatus::Code(0) || out.stdout != b"over vsock\n" {
            return Err(format!("{out:?}").into());
        }
        vm.revert().await?;
        vm.ping().await?;
        vm.destroy().await?;
        Ok::<(), Failed>(())
    })
}

fn main() {
    let args = Arguments::from_args();
    let present = Path::new(VHOST_VSOCK_DEVICE).exists();
    // Read once by the backend when it is created.
    std::env::set_var("AGENT_VM_TRANSPORT", "vsock");
    let trial = Trial::test("boot_exec_revert_over_vsock", boot_exec_revert_over_vsock)
        .with_ignored_flag(!present);
    let trial = if present {
        trial
    } else {
        trial.with_kind(format!("needs {VHOST_VSOCK_DEVICE}, absent on this host"))
    };
    libtest_mimic::run(&args, vec![trial]).exit();
}
