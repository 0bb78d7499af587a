//! Cluster test support: several real `paseo-relay` nodes on loopback (ephemeral ports,
//! each with an admin listener), and Paseo-like sessions that keep echoing and reconnect
//! the way the daemon and the app do (after 0.3 s, to any node that answers).

#![allow(dead_code)] // each test uses a different part

use crate::common::{temp_dir, wait_listening, write_conf, Relay};
use futures_util::{SinkExt, StreamExt};
use relay_module::cluster::owner_among;
use relay_tests::{sample, Endpoint, Message, Ws};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a reconnecting test client waits between attempts (Paseo's daemon and app).
pub const BACKOFF: Duration = Duration::from_millis(300);

/// One node: its process (killed on drop), listen and admin addresses.
pub struct Node {
    pub relay: Option<Relay>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    dir: PathBuf,
    conf: PathBuf,
    restarts: usize,
}

/// `n` distinct free loopback addresses (all bound together, then released).
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("ephemeral port"))
        .collect();
    held.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// The `cluster:` YAML for `nodes` with `me` as this node (`None`: from the environment).
pub fn cluster_yaml(nodes: &[SocketAddr], me: Option<SocketAddr>) -> String {
    let list: Vec<String> = nodes.iter().map(|a| a.to_string()).collect();
    let me = me.map_or(String::new(), |a| format!("  self: {a}\n"));
    format!(
        "cluster:\n{me}  nodes: [{}]\n  health_check_interval_ms: 500\n  \
         down_after_failures: 3\n  up_after_successes: 3\n\
         relay:\n  upgrades_per_ip_per_second: 1000\n  upgrade_burst_per_ip: 1000\n",
        list.join(", ")
    )
}

/// A cluster of `n` nodes on loopback, started and listening.
pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` nodes; node 0 takes its own address from `PASEO_CLUSTER_SELF` (the
    /// one-file-for-every-node form), the others from `cluster.self`.
    pub fn start(name: &str, n: usize) -> Cluster {
        Self::start_with(name, n, "")
    }

    /// As [`Cluster::start`], with `extra` YAML in every node's file.
    pub fn start_with(name: &str, n: usize, extra: &str) -> Cluster {
        let addrs = free_addrs(2 * n);
        let (listen, admin) = addrs.split_at(n);
        let nodes: Vec<Node> = (0..n)
            .map(|i| {
                let dir = temp_dir(&format!("{name}-{i}"));
                let me = (i > 0).then_some(listen[i]);
                let conf = write_conf(&dir, &format!("{}{extra}", cluster_yaml(listen, me)));
                Node {
                    relay: None,
                    addr: listen[i],
                    admin: admin[i],
                    dir,
                    conf,
                    restarts: 0,
                }
            })
            .collect();
        let mut cluster = Cluster { nodes };
        for i in 0..n {
            cluster.spawn(i);
        }
        for node in &cluster.nodes {
            wait_listening(node.addr);
            wait_listening(node.admin);
        }
        cluster
    }

    /// (Re)starts node `i` with its configuration.
    pub fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut cmd = crate::common::command();
        if i == 0 {
            cmd.env("PASEO_CLUSTER_SELF", node.addr.to_string());
        }
        let log = format!("relay-{}.log", node.restarts);
        node.restarts += 1;
        node.relay = Some(Relay::spawn_with(
            cmd,
            &node.dir,
            &log,
            &[
                "-c",
                node.conf.to_str().unwrap(),
                "--listen",
                &node.addr.to_string(),
                "--admin-listen",
                &node.admin.to_string(),
            ],
        ));
    }

    /// `kill -9` of node `i`; returns when it is gone.
    pub fn kill(&mut self, i: usize) {
        let mut relay = self.nodes[i].relay.take().expect("node running");
        relay.child.kill().expect("SIGKILL");
        relay.child.wait().expect("reap");
    }

    /// Every node's listen address.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    /// The listen endpoint of node `i`.
    pub fn endpoint(&self, i: usize) -> Endpoint {
        Endpoint {
            addr: self.nodes[i].addr,
        }
    }

    /// The admin endpoint of node `i`.
    pub fn admin(&self, i: usize) -> Endpoint {
        Endpoint {
            addr: self.nodes[i].admin,
        }
    }

    /// One sample of node `i`'s `/metrics` (0 when absent).
    pub async fn metric(&self, i: usize, series: &str) -> f64 {
        let scrape = self.admin(i).scrape().await;
        sample(&scrape, series).unwrap_or(0.0)
    }

    /// Waits until node `i` sees `up` nodes up, bounded by 15 s.
    pub async fn wait_nodes_up(&self, i: usize, up: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.metric(i, "paseo_relay_cluster_nodes_up").await;
            if now == up as f64 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} sees {now} nodes up, not {up}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The log of node `i`'s last start.
    pub fn log(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let path = node.dir.join(format!("relay-{}.log", node.restarts - 1));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// For each node, how many of `sessions` it owns when `up` are the nodes up.
    pub fn expected_sessions(&self, sessions: &[Arc<Session>], up: &[usize]) -> Vec<f64> {
        let all = self.addrs();
        let up: Vec<SocketAddr> = up.iter().map(|i| all[*i]).collect();
        let mut counts = vec![0.0; all.len()];
        for s in sessions {
            let owner = owner_among(&all, &up, &s.server_id).expect("an owner");
            counts[all.iter().position(|a| *a == owner).unwrap()] += 1.0;
        }
        counts
    }

    /// Waits until every node's `paseo_relay_active_sessions` is `want` (bounded by 10 s).
    pub async fn wait_sessions(&self, want: &[f64], alive: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut got = vec![0.0; want.len()];
            for i in alive {
                got[*i] = self.metric(*i, "paseo_relay_active_sessions").await;
            }
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sessions per node {got:?}, expected {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What a [`Session`] has seen.
#[derive(Debug, Default)]
pub struct Seen {
    /// When an echo went through K → D → K.
    pub echoes: Vec<Instant>,
    /// Each teardown: when, and the first close frame seen (code, reason), if any.
    pub ends: Vec<(Instant, Option<(u16, String)>)>,
}

/// One Paseo session: a daemon (control and data socket for connectionId `conn_a`) and an
/// app (client socket), each socket entering through its own node, echoing every 100 ms.
/// When any of its sockets ends, all three are dropped and, after [`BACKOFF`], open again,
/// each through the first node (from its usual one on) that answers 101.
pub struct Session {
    pub server_id: String,
    /// Entry node of the control, client and data sockets.
    pub entries: [usize; 3],
    pub seen: Mutex<Seen>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Session {
    /// Starts session `server_id` on `nodes` (listen addresses) with `entries`.
    pub fn start(nodes: Vec<SocketAddr>, server_id: String, entries: [usize; 3]) -> Arc<Session> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let s = Arc::new(Session {
            server_id,
            entries,
            seen: Mutex::new(Seen::default()),
            stop,
        });
        tokio::spawn(run(s.clone(), nodes, stopped));
        s
    }

    /// Stops the session's task (its sockets are dropped).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// The first echo at or after `t`.
    pub fn echo_after(&self, t: Instant) -> Option<Instant> {
        let seen = self.seen.lock().unwrap();
        seen.echoes.iter().copied().find(|e| *e >= t)
    }

    /// Teardowns at or after `t`.
    pub fn ends_after(&self, t: Instant) -> Vec<(Instant, Option<(u16, String)>)> {
        let seen = self.seen.lock().unwrap();
        seen.ends
            .iter()
            .filter(|(at, _)| *at >= t)
            .cloned()
            .collect()
    }
}

/// Opens `query` through the first node from `first` on that answers 101.
async fn open(nodes: &[SocketAddr], first: usize, query: &str, stop: &StopRx) -> Option<Ws> {
    let mut i = first;
    loop {
        if *stop.borrow() {
            return None;
        }
        let url = format!("ws://{}/ws?{query}", nodes[i % nodes.len()]);
        let attempt = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(url),
        )
        .await;
        if let Ok(Ok((ws, _))) = attempt {
            return Some(ws);
        }
        tokio::time::sleep(BACKOFF).await;
        i += 1;
    }
}

type StopRx = tokio::sync::watch::Receiver<bool>;

/// Why a round ended: the first close frame seen, if any.
type End = Option<(u16, String)>;

fn end_of(msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> End {
    match msg {
        Some(Ok(Message::Close(Some(f)))) => Some((u16::from(f.code), f.reason.to_string())),
        _ => None,
    }
}

/// Receives on `ws` until `want` (older echoes left over from an interrupted round are
/// skipped); a close or error ends the round.
async fn expect(ws: &mut Ws, want: &str) -> Result<(), End> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str() == want => return Ok(()),
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => continue,
            other => return Err(end_of(other)),
        }
    }
}

/// Reads `ws` until it ends (a close, an error or EOF); texts and pings are ignored.
async fn ended(ws: &mut Ws) -> End {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => continue,
            other => return end_of(other),
        }
    }
}

/// One echo K → D → K, then a pause of 100 ms; `Err` with the close seen as soon as either
/// socket ends (as a real peer, which always reads, would notice).
async fn echo(k: &mut Ws, d: &mut Ws, n: u64) -> Result<(), End> {
    let ping = format!("k{n}");
    k.send(Message::text(ping.clone()))
        .await
        .map_err(|_| None)?;
    tokio::select! {
        r = expect(d, &ping) => r?,
        end = ended(k) => return Err(end),
    }
    let pong = format!("d{n}");
    d.send(Message::text(pong.clone()))
        .await
        .map_err(|_| None)?;
    tokio::select! {
        r = expect(k, &pong) => r?,
        end = ended(d) => return Err(end),
    }
    Ok(())
}

/// Waits `pause`, or less if `k` or `d` ends meanwhile.
async fn pause(k: &mut Ws, d: &mut Ws, pause: Duration) -> Result<(), End> {
    tokio::select! {
        _ = tokio::time::sleep(pause) => Ok(()),
        end = ended(k) => Err(end),
        end = ended(d) => Err(end),
    }
}

async fn run(s: Arc<Session>, nodes: Vec<SocketAddr>, mut stop: StopRx) {
    let sid = &s.server_id;
    let mut n = 0u64;
    loop {
        let control = format!("serverId={sid}&role=server&v=2");
        let Some(mut c) = open(&nodes, s.entries[0], &control, &stop).await else {
            return;
        };
        let client = format!("serverId={sid}&role=client&v=2&connectionId=conn_a");
        let Some(mut k) = open(&nodes, s.entries[1], &client, &stop).await else {
            return;
        };
        let data = format!("serverId={sid}&role=server&v=2&connectionId=conn_a");
        let Some(mut d) = open(&nodes, s.entries[2], &data, &stop).await else {
            return;
        };
        let end: End = loop {
            n += 1;
            let step = async {
                tokio::time::timeout(Duration::from_secs(3), echo(&mut k, &mut d, n))
                    .await
                    .unwrap_or(Err(None))?;
                s.seen.lock().unwrap().echoes.push(Instant::now());
                pause(&mut k, &mut d, Duration::from_millis(100)).await
            };
            tokio::select! {
                _ = stop.changed() => return,
                msg = ended(&mut c) => break msg,
                r = step => if let Err(end) = r { break end },
            }
        };
        s.seen.lock().unwrap().ends.push((Instant::now(), end));
        drop((c, k, d));
        tokio::time::sleep(BACKOFF).await;
    }
}

/// Starts `count` sessions; session `i` enters through nodes `i`, `i+1`, `i+2` (mod the
/// node count) for its control, client and data sockets.
pub fn start_sessions(cluster: &Cluster, name: &str, count: usize) -> Vec<Arc<Session>> {
    let n = cluster.nodes.len();
    (0..count)
        .map(|i| {
            let sid = relay_tests::sid(&format!("{name}{i}"));
            Session::start(cluster.addrs(), sid, [i % n, (i + 1) % n, (i + 2) % n])
        })
        .collect()
}

/// Waits until every session echoed at or after `t`, bounded by `within`; returns the
/// latest first echo after `t`, as a delay from `t`.
pub async fn all_echo_after(sessions: &[Arc<Session>], t: Instant, within: Duration) -> Duration {
    let deadline = t + within;
    loop {
        let firsts: Vec<Option<Instant>> = sessions.iter().map(|s| s.echo_after(t)).collect();
        if firsts.iter().all(Option::is_some) {
            return firsts
                .iter()
                .map(|f| f.unwrap().saturating_duration_since(t))
                .max()
                .unwrap_or_default();
        }
        if Instant::now() >= deadline {
            let stuck: Vec<&str> = sessions
                .iter()
                .zip(&firsts)
                .filter(|(_, f)| f.is_none())
                .map(|(s, _)| s.server_id.as_str())
                .collect();
            panic!(
                "{} sessions did not echo within {within:?}: {stuck:?}",
                stuck.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
