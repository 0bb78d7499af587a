//! paseo-relay's relay module: the Paseo relay protocol (v1 and v2) served in-process by a
//! Pingora `ProxyHttp` service. The wire contract is `relay-protocol.md` (shared with the
//! project); section numbers in docs refer to it.
//!
//! ```text
//!                     ┌──────────── Pingora HTTP/1 listener ─────────────┐
//!  daemon control ──▶ │ RelayProxy::request_filter                       │
//!  daemon data(x) ──▶ │   /health → 200, /ws → params → handshake → 101  │
//!  app client(x)  ──▶ │   other → a route (Pingora proxies it) or 404    │
//!                     └──────┬───────────────────────────────────────────┘
//!                            │ raw stream taken out of Pingora after the 101
//!                            ▼
//!          conn::run: reader task + writer task per socket (Outbox, bounded in bytes)
//!                            │ attach / forward / detach
//!                            ▼
//!          SessionHub ─▶ Session (version, serverId): control, data(x), clients(x),
//!                        late-daemon buffer per x; nudge/reset timers (timers.rs)
//! ```
//!
//! Routing: `routes` (route table, load balancing, `X-Forwarded-*`, trusted proxies).
//! Operations: `tls` (certificate store, SIGHUP reload, plain HTTP on a TLS port) and
//! `lifecycle` (SIGTERM / SIGQUIT drain) run as Pingora background services next to the
//! timers; [`add_relay`] wires all of them into a `Server`.
//!
//! Only `service`, `conn`, `tls`, `lifecycle` and the timer service know Pingora or socket types; `hub`, `session`, `buffer`,
//! `params`, `handshake` and `protocol` are plain Rust with unit tests.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod buffer;
pub mod config;
pub mod conn;
pub mod handshake;
pub mod hub;
pub mod lifecycle;
pub mod outbox;
pub mod params;
pub mod protocol;
pub mod routes;
pub mod service;
pub mod session;
pub mod timers;
pub mod tls;

pub use config::RelayConf;
pub use hub::SessionHub;
pub use lifecycle::{Lifecycle, RelaySignals};
pub use routes::{RouteConf, Router};
pub use service::{add_relay, relay_service, Listener, RelayProxy};
pub use tls::CertStore;
