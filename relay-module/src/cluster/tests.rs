//! Unit tests of the cluster view: ownership, failover walk, moves and drain, DNS form.

use super::conf::NodeEntry;
use super::*;
use crate::config::RelayConf;
use crate::protocol::{SocketKind, Version};
use crate::session::hub::Attachment;
use crate::socket::outbox::Outbox;
use std::collections::BTreeSet;
use std::sync::Mutex;

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

fn spec(me: u16, ports: &[u16]) -> ClusterSpec {
    ClusterSpec {
        self_addr: addr(me),
        nodes: ports.iter().map(|p| NodeEntry::Addr(addr(*p))).collect(),
        interval: Duration::from_millis(500),
        down_after_failures: 3,
        up_after_successes: 3,
    }
}

fn cluster(me: u16) -> (Arc<Cluster>, Metrics) {
    let metrics = Metrics::new();
    let c = Cluster::new(spec(me, &[1, 2, 3]), "", &metrics);
    (c, metrics)
}

/// A serverId owned by `owner` when every node is up.
fn owned_by(owner: u16) -> String {
    let nodes = [addr(1), addr(2), addr(3)];
    (0..)
        .map(|i| format!("srv_{i}"))
        .find(|sid| owner_among(&nodes, &nodes, sid) == Some(addr(owner)))
        .unwrap()
}

fn attach(hub: &Arc<SessionHub>, server_id: &str) -> (Attachment, Attachment) {
    let out = || Arc::new(Outbox::new(1024).0);
    let key = || (Version::V2, server_id.to_string());
    let (c, _) = hub.attach(key(), SocketKind::Control, out(), None).unwrap();
    let (k, _) = hub
        .attach(key(), SocketKind::Client("x".into()), out(), None)
        .unwrap();
    (c, k)
}

#[test]
fn cluster_owner_is_ketama_over_the_up_nodes_and_the_same_everywhere() {
    let (a, _) = cluster(1);
    let (b, _) = cluster(2);
    assert_eq!(
        a.nodes(),
        [(addr(1), true), (addr(2), true), (addr(3), true)]
    );
    a.set_up(addr(2), false);
    b.set_up(addr(2), false);
    let up = [addr(1), addr(3)];
    let only_up = NodeBalancer::try_from_iter(up).unwrap();
    let mut owners = BTreeSet::new();
    for i in 0..500 {
        let sid = format!("srv_{i:04}");
        let want = only_up.select(sid.as_bytes(), 1000).and_then(|b| inet(&b));
        assert_eq!(a.owner(&sid), want, "{sid}");
        assert_eq!(b.owner(&sid), want, "{sid}");
        assert_eq!(owner_among(&[addr(1), addr(2), addr(3)], &up, &sid), want);
        owners.extend(want);
    }
    assert_eq!(
        owners,
        BTreeSet::from(up),
        "both up nodes own some serverIds"
    );
    a.set_up(addr(1), false);
    a.set_up(addr(3), false);
    assert_eq!(a.owner("srv_x"), None);
}

#[test]
fn cluster_route_and_failover_walk() {
    let (a, _) = cluster(1);
    let mine = owned_by(1);
    // Owned by node 3, and by this node (1) once node 3 is down.
    let nodes = [addr(1), addr(2), addr(3)];
    let theirs = (0..)
        .map(|i| format!("srv_t{i}"))
        .find(|sid| {
            owner_among(&nodes, &nodes, sid) == Some(addr(3))
                && owner_among(&nodes, &[addr(1), addr(2)], sid) == Some(addr(1))
        })
        .unwrap();
    assert!(a.route(&mine, false).is_none(), "served here");
    let mut t = a.route(&theirs, false).expect("tunnelled");
    assert_eq!(a.next_node(&t), Some(addr(3)));
    // Node 3 refuses: the walk goes on, the same on every node (Ketama without node 3);
    // here it reaches this node itself, which serves it.
    let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    let changes = a.clock().generation();
    a.connect_failed(&mut t, addr(3), &refused);
    let next = owner_among(&nodes, &[addr(1), addr(2)], &theirs);
    assert_eq!(next, Some(addr(1)));
    assert_eq!(a.next_node(&t), None, "served here");
    assert_eq!(
        t.to_string(),
        format!("session {} (connect failed: 127.0.0.1:3)", &theirs)
    );
    // Until its checks can have agreed (3 + 1 intervals), node 3 is down in this view: the
    // session that failed over here is not moved back, and others do not try it first.
    assert_eq!(a.clock().generation(), changes + 1);
    assert_eq!(a.owner(&theirs), next);
    assert!(a.route(&theirs, false).is_none(), "served here now");
    let hub = SessionHub::new(RelayConf::default());
    let _session = attach(&hub, &theirs);
    let later = Instant::now() + Duration::from_millis(1100);
    assert_eq!(a.sweep(&hub, later), 0);
    assert_eq!(
        a.owner_at(&theirs, later + Duration::from_secs(1)),
        Some(addr(3))
    );
    // Every node refusing: none is left.
    let (b, metrics) = cluster(1);
    let mut t = b.route(&theirs, true).expect("draining: tunnelled");
    let mut tried = Vec::new();
    while let Some(addr) = b.next_node(&t) {
        tried.push(addr);
        b.connect_failed(&mut t, addr, &refused);
    }
    tried.sort();
    assert_eq!(tried, [addr(2), addr(3)], "not itself: it drains");
    let failed = |r| metrics.forward_failed(r).get();
    assert_eq!(failed(ForwardFailure::Connect), 2);
    assert_eq!(failed(ForwardFailure::NoNode), 1);

    // A draining node tunnels even what it owns, to the next node on the ring.
    let (a, metrics) = cluster(1);
    let t = a.route(&mine, true).expect("tunnelled while draining");
    let next = owner_among(&nodes, &[addr(2), addr(3)], &mine);
    assert_eq!(a.next_node(&t), next);

    // A tunnel counts while its guard lives.
    let open = a.open_tunnel();
    assert_eq!(metrics.cluster_tunnels.get(), 1);
    drop(open);
    assert_eq!(metrics.cluster_tunnels.get(), 0);
}

#[test]
fn cluster_hop_marker_is_believed_only_from_nodes() {
    let (a, _) = cluster(1);
    let mut req = RequestHeader::build("GET", b"/ws?serverId=s", None).unwrap();
    let node: IpAddr = "127.0.0.1".parse().unwrap();
    let stranger: IpAddr = "192.0.2.7".parse().unwrap();
    assert!(!a.is_hop(&req, Some(node)));
    Cluster::mark_hop(&mut req).unwrap();
    assert!(a.is_hop(&req, Some(node)));
    assert!(!a.is_hop(&req, Some(stranger)));
    assert!(!a.is_hop(&req, None));

    let router = Router::build(&[], &["10.0.0.0/8".to_string()]).unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let client = |xff| Cluster::tunnelled_client(&router, node, xff);
    assert_eq!(client(Some("198.51.100.4")), ip("198.51.100.4"));
    // Behind a trusted proxy in front of the entry node, the proxy's client counts.
    assert_eq!(client(Some("198.51.100.4, 10.1.1.1")), ip("198.51.100.4"));
    // An untrusted entry's own X-Forwarded-For was already replaced by the entry node.
    assert_eq!(client(Some("6.6.6.6, 198.51.100.4")), ip("198.51.100.4"));
    assert_eq!(client(None), node);
    assert_eq!(client(Some("junk")), node);
}

#[tokio::test]
async fn cluster_moves_wait_for_a_stable_view_then_close_foreign_sessions_1012() {
    let (a, metrics) = cluster(1);
    let hub = SessionHub::new(RelayConf::default());
    let mine = owned_by(1);
    let (c1, k1) = attach(&hub, &mine);
    // Owned by node 1 once node 3 is down (its sessions land here).
    let nodes = [addr(1), addr(2), addr(3)];
    let fallback = (0..)
        .map(|i| format!("srv_f{i}"))
        .find(|sid| {
            owner_among(&nodes, &nodes, sid) == Some(addr(3))
                && owner_among(&nodes, &[addr(1), addr(2)], sid) == Some(addr(1))
        })
        .unwrap();
    a.set_up(addr(3), false);
    let (c3, k3) = attach(&hub, &fallback);
    let now = Instant::now();
    assert_eq!(a.sweep(&hub, now + Duration::from_millis(1500)), 0);
    // Node 3 comes back: its sessions move, once the view was stable for two intervals.
    a.set_up(addr(3), true);
    let changed = Instant::now();
    assert_eq!(a.sweep(&hub, changed + Duration::from_millis(900)), 0);
    assert!(!k3.outbox.is_closing());
    assert_eq!(a.sweep(&hub, changed + Duration::from_millis(1100)), 1);
    assert!(c3.outbox.is_closing() && k3.outbox.is_closing());
    assert!(!c1.outbox.is_closing() && !k1.outbox.is_closing());
    assert_eq!(metrics.cluster_owner_moves.get(), 1);
    // Sockets already closing are not moved (or counted) again.
    assert_eq!(a.sweep(&hub, changed + Duration::from_millis(1600)), 0);
    assert_eq!(metrics.cluster_owner_moves.get(), 1);
    assert_eq!(metrics.cluster_nodes_up.get(), 3);
}

#[tokio::test]
async fn cluster_draining_node_serves_tunnels_for_its_grace_then_moves_everything() {
    let (a, metrics) = cluster(1);
    let hub = SessionHub::new(RelayConf::default());
    let (c, k) = attach(&hub, &owned_by(1));
    hub.set_draining(true);
    let start = Instant::now();
    assert_eq!(a.drain_grace(), Duration::from_millis(2500));
    assert!(a.accepts_tunnelled());
    assert_eq!(a.sweep(&hub, start), 0);
    assert_eq!(a.sweep(&hub, start + Duration::from_millis(2400)), 0);
    assert!(a.accepts_tunnelled_at(start + Duration::from_millis(2400)));
    assert!(!a.accepts_tunnelled_at(start + Duration::from_millis(2600)));
    assert_eq!(a.sweep(&hub, start + Duration::from_millis(2600)), 1);
    assert!(c.outbox.is_closing() && k.outbox.is_closing());
    assert_eq!(metrics.cluster_owner_moves.get(), 1);
    // Resume: the drain clock starts over.
    hub.set_draining(false);
    assert_eq!(a.sweep(&hub, start + Duration::from_millis(2700)), 0);
    assert!(a.accepts_tunnelled());
}

#[tokio::test]
async fn cluster_dns_form_is_re_resolved_by_the_load_balancer() {
    let pod = |n: u8| IpAddr::from([127, 0, 0, n]);
    let answer = Arc::new(Mutex::new(vec![pod(1), pod(2)]));
    let shared = answer.clone();
    let resolver: discovery::Resolver = Arc::new(move |host, port| {
        assert_eq!((host, port), ("relay-headless.default.svc", 9000));
        Ok(shared
            .lock()
            .unwrap()
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect())
    });
    let spec = ClusterSpec {
        self_addr: "127.0.0.2:9000".parse().unwrap(),
        nodes: vec![NodeEntry::Name {
            host: "relay-headless.default.svc".into(),
            port: 9000,
        }],
        ..spec(1, &[])
    };
    let metrics = Metrics::new();
    let c = Cluster::with_resolver(spec, "", &metrics, resolver);
    let ports =
        |c: &Cluster| -> Vec<String> { c.nodes().iter().map(|(a, _)| a.to_string()).collect() };
    assert_eq!(ports(&c), ["127.0.0.1:9000", "127.0.0.2:9000"]);
    assert_eq!(c.lb.update_frequency, Some(RESOLVE_EVERY));
    assert_eq!(metrics.cluster_nodes_up.get(), 2);
    let before = c.clock().generation();
    *answer.lock().unwrap() = vec![pod(1), pod(2), pod(3)];
    c.lb.update().await.unwrap();
    assert_eq!(
        ports(&c),
        ["127.0.0.1:9000", "127.0.0.2:9000", "127.0.0.3:9000"]
    );
    assert!(
        c.clock().generation() > before,
        "a membership change is a view change"
    );
    // The new node owns its share at once.
    let nodes: Vec<SocketAddr> = c.nodes().iter().map(|(a, _)| *a).collect();
    for i in 0..50 {
        let sid = format!("srv_{i}");
        assert_eq!(c.owner(&sid), owner_among(&nodes, &nodes, &sid));
    }
    // The pod leaves again; this node stays in its own ring whatever DNS says.
    *answer.lock().unwrap() = vec![pod(3)];
    c.lb.update().await.unwrap();
    assert_eq!(ports(&c), ["127.0.0.2:9000", "127.0.0.3:9000"]);
}
