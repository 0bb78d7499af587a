//! Relay tuning: every limit and duration that relay-protocol.md §0 calls a default.
//!
//! `RelayConf` is plain data (serde, no I/O). The binary builds it from its configuration
//! sources; tests build it directly with short timer values.

use serde::Deserialize;
use std::time::Duration;

/// Longest duration any timer setting may have: 30 days, in ms.
pub const MAX_DURATION_MS: u64 = 30 * 24 * 3600 * 1000;

/// Tuning of the relay module. Every field has the default of relay-protocol.md §0.
///
/// Sizes are in bytes, durations in milliseconds (the field names carry the unit).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConf {
    /// Largest message (after reassembly of fragments) on a data, client or v1 socket.
    /// Over it the sender is closed 1009 `Message too big`. Default 32 MiB (spec §0).
    pub max_message_bytes: usize,
    /// Largest message on a v2 control socket. Default 64 KiB (spec §0).
    pub max_control_message_bytes: usize,
    /// Longest serverId or connectionId, in bytes after decoding; longer ones get 400.
    /// Default 256 (spec §0).
    pub max_id_bytes: usize,
    /// Largest request head (request target plus header names and values) the relay answers;
    /// a larger one gets 431 `Request header fields too large`. Default 64 KiB.
    pub max_request_head_bytes: usize,
    /// Late-daemon buffer: frames kept per connectionId (newest win). Default 200 (spec §3.7).
    pub pending_max_frames: usize,
    /// Late-daemon buffer: payload bytes kept per connectionId. Default 32 MiB (spec §0).
    pub pending_max_bytes: usize,
    /// Process-wide budget for all late-daemon buffers; a client frame that would exceed it
    /// closes that client 1013 `Relay ingress capacity`. Default 256 MiB (spec §0).
    pub pending_budget_bytes: usize,
    /// Outbound queue of one socket, in payload bytes. A forwarder waits while it is full.
    /// A single message larger than the queue is still accepted when the queue is empty.
    /// Default 1 MiB.
    pub outbound_queue_bytes: usize,
    /// How long a forwarder waits for room in a full outbound queue before the destination
    /// is closed 1013 `Slow consumer`. Default 30 000 ms (spec §0).
    pub slow_consumer_timeout_ms: u64,
    /// Nudge: `sync` to the control this long after a client attaches while its connectionId
    /// has no data socket. Default 10 000 ms (spec §3.8).
    pub nudge_after_ms: u64,
    /// Reset: the control is closed 1011 `Control unresponsive` this long after a client
    /// attaches if its connectionId still has no data socket. Default 15 000 ms (spec §3.8).
    pub reset_after_ms: u64,
    /// Interval of the relay's RFC 6455 pings on every socket. Default 30 000 ms (spec §0).
    pub ping_interval_ms: u64,
    /// A socket from which nothing has arrived for this long is closed 1001 `Ping timeout`.
    /// Default 90 000 ms (spec §0).
    pub ping_timeout_ms: u64,
    /// After the relay sends a close frame, how long it waits for the peer's close before
    /// dropping the TCP connection. Default 5 000 ms.
    pub close_grace_ms: u64,
    /// Path the relay is mounted on: with `/paseo` it answers `/paseo/ws` and
    /// `/paseo/health`, and `/ws` is no longer the relay's. Default empty (`/ws`, `/health`).
    /// Must start with `/`; a trailing `/` is ignored.
    pub path_prefix: String,
    /// Most WebSockets in the process; over it a `/ws` gets 503 `Relay at capacity` with
    /// `Retry-After: 5`. Default (`None`): the open-file limit (after the binary raised it)
    /// minus 1 024 for other files, but at least half the limit (issue 9).
    pub max_websockets: Option<usize>,
    /// Most WebSockets from one client address (as `trusted_proxies` resolves it); over it
    /// 429 `Too many connections from this address`. Default 256.
    pub max_websockets_per_ip: usize,
    /// Upgrade token bucket per address: tokens earned per second. Default 20.
    pub upgrades_per_ip_per_second: u32,
    /// Upgrade token bucket per address: most tokens held (the burst). Over it 429 `Too many
    /// requests` with `Retry-After` the whole seconds until a token. Default 100.
    pub upgrade_burst_per_ip: u32,
    /// Control sockets that may replace the current one per minute, per (version,
    /// serverId); the next newcomer gets 429 `Too many control replacements` and the current
    /// control keeps its place. Default 12.
    pub control_replacements_per_minute: u32,
    /// Bytes of partly received messages across the process, reserved from each frame
    /// header's length before its payload is read; a socket that would exceed it is not
    /// read until room frees up, and after `slow_consumer_timeout_ms` it is closed
    /// 1013 `Relay ingress capacity`. Default 512 MiB.
    pub ingress_budget_bytes: usize,
}

impl Default for RelayConf {
    fn default() -> Self {
        RelayConf {
            max_message_bytes: 32 << 20,
            max_control_message_bytes: 64 << 10,
            max_id_bytes: 256,
            max_request_head_bytes: 64 << 10,
            pending_max_frames: 200,
            pending_max_bytes: 32 << 20,
            pending_budget_bytes: 256 << 20,
            outbound_queue_bytes: 1 << 20,
            slow_consumer_timeout_ms: 30_000,
            nudge_after_ms: 10_000,
            reset_after_ms: 15_000,
            ping_interval_ms: 30_000,
            ping_timeout_ms: 90_000,
            close_grace_ms: 5_000,
            path_prefix: String::new(),
            max_websockets: None,
            max_websockets_per_ip: 256,
            upgrades_per_ip_per_second: 20,
            upgrade_burst_per_ip: 100,
            control_replacements_per_minute: 12,
            ingress_budget_bytes: 512 << 20,
        }
    }
}

impl RelayConf {
    /// Checks the values against each other; the error names the key and what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_message_bytes", self.max_message_bytes as u64),
            (
                "max_control_message_bytes",
                self.max_control_message_bytes as u64,
            ),
            ("max_id_bytes", self.max_id_bytes as u64),
            ("max_request_head_bytes", self.max_request_head_bytes as u64),
            ("pending_max_frames", self.pending_max_frames as u64),
            ("outbound_queue_bytes", self.outbound_queue_bytes as u64),
            ("slow_consumer_timeout_ms", self.slow_consumer_timeout_ms),
            ("nudge_after_ms", self.nudge_after_ms),
            ("ping_interval_ms", self.ping_interval_ms),
            ("ping_timeout_ms", self.ping_timeout_ms),
            ("close_grace_ms", self.close_grace_ms),
            (
                "max_websockets",
                self.max_websockets.map_or(1, |n| n as u64),
            ),
            ("max_websockets_per_ip", self.max_websockets_per_ip as u64),
            (
                "upgrades_per_ip_per_second",
                self.upgrades_per_ip_per_second.into(),
            ),
            ("upgrade_burst_per_ip", self.upgrade_burst_per_ip.into()),
            (
                "control_replacements_per_minute",
                self.control_replacements_per_minute.into(),
            ),
            ("ingress_budget_bytes", self.ingress_budget_bytes as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("relay.{key}: must be greater than 0"));
            }
        }
        if self.reset_after_ms <= self.nudge_after_ms {
            return Err(format!(
                "relay.reset_after_ms: must be greater than relay.nudge_after_ms ({} ms)",
                self.nudge_after_ms
            ));
        }
        if self.ping_timeout_ms <= self.ping_interval_ms {
            return Err(format!(
                "relay.ping_timeout_ms: must be greater than relay.ping_interval_ms ({} ms)",
                self.ping_interval_ms
            ));
        }
        let durations = [
            ("slow_consumer_timeout_ms", self.slow_consumer_timeout_ms),
            ("nudge_after_ms", self.nudge_after_ms),
            ("reset_after_ms", self.reset_after_ms),
            ("ping_interval_ms", self.ping_interval_ms),
            ("ping_timeout_ms", self.ping_timeout_ms),
            ("close_grace_ms", self.close_grace_ms),
        ];
        for (key, ms) in durations {
            if ms > MAX_DURATION_MS {
                return Err(format!(
                    "relay.{key}: must be at most {MAX_DURATION_MS} ms (30 days)"
                ));
            }
        }
        if !self.path_prefix.is_empty() {
            crate::http::routes::normalize_prefix(&self.path_prefix)
                .map_err(|e| format!("relay.path_prefix: {e}"))?;
        }
        if self.outbound_queue_bytes > u32::MAX as usize {
            return Err("relay.outbound_queue_bytes: must be at most 4 GiB".to_string());
        }
        Ok(())
    }

    /// The mount point without its trailing `/` (`""` for the root).
    pub fn mount(&self) -> &str {
        self.path_prefix.trim_end_matches('/')
    }

    /// The effective `max_websockets`: the configured value, or the default derived from
    /// the process's soft open-file limit `fd_limit` (limit - 1 024, at least limit / 2).
    pub fn max_websockets_for(&self, fd_limit: u64) -> usize {
        self.max_websockets.unwrap_or_else(|| {
            let limit = usize::try_from(fd_limit).unwrap_or(usize::MAX);
            limit.saturating_sub(1024).max(limit / 2).max(1)
        })
    }

    /// [`Self::slow_consumer_timeout_ms`] as a `Duration`.
    pub fn slow_consumer_timeout(&self) -> Duration {
        Duration::from_millis(self.slow_consumer_timeout_ms)
    }
    /// [`Self::nudge_after_ms`] as a `Duration`.
    pub fn nudge_after(&self) -> Duration {
        Duration::from_millis(self.nudge_after_ms)
    }
    /// [`Self::reset_after_ms`] as a `Duration`.
    pub fn reset_after(&self) -> Duration {
        Duration::from_millis(self.reset_after_ms)
    }
    /// [`Self::ping_interval_ms`] as a `Duration`.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
    /// [`Self::ping_timeout_ms`] as a `Duration`.
    pub fn ping_timeout(&self) -> Duration {
        Duration::from_millis(self.ping_timeout_ms)
    }
    /// [`Self::close_grace_ms`] as a `Duration`.
    pub fn close_grace(&self) -> Duration {
        Duration::from_millis(self.close_grace_ms)
    }
}

/// HTTP deadlines (`http:`, issue 9) of every connection: relay paths, routes and the admin
/// listener. An expiry is counted in `paseo_relay_request_timeouts_total` and logged at
/// debug; see [`crate::http::front`]. Durations in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConf {
    /// A request head (request line and headers) must arrive whole within this, counted
    /// from the accept for a connection's first request and from the first byte for a later
    /// one; otherwise `408 Request timeout` and the connection is closed. Default 10 000 ms.
    pub request_head_timeout_ms: u64,
    /// An idle keep-alive connection between two requests is closed (without an answer)
    /// after this. Default 60 000 ms.
    pub keepalive_timeout_ms: u64,
    /// A TLS handshake not finished this long after the accept is dropped. Default 10 000 ms.
    pub tls_handshake_timeout_ms: u64,
}

impl Default for HttpConf {
    fn default() -> Self {
        HttpConf {
            request_head_timeout_ms: 10_000,
            keepalive_timeout_ms: 60_000,
            tls_handshake_timeout_ms: 10_000,
        }
    }
}

impl HttpConf {
    /// Checks each deadline: greater than 0 and at most 30 days; the error names `http.KEY`.
    pub fn validate(&self) -> Result<(), String> {
        let durations = [
            ("request_head_timeout_ms", self.request_head_timeout_ms),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms),
        ];
        for (key, ms) in durations {
            if ms == 0 {
                return Err(format!("http.{key}: must be greater than 0"));
            }
            if ms > MAX_DURATION_MS {
                return Err(format!(
                    "http.{key}: must be at most {MAX_DURATION_MS} ms (30 days)"
                ));
            }
        }
        Ok(())
    }

    /// [`Self::request_head_timeout_ms`] as a `Duration`.
    pub fn request_head_timeout(&self) -> Duration {
        Duration::from_millis(self.request_head_timeout_ms)
    }
    /// [`Self::keepalive_timeout_ms`] as a `Duration`.
    pub fn keepalive_timeout(&self) -> Duration {
        Duration::from_millis(self.keepalive_timeout_ms)
    }
    /// [`Self::tls_handshake_timeout_ms`] as a `Duration`.
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms)
    }
}

#[cfg(test)]
mod http_conf_tests {
    use super::*;

    #[test]
    fn http_deadlines_default_and_limits() {
        let c = HttpConf::default();
        assert_eq!(c.request_head_timeout(), Duration::from_secs(10));
        assert_eq!(c.keepalive_timeout(), Duration::from_secs(60));
        assert_eq!(c.tls_handshake_timeout(), Duration::from_secs(10));
        assert_eq!(c.validate(), Ok(()));
        let zero = HttpConf {
            keepalive_timeout_ms: 0,
            ..HttpConf::default()
        };
        assert_eq!(
            zero.validate(),
            Err("http.keepalive_timeout_ms: must be greater than 0".into())
        );
        let long = HttpConf {
            tls_handshake_timeout_ms: MAX_DURATION_MS + 1,
            ..HttpConf::default()
        };
        assert_eq!(
            long.validate(),
            Err("http.tls_handshake_timeout_ms: must be at most 2592000000 ms (30 days)".into())
        );
        let most = HttpConf {
            request_head_timeout_ms: MAX_DURATION_MS,
            ..HttpConf::default()
        };
        assert_eq!(most.validate(), Ok(()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_spec_values_and_valid() {
        let c = RelayConf::default();
        assert_eq!(c.max_message_bytes, 33_554_432);
        assert_eq!(c.max_control_message_bytes, 65_536);
        assert_eq!(c.pending_max_frames, 200);
        assert_eq!(c.nudge_after(), Duration::from_secs(10));
        assert_eq!(c.reset_after(), Duration::from_secs(15));
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn max_websockets_defaults_from_the_open_file_limit() {
        let c = RelayConf::default();
        assert_eq!(c.max_websockets_for(1024), 512);
        assert_eq!(c.max_websockets_for(4096), 3072);
        assert_eq!(c.max_websockets_for(1_048_576), 1_047_552);
        let set = RelayConf {
            max_websockets: Some(7),
            ..c
        };
        assert_eq!(set.max_websockets_for(1024), 7);
        let zero = RelayConf {
            max_websockets: Some(0),
            ..RelayConf::default()
        };
        assert_eq!(
            zero.validate(),
            Err("relay.max_websockets: must be greater than 0".into())
        );
    }

    #[test]
    fn reset_must_follow_nudge() {
        let c = RelayConf {
            reset_after_ms: 10_000,
            ..RelayConf::default()
        };
        assert_eq!(
            c.validate(),
            Err(
                "relay.reset_after_ms: must be greater than relay.nudge_after_ms (10000 ms)".into()
            )
        );
    }
}
