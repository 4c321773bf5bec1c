//! What a build or a network set-up reports while it runs: [`Event`]s sent
//! to a callback of the caller's, which decides where they go. The library
//! itself prints nothing. [`Printer`] is the console form that `cargo xtask`
//! and the `agentvm` CLI both use.

use std::time::Instant;

/// One thing the library reports while it works.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A step began: `building guest agent ...`, `packing initramfs ...`,
    /// `defined network agentvm-nat`.
    Step(String),
    /// A detail of the step in progress (module load order, sizes, ...).
    Note(String),
    /// A line of the command's result: the summary of a finished build,
    /// the XML of a network dry run. A console shows it on stdout.
    Output(String),
}

/// The builder's handle on the caller's callback, with the time since the
/// build started (recorded in the manifest).
pub(crate) struct Progress<'a> {
    started: Instant,
    sink: &'a dyn Fn(Event),
}

impl<'a> Progress<'a> {
    pub(crate) fn new(sink: &'a dyn Fn(Event)) -> Self {
        Self {
            started: Instant::now(),
            sink,
        }
    }

    /// Reports that a step began.
    pub(crate) fn step(&self, what: impl Into<String>) {
        (self.sink)(Event::Step(what.into()));
    }

    /// Reports a detail of the current step.
    pub(crate) fn note(&self, what: impl Into<String>) {
        (self.sink)(Event::Note(what.into()));
    }

    /// Reports a line of the result.
    pub(crate) fn output(&self, what: impl Into<String>) {
        (self.sink)(Event::Output(what.into()));
    }

    /// Seconds since [`Progress::new`].
    pub(crate) fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// Prints events on a console: steps and notes on stderr with the time
/// since the printer was made (`==> [  1.23s] packing initramfs`), output
/// lines on stdout.
#[derive(Debug)]
pub struct Printer {
    started: Instant,
}

impl Printer {
    /// A printer whose clock starts now.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
        }
    }

    /// Prints `event`.
    pub fn print(&self, event: &Event) {
        match event {
            Event::Step(what) => eprintln!("==> [{:6.2}s] {what}", self.elapsed_secs()),
            Event::Note(what) => eprintln!("             {what}"),
            Event::Output(line) => println!("{line}"),
        }
    }

    /// Seconds since [`Printer::new`].
    pub fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

impl Default for Printer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn progress_sends_typed_events_in_order() {
        let seen = RefCell::new(Vec::new());
        let sink = |e: Event| seen.borrow_mut().push(e);
        let p = Progress::new(&sink);
        p.step("a");
        p.note("b");
        p.output("c");
        assert_eq!(
            seen.into_inner(),
            [
                Event::Step("a".into()),
                Event::Note("b".into()),
                Event::Output("c".into())
            ]
        );
    }
}
