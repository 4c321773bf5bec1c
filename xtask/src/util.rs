//! Small helpers of the xtask commands: the workspace root and progress
//! lines. Host helpers (finding tools, quoting commands, dates) come from
//! `agentvm_image::util`, shared with the image builder.

use std::path::{Path, PathBuf};

pub use agentvm_image::util::{find_in_path, is_root, rfc3339_utc, show_command};
use agentvm_image::{Event, Printer};

/// The workspace root (the parent of the xtask crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Prints one progress line per step, with the time since it was made (the
/// same console form as the image builder's events).
pub struct Progress {
    printer: Printer,
}

impl Progress {
    pub fn new() -> Self {
        Self {
            printer: Printer::new(),
        }
    }

    /// Starts a step: prints `==> [  1.23s] what` on stderr.
    pub fn step(&self, what: impl Into<String>) {
        self.printer.print(&Event::Step(what.into()));
    }

    /// A detail line belonging to the current step.
    pub fn note(&self, what: impl Into<String>) {
        self.printer.print(&Event::Note(what.into()));
    }

    /// Prints a library event (image build, network set-up) on the same clock.
    pub fn event(&self, event: &Event) {
        self.printer.print(event);
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.printer.elapsed_secs()
    }
}
