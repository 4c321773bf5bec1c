//! The host side of the agents' network: a **model gateway** that speaks the Anthropic
//! Messages and OpenAI Chat Completions / Responses APIs, and an allowlisting **egress
//! proxy**. It knows no VM backend: both serve any `AsyncRead + AsyncWrite` stream (a
//! connection tunnelled out of the guest, or a socket accepted on 127.0.0.1).
//!
//! The gateway answers in one of three modes ([`Model`]):
//! * **scripted** — the test's [`Turn`]s, mapped onto the tools the agent advertises
//!   (see [`script`] for the mapping and which requests consume a turn);
//! * **replay** — a JSON Lines [`cassette`], matched on the [`normalise`]d request; a
//!   request that matches nothing gets an error and a readable diff;
//! * **record** — pass-through to the vendor with the host's key ([`Upstream`]), writing
//!   the cassette. `AGENTVM_MODEL` picks replay or record, and `CI` forces replay
//!   ([`ModelMode`]).
//!
//! Everything the agent asked and got is in [`Gateway::transcript`]; anything that went
//! wrong (script ran out, mismatch, bad request) in [`Gateway::take_errors`].
//!
//! ```no_run
//! use agentvm_gateway::{Gateway, GatewayConfig, Model, Turn};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let gateway = Gateway::new(GatewayConfig::new(Model::scripted([
//!     Turn::shell("echo hi > hi.txt"),
//!     Turn::edit("README.md", "old", "new"),
//!     Turn::text("done"),
//! ])))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let port = listener.local_addr()?.port();
//! let _server = gateway.serve_listener(listener);
//! // … run the agent with ANTHROPIC_BASE_URL=http://127.0.0.1:{port} …
//! let errors = gateway.take_errors();
//! assert!(errors.is_empty(), "model gateway: {errors:#?}");
//! println!("{}", serde_json::to_string_pretty(&gateway.transcript())?);
//! # Ok(()) }
//! ```
//!
//! The egress proxy:
//!
//! ```no_run
//! use agentvm_gateway::egress::{Allowlist, EgressProxy};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let proxy = EgressProxy::new(Allowlist::parse(["*.crates.example", "git.example:443"])?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let _server = proxy.serve_listener(listener);
//! // … HTTPS_PROXY=http://127.0.0.1:{port} …
//! for c in proxy.connections() { println!("{} {}:{} {}", c.allowed, c.host, c.port, c.bytes_down); }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod anthropic;
pub mod api;
pub mod cassette;
pub mod egress;
pub mod error;
mod gateway;
pub mod model;
pub mod normalise;
pub mod openai_chat;
pub mod openai_responses;
pub mod record;
pub mod script;
pub mod sse;
pub mod transcript;

pub use api::{Api, InputItem, ToolCall, Usage};
pub use egress::{Allowlist, ConnectionKind, ConnectionRecord, EgressProxy};
pub use error::{CassetteError, GatewayError, SetupError};
pub use gateway::{Gateway, GatewayConfig, DEFAULT_MAX_BODY_BYTES};
pub use model::{Model, ModelMode};
pub use record::Upstream;
pub use script::{ChatEditFormat, Turn};
pub use transcript::{Exchange, ExchangeKind, ModeName};
