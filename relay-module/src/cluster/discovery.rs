//! The cluster's members as a Pingora [`ServiceDiscovery`]: the literal addresses of
//! `cluster.nodes`, every address its names resolve to (again every 10 s, the load
//! balancer's `update_frequency`), and this node itself, always.
//!
//! A name that fails to resolve keeps the addresses it last gave (a DNS hiccup must not
//! shrink the ring), with one warning per failure streak. The resolver is injectable so
//! that a unit test can play a headless service whose pods come and go.

use crate::cluster::conf::NodeEntry;
use crate::cluster::ViewClock;
use async_trait::async_trait;
use log::{info, warn};
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::Backend;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};

/// Resolves `host` and `port` to addresses (blocking; run off the async threads).
pub type Resolver = Arc<dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync>;

/// The system resolver (`getaddrinfo`).
pub fn system_resolver() -> Resolver {
    Arc::new(|host, port| Ok((host, port).to_socket_addrs()?.collect()))
}

/// What one name resolved to last, and whether its last lookup failed.
#[derive(Debug, Default, Clone)]
struct Known {
    addrs: Vec<SocketAddr>,
    failing: bool,
}

/// The node list and how to resolve it: cheap to clone into a blocking task.
#[derive(Clone)]
struct Nodes {
    self_addr: SocketAddr,
    entries: Arc<[NodeEntry]>,
    resolver: Resolver,
}

impl Nodes {
    /// Resolves every entry (blocking) and returns the members, this node included;
    /// `known` holds what each name (by entry index) gave last.
    fn resolve(&self, known: &mut HashMap<usize, Known>) -> BTreeSet<SocketAddr> {
        let mut members = BTreeSet::from([self.self_addr]);
        for (i, entry) in self.entries.iter().enumerate() {
            let (host, port) = match entry {
                NodeEntry::Addr(addr) => {
                    members.insert(*addr);
                    continue;
                }
                NodeEntry::Name { host, port } => (host, *port),
            };
            let k = known.entry(i).or_default();
            match (self.resolver)(host, port) {
                Ok(addrs) if !addrs.is_empty() => {
                    if k.failing {
                        info!("cluster: `{host}:{port}` resolves again");
                    }
                    *k = Known {
                        addrs,
                        failing: false,
                    };
                }
                result => {
                    if !k.failing {
                        let why = match result {
                            Err(e) => e.to_string(),
                            Ok(_) => "no address".to_string(),
                        };
                        warn!(
                            "cluster: `{host}:{port}` does not resolve ({why}); keeping its {} \
                             last known addresses, trying again every 10 s",
                            k.addrs.len()
                        );
                    }
                    k.failing = true;
                }
            }
            members.extend(k.addrs.iter().copied());
        }
        members
    }

    fn has_names(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e, NodeEntry::Name { .. }))
    }
}

/// The cluster's node list as a [`ServiceDiscovery`]; see the module docs.
pub struct NodeDiscovery {
    nodes: Nodes,
    known: Mutex<HashMap<usize, Known>>,
    /// The members last returned (to log and mark changes).
    last: Mutex<BTreeSet<SocketAddr>>,
    /// The first answer, resolved before the server started (see [`NodeDiscovery::seed`]).
    seed: Mutex<Option<BTreeSet<SocketAddr>>>,
    clock: Arc<ViewClock>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn backend(addr: SocketAddr) -> Backend {
    Backend {
        addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
        weight: 1,
        ext: Default::default(),
    }
}

impl NodeDiscovery {
    /// The discovery of `entries` plus `self_addr`, resolving names with `resolver`; a
    /// membership change is marked on `clock`.
    pub fn new(
        self_addr: SocketAddr,
        entries: Vec<NodeEntry>,
        resolver: Resolver,
        clock: Arc<ViewClock>,
    ) -> NodeDiscovery {
        NodeDiscovery {
            nodes: Nodes {
                self_addr,
                entries: entries.into(),
                resolver,
            },
            known: Mutex::new(HashMap::new()),
            last: Mutex::new(BTreeSet::new()),
            seed: Mutex::new(None),
            clock,
        }
    }

    /// Resolves every entry now, blocking, and keeps the answer for the first
    /// [`ServiceDiscovery::discover`], so that the ring is whole before the server starts
    /// (when no async runtime exists yet). Logs a warning per name that does not resolve.
    pub fn seed(&self) {
        let members = self.nodes.resolve(&mut lock(&self.known));
        *lock(&self.seed) = Some(members);
    }

    /// Records `members` as the current membership: logs and marks a view change when it
    /// differs from the last.
    fn publish(&self, members: &BTreeSet<SocketAddr>) {
        let mut last = lock(&self.last);
        if *last == *members {
            return;
        }
        if !last.is_empty() {
            let shown: Vec<String> = members.iter().map(|a| a.to_string()).collect();
            info!(
                "cluster: {} nodes in the ring: {}",
                members.len(),
                shown.join(", ")
            );
        }
        *last = members.clone();
        self.clock.changed();
    }
}

#[async_trait]
impl ServiceDiscovery for NodeDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let seeded = lock(&self.seed).take();
        let members = match seeded {
            Some(members) => members,
            None if self.nodes.has_names() => {
                // getaddrinfo blocks: resolve off the async threads.
                let nodes = self.nodes.clone();
                let mut known = lock(&self.known).clone();
                let (members, known) = tokio::task::spawn_blocking(move || {
                    let members = nodes.resolve(&mut known);
                    (members, known)
                })
                .await
                .map_err(|e| {
                    pingora::Error::because(
                        pingora::ErrorType::InternalError,
                        "cluster: resolving the nodes",
                        e,
                    )
                })?;
                *lock(&self.known) = known;
                members
            }
            None => self.nodes.resolve(&mut lock(&self.known)),
        };
        self.publish(&members);
        Ok((members.into_iter().map(backend).collect(), HashMap::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn addrs(set: &BTreeSet<Backend>) -> Vec<String> {
        set.iter().map(|b| b.addr.to_string()).collect()
    }

    /// A headless service whose answer the test changes.
    fn fake_dns() -> (Arc<Mutex<io::Result<Vec<SocketAddr>>>>, Resolver) {
        let answer: Arc<Mutex<io::Result<Vec<SocketAddr>>>> = Arc::new(Mutex::new(Ok(vec![])));
        let shared = answer.clone();
        let resolver: Resolver = Arc::new(move |host, port| {
            assert_eq!((host, port), ("relay-headless", 8080));
            match &*shared.lock().unwrap() {
                Ok(a) => Ok(a.clone()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            }
        });
        (answer, resolver)
    }

    #[tokio::test]
    async fn cluster_dns_nodes_are_re_resolved_and_kept_on_failure() {
        let (answer, resolver) = fake_dns();
        let clock = Arc::new(ViewClock::new());
        let d = NodeDiscovery::new(
            addr("127.0.0.2:8080"),
            vec![NodeEntry::Name {
                host: "relay-headless".into(),
                port: 8080,
            }],
            resolver,
            clock.clone(),
        );
        *answer.lock().unwrap() = Ok(vec![addr("127.0.0.1:8080"), addr("127.0.0.2:8080")]);
        d.seed();
        let (first, _) = d.discover().now_or_never().unwrap().unwrap();
        assert_eq!(addrs(&first), ["127.0.0.1:8080", "127.0.0.2:8080"]);
        let changes = clock.generation();

        // A third pod joins the headless service.
        *answer.lock().unwrap() = Ok(vec![
            addr("127.0.0.1:8080"),
            addr("127.0.0.2:8080"),
            addr("127.0.0.3:8080"),
        ]);
        let (grown, _) = d.discover().await.unwrap();
        assert_eq!(
            addrs(&grown),
            ["127.0.0.1:8080", "127.0.0.2:8080", "127.0.0.3:8080"]
        );
        assert_eq!(clock.generation(), changes + 1);

        // DNS fails: the last answer stays; then it shrinks; self always stays.
        *answer.lock().unwrap() = Err(io::Error::other("SERVFAIL"));
        let (kept, _) = d.discover().await.unwrap();
        assert_eq!(addrs(&kept), addrs(&grown));
        assert_eq!(clock.generation(), changes + 1);
        *answer.lock().unwrap() = Ok(vec![addr("127.0.0.3:8080")]);
        let (shrunk, _) = d.discover().await.unwrap();
        assert_eq!(addrs(&shrunk), ["127.0.0.2:8080", "127.0.0.3:8080"]);
        assert_eq!(clock.generation(), changes + 2);
    }
}
