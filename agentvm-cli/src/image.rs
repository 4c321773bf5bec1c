//! `agentvm image build` and `agentvm setup-network`: the `agentvm-image`
//! library (the same as `cargo xtask build-image` / `setup-network`), with
//! the output directory defaulting to where this workspace's tests look.

use std::process::ExitCode;

use agentvm_image::{BuildImageArgs, Printer, SetupNetworkArgs};
use agentvm_runtime::config::AgentVmConfig;
use anyhow::{Context, Result};

/// Builds the image `args` describes; without `--out`, into the image_dir
/// of the current workspace's configuration.
pub fn build(mut args: BuildImageArgs) -> Result<ExitCode> {
    if args.out.is_none() {
        let config = AgentVmConfig::load().context("reading the agentvm configuration")?;
        args.out = Some(config.image_dir);
    }
    let printer = Printer::new();
    agentvm_image::build::run(args, &|event| printer.print(&event))?;
    Ok(ExitCode::SUCCESS)
}

/// Sets up (or tears down, or prints) the libvirt network and its filter.
pub fn setup_network(args: &SetupNetworkArgs) -> Result<ExitCode> {
    let printer = Printer::new();
    agentvm_image::network::run(args, &|event| printer.print(&event))?;
    Ok(ExitCode::SUCCESS)
}
