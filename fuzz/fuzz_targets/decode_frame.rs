//! Fuzzes the host-side frame decoder with arbitrary guest bytes:
//! `cargo +nightly fuzz run decode_frame` (or `cargo fuzz run` with a nightly toolchain).
#![no_main]

use agentvm_runtime::protocol::{decode_frame, encode_frame, skip_to_next_magic};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // Decode the way the client does in resync mode: skip garbage, keep going.
    for _ in 0..1024 {
        match decode_frame(&mut buf) {
            Ok(Some(frame)) => {
                // Whatever decodes must re-encode and decode to the same thing.
                let mut again = BytesMut::new();
                encode_frame(frame.request_id, &frame.message, &mut again).expect("re-encodes");
                let round = decode_frame(&mut again).expect("decodes").expect("complete");
                assert_eq!(round, frame);
            }
            Ok(None) => break,
            Err(e) if e.is_frame_local() => {}
            Err(_) => {
                if skip_to_next_magic(&mut buf) == 0 {
                    break;
                }
            }
        }
    }
});
