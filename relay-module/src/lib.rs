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
//! The source tree shows the parts:
//!
//! | module | owns |
//! |---|---|
//! | [`cluster`] | several nodes: the view (Ketama ring, health checks), tunnels, moves |
//! | [`http`] | the `ProxyHttp` service, `/ws` validation (params, RFC 6455 handshake), routes |
//! | [`session`] | session state: hub, sessions, late-daemon buffers, timers (no Pingora types) |
//! | [`socket`] | one WebSocket's reader and writer tasks and its outbound queue |
//! | [`ops`] | background services: shutdown drain, TLS store and SIGHUP reload, timers |
//! | [`protocol`], [`config`] | wire vocabulary (close codes, control JSON) and tuning |
//!
//! [`add_relay`] wires all of them into a Pingora `Server`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cluster;
pub mod config;
pub mod http;
pub mod ops;
pub mod protocol;
pub mod session;
pub mod socket;

pub use config::RelayConf;
pub use http::routes::{RouteConf, Router};
pub use http::service::{add_relay, relay_service, Listener, RelayProxy};
pub use ops::lifecycle::{Lifecycle, RelaySignals};
pub use ops::tls::CertStore;
pub use session::hub::SessionHub;
