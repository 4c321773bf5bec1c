//! The host↔guest wire protocol.
//!
//! Every message travels in one frame:
//!
//! ```text
//! offset  size  field
//!      0     4  magic  b"AVMF"
//!      4     1  protocol version (PROTOCOL_VERSION)
//!      5     1  message kind (see [`Message::kind`])
//!      6     2  reserved, zero
//!      8     8  request id (little endian)
//!     16     4  payload length (little endian, at most MAX_PAYLOAD_LEN)
//!     20     4  CRC32 (IEEE) over bytes 0..20 and the payload (little endian)
//!     24     n  payload: the message body, postcard-encoded
//! ```
//!
//! The guest is untrusted: decoding never panics and never allocates more than
//! [`MAX_PAYLOAD_LEN`] for a frame, whatever length a header claims.
//!
//! Request ids tie replies to requests so several operations can be in flight
//! on one channel (an exec streaming output while a file is fetched). A request
//! and every frame answering it share its id; id 0 is for unsolicited frames.

mod codec;
mod frame;
mod message;
pub mod path_text;

pub use codec::{FrameCodec, FrameReader, FrameWriter};
pub use frame::{
    decode_frame, encode_frame, find_later_valid_frame, skip_to_next_magic, Frame, FrameError,
    FILE_CHUNK_LEN, HEADER_LEN, MAGIC, MAX_PAYLOAD_LEN, PROTOCOL_VERSION,
};
pub use message::*;
