//! `cargo xtask build-image`: the `agentvm-image` library's build, printed
//! on the console (the same as `agentvm image build`).

use anyhow::Result;

pub use agentvm_image::build::BuildImageArgs;

use crate::util::Progress;

/// Builds the image `args` describes (up to date: does nothing).
pub fn run(args: BuildImageArgs) -> Result<()> {
    let progress = Progress::new();
    agentvm_image::build::run(args, &|event| progress.event(&event))?;
    Ok(())
}
