//! relay-bench: a benchmark that drives any relay speaking the Paseo v2 protocol
//! (relay-protocol.md §3) on loopback, so that this relay and other implementations can be
//! measured side by side, plus a raw TCP forwarder as the machine's speed of light.
//!
//! ```text
//!            ┌──────────── relay under test (--pid: CPU and RSS from /proc) ───────────┐
//!   app ─────┤ client socket ──▶ data socket ──▶ daemon (echo) ──▶ data ──▶ client ──▶ app
//!            └── control socket: sync, connected X  (the daemon then opens data X) ────┘
//! ```
//!
//! Workloads: [`run_echo`] (messages per second, round-trip latency, CPU per message),
//! [`run_idle`] (RSS per idle socket), [`run_large`] (1-32 MiB messages), [`run_baseline`]
//! (the `echo` load through [`baseline::Forwarder`]), [`run_compare`] (two relays side by side,
//! fresh per run, medians and ratios) and [`run_plot`] (latency against load).
//! Each returns [`Record`]s, printed as a table or as JSON lines by the binary.
//!
//! Units are in names: `_us` µs, `_ms` ms, `_s` s, `_kb` kB (1024 bytes, as /proc), `_bytes`,
//! `_per_s` per second, `_mb_per_s` 10^6 bytes per second. Every run is bounded in count
//! and time (see [`params`]) and refuses targets that are not loopback.

#![warn(missing_docs)]

pub mod baseline;
pub mod compare;
pub mod driver;
pub mod echo;
pub mod error;
pub mod idle;
pub mod large;
pub mod params;
pub mod plot;
pub mod procfs;
pub mod ratios;
pub mod report;
pub mod v2;

pub use baseline::run_baseline;
pub use compare::{run_compare, CompareParams};
pub use echo::run_echo;
pub use error::{BenchError, Result};
pub use idle::run_idle;
pub use large::run_large;
pub use params::{
    BaselineParams, EchoParams, IdleParams, LargeParams, LoadShape, PlotParams, RelayUrl,
};
pub use plot::run_plot;
pub use report::{table, Field, Record};
