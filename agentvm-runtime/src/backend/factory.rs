//! Building the configured backend. Each backend reads the settings it
//! needs from the [`AgentVmConfig`] itself ([`FromConfig`], implemented next
//! to the backend); [`create_backend`] only dispatches on [`BackendKind`], so
//! neither the configuration nor this dispatcher knows a backend's internals.

use std::sync::Arc;

use super::{Backend, BackendError};
use crate::config::{AgentVmConfig, BackendKind};

/// A backend that builds itself from the run's configuration (its own keys:
/// `golden_cache` for QEMU, `libvirt_uri` for libvirt; the mock reads none).
pub trait FromConfig: Backend + Sized {
    /// The backend for `config`, with defaults for what the configuration
    /// does not set.
    fn from_config(config: &AgentVmConfig) -> Result<Self, BackendError>;
}

/// Creates the backend the configuration names.
pub fn create_backend(config: &AgentVmConfig) -> Result<Arc<dyn Backend>, BackendError> {
    match config.backend {
        BackendKind::Mock => build::<super::mock::MockBackend>(config),
        BackendKind::Qemu => build::<super::qemu::QemuBackend>(config),
        #[cfg(feature = "libvirt")]
        BackendKind::Libvirt => build::<super::libvirt::LibvirtBackend>(config),
        #[cfg(not(feature = "libvirt"))]
        BackendKind::Libvirt => Err(BackendError::NotCompiled {
            backend: "libvirt",
            hint: "enable the cargo feature `libvirt` of agentvm-test (e.g. \
                   `agentvm-test = { ..., features = [\"libvirt\"] }`, or \
                   `cargo test --features agentvm-test/libvirt`); it links libvirt.so \
                   and needs libvirt-dev to build (scripts/start-libvirtd.sh installs it)",
        }),
    }
}

fn build<B: FromConfig>(config: &AgentVmConfig) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(Arc::new(B::from_config(config)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_factory() {
        let c = AgentVmConfig {
            backend: BackendKind::Mock,
            ..AgentVmConfig::default()
        };
        assert_eq!(create_backend(&c).unwrap().name(), "mock");
        // (The QEMU backend is not created here: it sweeps its runtime
        // directory, a side effect unit tests should not have.)
    }

    #[cfg(not(feature = "libvirt"))]
    #[test]
    fn libvirt_without_the_feature_says_how_to_enable_it() {
        let c = AgentVmConfig {
            backend: BackendKind::Libvirt,
            ..AgentVmConfig::default()
        };
        let e = create_backend(&c).err().unwrap().to_string();
        assert!(
            e.starts_with("the libvirt backend is not compiled in: enable the cargo feature"),
            "{e}"
        );
    }
}
