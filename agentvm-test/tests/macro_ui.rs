//! Compile-time behaviour of `#[agent_vm_test]`: what compiles and registers,
//! and where each kind of mistake is reported (tests/ui/*.stderr).
//!
//! To regenerate the expected output after an intended change:
//! `TRYBUILD=overwrite cargo test -p agentvm-test --test macro_ui`, then read
//! the diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass_*.rs");
    t.compile_fail("tests/ui/fail_*.rs");
}
