//! Session state, free of Pingora and socket types: the hub of sessions keyed by
//! (version, serverId), each session's sockets and routing decisions, the late-daemon
//! buffers and the nudge/reset timer queue (relay-protocol.md §2, §3).
//!
//! - [`hub`]: `SessionHub`, the table and what the whole relay shares (budgets, counts,
//!   shutdown state); `Attachment`, one socket's registration.
//! - [`state`]: `Session`, where each frame goes; never awaits, always under its lock.
//! - [`admission`]: the WebSocket ceilings (process, per address) and upgrade buckets.
//! - [`buffer`]: the late-daemon buffer and its process-wide budget.
//! - [`timers`]: the nudge and reset timers of spec §3.8.

pub mod admission;
pub mod buffer;
pub mod hub;
pub mod state;
pub mod timers;

pub use state::{ControlAdmit, Forward, Peer, Session};
