//! The HTTP/1.1 wire format: how messages are delimited, parsed and written (RFC 9112).
//!
//! Framing headers are always derived from the parsed message and written by the proxy, never copied from a peer.

pub mod framing;
