//! The relay's Prometheus metrics (issue 9 "Metrics"): one [`Metrics`] per [`SessionHub`],
//! with its own `prometheus::Registry`, rendered as text format 0.0.4 by
//! [`Metrics::render`] on the admin listener's `GET /metrics`.
//!
//! Every handle the relay touches while serving is resolved when the hub is built (labelled
//! series included), so counting costs an atomic add: no lock, no allocation, no label
//! lookup. Gauges that mirror a value the relay already keeps (late-daemon bytes, ingress
//! reservations, ready/draining) are set from it just before a scrape, so they cannot
//! drift. Never a serverId or connectionId in a label or value.
//!
//! Names shared with the official Elixir relay keep its meaning, so its dashboards and
//! alerts carry over.
//!
//! [`SessionHub`]: crate::session::hub::SessionHub

use crate::protocol::SocketKind;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// `Content-Type` of [`Metrics::render`]'s output (Prometheus text format).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// The close codes the relay sends (spec §0, §3.9): exposed at 0 before the first close.
pub const CLOSE_CODES: [u16; 9] = [1000, 1001, 1002, 1007, 1008, 1009, 1011, 1012, 1013];

/// The kind label of a socket: `control`, `data`, `client` or `v1`.
pub fn kind_label(kind: &SocketKind) -> &'static str {
    match kind {
        SocketKind::Control => "control",
        SocketKind::Data(_) => "data",
        SocketKind::Client(_) => "client",
        SocketKind::V1(_) => "v1",
    }
}

/// Why a connection attempt was refused (`paseo_relay_connection_rejections_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// 400 or 426: bad query or handshake.
    BadRequest,
    /// 503 `Relay at capacity`: at `max_websockets`.
    Capacity,
    /// 429: at `max_websockets_per_ip`.
    PerIp,
    /// 429: the address's upgrade token bucket is empty.
    Rate,
    /// 429: too many control replacements for one serverId.
    Replacement,
    /// 503 while draining or stopping.
    Draining,
}

impl Rejection {
    const ALL: [Rejection; 6] = [
        Rejection::BadRequest,
        Rejection::Capacity,
        Rejection::PerIp,
        Rejection::Rate,
        Rejection::Replacement,
        Rejection::Draining,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::BadRequest => "bad_request",
            Rejection::Capacity => "capacity",
            Rejection::PerIp => "per_ip",
            Rejection::Rate => "rate",
            Rejection::Replacement => "replacement",
            Rejection::Draining => "draining",
        }
    }
}

/// Which handler answered an HTTP request (`paseo_relay_http_requests_total{handler}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    /// `/health`.
    Health,
    /// `/ready`.
    Ready,
    /// `/ws`, whatever the outcome.
    Ws,
    /// A configured route (proxied).
    Route,
    /// 404 `Not found`.
    NotFound,
    /// Anything else (431, admin endpoints, ...).
    Other,
}

impl Handler {
    const ALL: [Handler; 6] = [
        Handler::Health,
        Handler::Ready,
        Handler::Ws,
        Handler::Route,
        Handler::NotFound,
        Handler::Other,
    ];

    /// The `handler` label.
    pub fn label(self) -> &'static str {
        match self {
            Handler::Health => "health",
            Handler::Ready => "ready",
            Handler::Ws => "ws",
            Handler::Route => "route",
            Handler::NotFound => "not_found",
            Handler::Other => "other",
        }
    }
}

/// Why a cluster node could not tunnel a `/ws` to its owner
/// (`paseo_relay_cluster_forward_failures_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardFailure {
    /// The owner refused the connection or did not answer in time: the next node on the
    /// ring is tried.
    Connect,
    /// The owner answered without a 101 (its answer is passed on to the client).
    Status,
    /// No other node was left to try: the entry node serves it (or refuses it, draining).
    NoNode,
}

impl ForwardFailure {
    const ALL: [ForwardFailure; 3] = [
        ForwardFailure::Connect,
        ForwardFailure::Status,
        ForwardFailure::NoNode,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            ForwardFailure::Connect => "connect",
            ForwardFailure::Status => "status",
            ForwardFailure::NoNode => "no_node",
        }
    }
}

/// One series per socket kind, in [`kind_label`] order: control, data, client, v1.
#[derive(Debug, Clone)]
pub struct PerKind<T>([T; 4]);

impl<T> PerKind<T> {
    /// The series of `kind`.
    pub fn get(&self, kind: &SocketKind) -> &T {
        let i = match kind {
            SocketKind::Control => 0,
            SocketKind::Data(_) => 1,
            SocketKind::Client(_) => 2,
            SocketKind::V1(_) => 3,
        };
        &self.0[i]
    }
}

/// Every metric of one relay. Cheap handles (each an `Arc` around atomics): clone what a
/// task needs.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// `paseo_relay_active_websockets{kind}`: sockets attached now.
    pub active_websockets: PerKind<IntGauge>,
    /// `paseo_relay_active_sessions`: sessions (version, serverId) with a socket.
    pub active_sessions: IntGauge,
    /// `paseo_relay_pending_bytes`: payload bytes in late-daemon buffers (set at scrape).
    pub pending_bytes: IntGauge,
    /// `paseo_relay_outbound_queued_bytes`: payload bytes in outbound data queues.
    pub outbound_queued_bytes: IntGauge,
    /// `paseo_relay_ingress_reserved_bytes`: bytes reserved for partly received messages.
    pub ingress_reserved_bytes: IntGauge,
    /// `paseo_relay_max_websockets`: the configured ceiling.
    pub max_websockets: IntGauge,
    /// `paseo_relay_ready`: 1 while new WebSockets are accepted.
    pub ready: IntGauge,
    /// `paseo_relay_draining`: 1 while draining (admin drain or shutdown).
    pub draining: IntGauge,
    /// `paseo_relay_websockets_accepted_total{kind}`: 101s written.
    pub websockets_accepted: PerKind<IntCounter>,
    rejections: [IntCounter; 6],
    /// `paseo_relay_closes_total{code}`: close frames the relay sends, by code. The codes
    /// of [`CLOSE_CODES`] are exposed from the start (at 0) and counted without a lookup.
    pub closes: IntCounterVec,
    known_closes: [IntCounter; CLOSE_CODES.len()],
    /// `paseo_relay_frames_forwarded_total`: data messages the relay accepted for
    /// forwarding: routed to a destination (one, or several in a fan-out, which counts
    /// once) or kept in a late-daemon buffer. One per message however fragmented; counted
    /// when routed, not when written (a destination that closes meanwhile does not uncount
    /// it); messages dropped for want of a peer or refused by the buffer budget are not.
    pub frames_forwarded: IntCounter,
    /// `paseo_relay_bytes_forwarded_total`: payload bytes of those messages (once per
    /// message, like the count).
    pub bytes_forwarded: IntCounter,
    /// `paseo_relay_pending_dropped_frames_total`: late-daemon frames dropped (oldest first).
    pub pending_dropped_frames: IntCounter,
    /// `paseo_relay_slow_consumer_disconnects_total`: destinations closed 1013 `Slow
    /// consumer`, and connections dropped because their peer stopped reading.
    pub slow_consumer_disconnects: IntCounter,
    /// `paseo_relay_nudges_total`: nudge `sync`s sent (spec §3.8).
    pub nudges: IntCounter,
    /// `paseo_relay_resets_total`: controls closed 1011 `Control unresponsive`.
    pub resets: IntCounter,
    /// `paseo_relay_ping_timeouts_total`: sockets closed 1001 `Ping timeout`.
    pub ping_timeouts: IntCounter,
    /// `paseo_relay_request_timeouts_total`: HTTP deadlines that expired (head, keep-alive,
    /// TLS handshake).
    pub request_timeouts: IntCounter,
    http_requests: [IntCounter; 6],
    /// `paseo_relay_proxied_requests_total{route,class}`: proxied requests by route prefix
    /// and status class (`2xx` .. `5xx`).
    pub proxied_requests: IntCounterVec,
    /// `paseo_relay_frame_size_bytes`: sizes of forwarded data messages (the same
    /// messages as `frames_forwarded`).
    pub frame_size: Histogram,
    /// `paseo_relay_send_wait_seconds`: how long a sender waited for room in a full
    /// destination queue.
    pub send_wait: Histogram,
    /// `paseo_relay_cluster_nodes_up`: cluster nodes up in this node's view, itself
    /// included (0 without `cluster:`).
    pub cluster_nodes_up: IntGauge,
    /// `paseo_relay_cluster_tunnels`: WebSockets this node tunnels to their owner.
    pub cluster_tunnels: IntGauge,
    /// `paseo_relay_cluster_owner_moves_total`: sessions closed 1012 `Session owner moved`.
    pub cluster_owner_moves: IntCounter,
    forward_failures: [IntCounter; 3],
}

fn registered<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    // Names are fixed and distinct: registration cannot collide.
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    registered(registry, IntGauge::new(name, help).expect("valid metric"))
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    registered(registry, IntCounter::new(name, help).expect("valid metric"))
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets);
    let vec = registered(
        registry,
        HistogramVec::new(opts, &[]).expect("valid metric"),
    );
    vec.with_label_values(&[] as &[&str])
}

fn per_kind<T>(f: impl Fn(&'static str) -> T) -> PerKind<T> {
    PerKind(["control", "data", "client", "v1"].map(f))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every relay metric at zero and the process collector
    /// (`process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`,
    /// `process_cpu_seconds_total`, `process_start_time_seconds`).
    pub fn new() -> Metrics {
        let r = Registry::new();
        let active = registered(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "paseo_relay_active_websockets",
                    "WebSockets the relay terminates now, by kind",
                ),
                &["kind"],
            )
            .expect("valid metric"),
        );
        let accepted = registered(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "paseo_relay_websockets_accepted_total",
                    "WebSockets accepted (101 written), by kind",
                ),
                &["kind"],
            )
            .expect("valid metric"),
        );
        let rejections = registered(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "paseo_relay_connection_rejections_total",
                    "/ws requests refused, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let http = registered(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "paseo_relay_http_requests_total",
                    "HTTP requests, by the handler that answered",
                ),
                &["handler"],
            )
            .expect("valid metric"),
        );
        let closes = registered(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "paseo_relay_closes_total",
                    "Close frames the relay sent, by close code",
                ),
                &["code"],
            )
            .expect("valid metric"),
        );
        let forward_failures = registered(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "paseo_relay_cluster_forward_failures_total",
                    "/ws requests this node could not tunnel to their owner, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let m = Metrics {
            active_websockets: per_kind(|k| active.with_label_values(&[k])),
            active_sessions: gauge(
                &r,
                "paseo_relay_active_sessions",
                "Sessions (version, serverId) with at least one socket",
            ),
            pending_bytes: gauge(
                &r,
                "paseo_relay_pending_bytes",
                "Payload bytes held in late-daemon buffers",
            ),
            outbound_queued_bytes: gauge(
                &r,
                "paseo_relay_outbound_queued_bytes",
                "Payload bytes queued for sockets' writers",
            ),
            ingress_reserved_bytes: gauge(
                &r,
                "paseo_relay_ingress_reserved_bytes",
                "Bytes reserved for partly received messages",
            ),
            max_websockets: gauge(
                &r,
                "paseo_relay_max_websockets",
                "Most WebSockets the relay accepts (relay.max_websockets)",
            ),
            ready: gauge(
                &r,
                "paseo_relay_ready",
                "1 while new WebSockets are accepted, else 0",
            ),
            draining: gauge(
                &r,
                "paseo_relay_draining",
                "1 while the relay drains (admin drain or shutdown), else 0",
            ),
            websockets_accepted: per_kind(|k| accepted.with_label_values(&[k])),
            rejections: Rejection::ALL.map(|r| rejections.with_label_values(&[r.label()])),
            closes: closes.clone(),
            known_closes: CLOSE_CODES.map(|c| closes.with_label_values(&[&c.to_string()])),
            frames_forwarded: counter(
                &r,
                "paseo_relay_frames_forwarded_total",
                "Data messages forwarded (one per message however fragmented)",
            ),
            bytes_forwarded: counter(
                &r,
                "paseo_relay_bytes_forwarded_total",
                "Payload bytes of forwarded data messages",
            ),
            pending_dropped_frames: counter(
                &r,
                "paseo_relay_pending_dropped_frames_total",
                "Late-daemon buffer frames dropped to keep the newest",
            ),
            slow_consumer_disconnects: counter(
                &r,
                "paseo_relay_slow_consumer_disconnects_total",
                "Sockets closed or dropped because they did not take data",
            ),
            nudges: counter(
                &r,
                "paseo_relay_nudges_total",
                "Nudge sync messages sent to controls",
            ),
            resets: counter(
                &r,
                "paseo_relay_resets_total",
                "Controls closed 1011 Control unresponsive",
            ),
            ping_timeouts: counter(
                &r,
                "paseo_relay_ping_timeouts_total",
                "Sockets closed 1001 Ping timeout",
            ),
            request_timeouts: counter(
                &r,
                "paseo_relay_request_timeouts_total",
                "HTTP deadlines expired (request head, keep-alive idle, TLS handshake)",
            ),
            http_requests: Handler::ALL.map(|h| http.with_label_values(&[h.label()])),
            proxied_requests: registered(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "paseo_relay_proxied_requests_total",
                        "Requests proxied to a route, by route prefix and status class",
                    ),
                    &["route", "class"],
                )
                .expect("valid metric"),
            ),
            frame_size: histogram(
                &r,
                "paseo_relay_frame_size_bytes",
                "Sizes of forwarded data messages, bytes",
                prometheus::exponential_buckets(64.0, 4.0, 11).expect("valid buckets"),
            ),
            send_wait: histogram(
                &r,
                "paseo_relay_send_wait_seconds",
                "Time a sender waited for room in a full destination queue",
                vec![0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            cluster_nodes_up: gauge(
                &r,
                "paseo_relay_cluster_nodes_up",
                "Cluster nodes up in this node's view, itself included",
            ),
            cluster_tunnels: gauge(
                &r,
                "paseo_relay_cluster_tunnels",
                "WebSockets this node tunnels to the node that owns their serverId",
            ),
            cluster_owner_moves: counter(
                &r,
                "paseo_relay_cluster_owner_moves_total",
                "Sessions closed 1012 Session owner moved (their serverId belongs elsewhere)",
            ),
            forward_failures: ForwardFailure::ALL
                .map(|f| forward_failures.with_label_values(&[f.label()])),
            registry: r,
        };
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            // Only fails on a duplicate name, and the registry is new.
            let _ = m.registry.register(Box::new(process));
        }
        m
    }

    /// The rejection counter for `reason`.
    pub fn rejected(&self, reason: Rejection) -> &IntCounter {
        let i = Rejection::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        &self.rejections[i]
    }

    /// The cluster forward failure counter for `reason`.
    pub fn forward_failed(&self, reason: ForwardFailure) -> &IntCounter {
        let i = ForwardFailure::ALL
            .iter()
            .position(|f| *f == reason)
            .unwrap_or(0);
        &self.forward_failures[i]
    }

    /// The request counter for `handler`.
    pub fn request(&self, handler: Handler) -> &IntCounter {
        let i = Handler::ALL.iter().position(|h| *h == handler).unwrap_or(0);
        &self.http_requests[i]
    }

    /// Counts one close frame sent with `code`.
    /// The codes of [`CLOSE_CODES`] cost an atomic add; another code (an echo of a peer's
    /// own) a label lookup, once per socket at most.
    pub fn close_sent(&self, code: u16) {
        match CLOSE_CODES.iter().position(|c| *c == code) {
            Some(i) => self.known_closes[i].inc(),
            None => self.closes.with_label_values(&[&code.to_string()]).inc(),
        }
    }

    /// Counts one proxied request of `route` answered with `status`.
    pub fn proxied(&self, route: &str, status: u16) {
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        };
        self.proxied_requests
            .with_label_values(&[route, class])
            .inc();
    }

    /// The text exposition of every metric (Prometheus text format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 << 10);
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exposed_at_zero_with_its_labels() {
        let m = Metrics::new();
        m.websockets_accepted
            .get(&SocketKind::Data("x".into()))
            .inc();
        m.close_sent(1001);
        m.close_sent(4000);
        m.proxied("/api", 502);
        let text = m.render();
        for line in [
            "paseo_relay_active_websockets{kind=\"control\"} 0",
            "paseo_relay_active_websockets{kind=\"v1\"} 0",
            "paseo_relay_websockets_accepted_total{kind=\"data\"} 1",
            "paseo_relay_connection_rejections_total{reason=\"replacement\"} 0",
            "paseo_relay_http_requests_total{handler=\"not_found\"} 0",
            "paseo_relay_closes_total{code=\"1001\"} 1",
            "paseo_relay_closes_total{code=\"1013\"} 0",
            "paseo_relay_proxied_requests_total{class=\"5xx\",route=\"/api\"} 1",
            "paseo_relay_closes_total{code=\"4000\"} 1",
            "paseo_relay_frame_size_bytes_count 0",
            "paseo_relay_send_wait_seconds_bucket{le=\"30\"} 0",
            "paseo_relay_ready 0",
            "paseo_relay_cluster_nodes_up 0",
            "paseo_relay_cluster_tunnels 0",
            "paseo_relay_cluster_owner_moves_total 0",
            "paseo_relay_cluster_forward_failures_total{reason=\"no_node\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in:\n{text}"
            );
        }
        assert!(text.contains("\nprocess_open_fds "), "{text}");
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
    }
}
