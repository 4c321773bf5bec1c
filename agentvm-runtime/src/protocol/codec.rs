//! Async framing over any tokio byte stream.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::frame::{
    decode_frame, encode_frame, find_later_valid_frame, skip_to_next_magic, Frame, FrameError,
};
use super::message::Message;

/// [`tokio_util::codec`] adapter, for use with `Framed`/`FramedRead`/`FramedWrite`.
/// Any decode error ends such a stream; use [`FrameReader`] to recover from garbage.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        decode_frame(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match decode_frame(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(truncated(src)),
        }
    }
}

impl tokio_util::codec::Encoder<(u64, Message)> for FrameCodec {
    type Error = FrameError;

    fn encode(
        &mut self,
        (request_id, message): (u64, Message),
        dst: &mut BytesMut,
    ) -> Result<(), FrameError> {
        encode_frame(request_id, &message, dst)
    }
}

impl tokio_util::codec::Encoder<&Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame(frame.request_id, &frame.message, dst)
    }
}

fn truncated(src: &BytesMut) -> FrameError {
    let needed = if src.len() >= super::HEADER_LEN {
        super::HEADER_LEN + u32::from_le_bytes(src[16..20].try_into().expect("4 bytes")) as usize
    } else {
        super::HEADER_LEN
    };
    FrameError::Truncated {
        needed,
        available: src.len(),
    }
}

/// Reads frames from a byte stream.
///
/// Errors do not poison the reader: after a frame-local error
/// ([`FrameError::is_frame_local`]) the next call continues with the next frame;
/// after a stream-level error (bad magic, CRC, ...) call [`FrameReader::skip_garbage`]
/// to resynchronise, or enable [`FrameReader::set_resync`] to do that automatically.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    resync: bool,
    hunting: bool,
    skipped: u64,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a byte stream.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
            resync: false,
            hunting: false,
            skipped: 0,
        }
    }

    /// In resync mode, stream-level errors are not returned: the reader skips
    /// to the next frame magic and counts the dropped bytes.
    pub fn set_resync(&mut self, on: bool) {
        self.resync = on;
    }

    /// While hunting (only meaningful in resync mode), a partial frame that
    /// waits for more bytes is abandoned as soon as a complete, CRC-valid frame
    /// starts later in the buffer: a stale header left by a revert may claim
    /// bytes that will never come. Only for a reader that waits for one known
    /// answer (the host after a revert): in normal traffic a frame's payload
    /// may itself contain a valid frame.
    pub fn set_hunting(&mut self, on: bool) {
        self.hunting = on;
    }

    /// Bytes dropped as garbage so far.
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped
    }

    /// Drops buffered bytes up to the next frame magic.
    pub fn skip_garbage(&mut self) {
        self.skipped += skip_to_next_magic(&mut self.buf) as u64;
    }

    /// Drops every byte buffered so far (not the ones still in the stream).
    pub fn discard_buffered(&mut self) {
        self.skipped += self.buf.len() as u64;
        self.buf.clear();
    }

    /// Next frame; `Ok(None)` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            match decode_frame(&mut self.buf) {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) if self.resync && self.hunting && self.buf.len() >= super::HEADER_LEN => {
                    if let Some(start) = find_later_valid_frame(&self.buf) {
                        self.skipped += start as u64;
                        self.buf.advance(start);
                        continue;
                    }
                }
                Ok(None) => {}
                Err(e) if e.is_frame_local() => return Err(e),
                Err(_) if self.resync => {
                    self.skip_garbage();
                    continue;
                }
                Err(e) => return Err(e),
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(64 * 1024);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                if self.resync {
                    self.discard_buffered();
                    return Ok(None);
                }
                return Err(truncated(&self.buf));
            }
        }
    }

    /// The wrapped stream.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Writes frames to a byte stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps a byte stream.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// Encodes and writes one frame, then flushes.
    pub async fn send(&mut self, request_id: u64, message: &Message) -> Result<(), FrameError> {
        self.buf.clear();
        encode_frame(request_id, message, &mut self.buf)?;
        self.inner.write_all(&self.buf).await?;
        self.inner.flush().await?;
        Ok(())
    }

    /// The wrapped stream.
    pub fn into_inner(self) -> W {
        self.inner
    }
}
