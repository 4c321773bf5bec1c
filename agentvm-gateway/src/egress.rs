//! Egress proxy (HTTP CONNECT + plain-HTTP forward proxy with an allowlist).
