//! Wire vocabulary of the Paseo relay: versions, roles, socket kinds, control-channel JSON,
//! close codes and reasons. No I/O here (relay-protocol.md §1-§3).

use serde::Serialize;
use std::time::{SystemTime, UNIX_EPOCH};

/// Protocol version from the `v` query parameter (spec §1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// Legacy single pair (spec §2).
    V1,
    /// Control, data and client sockets (spec §3).
    V2,
}

/// The `role` query parameter (spec §1.2): exactly `server` or `client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The daemon side.
    Server,
    /// The app side (mobile, desktop, CLI).
    Client,
}

/// What a socket is inside its session, derived from version, role and connectionId
/// (spec §2, §3.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SocketKind {
    /// v1 socket; one slot per role.
    V1(Role),
    /// v2 daemon control socket (`role=server`, no connectionId).
    Control,
    /// v2 daemon data socket for a connectionId.
    Data(String),
    /// v2 client socket for a connectionId (given or assigned).
    Client(String),
}

impl std::fmt::Display for SocketKind {
    /// `v1 server`, `control`, `data <id>`, `client <id>` (for logs; control characters in
    /// the id are escaped).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketKind::V1(Role::Server) => f.write_str("v1 server"),
            SocketKind::V1(Role::Client) => f.write_str("v1 client"),
            SocketKind::Control => f.write_str("control"),
            SocketKind::Data(x) => write!(f, "data {}", x.escape_debug()),
            SocketKind::Client(x) => write!(f, "client {}", x.escape_debug()),
        }
    }
}

/// Messages the relay sends on a control socket (spec §3.4), serialised as compact JSON with
/// `type` first, e.g. `{"type":"sync","connectionIds":["a"]}`.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ControlMessage {
    /// Every connectionId that has at least one client socket; always an array.
    Sync {
        /// Distinct ids, order unspecified.
        #[serde(rename = "connectionIds")]
        connection_ids: Vec<String>,
    },
    /// A client socket attached.
    Connected {
        /// The client's connectionId.
        #[serde(rename = "connectionId")]
        connection_id: String,
    },
    /// The last client socket of a connectionId left.
    Disconnected {
        /// The connectionId that has no clients any more.
        #[serde(rename = "connectionId")]
        connection_id: String,
    },
    /// Answer to a JSON ping; `ts` is milliseconds since the Unix epoch.
    Pong {
        /// Wall-clock milliseconds since the epoch.
        ts: u64,
    },
}

impl ControlMessage {
    /// Compact JSON text of the message.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("control messages always serialise")
    }

    /// A pong stamped with the current wall-clock time.
    pub fn pong_now() -> Self {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        ControlMessage::Pong { ts }
    }
}

/// Whether a text frame received on a control socket is a JSON ping: any JSON object whose
/// `type` is exactly `"ping"`; surrounding whitespace is allowed (spec §3.4, cases 24-26).
pub fn is_json_ping(text: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    // Only objects deserialise into a struct from JSON text starting with `{`; arrays would
    // deserialise positionally, so reject them first.
    if !text.trim_start().starts_with('{') {
        return false;
    }
    match serde_json::from_str::<Typed>(text) {
        Ok(t) => t.kind.as_deref() == Some("ping"),
        Err(_) => false,
    }
}

/// A new relay-assigned connectionId: `conn_` + 16 random lowercase hex digits (spec §0, §3.2).
pub fn assign_connection_id() -> String {
    format!("conn_{:016x}", rand::random::<u64>())
}

/// Close codes and reasons the relay sends (spec §0, §3).
pub mod close {
    /// Normal closure (peer echoes).
    pub const NORMAL: u16 = 1000;
    /// Going away: last client left, ping timeout.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error (bad frame, RSV bits, unknown opcode).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Text frame that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation: replaced by a newer socket.
    pub const POLICY: u16 = 1008;
    /// Message over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error: control unresponsive.
    pub const INTERNAL: u16 = 1011;
    /// Service restart: the data socket of the client's connectionId went away.
    pub const RESTART: u16 = 1012;
    /// Try again later: slow consumer, buffer budget exhausted.
    pub const TRY_AGAIN: u16 = 1013;

    /// Reason for 1008 on replacement (spec §2, §3.3).
    pub const REPLACED: &str = "Replaced by new connection";
    /// Reason for 1001 to the data socket when the last client leaves (spec §3.9).
    pub const CLIENT_DISCONNECTED: &str = "Client disconnected";
    /// Reason for 1012 to clients when their data socket closes (spec §3.9).
    pub const SERVER_DISCONNECTED: &str = "Server disconnected";
    /// Reason for 1011 at the reset deadline (spec §3.8).
    pub const CONTROL_UNRESPONSIVE: &str = "Control unresponsive";
    /// Reason for 1009 (spec §0).
    pub const TOO_BIG_REASON: &str = "Message too big";
    /// Reason for 1013 when a destination's queue stays full (spec §0).
    pub const SLOW_CONSUMER: &str = "Slow consumer";
    /// Reason for 1013 when the process-wide buffer budget is spent (spec §0).
    pub const INGRESS_CAPACITY: &str = "Relay ingress capacity";
    /// Reason for 1001 after 90 s of silence (spec §0).
    pub const PING_TIMEOUT: &str = "Ping timeout";
    /// Reason for 1002.
    pub const PROTOCOL_ERROR_REASON: &str = "Protocol error";
    /// Reason for 1007.
    pub const INVALID_UTF8: &str = "Invalid UTF-8";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_json_is_exact() {
        let sync = ControlMessage::Sync {
            connection_ids: vec![],
        };
        assert_eq!(sync.to_json(), r#"{"type":"sync","connectionIds":[]}"#);
        let c = ControlMessage::Connected {
            connection_id: "a".into(),
        };
        assert_eq!(c.to_json(), r#"{"type":"connected","connectionId":"a"}"#);
        let d = ControlMessage::Disconnected {
            connection_id: "a\"b".into(),
        };
        assert_eq!(
            d.to_json(),
            r#"{"type":"disconnected","connectionId":"a\"b"}"#
        );
        assert_eq!(
            ControlMessage::Pong { ts: 17 }.to_json(),
            r#"{"type":"pong","ts":17}"#
        );
    }

    #[test]
    fn json_ping_detection() {
        assert!(is_json_ping(r#"{"type":"ping"}"#));
        assert!(is_json_ping(r#" {"type":"ping","ts":"abc","extra":[1]} "#));
        assert!(is_json_ping(r#"{"ts":1,"type":"ping"}"#));
        for no in [
            "hello",
            r#"{"type":"PING"}"#,
            "[]",
            r#"["ping"]"#,
            "null",
            r#""ping""#,
            r#"{"type":"sync","connectionIds":["z"]}"#,
            r#"{"type":1}"#,
            r#"{"type":"ping""#,
            r#"{"type":"ping"} x"#,
        ] {
            assert!(!is_json_ping(no), "{no}");
        }
    }

    #[test]
    fn assigned_ids_match_the_format() {
        let id = assign_connection_id();
        assert_eq!(id.len(), 21);
        assert!(id.starts_with("conn_"));
        assert!(id[5..]
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_ne!(assign_connection_id(), assign_connection_id());
    }
}
