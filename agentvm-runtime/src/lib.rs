//! The agentvm engine.
//!
//! * [`protocol`]: the framed host↔guest wire protocol (CRC32-checked frames with
//!   postcard payloads) and its async codec. Used by both ends; it has no host-only
//!   dependencies, so the guest agent links it with `default-features = false`.
//! * [`client`] (feature `host`): the host side of the control channel — a
//!   multiplexing client that runs commands, moves files and lists workspace
//!   changes in a guest.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod protocol;

#[cfg(feature = "host")]
pub mod client;

#[cfg(feature = "host")]
pub mod backend;
#[cfg(feature = "host")]
pub mod command;
#[cfg(feature = "host")]
pub mod config;
#[cfg(feature = "host")]
pub mod daemon;
#[cfg(feature = "host")]
pub mod events;
#[cfg(feature = "host")]
pub mod image;
#[cfg(feature = "host")]
pub mod metrics;
#[cfg(feature = "host")]
pub mod pool;
#[cfg(feature = "host")]
pub mod spec;
#[cfg(feature = "host")]
pub mod tunnel;
#[cfg(feature = "host")]
pub mod vm;
