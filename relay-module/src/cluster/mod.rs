//! Several relay nodes, one owner per serverId (issue 10 "Cluster"). Every node runs the
//! same binary and configuration and accepts any `/ws`; the node that owns the serverId
//! terminates it, the others tunnel it there ([`tunnel`]).
//!
//! ```text
//!   daemon / app ──▶ L4 balancer or DNS ──▶ any node (entry)
//!                                             │ /ws validated here (400 / 426)
//!                                             │ owner(serverId) = Ketama over the up nodes
//!                        ┌────────────────────┴───────────────────┐
//!                  owner is this node                      owner is node B
//!              served locally (SessionHub)        the upgrade goes to B with X-Forwarded-For
//!                                                 and X-Paseo-Relay-Hop, then bytes are
//!                                                 spliced; B serves a hop-marked /ws itself
//! ```
//!
//! - **View**: a Pingora `LoadBalancer<KetamaHashing>` over the nodes ([`discovery`]: the
//!   list, names re-resolved every 10 s, this node always), with an `HttpHealthCheck` of
//!   `GET <path_prefix>/ready` on each (200 = up; a draining or full node answers 503),
//!   `down_after_failures` / `up_after_successes` consecutive checks to flip. Every node
//!   starts with every node up (Pingora's initial health), so it serves at once.
//! - **Owner**: the first up node on the full Ketama ring walked from the serverId. A
//!   node's ring points depend only on its own address, so this is Ketama over only the up
//!   nodes, and every node with the same view finds the same owner.
//! - **Failover**: an owner that refuses the connection (or does not answer in time) is
//!   failed for that request, and suspected down in this node's view until its health check
//!   can have agreed; the walk goes on (the same walk on every node). Reaching this node
//!   itself serves the request here.
//! - **Moves** ([`moves`]): once the view has been stable for two health intervals, a node
//!   closes every socket of each local session owned elsewhere, 1012 `Session owner
//!   moved`; both sides reconnect and meet at the owner. A draining node keeps serving what
//!   is tunnelled to it for `down_after_failures + 2` intervals (until its peers can have
//!   seen it down), then moves all its sessions.
//!
//! Without `cluster:` none of this exists: no service, no check, no cost per request.

pub mod conf;
pub mod discovery;
pub mod moves;
pub mod tunnel;

use crate::cluster::conf::{ClusterSpec, RESOLVE_EVERY};
use crate::cluster::discovery::{NodeDiscovery, Resolver};
use crate::http::routes::Router;
use crate::ops::metrics::{ForwardFailure, Metrics};
use crate::session::hub::{Closing, SessionHub};
use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::lb::health_check::{HealthObserve, HttpHealthCheck};
use pingora::lb::selection::consistent::KetamaHashing;
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::server::Server;
use pingora::services::background::{background_service, GenBackgroundService};
use prometheus::IntGauge;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

pub use conf::ClusterConf;

/// Request header the entry node adds to a tunnelled `/ws`; a `/ws` that carries it, from
/// a cluster node's address, is always served locally (so there are never loops).
pub const HOP_HEADER: &str = "X-Paseo-Relay-Hop";

/// The close of every socket of a session whose serverId belongs to another node now.
pub const OWNER_MOVED: Closing = Closing {
    code: 1012,
    reason: "Session owner moved",
};

/// Connect timeout to an owner: a node that does not accept within it is failed over.
/// (The owner's answer has [`tunnel::ANSWER_TIMEOUT`]; the tunnel itself has no timeout.)
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Points per node on Pingora's Ketama ring (weight 1, `KetamaConfig` default).
const KETAMA_POINTS: usize = 160;

/// The cluster's load balancer: the nodes, their health, the Ketama ring.
pub type NodeBalancer = LoadBalancer<KetamaHashing>;

/// When this node's view (membership or health) last changed.
#[derive(Debug)]
pub struct ViewClock {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last change.
    changed_ms: AtomicU64,
    generation: AtomicU64,
}

impl Default for ViewClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ViewClock {
    /// A clock whose view changed now (a node starts with a fresh view).
    pub fn new() -> ViewClock {
        ViewClock {
            epoch: Instant::now(),
            changed_ms: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Marks a change now.
    pub fn changed(&self) {
        self.changed_ms
            .store(self.ms(Instant::now()), Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// How many changes were marked.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// How long the view has been unchanged at `now`.
    pub fn stable_for(&self, now: Instant) -> Duration {
        let since = self.changed_ms.load(Ordering::Acquire);
        Duration::from_millis(self.ms(now).saturating_sub(since))
    }
}

/// Where the health check reports flips: the view clock and the up-node gauge.
struct Observer {
    lb: Arc<OnceLock<Weak<NodeBalancer>>>,
    clock: Arc<ViewClock>,
    nodes_up: IntGauge,
}

#[async_trait]
impl HealthObserve for Observer {
    async fn observe(&self, _target: &Backend, _healthy: bool) {
        self.clock.changed();
        if let Some(lb) = self.lb.get().and_then(Weak::upgrade) {
            self.nodes_up.set(nodes_up(&lb));
        }
    }
}

fn inet(backend: &Backend) -> Option<SocketAddr> {
    backend.addr.as_inet().copied()
}

fn nodes_up(lb: &NodeBalancer) -> i64 {
    let backends = lb.backends();
    let up = backends
        .get_backend()
        .iter()
        .filter(|b| backends.ready(b))
        .count();
    i64::try_from(up).unwrap_or(i64::MAX)
}

/// The first node on `lb`'s ring from `key` that `accept` takes (address, healthy).
fn walk(
    lb: &NodeBalancer,
    key: &str,
    accept: impl Fn(&SocketAddr, bool) -> bool,
) -> Option<SocketAddr> {
    // The whole ring, so that every node is reachable however many are refused.
    let steps = lb.backends().get_backend().len() * KETAMA_POINTS + 1;
    let backend = lb.select_with(key.as_bytes(), steps, |b, healthy| {
        inet(b).is_some_and(|addr| accept(&addr, healthy))
    })?;
    inet(&backend)
}

/// The owner of `server_id` that every node computes when `up` (a subset of `nodes`) are
/// the nodes up in its view: Ketama over `nodes`, skipping those not up. For tests and
/// tools; the running node uses [`Cluster::owner`].
pub fn owner_among(nodes: &[SocketAddr], up: &[SocketAddr], server_id: &str) -> Option<SocketAddr> {
    let lb = NodeBalancer::try_from_iter(nodes.iter().copied()).ok()?;
    walk(&lb, server_id, |addr, _| up.contains(addr))
}

/// Nodes whose connect failed lately, and until when they count as down in this node's
/// view: a dead node refuses connections at once, but its health check needs
/// `down_after_failures` intervals to agree. Meanwhile the sessions that failed over here
/// must not be moved back to it, and new ones need not try it first.
#[derive(Debug, Default)]
struct Suspects {
    any: AtomicBool,
    until: Mutex<Vec<(SocketAddr, Instant)>>,
}

impl Suspects {
    fn contains(&self, addr: &SocketAddr, now: Instant) -> bool {
        self.any.load(Ordering::Acquire)
            && lock(&self.until)
                .iter()
                .any(|(a, until)| a == addr && *until > now)
    }

    /// Suspects `addr` until `until`; whether it was not suspected yet.
    fn insert(&self, addr: SocketAddr, until: Instant) -> bool {
        let mut list = lock(&self.until);
        let now = Instant::now();
        let fresh = !list.iter().any(|(a, u)| *a == addr && *u > now);
        list.retain(|(a, _)| *a != addr);
        list.push((addr, until));
        self.any.store(true, Ordering::Release);
        fresh
    }

    /// Forgets the suspicions over at `now`; whether one was.
    fn expire(&self, now: Instant) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let mut list = lock(&self.until);
        let before = list.len();
        list.retain(|(_, until)| *until > now);
        self.any.store(!list.is_empty(), Ordering::Release);
        list.len() != before
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A `/ws` this node tunnels to the owner of its serverId, while its owner is found.
#[derive(Debug)]
pub struct Tunnel {
    server_id: String,
    /// Nodes that refused it (not tried again).
    failed: Vec<SocketAddr>,
    /// This node drained when the request came: it is not a candidate.
    draining: bool,
}

impl std::fmt::Display for Tunnel {
    /// `session <serverId, first 8 characters>`, for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "session {}",
            crate::session::hub::short_id(&self.server_id)
        )?;
        if !self.failed.is_empty() {
            let failed: Vec<String> = self.failed.iter().map(|a| a.to_string()).collect();
            write!(f, " (connect failed: {})", failed.join(", "))?;
        }
        Ok(())
    }
}

/// One tunnelled WebSocket in `paseo_relay_cluster_tunnels`, while held.
#[derive(Debug)]
pub struct OpenTunnel(IntGauge);

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// This node's view of the cluster; see the module docs.
pub struct Cluster {
    spec: ClusterSpec,
    lb: Arc<NodeBalancer>,
    clock: Arc<ViewClock>,
    metrics: Metrics,
    /// When this node was first seen draining, ms since the clock's epoch plus 1 (0: not
    /// draining). Kept by [`Cluster::sweep`].
    drain_since: AtomicU64,
    suspects: Suspects,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("self", &self.spec.self_addr)
            .field("nodes", &self.nodes())
            .finish()
    }
}

impl Cluster {
    /// The view of `spec`, health-checking `<mount>/ready` on every node, counting into
    /// `metrics`. Resolves node names now (blocking, before the server starts).
    pub fn new(spec: ClusterSpec, mount: &str, metrics: &Metrics) -> Arc<Cluster> {
        Self::with_resolver(spec, mount, metrics, discovery::system_resolver())
    }

    /// As [`Cluster::new`], resolving names with `resolver`.
    pub fn with_resolver(
        spec: ClusterSpec,
        mount: &str,
        metrics: &Metrics,
        resolver: Resolver,
    ) -> Arc<Cluster> {
        let clock = Arc::new(ViewClock::new());
        let discovery =
            NodeDiscovery::new(spec.self_addr, spec.nodes.clone(), resolver, clock.clone());
        discovery.seed();
        let slot = Arc::new(OnceLock::new());
        let mut check = HttpHealthCheck::new("paseo-relay", false);
        let mut req = RequestHeader::build("GET", format!("{mount}/ready").as_bytes(), None)
            .expect("a fixed request line");
        req.insert_header("Host", "paseo-relay")
            .expect("a fixed header");
        check.req = req;
        check.consecutive_failure = spec.down_after_failures as usize;
        check.consecutive_success = spec.up_after_successes as usize;
        // A check must end before the next is due (Pingora runs them back to back).
        let timeout = spec.interval.min(Duration::from_secs(1));
        check.peer_template.options.connection_timeout = Some(timeout);
        check.peer_template.options.read_timeout = Some(timeout);
        check.health_changed_callback = Some(Box::new(Observer {
            lb: slot.clone(),
            clock: clock.clone(),
            nodes_up: metrics.cluster_nodes_up.clone(),
        }));
        // Pingora logs each flip, warn when down (with the reason) and info when up, as
        // "<summary> becomes unhealthy, <error>" / "<summary> becomes healthy".
        let me = spec.self_addr;
        check.set_backend_summary(move |b| match inet(b) {
            Some(addr) if addr == me => format!("cluster: this node {addr}"),
            _ => format!("cluster: node {}", b.addr),
        });
        let mut lb = NodeBalancer::from_backends(Backends::new(Box::new(discovery)));
        lb.set_health_check(Box::new(check));
        lb.health_check_frequency = Some(spec.interval);
        lb.parallel_health_check = true;
        lb.update_frequency = spec.has_names().then_some(RESOLVE_EVERY);
        // The seeded first discovery needs no runtime: the ring is whole from the start.
        let _ = futures_util::FutureExt::now_or_never(lb.update());
        let lb = Arc::new(lb);
        let _ = slot.set(Arc::downgrade(&lb));
        metrics.cluster_nodes_up.set(nodes_up(&lb));
        Arc::new(Cluster {
            spec,
            lb,
            clock,
            metrics: metrics.clone(),
            drain_since: AtomicU64::new(0),
            suspects: Suspects::default(),
        })
    }

    /// Adds the health checks, the DNS re-resolve and the ownership moves to `server`.
    pub fn add_services(self: &Arc<Self>, server: &mut Server, hub: &Arc<SessionHub>) {
        server.add_service(GenBackgroundService::new(
            "cluster health".to_string(),
            self.lb.clone(),
        ));
        server.add_service(background_service(
            "cluster moves",
            moves::MoveService {
                hub: hub.clone(),
                cluster: self.clone(),
            },
        ));
    }

    /// This node's address.
    pub fn self_addr(&self) -> SocketAddr {
        self.spec.self_addr
    }

    /// Every node of the ring and whether it is up in this node's view.
    pub fn nodes(&self) -> Vec<(SocketAddr, bool)> {
        let backends = self.lb.backends();
        backends
            .get_backend()
            .iter()
            .filter_map(|b| Some((inet(b)?, backends.ready(b))))
            .collect()
    }

    /// The owner of `server_id` in this node's view: the first up node on the ring.
    /// `None` when no node is up.
    pub fn owner(&self, server_id: &str) -> Option<SocketAddr> {
        self.owner_at(server_id, Instant::now())
    }

    fn owner_at(&self, server_id: &str, now: Instant) -> Option<SocketAddr> {
        walk(&self.lb, server_id, |addr, healthy| {
            self.up(addr, healthy, now)
        })
    }

    /// Whether `addr` is up in this node's view: healthy, and no connect to it failed
    /// lately.
    fn up(&self, addr: &SocketAddr, healthy: bool, now: Instant) -> bool {
        healthy && !self.suspects.contains(addr, now)
    }

    /// Whether `ip` is the address of a cluster node.
    pub fn is_node(&self, ip: IpAddr) -> bool {
        self.lb
            .backends()
            .get_backend()
            .iter()
            .any(|b| inet(b).is_some_and(|a| a.ip() == ip))
    }

    /// Whether `req` was tunnelled here by a cluster node: it carries [`HOP_HEADER`] and
    /// `peer` is a node's address (a client's own hop header is not believed).
    pub fn is_hop(&self, req: &RequestHeader, peer: Option<IpAddr>) -> bool {
        req.headers.contains_key(HOP_HEADER) && peer.is_some_and(|ip| self.is_node(ip))
    }

    /// Where a valid `/ws` of `server_id` that did not come from a node goes: `None` to be
    /// served here, or the tunnel to its owner. A draining node is not a candidate.
    pub fn route(&self, server_id: &str, draining: bool) -> Option<Tunnel> {
        let me = self.spec.self_addr;
        let now = Instant::now();
        let owner = walk(&self.lb, server_id, |addr, healthy| {
            self.up(addr, healthy, now) && !(draining && *addr == me)
        })?;
        (owner != me).then(|| Tunnel {
            server_id: server_id.to_string(),
            failed: Vec::new(),
            draining,
        })
    }

    /// The node to try next for `tunnel`: the first up node on the ring that has not failed
    /// this request. `None` when that is this node itself, or when no node is left (counted
    /// as `no_node`): serve it here.
    pub fn next_node(&self, tunnel: &Tunnel) -> Option<SocketAddr> {
        let me = self.spec.self_addr;
        let now = Instant::now();
        let next = walk(&self.lb, &tunnel.server_id, |addr, healthy| {
            self.up(addr, healthy, now)
                && !tunnel.failed.contains(addr)
                && !(tunnel.draining && *addr == me)
        });
        match next {
            Some(addr) if addr == me => None,
            Some(addr) => Some(addr),
            None => {
                self.metrics.forward_failed(ForwardFailure::NoNode).inc();
                None
            }
        }
    }

    /// Records that `addr` refused `tunnel` (no connect, or no answer in time); the next
    /// [`Cluster::next_node`] goes on along the ring. Until its health check can have agreed
    /// (`down_after_failures + 1` intervals), the node counts as down in this node's view: for
    /// other requests, and for the moves (the sessions that fail over here stay).
    pub fn connect_failed(&self, tunnel: &mut Tunnel, addr: SocketAddr, e: &std::io::Error) {
        self.metrics.forward_failed(ForwardFailure::Connect).inc();
        tunnel.failed.push(addr);
        log::debug!("cluster: node {addr} refused {tunnel} ({e}); next on the ring");
        let until = Instant::now() + self.spec.interval * (self.spec.down_after_failures + 1);
        if addr != self.spec.self_addr && self.suspects.insert(addr, until) {
            self.clock.changed();
        }
    }

    /// Marks a request going to the owner as tunnelled by a node.
    pub fn mark_hop(req: &mut RequestHeader) -> pingora::Result<()> {
        req.insert_header(HOP_HEADER, "1")
    }

    /// Counts one tunnel in `paseo_relay_cluster_tunnels` until the guard drops.
    pub fn open_tunnel(&self) -> OpenTunnel {
        self.metrics.cluster_tunnels.inc();
        OpenTunnel(self.metrics.cluster_tunnels.clone())
    }

    /// The client address of a hop-marked `/ws`: the entry node appended the address it
    /// saw last to `X-Forwarded-For`; what comes before is believed as far as `router`
    /// trusts that address (a proxy in front of the entry node). `entry` when there is none.
    pub fn tunnelled_client(router: &Router, entry: IpAddr, xff: Option<&str>) -> IpAddr {
        let xff = xff.unwrap_or("");
        let (before, last) = match xff.rsplit_once(',') {
            Some((before, last)) => (Some(before), last),
            None => (None, xff),
        };
        match last.trim().parse::<IpAddr>() {
            Ok(client) => router.client_addr(client, before),
            Err(_) => entry,
        }
    }

    /// How long a draining node keeps serving what is tunnelled to it: until its peers can
    /// have seen it down (`down_after_failures` health intervals plus two).
    pub fn drain_grace(&self) -> Duration {
        self.spec.interval * (self.spec.down_after_failures + 2)
    }

    /// Whether a hop-marked `/ws` is still served while this node drains (within
    /// [`Cluster::drain_grace`] of the drain's start).
    pub fn accepts_tunnelled(&self) -> bool {
        self.accepts_tunnelled_at(Instant::now())
    }

    fn accepts_tunnelled_at(&self, now: Instant) -> bool {
        match self.drain_started() {
            None => true,
            Some(since) => now.saturating_duration_since(since) < self.drain_grace(),
        }
    }

    fn drain_started(&self) -> Option<Instant> {
        match self.drain_since.load(Ordering::Acquire) {
            0 => None,
            ms => Some(self.clock.epoch + Duration::from_millis(ms - 1)),
        }
    }

    /// Notes whether the node drains at `now`; returns since when.
    fn note_drain(&self, draining: bool, now: Instant) -> Option<Instant> {
        if !draining {
            self.drain_since.store(0, Ordering::Release);
            return None;
        }
        let started = self.drain_started();
        if started.is_none() {
            let ms = self.clock.ms(now) + 1;
            self.drain_since.store(ms, Ordering::Release);
        }
        started.or(Some(now))
    }

    /// One round of the ownership-move rule at `now` (run by [`moves::MoveService`] every
    /// half health interval): while draining, after [`Cluster::drain_grace`], every local
    /// session moves; otherwise, once the view has been stable for two intervals, every
    /// local session owned by another node. Returns how many sessions were moved.
    pub fn sweep(&self, hub: &SessionHub, now: Instant) -> usize {
        self.metrics.cluster_nodes_up.set(nodes_up(&self.lb));
        if self.suspects.expire(now) {
            self.clock.changed(); // the node is back in the ring, unless its checks failed
        }
        if hub.closing().is_some() {
            return 0; // the relay stops: its own drain closes every socket
        }
        let me = self.spec.self_addr;
        let moved = match self.note_drain(hub.is_draining(), now) {
            Some(since) if now.saturating_duration_since(since) < self.drain_grace() => return 0,
            Some(_) => hub.close_sessions(|_| true, OWNER_MOVED),
            None if self.clock.stable_for(now) < self.spec.interval * 2 => return 0,
            None => hub.close_sessions(
                |(_, server_id)| {
                    self.owner_at(server_id, now)
                        .is_some_and(|owner| owner != me)
                },
                OWNER_MOVED,
            ),
        };
        for key in &moved {
            self.metrics.cluster_owner_moves.inc();
            let to = match self.owner_at(&key.1, now) {
                Some(owner) if owner != me => format!("to {owner}"),
                _ => "off this draining node".to_string(),
            };
            log::info!(
                "cluster: {} moved {to}: its sockets closed {} {}",
                crate::session::hub::describe_key(key),
                OWNER_MOVED.code,
                OWNER_MOVED.reason
            );
        }
        moved.len()
    }

    /// How often [`Cluster::sweep`] runs: half a health interval.
    pub fn sweep_every(&self) -> Duration {
        (self.spec.interval / 2).max(Duration::from_millis(10))
    }

    /// The view clock (membership and health changes).
    pub fn clock(&self) -> &ViewClock {
        &self.clock
    }

    #[cfg(test)]
    fn set_up(&self, addr: SocketAddr, up: bool) {
        let backends = self.lb.backends();
        for b in backends.get_backend().iter() {
            if inet(b) == Some(addr) {
                backends.set_enable(b, up);
            }
        }
        self.clock.changed();
    }
}

#[cfg(test)]
mod tests;
