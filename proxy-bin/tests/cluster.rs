//! Several relay nodes (issue 10 "Cluster"), real binaries on loopback: pairing across
//! entry nodes, a node killed with 30 live sessions and restarted, a node drained and
//! resumed, and `-t` on bad `cluster:` values. The DNS form of `nodes` is unit-tested in
//! relay-module (`cluster::tests`): a test cannot make a name resolve to several loopback
//! addresses without `/etc/hosts`.

mod cluster_nodes;
mod common;

use cluster_nodes::{all_echo_after, start_sessions, Cluster, Session};
use common::{command, temp_dir, write_conf};
use futures_util::StreamExt;
use relay_module::cluster::owner_among;
use relay_tests::{recv_close, recv_text, send_close, sid, Endpoint};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The three-node tests each run 3 processes on a 2-core machine: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A serverId that `owner` owns when every node of `nodes` is up.
fn owned_by(nodes: &[SocketAddr], owner: usize, name: &str) -> String {
    (0..)
        .map(|i| sid(&format!("{name}{i}")))
        .find(|s| owner_among(nodes, nodes, s) == Some(nodes[owner]))
        .unwrap()
}

async fn ws(e: &Endpoint, query: &str) -> relay_tests::Ws {
    e.ws(query).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_pairs_when_control_data_and_client_enter_through_three_nodes() {
    let _one = SERIAL.lock().await;
    // HTTP deadlines of 1 s: a tunnelled WebSocket must outlive them idle.
    let http = "http:\n  request_head_timeout_ms: 1000\n  keepalive_timeout_ms: 1000\n";
    let cluster = Cluster::start_with("pair", 3, http);
    for i in 0..3 {
        cluster.wait_nodes_up(i, 3).await;
    }
    let nodes = cluster.addrs();
    let [a, b, c] = [0, 1, 2].map(|i| cluster.endpoint(i));
    // Session j is owned by node j; its control enters through node 0, its client through
    // node 1 and its data socket through node 2.
    let mut sessions = Vec::new();
    for owner in 0..3 {
        let s = owned_by(&nodes, owner, "pair");
        let mut control = ws(&a, &format!("serverId={s}&role=server&v=2")).await;
        assert_eq!(
            recv_text(&mut control).await,
            r#"{"type":"sync","connectionIds":[]}"#
        );
        let mut k = ws(&b, &format!("serverId={s}&role=client&v=2&connectionId=x")).await;
        assert_eq!(
            recv_text(&mut control).await,
            r#"{"type":"connected","connectionId":"x"}"#
        );
        let mut d = ws(&c, &format!("serverId={s}&role=server&v=2&connectionId=x")).await;
        relay_tests::assert_kind_and_bytes_preserved(&mut k, &mut d).await;
        sessions.push((s, control, k, d));
    }
    // Each node terminates its own session's three sockets and tunnels two others.
    for i in 0..3 {
        let m = |series: &str| {
            let series = series.to_string();
            let cluster = &cluster;
            async move { cluster.metric(i, &series).await }
        };
        assert_eq!(m("paseo_relay_active_sessions").await, 1.0, "node {i}");
        for kind in ["control", "client", "data"] {
            let series = format!("paseo_relay_active_websockets{{kind=\"{kind}\"}}");
            assert_eq!(m(&series).await, 1.0, "node {i} {kind}");
        }
        assert_eq!(m("paseo_relay_cluster_tunnels").await, 2.0, "node {i}");
        assert_eq!(m("paseo_relay_cluster_nodes_up").await, 3.0, "node {i}");
        let failures = "paseo_relay_cluster_forward_failures_total{reason=\"connect\"}";
        assert_eq!(m(failures).await, 0.0, "node {i}");
    }

    // A bad /ws is answered by the entry node, which tunnels nothing.
    let theirs = owned_by(&nodes, 2, "bad");
    let ws_requests = "paseo_relay_http_requests_total{handler=\"ws\"}";
    let owner_before = cluster.metric(2, ws_requests).await;
    let no_key = a
        .get(
            &format!("/ws?serverId={theirs}&role=server&v=2"),
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
        )
        .await;
    assert_eq!(no_key.status, 400);
    assert_eq!(no_key.body, "Missing or invalid Sec-WebSocket-Key header");
    let plain = a
        .get(&format!("/ws?serverId={theirs}&role=server&v=2"), "")
        .await;
    assert_eq!(plain.status, 426);
    assert_eq!(cluster.metric(2, ws_requests).await, owner_before);
    assert_eq!(
        cluster
            .metric(
                0,
                "paseo_relay_connection_rejections_total{reason=\"bad_request\"}"
            )
            .await,
        2.0
    );

    // The owner closes: the entry node closes the client side at once. Session 0's data
    // socket leaves; its client (tunnelled through node 1) gets 1012 and its end.
    let (_, _control, mut k, d) = sessions.remove(0);
    let mut d = d;
    send_close(&mut d, 1000, "bye").await;
    assert_eq!(
        recv_close(&mut k).await,
        (1012, "Server disconnected".to_string())
    );
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(Ok(_)) = k.next().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the entry node closed the client's connection"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while cluster.metric(1, "paseo_relay_cluster_tunnels").await != 1.0 {
        assert!(Instant::now() < deadline, "node 1 still counts the tunnel");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The others still relay both ways, after idling longer than every HTTP deadline.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for (_, _, k, d) in sessions.iter_mut() {
        relay_tests::assert_relays_both_ways(k, d).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_kill_with_30_sessions_re_pairs_within_5_s_and_restart_moves_them_back() {
    let _one = SERIAL.lock().await;
    let mut cluster = Cluster::start("kill", 3);
    for i in 0..3 {
        cluster.wait_nodes_up(i, 3).await;
    }
    let sessions = start_sessions(&cluster, "kill", 30);
    all_echo_after(&sessions, Instant::now(), Duration::from_secs(15)).await;
    let everyone = cluster.expected_sessions(&sessions, &[0, 1, 2]);
    assert_eq!(everyone.iter().sum::<f64>(), 30.0);
    assert!(everyone.iter().all(|n| *n > 0.0), "{everyone:?}");
    cluster.wait_sessions(&everyone, &[0, 1, 2]).await;

    // kill -9 of node 2: its sessions' daemons and apps reconnect to the others and meet.
    let killed = Instant::now();
    cluster.kill(2);
    let repair = all_echo_after(&sessions, killed, Duration::from_secs(5)).await;
    eprintln!("cluster: every session echoed again {repair:?} after the kill");
    if std::env::var("CLUSTER_DEBUG").is_ok() {
        let all = cluster.addrs();
        for s in &sessions {
            let owner = owner_among(&all, &all, &s.server_id);
            let ends = s.ends_after(killed);
            eprintln!(
                "{} owner {owner:?} entries {:?} echo after {:?} ends {:?}",
                s.server_id,
                s.entries,
                s.echo_after(killed).map(|e| e - killed),
                ends.iter()
                    .map(|(at, why)| (*at - killed, why.clone()))
                    .collect::<Vec<_>>()
            );
        }
    }
    cluster.wait_nodes_up(0, 2).await;
    cluster.wait_nodes_up(1, 2).await;
    let survivors = cluster.expected_sessions(&sessions, &[0, 1]);
    assert_eq!(survivors[2], 0.0);
    cluster.wait_sessions(&survivors, &[0, 1]).await;
    // Every session had a socket entering through node 2: each one reconnected.
    let nodes = cluster.addrs();
    assert!(sessions.iter().all(|s| !s.ends_after(killed).is_empty()));

    // Restart: the sessions it owns move back, 1012 Session owner moved, and re-pair.
    let restarted = Instant::now();
    cluster.spawn(2);
    common::wait_listening(nodes[2]);
    cluster.wait_nodes_up(0, 3).await;
    cluster.wait_nodes_up(1, 3).await;
    cluster.wait_sessions(&everyone, &[0, 1, 2]).await;
    let mut moved = 0;
    for s in &sessions {
        let ends = s.ends_after(restarted);
        let owned = owner_among(&nodes, &nodes, &s.server_id) == Some(nodes[2]);
        assert_eq!(!ends.is_empty(), owned, "{} {ends:?}", s.server_id);
        if let Some((at, why)) = ends.last() {
            moved += 1;
            assert_eq!(
                why.clone(),
                Some((1012, "Session owner moved".to_string())),
                "{}",
                s.server_id
            );
            let again = all_echo_after(std::slice::from_ref(s), *at, Duration::from_secs(5)).await;
            eprintln!(
                "cluster: {} re-paired {again:?} after its move",
                s.server_id
            );
        }
    }
    assert_eq!(moved as f64, everyone[2]);
    let moves = cluster
        .metric(0, "paseo_relay_cluster_owner_moves_total")
        .await
        + cluster
            .metric(1, "paseo_relay_cluster_owner_moves_total")
            .await;
    assert!(moves >= everyone[2], "{moves} moves for {moved} sessions");
    // No split: every session echoes through its one owner.
    all_echo_after(&sessions, Instant::now(), Duration::from_secs(5)).await;
    assert!(cluster
        .log(0)
        .contains(&format!("cluster: node {} becomes healthy", nodes[2])));
    assert!(cluster
        .log(0)
        .contains(&format!("cluster: node {} becomes unhealthy", nodes[2])));
    assert!(cluster.log(0).contains("moved to ") || cluster.log(1).contains("moved to "));
    sessions.iter().for_each(|s| s.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_drain_moves_a_nodes_sessions_away_and_resume_brings_them_back() {
    let _one = SERIAL.lock().await;
    let cluster = Cluster::start("drain", 3);
    for i in 0..3 {
        cluster.wait_nodes_up(i, 3).await;
    }
    let sessions = start_sessions(&cluster, "drain", 12);
    all_echo_after(&sessions, Instant::now(), Duration::from_secs(15)).await;
    let everyone = cluster.expected_sessions(&sessions, &[0, 1, 2]);
    assert!(everyone[1] > 0.0, "{everyone:?}");
    cluster.wait_sessions(&everyone, &[0, 1, 2]).await;

    let drained = Instant::now();
    let resp = cluster.admin(1).post("/drain").await;
    assert_eq!(resp.status, 200);
    let nodes = cluster.addrs();
    let owned_by_1: Vec<&Arc<Session>> = sessions
        .iter()
        .filter(|s| owner_among(&nodes, &nodes, &s.server_id) == Some(nodes[1]))
        .collect();
    // Its peers see it down after 3 checks; it moves its sessions only after 3 + 2
    // intervals (2.5 s), so no reconnect lands on a node that refuses it.
    let away = cluster.expected_sessions(&sessions, &[0, 2]);
    cluster.wait_sessions(&away, &[0, 1, 2]).await;
    for s in &sessions {
        let ends = s.ends_after(drained);
        let owned = owned_by_1.iter().any(|o| Arc::ptr_eq(o, s));
        assert_eq!(!ends.is_empty(), owned, "{} {ends:?}", s.server_id);
        if let Some((at, why)) = ends.first() {
            assert_eq!(why.clone(), Some((1012, "Session owner moved".to_string())));
            assert!(
                *at - drained >= Duration::from_millis(2500),
                "{:?}",
                *at - drained
            );
        }
    }
    all_echo_after(&sessions, Instant::now(), Duration::from_secs(5)).await;
    // Nothing lands on it: a new session entering only through it is served elsewhere.
    let newcomer = Session::start(nodes.clone(), sid("newcomer"), [1, 1, 1]);
    all_echo_after(
        std::slice::from_ref(&newcomer),
        drained,
        Duration::from_secs(5),
    )
    .await;
    for kind in ["control", "client", "data"] {
        let series = format!("paseo_relay_active_websockets{{kind=\"{kind}\"}}");
        assert_eq!(cluster.metric(1, &series).await, 0.0, "{kind}");
    }
    assert_eq!(cluster.metric(1, "paseo_relay_active_sessions").await, 0.0);
    assert_eq!(
        cluster.metric(1, "paseo_relay_cluster_tunnels").await,
        3.0 + tunnels_through_1(&sessions, &nodes, &[0, 2])
    );
    newcomer.stop();

    // Resume: it is up again after 3 good checks, and its sessions come back.
    let resumed = Instant::now();
    assert_eq!(cluster.admin(1).post("/resume").await.status, 200);
    cluster.wait_nodes_up(0, 3).await;
    cluster.wait_sessions(&everyone, &[0, 1, 2]).await;
    for s in &owned_by_1 {
        let ends = s.ends_after(resumed);
        assert_eq!(ends.len(), 1, "{} {ends:?}", s.server_id);
        assert_eq!(ends[0].1, Some((1012, "Session owner moved".to_string())));
    }
    all_echo_after(&sessions, Instant::now(), Duration::from_secs(5)).await;
    sessions.iter().for_each(|s| s.stop());
}

/// Sockets of `sessions` that enter through node 1 and are owned elsewhere when `up` are
/// the nodes up.
fn tunnels_through_1(sessions: &[Arc<Session>], nodes: &[SocketAddr], up: &[usize]) -> f64 {
    let up: Vec<SocketAddr> = up.iter().map(|i| nodes[*i]).collect();
    let mut n = 0.0;
    for s in sessions {
        let owner = owner_among(nodes, &up, &s.server_id);
        n += s
            .entries
            .iter()
            .filter(|e| **e == 1 && owner != Some(nodes[1]))
            .count() as f64;
    }
    n
}

#[test]
fn cluster_check_rejects_bad_values_with_exact_lines() {
    let dir = temp_dir("cluster-check");
    let base = "listen: 127.0.0.1:9001\n";
    let cases = [
        ("cluster:\n  nodes: []\n", "cluster.nodes: no node given"),
        (
            "cluster:\n  self: 127.0.0.1:9001\n  nodes: [127.0.0.1:9001, 127.0.0.1]\n",
            "cluster.nodes[1]: `127.0.0.1` is not host:port",
        ),
        (
            "cluster:\n  self: 127.0.0.1:9001\n  nodes: [127.0.0.1:9001, 127.0.0.1:9001]\n",
            "cluster.nodes[1]: `127.0.0.1:9001` is given twice",
        ),
        (
            "cluster:\n  nodes: [127.0.0.1:9001]\n",
            "cluster.self: not set (this node's IP:port as the other nodes reach it; or set \
             PASEO_CLUSTER_SELF)",
        ),
        (
            "cluster:\n  self: 127.0.0.1:9002\n  nodes: [127.0.0.1:9001, 127.0.0.1:9003]\n",
            "cluster.self: `127.0.0.1:9002` is not in cluster.nodes",
        ),
        (
            "cluster:\n  self: 127.0.0.1:9002\n  nodes: [127.0.0.1:9001, 127.0.0.1:9002]\n",
            "cluster.self: `127.0.0.1:9002` is not served by a plain (tcp://) listen address \
             of this node",
        ),
        (
            "cluster:\n  self: node-a:9001\n  nodes: [127.0.0.1:9001]\n",
            "cluster.self: `node-a:9001` is not an IP:port address",
        ),
        (
            "cluster:\n  self: 127.0.0.1:9001\n  nodes: 9001\n",
            "cluster.nodes: expected host:port or a list of host:port",
        ),
        (
            "cluster:\n  self: 127.0.0.1:9001\n  nodes: [127.0.0.1:9001]\n  \
             health_check_interval_ms: 0\n",
            "cluster.health_check_interval_ms: must be greater than 0",
        ),
        (
            "cluster:\n  self: 127.0.0.1:9001\n  nodes: [127.0.0.1:9001]\n  \
             down_after_failures: many\n",
            "cluster.down_after_failures: expected a count",
        ),
        (
            "cluster:\n  self: 127.0.0.1:9001\n  nodes: [127.0.0.1:9001]\n  \
             up_after_successes: 0\n",
            "cluster.up_after_successes: must be greater than 0",
        ),
        (
            "cluster:\n  self: 127.0.0.1:9001\n",
            "cluster.nodes: missing (host:port of every node)",
        ),
        (
            "cluster:\n  nodes: [127.0.0.1:9001]\n  peers: []\n",
            "cluster: unknown key `peers` (expected self, nodes, health_check_interval_ms, \
             down_after_failures, up_after_successes)",
        ),
    ];
    for (text, want) in cases {
        let conf = write_conf(&dir, &format!("{base}{text}"));
        let out = command()
            .args(["-t", "-c", conf.to_str().unwrap()])
            .output()
            .expect("run -t");
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("paseo-relay: {}: {want}\n", conf.display()),
            "{text}"
        );
    }
    // The environment names itself; without cluster: it is a mistake.
    let conf = write_conf(
        &dir,
        &format!("{base}cluster:\n  nodes: [127.0.0.1:9001]\n"),
    );
    let out = command()
        .args(["-t", "-c", conf.to_str().unwrap()])
        .env("PASEO_CLUSTER_SELF", "127.0.0.1:9001")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = command()
        .args(["-t", "-c", conf.to_str().unwrap()])
        .env("PASEO_CLUSTER_SELF", "127.0.0.1:9009")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "paseo-relay: PASEO_CLUSTER_SELF: `127.0.0.1:9009` is not in cluster.nodes\n"
    );
    let single = write_conf(&dir, base);
    let out = command()
        .args(["-t", "-c", single.to_str().unwrap()])
        .env("PASEO_CLUSTER_SELF", "127.0.0.1:9001")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "paseo-relay: PASEO_CLUSTER_SELF: set, but the configuration has no cluster: section\n"
    );
}
