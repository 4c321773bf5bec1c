//! Wire protocol: round trips over random messages, and every kind of bad
//! input gives a typed error without panicking or allocating the claimed size.

use std::time::Duration;

use agentvm_runtime::protocol::*;
use bytes::BytesMut;
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 /._-]{0,40}"
}

fn bytes_up_to(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn duration() -> impl Strategy<Value = Duration> {
    (0u64..10_000_000, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n))
}

fn file_state() -> impl Strategy<Value = FileState> {
    (
        prop_oneof![
            Just(FileKind::File),
            Just(FileKind::Dir),
            Just(FileKind::Symlink),
            Just(FileKind::Other)
        ],
        any::<u64>(),
        any::<u32>(),
        proptest::option::of("[0-9a-f]{64}"),
        proptest::option::of(text()),
    )
        .prop_map(|(kind, size, mode, sha256, text)| FileState {
            kind,
            size,
            mode,
            sha256,
            text,
        })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u8>(),
            text(),
            proptest::collection::vec(text(), 0..4),
            proptest::option::of(text())
        )
            .prop_map(
                |(protocol_version, software, capabilities, workspace_root)| Message::Hello(
                    Hello {
                        protocol_version,
                        software,
                        capabilities,
                        workspace_root,
                        kernel: None,
                    }
                )
            ),
        any::<u64>().prop_map(|nonce| Message::Ping(Ping { nonce })),
        any::<u64>().prop_map(|nonce| Message::Pong(Pong { nonce })),
        (
            proptest::collection::vec(text(), 1..5),
            proptest::collection::vec((text(), text()), 0..3),
            any::<bool>(),
            proptest::option::of(text()),
            bytes_up_to(512),
            proptest::option::of(duration()),
            duration(),
            any::<u64>()
        )
            .prop_map(
                |(argv, env, clear_env, cwd, stdin, timeout, kill_grace, output_limit)| {
                    Message::Exec(ExecRequest {
                        argv,
                        env,
                        clear_env,
                        cwd,
                        stdin,
                        timeout,
                        kill_grace,
                        output_limit,
                        user: None,
                    })
                }
            ),
        (any::<bool>(), bytes_up_to(4096)).prop_map(|(err, data)| Message::Output(OutputChunk {
            stream: if err {
                OutputStream::Stderr
            } else {
                OutputStream::Stdout
            },
            data,
        })),
        (
            any::<i32>(),
            any::<bool>(),
            any::<bool>(),
            duration(),
            proptest::option::of(any::<u64>()),
            any::<u64>()
        )
            .prop_map(|(code, signal, timed_out, d, rss, bytes)| Message::Exit(
                ExitReport {
                    status: if signal {
                        ExitStatus::Signal(code)
                    } else {
                        ExitStatus::Code(code)
                    },
                    timed_out,
                    duration: d,
                    resources: ResourceUsage {
                        peak_rss_bytes: rss,
                        user_cpu: Some(d),
                        system_cpu: None,
                        processes_started: rss,
                        peak_processes: Some(bytes / 3),
                        unroutable_packets: Some(bytes),
                        oom_kills: Some(bytes / 5),
                    },
                    stdout_bytes: bytes,
                    stderr_bytes: bytes / 2,
                    stdout_truncated: timed_out,
                    stderr_truncated: signal,
                }
            )),
        (
            text(),
            any::<u32>(),
            any::<u64>(),
            bytes_up_to(4096),
            any::<bool>()
        )
            .prop_map(
                |(path, mode, offset, data, last)| Message::PutFile(PutFileChunk {
                    path,
                    mode,
                    offset,
                    data,
                    last
                })
            ),
        text().prop_map(|path| Message::GetFile(GetFileRequest { path })),
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            bytes_up_to(4096),
            any::<bool>()
        )
            .prop_map(|(mode, total_size, offset, data, last)| Message::FileData(
                FileDataChunk {
                    mode,
                    total_size,
                    offset,
                    data,
                    last
                }
            )),
        (any::<bool>(), any::<bool>()).prop_map(|(include_text, outside_workspace)| {
            Message::ListChanges(ListChangesRequest {
                include_text,
                outside_workspace,
            })
        }),
        proptest::collection::vec(
            (
                text(),
                proptest::option::of(file_state()),
                proptest::option::of(file_state())
            ),
            0..4
        )
        .prop_map(|entries| Message::Changes(ChangeList {
            changes: entries
                .into_iter()
                .map(|(path, before, after)| FileChange {
                    change: match (&before, &after) {
                        (None, _) => ChangeKind::Created,
                        (_, None) => ChangeKind::Deleted,
                        _ => ChangeKind::Modified,
                    },
                    path,
                    before,
                    after,
                })
                .collect(),
            outside_workspace: vec!["/etc/x".into()],
            outside_truncated: false,
        })),
        Just(Message::ResetBaseline(ResetBaselineRequest {})),
        (any::<u64>(), proptest::option::of(any::<i32>()))
            .prop_map(|(target, signal)| Message::Kill(KillRequest { target, signal })),
        any::<bool>().prop_map(|poweroff| Message::Shutdown(ShutdownRequest { poweroff })),
        Just(Message::Ok(Ack {})),
        text().prop_map(|message| Message::Error(ErrorReply {
            kind: ErrorKind::Io,
            message
        })),
    ]
}

fn encode(request_id: u64, message: &Message) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_frame(request_id, message, &mut buf).expect("encodes");
    buf
}

fn ping_frame() -> BytesMut {
    encode(7, &Message::Ping(Ping { nonce: 42 }))
}

/// Rewrites the CRC so that a deliberately edited header still passes the checksum.
fn fix_crc(frame: &mut [u8]) {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&frame[..20]);
    hasher.update(&frame[HEADER_LEN..]);
    let crc = hasher.finalize();
    frame[20..24].copy_from_slice(&crc.to_le_bytes());
}

proptest! {
    #[test]
    fn any_message_round_trips(request_id in any::<u64>(), message in message()) {
        let mut buf = encode(request_id, &message);
        let frame = decode_frame(&mut buf).expect("decodes").expect("complete");
        prop_assert_eq!(frame.request_id, request_id);
        prop_assert_eq!(frame.message, message);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn frames_split_anywhere_decode_the_same(messages in proptest::collection::vec(message(), 1..6), split in any::<prop::sample::Index>()) {
        let mut all = BytesMut::new();
        for (i, m) in messages.iter().enumerate() {
            encode_frame(i as u64, m, &mut all).unwrap();
        }
        let cut = split.index(all.len());
        let mut buf = BytesMut::from(&all[..cut]);
        let mut decoded = Vec::new();
        while let Some(frame) = decode_frame(&mut buf).unwrap() {
            decoded.push(frame.message);
        }
        buf.extend_from_slice(&all[cut..]);
        while let Some(frame) = decode_frame(&mut buf).unwrap() {
            decoded.push(frame.message);
        }
        prop_assert_eq!(decoded, messages);
    }

    #[test]
    fn random_bytes_never_panic(data in bytes_up_to(2048)) {
        let mut buf = BytesMut::from(&data[..]);
        for _ in 0..64 {
            match decode_frame(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(e) if e.is_frame_local() => continue,
                Err(_) => { if skip_to_next_magic(&mut buf) == 0 { break; } }
            }
        }
        prop_assert!(buf.capacity() <= 2048 + HEADER_LEN + MAX_PAYLOAD_LEN + 64 * 1024);
    }

    #[test]
    fn any_single_bit_flip_is_detected(message in message(), bit in any::<prop::sample::Index>()) {
        let mut frame = encode(3, &message);
        let bit = bit.index(frame.len() * 8);
        frame[bit / 8] ^= 1 << (bit % 8);
        match decode_frame(&mut frame) {
            Ok(Some(decoded)) => prop_assert!(false, "corrupt frame decoded as {decoded:?}"),
            // A flipped length bit can make the frame look longer than what is there.
            Ok(None) => {}
            Err(_) => {}
        }
    }
}

#[test]
fn corrupt_crc_is_a_typed_error() {
    let mut frame = ping_frame();
    let last = frame.len() - 1;
    frame[last] ^= 0xff;
    let err = decode_frame(&mut frame).unwrap_err();
    assert!(matches!(err, FrameError::CrcMismatch { .. }), "{err:?}");
    assert!(!frame.is_empty(), "a stream-level error consumes nothing");
}

#[test]
fn truncated_frame_waits_then_reports_truncation_at_eof() {
    use tokio_util::codec::Decoder;
    let frame = ping_frame();
    let mut partial = BytesMut::from(&frame[..frame.len() - 3]);
    assert!(decode_frame(&mut partial).unwrap().is_none());
    let err = FrameCodec.decode_eof(&mut partial).unwrap_err();
    assert!(
        matches!(err, FrameError::Truncated { available, .. } if available == frame.len() - 3),
        "{err:?}"
    );
}

#[test]
fn oversized_length_is_rejected_without_allocating_it() {
    let mut frame = ping_frame();
    frame[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut buf = BytesMut::from(&frame[..HEADER_LEN]);
    let before = buf.capacity();
    let err = decode_frame(&mut buf).unwrap_err();
    assert!(
        matches!(err, FrameError::Oversized { len } if len == u32::MAX as u64),
        "{err:?}"
    );
    assert_eq!(
        buf.capacity(),
        before,
        "nothing reserved for an oversized claim"
    );
}

#[test]
fn encoding_an_oversized_message_fails_cleanly() {
    let message = Message::Output(OutputChunk {
        stream: OutputStream::Stdout,
        data: vec![0; MAX_PAYLOAD_LEN + 1],
    });
    let mut buf = BytesMut::from(&b"keep"[..]);
    let err = encode_frame(1, &message, &mut buf).unwrap_err();
    assert!(matches!(err, FrameError::Oversized { .. }), "{err:?}");
    assert_eq!(
        &buf[..],
        b"keep",
        "a failed encode leaves the buffer as it was"
    );
}

#[test]
fn unknown_kind_is_frame_local_and_consumed() {
    let mut frame = ping_frame();
    frame[5] = 200;
    fix_crc(&mut frame);
    frame.extend_from_slice(&ping_frame());
    let err = decode_frame(&mut frame).unwrap_err();
    assert!(
        matches!(
            err,
            FrameError::UnknownKind {
                kind: 200,
                request_id: 7
            }
        ),
        "{err:?}"
    );
    assert!(err.is_frame_local());
    let next = decode_frame(&mut frame).unwrap().unwrap();
    assert_eq!(next.message, Message::Ping(Ping { nonce: 42 }));
}

#[test]
fn wrong_version_is_a_typed_error() {
    let mut frame = ping_frame();
    frame[4] = PROTOCOL_VERSION + 1;
    fix_crc(&mut frame);
    let err = decode_frame(&mut frame).unwrap_err();
    assert!(
        matches!(err, FrameError::UnsupportedVersion { found } if found == PROTOCOL_VERSION + 1),
        "{err:?}"
    );
}

#[test]
fn bad_magic_is_reported_as_soon_as_it_differs() {
    let mut buf = BytesMut::from(&b"AVX"[..]);
    let err = decode_frame(&mut buf).unwrap_err();
    assert!(matches!(err, FrameError::BadMagic { .. }), "{err:?}");
}

#[test]
fn malformed_payload_is_frame_local() {
    // A Ping body is one varint; 0xff 0xff ... never terminates within the payload.
    let mut frame = ping_frame();
    frame.truncate(HEADER_LEN);
    frame.extend_from_slice(&[0xff; 3]);
    frame[16..20].copy_from_slice(&3u32.to_le_bytes());
    fix_crc(&mut frame);
    let err = decode_frame(&mut frame).unwrap_err();
    assert!(
        matches!(err, FrameError::Payload { request_id: 7, .. }),
        "{err:?}"
    );
    assert!(frame.is_empty());
}

#[test]
fn trailing_bytes_in_payload_are_rejected() {
    let mut frame = ping_frame();
    frame.extend_from_slice(&[0]);
    let len = (frame.len() - HEADER_LEN) as u32;
    frame[16..20].copy_from_slice(&len.to_le_bytes());
    fix_crc(&mut frame);
    let err = decode_frame(&mut frame).unwrap_err();
    assert!(matches!(err, FrameError::Payload { .. }), "{err:?}");
}

#[test]
fn skip_to_next_magic_finds_the_next_frame_after_garbage() {
    let mut buf = BytesMut::from(&b"garbage!AV"[..]);
    buf.extend_from_slice(&ping_frame());
    assert!(decode_frame(&mut buf).is_err());
    while decode_frame(&mut buf).is_err() {
        assert!(skip_to_next_magic(&mut buf) > 0);
    }
    let frame = decode_frame(&mut buf).unwrap();
    assert!(frame.is_none() || frame.unwrap().message == Message::Ping(Ping { nonce: 42 }));
}

#[test]
fn skip_keeps_a_partial_magic_at_the_end() {
    let mut buf = BytesMut::from(&b"xxxxAVM"[..]);
    assert_eq!(skip_to_next_magic(&mut buf), 4);
    assert_eq!(&buf[..], b"AVM");
}

#[tokio::test]
async fn reader_in_resync_mode_skips_garbage_and_a_stalled_partial_frame() {
    // A partial frame whose header claims 1 MiB (left over from before a
    // revert), then garbage, then the Pong we wait for.
    let mut stream = Vec::new();
    let mut stale = ping_frame();
    stale[16..20].copy_from_slice(&(MAX_PAYLOAD_LEN as u32).to_le_bytes());
    stream.extend_from_slice(&stale);
    stream.extend_from_slice(b"\x00\xffnoise");
    stream.extend_from_slice(&encode(9, &Message::Pong(Pong { nonce: 5 })));
    let (mut tx, rx) = tokio::io::duplex(4096);
    tokio::io::AsyncWriteExt::write_all(&mut tx, &stream)
        .await
        .unwrap();
    let mut reader = FrameReader::new(rx);
    reader.set_resync(true);
    reader.set_hunting(true);
    let frame = tokio::time::timeout(Duration::from_secs(5), reader.next())
        .await
        .expect("not stuck")
        .unwrap()
        .unwrap();
    assert_eq!(frame.message, Message::Pong(Pong { nonce: 5 }));
    assert!(reader.skipped_bytes() > 0);
}

#[tokio::test]
async fn a_frame_inside_a_payload_is_not_taken_for_the_next_frame_when_not_hunting() {
    // An upload whose data is itself a recorded frame: a resyncing (but not
    // hunting) reader must deliver the upload, not the frame inside it.
    let inner = encode(1, &Message::Ping(Ping { nonce: 1 }));
    let upload = encode(
        2,
        &Message::PutFile(PutFileChunk {
            path: "x".into(),
            mode: 0o644,
            offset: 0,
            data: inner.to_vec(),
            last: true,
        }),
    );
    let (mut tx, rx) = tokio::io::duplex(4096);
    let mut reader = FrameReader::new(rx);
    reader.set_resync(true);
    let (first, rest) = upload.split_at(upload.len() - 5);
    tokio::io::AsyncWriteExt::write_all(&mut tx, first)
        .await
        .unwrap();
    let next = reader.next();
    tokio::pin!(next);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut next)
            .await
            .is_err(),
        "waits for the rest"
    );
    tokio::io::AsyncWriteExt::write_all(&mut tx, rest)
        .await
        .unwrap();
    let frame = next.await.unwrap().unwrap();
    assert_eq!(frame.request_id, 2);
    assert!(matches!(frame.message, Message::PutFile(_)));
}

#[tokio::test]
async fn strict_reader_reports_garbage() {
    let (mut tx, rx) = tokio::io::duplex(4096);
    tokio::io::AsyncWriteExt::write_all(&mut tx, b"not a frame at all, really")
        .await
        .unwrap();
    let mut reader = FrameReader::new(rx);
    assert!(matches!(
        reader.next().await,
        Err(FrameError::BadMagic { .. })
    ));
}

#[tokio::test]
async fn writer_and_reader_round_trip_over_a_pipe() {
    let (tx, rx) = tokio::io::duplex(1 << 16);
    let mut writer = FrameWriter::new(tx);
    let mut reader = FrameReader::new(rx);
    let big = Message::Output(OutputChunk {
        stream: OutputStream::Stderr,
        data: vec![7; 300_000],
    });
    let send = async {
        writer.send(1, &big).await.unwrap();
        writer.send(2, &Message::Ok(Ack {})).await.unwrap();
        drop(writer);
    };
    let recv = async {
        let a = reader.next().await.unwrap().unwrap();
        let b = reader.next().await.unwrap().unwrap();
        assert!(reader.next().await.unwrap().is_none(), "clean EOF");
        (a, b)
    };
    let ((), (a, b)) = tokio::join!(send, recv);
    assert_eq!(a.message, big);
    assert_eq!((b.request_id, b.message), (2, Message::Ok(Ack {})));
}
