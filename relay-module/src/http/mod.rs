//! The HTTP surface: what arrives on a listener before it is a WebSocket or a proxied
//! request.
//!
//! - [`front`]: what every listener runs before Pingora's HTTP code: the TLS handshake and
//!   the request head and keep-alive deadlines (`http:`).
//! - [`service`]: `RelayProxy`, the Pingora `ProxyHttp` module (`/health`, `/ws`, routed
//!   paths, 404) and the wiring of the relay into a Pingora `Server`.
//! - [`admin`]: the admin listener (`/metrics`, `/ready`, `/drain`, `/resume`).
//! - [`params`] and [`handshake`]: validation of a `/ws` request (query, RFC 6455), plain
//!   Rust.
//! - [`routes`]: the route table for every other path, load balancing and forwarded headers.

pub mod admin;
pub mod front;
pub mod handshake;
pub mod params;
pub mod routes;
pub mod service;
