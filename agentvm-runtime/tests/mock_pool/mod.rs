//! The pool configuration the mock-backend pool tests share
//! (`tests/pool.rs`, `tests/pool_churn.rs`).

use std::time::Duration;

use agentvm_runtime::pool::PoolConfig;
use agentvm_runtime::spec::{Accel, ImagePaths, NetworkMode, ResourceProfile, VmSpec};

/// A pool of `min_size..=max_size` mock VMs (the image paths are never read).
pub fn config(min_size: usize, max_size: usize) -> PoolConfig {
    PoolConfig {
        min_size,
        max_size,
        max_uses: None,
        ttl: None,
        health_interval: None,
        spec: VmSpec {
            image: ImagePaths {
                name: "mock".into(),
                kernel: "/nonexistent/vmlinuz".into(),
                initramfs: "/nonexistent/initramfs".into(),
                cmdline: String::new(),
                rootfs: None,
            },
            profile: ResourceProfile::Minimal,
            network: NetworkMode::Isolated,
            accel: Accel::Tcg,
            boot_timeout: Duration::from_secs(5),
        },
    }
}
