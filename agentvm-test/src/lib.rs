//! agentvm-test: the crate users depend on to write agent behaviour tests that
//! run inside VMs (`#[agent_vm_test]`, the test harness, snapshot helpers).
//!
//! ```ignore
//! // tests/agents.rs — Cargo.toml: [[test]] name = "agents", harness = false
//! use agentvm_test::prelude::*;
//!
//! #[agent_vm_test(timeout = "30s", profile = "light", network = "isolated")]
//! async fn agent_creates_hello(vm: &mut Vm) -> TestResult {
//!     let agent = Agent::script("examples/agents/hello.sh");
//!     let run = vm.run_agent(&agent, Task::prompt("create hello.txt saying hi")).await?;
//!     assert_eq!(run.exit_code(), Some(0));
//!     assert_agent_snapshot!(run);
//!     Ok(())
//! }
//!
//! agentvm_test::main!();
//! ```
//!
//! * [`agent_vm_test`] registers a test; [`main!`] runs them all with the
//!   [`harness`] (libtest-compatible flags, a warm VM pool, revert after each
//!   test, artifacts of failed tests);
//! * [`Agent`] and [`Task`] describe what runs and on what;
//!   [`VmExt::run_agent`] runs it and returns an [`AgentRun`];
//! * [`assert_agent_snapshot!`] snapshots the run with insta;
//! * secrets ([`Agent::secret_env`]) are redacted everywhere ([`redact`]).
//! * observability: the [`audit`] log, [`anomaly`] detection and the run
//!   [`report`] (`report.json`, `junit.xml`); Prometheus metrics are in
//!   [`agentvm_runtime::metrics`].
//!
//! Configuration: `.config/agentvm.toml` and `AGENT_VM_*` variables, see
//! [`agentvm_runtime::config`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod anomaly;
pub mod audit;
pub mod harness;
pub mod pool_source;
pub mod redact;
pub mod registry;
pub mod report;
pub mod snapshot;

mod agent;
mod context;
mod run;
mod vm_ext;

pub use agent::{
    Agent, Task, AGENT_DIR, DEFAULT_AGENT_OUTPUT_LIMIT, PROMPT_FILE, TASK_DIR, WORKSPACE,
};
pub use agentvm_gateway;
pub use agentvm_macros::agent_vm_test;
pub use agentvm_runtime;
pub use agentvm_runtime::command::Command;
pub use harness::{run_harness, run_tests};
pub use registry::{TestFailure, TestResult, Vm};
pub use run::{
    unified_diff, AgentRun, Before, Change, ChangeType, EntryKind, Resources, MAX_DIFF_TEXT,
};
pub use vm_ext::{AgentError, ShellOutput, VmExt};

/// Everything a test file needs: `use agentvm_test::prelude::*;`.
pub mod prelude {
    pub use crate::{
        agent_vm_test, assert_agent_snapshot, Agent, AgentRun, Command, Task, TestResult, Vm, VmExt,
    };
    pub use agentvm_gateway::{Model, Turn};
}

/// Defines the test binary's `main`, which runs every `#[agent_vm_test]` of
/// the binary with the [`harness`]. Put it once at the end of a test file
/// whose `[[test]]` target has `harness = false`.
///
/// `agentvm_test::main!();` expands to
/// `fn main() { ::agentvm_test::run_harness() }`.
#[macro_export]
macro_rules! main {
    () => {
        fn main() {
            ::agentvm_test::run_harness()
        }
    };
}

/// What `#[agent_vm_test]` expansions refer to (through absolute
/// `::agentvm_test::__private::...` paths). Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::registry::{IntoTestOutcome, TestCase, TestConfig, TestFuture, Vm, TESTS};
    pub use ::core::option::Option::{None, Some};
    pub use ::core::time::Duration;
    pub use ::insta;
    pub use ::linkme;
    pub use ::std::boxed::Box;
}
