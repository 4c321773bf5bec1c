//! `agentvm-guest`: the agent inside the VM. It serves the agentvm control
//! protocol on a byte stream: runs commands, moves files, lists workspace changes.
fn main() {}
