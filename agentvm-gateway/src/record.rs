//! Record mode: pass-through to the vendor's API with the host's key, writing a cassette.
//!
//! The upstream client is hyper-util's client with hyper-rustls (ring provider, the host's
//! native root certificates): the gateway already is a hyper server, so it reuses hyper's
//! types and adds only the TLS layer, where reqwest would bring a second HTTP stack. Plain
//! `http://` upstreams work too (tests use a loopback fake). The upstream response is read in
//! full before it is answered: same bytes, but not streamed as they arrive.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::api::Api;
use crate::cassette::Interaction;
use crate::error::{GatewayError, SetupError};

/// The vendors' API base URLs: the only place their host names appear.
pub mod vendor {
    /// Anthropic's API base URL.
    pub const ANTHROPIC: &str = "https://api.anthropic.com";
    /// OpenAI's API base URL.
    pub const OPENAI: &str = "https://api.openai.com";
}

/// Where record mode forwards to, and the host's keys it injects.
#[derive(Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Base URL for the Anthropic API (the request path is appended).
    pub anthropic_base: String,
    /// Base URL for the OpenAI APIs.
    pub openai_base: String,
    /// The host's Anthropic key (`ANTHROPIC_API_KEY`).
    pub anthropic_key: Option<String>,
    /// The host's OpenAI key (`OPENAI_API_KEY`).
    pub openai_key: Option<String>,
    /// Give up on an upstream response after this long.
    pub timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("anthropic_base", &self.anthropic_base)
            .field("openai_base", &self.openai_base)
            .field(
                "anthropic_key",
                &self.anthropic_key.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "openai_key",
                &self.openai_key.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Upstream {
    /// The vendors' URLs and keys from the process environment (see [`Upstream::from_lookup`]).
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Keys from `ANTHROPIC_API_KEY` / `OPENAI_API_KEY`; base URLs from
    /// `AGENTVM_ANTHROPIC_UPSTREAM` / `AGENTVM_OPENAI_UPSTREAM`, else the vendors'.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            anthropic_base: lookup("AGENTVM_ANTHROPIC_UPSTREAM")
                .unwrap_or_else(|| vendor::ANTHROPIC.into()),
            openai_base: lookup("AGENTVM_OPENAI_UPSTREAM").unwrap_or_else(|| vendor::OPENAI.into()),
            anthropic_key: lookup("ANTHROPIC_API_KEY").filter(|k| !k.is_empty()),
            openai_key: lookup("OPENAI_API_KEY").filter(|k| !k.is_empty()),
            timeout: Duration::from_secs(600),
        }
    }

    /// Both APIs at one base URL (e.g. a loopback fake) with the given keys.
    pub fn at(
        base: impl Into<String>,
        anthropic_key: Option<String>,
        openai_key: Option<String>,
    ) -> Self {
        let base = base.into();
        Self {
            anthropic_base: base.clone(),
            openai_base: base,
            anthropic_key,
            openai_key,
            timeout: Duration::from_secs(600),
        }
    }

    fn base(&self, api: Api) -> &str {
        match api {
            Api::Anthropic => &self.anthropic_base,
            Api::OpenAiChat | Api::OpenAiResponses => &self.openai_base,
        }
    }

    /// The key for `api`, or the error that says which variable to set.
    fn key(&self, api: Api) -> Result<&str, GatewayError> {
        match api {
            Api::Anthropic => self
                .anthropic_key
                .as_deref()
                .ok_or(GatewayError::MissingKey {
                    var: "ANTHROPIC_API_KEY",
                }),
            _ => self.openai_key.as_deref().ok_or(GatewayError::MissingKey {
                var: "OPENAI_API_KEY",
            }),
        }
    }

    fn secrets(&self) -> Vec<&str> {
        [&self.anthropic_key, &self.openai_key]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }
}

/// Headers never forwarded: hop-by-hop, recomputed, or the guest's (fake) credentials.
const DROPPED_HEADERS: [&str; 9] = [
    "host",
    "content-length",
    "connection",
    "transfer-encoding",
    "accept-encoding",
    "x-api-key",
    "authorization",
    "proxy-authorization",
    "keep-alive",
];

/// The headers sent upstream: the agent's, minus the hop-by-hop and recomputed ones and its (fake) credentials, plus the host's key.
pub fn upstream_headers(api: Api, incoming: &HeaderMap, key: &str) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in incoming {
        if !DROPPED_HEADERS.contains(&name.as_str()) {
            out.append(name, value.clone());
        }
    }
    let (name, value) = match api {
        Api::Anthropic => ("x-api-key", key.to_owned()),
        _ => ("authorization", format!("Bearer {key}")),
    };
    if let Ok(mut value) = HeaderValue::from_str(&value) {
        value.set_sensitive(true);
        out.insert(name, value);
    }
    out
}

/// An upstream answer.
pub(crate) struct UpstreamResponse {
    pub status: u16,
    pub content_type: String,
    pub body: Bytes,
}

/// Forwards requests and appends interactions to the cassette.
pub(crate) struct Recorder {
    upstream: Upstream,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl Recorder {
    /// Creates (truncates) the cassette and builds the client.
    pub fn new(path: PathBuf, upstream: Upstream) -> Result<Self, SetupError> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(SetupError::Tls)?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SetupError::CreateCassette {
                path: path.clone(),
                source,
            })?;
        }
        let file = std::fs::File::create(&path).map_err(|source| SetupError::CreateCassette {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            upstream,
            client,
            path,
            file: Mutex::new(file),
        })
    }

    /// Sends the agent's request upstream with the host's key and reads the whole answer.
    pub async fn forward(
        &self,
        request: u64,
        api: Api,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, GatewayError> {
        let key = self.upstream.key(api)?;
        let url = format!(
            "{}{path_and_query}",
            self.upstream.base(api).trim_end_matches('/')
        );
        let fail = |message: String| GatewayError::Upstream {
            request,
            url: url.clone(),
            message,
        };
        let mut builder = Request::builder().method(method.clone()).uri(&url);
        if let Some(h) = builder.headers_mut() {
            *h = upstream_headers(api, headers, key);
        }
        let req = builder
            .body(Full::new(body))
            .map_err(|e| fail(format!("bad request: {e}")))?;
        let exchange = async {
            let response = self
                .client
                .request(req)
                .await
                .map_err(|e| fail(format!("{e:#}")))?;
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json")
                .to_owned();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| fail(format!("reading body: {e}")))?;
            Ok(UpstreamResponse {
                status,
                content_type,
                body: body.to_bytes(),
            })
        };
        tokio::time::timeout(self.upstream.timeout, exchange)
            .await
            .map_err(|_| fail(format!("no answer within {:?}", self.upstream.timeout)))?
    }

    /// Appends `interaction` to the cassette with the host's keys redacted.
    pub fn write(&self, interaction: &Interaction) -> Result<(), GatewayError> {
        use std::io::Write;
        let line = interaction.to_line(&self.upstream.secrets());
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(file, "{line}")
            .and_then(|()| file.flush())
            .map_err(|e| GatewayError::CassetteWrite {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_host_env_and_bases_default_to_the_vendors() {
        let up =
            Upstream::from_lookup(|n| (n == "ANTHROPIC_API_KEY").then(|| "sk-host".to_owned()));
        assert_eq!(up.anthropic_base, vendor::ANTHROPIC);
        assert_eq!(up.key(Api::Anthropic).unwrap(), "sk-host");
        assert_eq!(
            up.key(Api::OpenAiResponses),
            Err(GatewayError::MissingKey {
                var: "OPENAI_API_KEY"
            })
        );
        assert!(!format!("{up:?}").contains("sk-host"));
    }

    #[test]
    fn guest_credentials_are_replaced_by_the_host_key() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("sk-fake"));
        h.insert("authorization", HeaderValue::from_static("Bearer sk-fake"));
        h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        h.insert("accept-encoding", HeaderValue::from_static("gzip"));
        let out = upstream_headers(Api::Anthropic, &h, "sk-host");
        assert_eq!(out["x-api-key"], "sk-host");
        assert_eq!(out["anthropic-version"], "2023-06-01");
        assert!(out.get("authorization").is_none() && out.get("accept-encoding").is_none());
        let out = upstream_headers(Api::OpenAiChat, &h, "sk-host");
        assert_eq!(out["authorization"], "Bearer sk-host");
        assert!(out.get("x-api-key").is_none());
    }
}
