//! One frame: header layout, encoding, validation and decoding (pure functions
//! over byte buffers, so they are easy to test and fuzz).

use bytes::{Buf, BufMut, BytesMut};

use super::message::Message;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"AVMF";
/// Version of the frame layout and message set this build speaks.
pub const PROTOCOL_VERSION: u8 = 3;
/// Length of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 24;
/// Largest payload a frame may carry. A header claiming more is rejected
/// before anything is allocated for it.
pub const MAX_PAYLOAD_LEN: usize = 1024 * 1024;
/// Size of the data chunks file transfers are split into; leaves room for the
/// rest of the message inside [`MAX_PAYLOAD_LEN`].
pub const FILE_CHUNK_LEN: usize = 256 * 1024;

const CRC_OFFSET: usize = 20;

/// A decoded frame: a message and the request it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Id of the request this frame belongs to (0: unsolicited).
    pub request_id: u64,
    /// The message carried.
    pub message: Message,
}

/// Why bytes could not be encoded or decoded as a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes are not [`MAGIC`]: the stream is out of step or not ours.
    #[error("bad frame magic {found:02x?} (expected {MAGIC:02x?}); the stream is out of sync")]
    BadMagic {
        /// The four bytes found where the magic should be.
        found: [u8; 4],
    },
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {found} (this build speaks {PROTOCOL_VERSION}); rebuild the guest image so host and guest match")]
    UnsupportedVersion {
        /// Version byte found in the header.
        found: u8,
    },
    /// The reserved header bytes are not zero.
    #[error("reserved header bytes are {found:#06x}, expected 0")]
    ReservedBits {
        /// The reserved field as found.
        found: u16,
    },
    /// The header claims a payload larger than [`MAX_PAYLOAD_LEN`].
    #[error("frame payload of {len} bytes exceeds the maximum of {MAX_PAYLOAD_LEN}")]
    Oversized {
        /// The claimed payload length.
        len: u64,
    },
    /// The checksum does not match: the frame was corrupted.
    #[error("frame checksum mismatch: header says {expected:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// CRC carried in the header.
        expected: u32,
        /// CRC computed over the received bytes.
        computed: u32,
    },
    /// A well-formed frame of a message kind this build does not know.
    #[error("unknown message kind {kind} in request {request_id}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
        /// The request the frame belonged to.
        request_id: u64,
    },
    /// A well-formed frame whose payload is not a valid body for its kind.
    #[error("malformed {kind_name} payload in request {request_id}: {source}")]
    Payload {
        /// Name of the message kind.
        kind_name: &'static str,
        /// The request the frame belonged to.
        request_id: u64,
        /// What the payload decoder said.
        #[source]
        source: postcard::Error,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({available} of at least {needed} bytes received)")]
    Truncated {
        /// Bytes needed to complete the frame (as far as known).
        needed: usize,
        /// Bytes that were available.
        available: usize,
    },
    /// Reading or writing the underlying stream failed.
    #[error("control channel I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Whether the frame boundary is still known after this error, so the
    /// stream can go on with the next frame (the bad frame was consumed).
    pub fn is_frame_local(&self) -> bool {
        matches!(self, Self::UnknownKind { .. } | Self::Payload { .. })
    }

    /// The request id of the offending frame, when its header was trustworthy.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            Self::UnknownKind { request_id, .. } | Self::Payload { request_id, .. } => {
                Some(*request_id)
            }
            _ => None,
        }
    }
}

/// Appends one frame carrying `message` for `request_id` to `dst`.
pub fn encode_frame(
    request_id: u64,
    message: &Message,
    dst: &mut BytesMut,
) -> Result<(), FrameError> {
    let start = dst.len();
    dst.reserve(HEADER_LEN);
    dst.put_slice(&MAGIC);
    dst.put_u8(PROTOCOL_VERSION);
    dst.put_u8(message.kind());
    dst.put_u16_le(0);
    dst.put_u64_le(request_id);
    dst.put_u32_le(0); // payload length, patched below
    dst.put_u32_le(0); // crc, patched below
    let payload_start = dst.len();
    if let Err(source) = message.encode_payload(BufMut::writer(&mut *dst)) {
        dst.truncate(start);
        return Err(FrameError::Payload {
            kind_name: message.kind_name(),
            request_id,
            source,
        });
    }
    if dst.len() - payload_start > MAX_PAYLOAD_LEN {
        let len = (dst.len() - payload_start) as u64;
        dst.truncate(start);
        return Err(FrameError::Oversized { len });
    }
    let len = (dst.len() - payload_start) as u32;
    dst[start + 16..start + 20].copy_from_slice(&len.to_le_bytes());
    let crc = frame_crc(&dst[start..start + CRC_OFFSET], &dst[payload_start..]);
    dst[start + CRC_OFFSET..start + HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decodes one frame from the front of `src`.
///
/// * `Ok(None)`: more bytes are needed; nothing was consumed (capacity for the
///   rest of the frame may have been reserved, bounded by [`MAX_PAYLOAD_LEN`]).
/// * `Ok(Some(frame))`: the frame was consumed.
/// * `Err(e)` with [`FrameError::is_frame_local`]: the bad frame was consumed;
///   the next frame can be decoded.
/// * any other `Err`: nothing was consumed; the stream is out of step. Either
///   give up or call [`skip_to_next_magic`] and try again.
pub fn decode_frame(src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    let Some(header) = peek_header(src)? else {
        src.reserve(HEADER_LEN - src.len());
        return Ok(None);
    };
    let total = HEADER_LEN + header.payload_len;
    if src.len() < total {
        src.reserve(total - src.len());
        return Ok(None);
    }
    let computed = frame_crc(&src[..CRC_OFFSET], &src[HEADER_LEN..total]);
    if computed != header.crc {
        return Err(FrameError::CrcMismatch {
            expected: header.crc,
            computed,
        });
    }
    let frame_bytes = src.split_to(total);
    let message =
        Message::decode_payload(header.kind, header.request_id, &frame_bytes[HEADER_LEN..])?;
    Ok(Some(Frame {
        request_id: header.request_id,
        message,
    }))
}

/// Drops bytes from the front of `src` up to the next occurrence of [`MAGIC`]
/// after the first byte (or all but a possible partial magic at the end).
/// Returns how many bytes were dropped. Used to find the next frame after
/// garbage, e.g. bytes left in flight when a VM was reverted.
pub fn skip_to_next_magic(src: &mut BytesMut) -> usize {
    let next = src
        .windows(MAGIC.len())
        .skip(1)
        .position(|w| w == MAGIC)
        .map(|p| p + 1);
    let drop = match next {
        Some(pos) => pos,
        None => {
            // Keep a tail that could be the start of a magic split across reads.
            let keep = (1..MAGIC.len())
                .rev()
                .find(|&k| src.len() > k && src[src.len() - k..] == MAGIC[..k])
                .unwrap_or(0);
            src.len()
                .saturating_sub(keep)
                .max(usize::from(!src.is_empty()))
        }
    };
    let drop = drop.min(src.len());
    src.advance(drop);
    drop
}

/// Position of the first complete, CRC-valid frame that starts after the front
/// of `src`, if any. In resync mode this finds a good frame hidden behind a
/// partial one whose header claims more bytes than will ever arrive.
pub fn find_later_valid_frame(src: &[u8]) -> Option<usize> {
    (1..src.len().saturating_sub(HEADER_LEN - 1))
        .filter(|&p| src[p..p + MAGIC.len()] == MAGIC)
        .find(|&p| match peek_header(&src[p..]) {
            Ok(Some(header)) => {
                let end = p + HEADER_LEN + header.payload_len;
                end <= src.len()
                    && frame_crc(&src[p..p + CRC_OFFSET], &src[p + HEADER_LEN..end]) == header.crc
            }
            _ => false,
        })
}

struct Header {
    kind: u8,
    request_id: u64,
    payload_len: usize,
    crc: u32,
}

/// Validates the fixed header at the front of `src` without consuming it.
fn peek_header(src: &[u8]) -> Result<Option<Header>, FrameError> {
    // Reject a bad magic as soon as the bytes that differ are in.
    let seen = src.len().min(MAGIC.len());
    if src[..seen] != MAGIC[..seen] {
        let mut found = [0u8; 4];
        found[..seen].copy_from_slice(&src[..seen]);
        return Err(FrameError::BadMagic { found });
    }
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let version = src[4];
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion { found: version });
    }
    let reserved = u16::from_le_bytes([src[6], src[7]]);
    if reserved != 0 {
        return Err(FrameError::ReservedBits { found: reserved });
    }
    let payload_len = u32::from_le_bytes(src[16..20].try_into().expect("4 bytes")) as usize;
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(FrameError::Oversized {
            len: payload_len as u64,
        });
    }
    Ok(Some(Header {
        kind: src[5],
        request_id: u64::from_le_bytes(src[8..16].try_into().expect("8 bytes")),
        payload_len,
        crc: u32::from_le_bytes(src[20..24].try_into().expect("4 bytes")),
    }))
}

fn frame_crc(header_without_crc: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header_without_crc);
    hasher.update(payload);
    hasher.finalize()
}
