//! Building agentvm guest images, and setting up the libvirt network of the
//! `nat-filtered` mode, as a library: `cargo xtask build-image` /
//! `setup-network` and the installable CLI's `agentvm image build` /
//! `agentvm setup-network` are thin callers of [`build::run`] and
//! [`network::run`].
//!
//! ```no_run
//! use agentvm_image::{build::{self, BuildImageArgs}, Printer};
//!
//! let printer = Printer::new();
//! let mut args = BuildImageArgs::defaults();
//! args.out = Some("/srv/agentvm/images".into());
//! build::run(args, &|event| printer.print(&event))?;
//! # Ok::<(), agentvm_image::Error>(())
//! ```
//!
//! Progress is reported as [`Event`]s to a callback (the library prints
//! nothing itself); [`Printer`] is the console form. The guest agent, the
//! init script and the recipes are read from an agentvm source tree
//! ([`source`]). Errors are [`Error`]: the cases a caller acts on have their
//! own variants; every other failure (a missing tool, apt, a download) is
//! [`Error::Failed`], an error chain whose messages say what to do (the
//! builder's internals use `anyhow`).
//!
//! With the `clap` feature the option structs derive `clap::Args`, so every
//! front end offers the same flags.

#![warn(missing_docs)]

mod boot_header;
pub mod build;
mod busybox;
mod cpio;
mod elf;
mod guest;
mod initramfs;
mod kernel;
mod manifest;
mod modules;
pub mod network;
pub mod progress;
mod recipe;
mod rootfs;
pub mod source;
pub mod util;

use std::path::PathBuf;

pub use build::BuildImageArgs;
pub use network::SetupNetworkArgs;
pub use progress::{Event, Printer};
pub use rootfs::RootfsFormat;
pub use source::SourceTree;

/// What can go wrong building an image or setting up the network.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image name is not usable as a directory name.
    #[error("bad image name {name:?}: use letters, digits, '-', '_' and '.'")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// A root file system was asked for the `default` image, which the
    /// framework's own tests expect to be the busybox one.
    #[error(
        "the default image is the busybox one that the framework's own tests expect: \
         build a root file system image under another name (`--name agent --with {with}`)"
    )]
    RootfsForDefault {
        /// The recipes asked for, comma separated.
        with: String,
    },
    /// A builder input that comes from the agentvm source tree is not there.
    #[error(
        "{} not found: images are built from an agentvm source tree (the guest agent \
         crate agentvm-guest, images/init, images/recipes). Point --source DIR or {} at an \
         agentvm checkout, or install the CLI from one with \
         `cargo install --path <checkout>/agentvm-cli` and keep the checkout; \
         or pass {instead}",
        .path.display(),
        source::SOURCE_DIR_ENV
    )]
    SourceNotFound {
        /// What was looked for.
        path: PathBuf,
        /// The flag that replaces this input, if any.
        instead: &'static str,
    },
    /// Any other failure: the chain says which step failed and what to do.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}
