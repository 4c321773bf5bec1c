//! `cargo xtask`: project automation (guest image, set-up, benchmarks).
fn main() {}
