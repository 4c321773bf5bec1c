//! Frame encode/decode throughput: `cargo bench -p agentvm-runtime --bench protocol`.
//! Prints MiB/s for 64 KiB output chunks (the bulk path) and frames/s for
//! small pings (the per-frame overhead path).

use std::hint::black_box;
use std::time::{Duration, Instant};

use agentvm_runtime::protocol::{
    decode_frame, encode_frame, Message, OutputChunk, OutputStream, Ping,
};
use bytes::BytesMut;

fn measure(name: &str, message: &Message, bytes_per_frame: usize) {
    let mut buf = BytesMut::with_capacity(1 << 20);
    // Warm up, then run for about a second.
    let mut frames = 0u64;
    let start = Instant::now();
    let mut encode_time = Duration::ZERO;
    let mut decode_time = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(1) {
        let t = Instant::now();
        for i in 0..64 {
            encode_frame(i, message, &mut buf).unwrap();
        }
        encode_time += t.elapsed();
        let t = Instant::now();
        while let Some(frame) = decode_frame(&mut buf).unwrap() {
            black_box(frame);
        }
        decode_time += t.elapsed();
        frames += 64;
    }
    let mib = (frames as f64 * bytes_per_frame as f64) / (1024.0 * 1024.0);
    println!(
        "{name:<22} encode {:>9.0} frames/s {:>8.0} MiB/s | decode {:>9.0} frames/s {:>8.0} MiB/s",
        frames as f64 / encode_time.as_secs_f64(),
        mib / encode_time.as_secs_f64(),
        frames as f64 / decode_time.as_secs_f64(),
        mib / decode_time.as_secs_f64(),
    );
}

fn main() {
    let chunk = Message::Output(OutputChunk {
        stream: OutputStream::Stdout,
        data: vec![0xa5; 64 * 1024],
    });
    measure("output chunk 64 KiB", &chunk, 64 * 1024);
    measure("ping", &Message::Ping(Ping { nonce: 42 }), 33);
}
