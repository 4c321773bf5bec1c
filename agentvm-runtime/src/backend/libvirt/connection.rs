//! A libvirt connection shared by the backend and its machines.
//!
//! The `virt` crate's calls block (RPC to the daemon), so every call runs in
//! `tokio::task::spawn_blocking`. A connection that broke (daemon restarted)
//! is reopened once and the call retried.

use std::sync::{Arc, Mutex};

use virt::connect::Connect;
use virt::enumutil::Enum;
use virt::error::{Error as VirtError, ErrorDomain, ErrorNumber};

use crate::backend::BackendError;

/// The environment variable naming the URI (libvirt's own).
pub const URI_ENV: &str = "LIBVIRT_DEFAULT_URI";
/// The URI used when nothing else is configured.
pub const DEFAULT_URI: &str = "qemu:///system";

/// The URI to use: the configured one, else `LIBVIRT_DEFAULT_URI`, else `qemu:///system`.
pub fn resolve_uri(configured: Option<&str>, env: Option<&str>) -> String {
    configured
        .filter(|s| !s.trim().is_empty())
        .or(env.filter(|s| !s.trim().is_empty()))
        .unwrap_or(DEFAULT_URI)
        .trim()
        .to_owned()
}

/// The error of an unreachable daemon, with what to do: on this machine (no
/// host name in the URI) start it with the script, elsewhere check the host.
pub fn unreachable(uri: &str, message: &str) -> BackendError {
    let on_this_machine = uri
        .split_once("://")
        .is_some_and(|(_, rest)| rest.starts_with('/'));
    let hint = if on_this_machine {
        "start it with scripts/start-libvirtd.sh"
    } else {
        "check that the host is up, reachable from here, and runs its libvirt daemon"
    };
    BackendError::Io {
        context: format!("libvirt daemon unreachable at {uri}: {hint}"),
        source: std::io::Error::other(message.to_owned()),
    }
}

/// Whether an error means the connection itself is gone.
pub fn is_connection_error(e: &VirtError) -> bool {
    matches!(
        e.code(),
        Enum::Known(ErrorNumber::SystemError | ErrorNumber::NoConnect | ErrorNumber::Rpc)
    ) || matches!(e.domain(), Enum::Known(ErrorDomain::Rpc))
}

/// Whether an error says the domain does not exist (any more).
pub fn is_no_domain(e: &VirtError) -> bool {
    matches!(e.code(), Enum::Known(ErrorNumber::NoDomain))
}

/// Whether an error says the domain is not running.
pub fn is_not_running(e: &VirtError) -> bool {
    matches!(e.code(), Enum::Known(ErrorNumber::OperationInvalid))
}

/// One libvirt connection, reopened once when it broke.
#[derive(Debug)]
pub struct Connection {
    uri: String,
    conn: Mutex<Option<Connect>>,
}

impl Connection {
    /// Opens the connection (blocking).
    pub fn open(uri: &str) -> Result<Arc<Self>, BackendError> {
        // libvirt's default error handler prints every error to stderr; errors
        // are returned (and logged) instead.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|e| unreachable(uri, e.message()))?;
        Ok(Arc::new(Self {
            uri: uri.to_owned(),
            conn: Mutex::new(Some(conn)),
        }))
    }

    /// A connection to `uri` that is opened by its first call (for a host
    /// that did not answer yet).
    pub fn unopened(uri: &str) -> Arc<Self> {
        virt::error::clear_error_callback();
        Arc::new(Self {
            uri: uri.to_owned(),
            conn: Mutex::new(None),
        })
    }

    /// The URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn current(&self) -> Result<Connect, BackendError> {
        let mut guard = self.conn.lock().expect("libvirt connection lock");
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = Connect::open(Some(&self.uri)).map_err(|e| unreachable(&self.uri, e.message()))?;
        *guard = Some(c.clone());
        Ok(c)
    }

    fn drop_broken(&self) {
        let mut guard = self.conn.lock().expect("libvirt connection lock");
        // Dropping the handle releases it.
        guard.take();
    }

    /// Runs `f` on the connection (blocking); on a connection error, reopens
    /// the connection and runs it once more.
    pub fn with_blocking<T>(
        &self,
        f: impl Fn(&Connect) -> Result<T, VirtError>,
    ) -> Result<Result<T, VirtError>, BackendError> {
        let conn = self.current()?;
        match f(&conn) {
            Err(e) if is_connection_error(&e) || !conn.is_alive().unwrap_or(false) => {
                tracing::warn!(uri = %self.uri, error = %e, "libvirt connection broken: reconnecting");
                self.drop_broken();
                let conn = self.current()?;
                Ok(f(&conn))
            }
            other => Ok(other),
        }
    }

    /// [`Connection::with_blocking`] on a blocking thread.
    pub async fn with<T, F>(self: &Arc<Self>, f: F) -> Result<Result<T, VirtError>, BackendError>
    where
        T: Send + 'static,
        F: Fn(&Connect) -> Result<T, VirtError> + Send + 'static,
    {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.with_blocking(f))
            .await
            .map_err(|e| BackendError::Io {
                context: "libvirt call".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_resolution() {
        assert_eq!(resolve_uri(None, None), "qemu:///system");
        assert_eq!(
            resolve_uri(None, Some("qemu:///session")),
            "qemu:///session"
        );
        assert_eq!(
            resolve_uri(Some("test:///default"), Some("qemu:///session")),
            "test:///default"
        );
        assert_eq!(resolve_uri(Some(" "), None), "qemu:///system");
    }

    #[test]
    fn unreachable_names_the_script() {
        let e = unreachable("qemu:///system", "Failed to connect socket");
        let text = e.to_string();
        assert!(
            text.starts_with("libvirt daemon unreachable at qemu:///system: start it with scripts/start-libvirtd.sh"),
            "{text}"
        );
        assert!(text.contains("Failed to connect socket"), "{text}");
        let e = unreachable("qemu+ssh://ci@b.example/system", "Connection refused");
        assert!(
            e.to_string().starts_with(
                "libvirt daemon unreachable at qemu+ssh://ci@b.example/system: check that the host is up"
            ),
            "{e}"
        );
    }
}
