//! Progress of a benchmark run, as typed events; [`Printer`] turns them into
//! stderr lines (`==> [  12.34s] phase`, indented notes).

use crate::util::Progress;

/// Something worth telling the user while the benchmark runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new phase starts.
    Phase(String),
    /// A detail of the current phase.
    Note(String),
    /// A line a child process printed that is not an event (warnings, errors).
    Output(String),
}

impl Event {
    /// Reads a stderr line of the measuring program: `@phase …` / `@note …`
    /// are its events, anything else is passed through.
    pub fn from_child_line(line: &str) -> Self {
        if let Some(text) = line.strip_prefix("@phase ") {
            Self::Phase(text.to_string())
        } else if let Some(text) = line.strip_prefix("@note ") {
            Self::Note(text.to_string())
        } else {
            Self::Output(line.to_string())
        }
    }
}

/// Prints events on stderr with the time since the run started.
pub struct Printer {
    progress: Progress,
}

impl Printer {
    pub fn new() -> Self {
        Self {
            progress: Progress::new(),
        }
    }

    pub fn emit(&self, event: Event) {
        match event {
            Event::Phase(text) => self.progress.step(text),
            Event::Note(text) => self.progress.note(text),
            Event::Output(text) => eprintln!("             | {text}"),
        }
    }

    pub fn phase(&self, text: impl Into<String>) {
        self.emit(Event::Phase(text.into()));
    }

    pub fn note(&self, text: impl Into<String>) {
        self.emit(Event::Note(text.into()));
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.progress.elapsed_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_lines() {
        assert_eq!(
            Event::from_child_line("@phase cold boot"),
            Event::Phase("cold boot".into())
        );
        assert_eq!(
            Event::from_child_line("@note boot 1/5"),
            Event::Note("boot 1/5".into())
        );
        assert_eq!(
            Event::from_child_line("WARN something"),
            Event::Output("WARN something".into())
        );
    }
}
