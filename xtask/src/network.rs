//! `cargo xtask setup-network`: the `agentvm-image` library's libvirt
//! network set-up, printed on the console (the same as `agentvm setup-network`).

use anyhow::Result;

pub use agentvm_image::network::{daemon_answers, SetupNetworkArgs};

use crate::util::Progress;

/// Sets up (or tears down, or prints) the network and its filter.
pub fn run(args: &SetupNetworkArgs) -> Result<()> {
    let progress = Progress::new();
    agentvm_image::network::run(args, &|event| progress.event(&event))?;
    Ok(())
}
