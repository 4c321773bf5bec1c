//! The whole host side against real VMs run by the QEMU backend (TCG where
//! KVM does not work) with the real guest image and agent. The suite itself
//! is shared with the other backends: `vm_suite/mod.rs`.

mod vm_suite;

use agentvm_runtime::backend::qemu::{QemuBackend, QemuConfig};
use agentvm_runtime::backend::Backend;

fn backend() -> std::sync::Arc<dyn Backend> {
    std::sync::Arc::new(QemuBackend::new(QemuConfig::default()).expect("qemu backend"))
}

vm_suite_tests!();
