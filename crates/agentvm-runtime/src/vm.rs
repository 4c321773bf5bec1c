//! A booted VM with a connected guest agent: the handle tests use.

/// A running VM whose guest agent is connected and ready (placeholder; being built).
#[derive(Debug)]
pub struct Vm {
    _private: (),
}
