//! Test support for paseo-relay's integration tests: [`TestRelay`] starts the real Pingora
//! server with the relay services (the same `add_relay` wiring the binary uses) on an
//! ephemeral port, and small WebSocket and raw-HTTP client helpers speak to it.

pub mod upstream;

use futures_util::{SinkExt, StreamExt};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use relay_module::config::HttpConf;
use relay_module::{add_relay, Lifecycle, Listener, RelayConf, Router, SessionHub};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
pub use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client WebSocket to the relay.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The default reception deadline of relay-protocol.md §9 ("within 1 s"), with slack for a
/// loaded 2-core machine.
pub const WITHIN: Duration = Duration::from_secs(3);

struct WatchShutdown(watch::Receiver<bool>);

#[async_trait::async_trait]
impl ShutdownSignalWatch for WatchShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
        ShutdownSignal::FastShutdown
    }
}

/// A relay's address, with the client helpers that speak to it (plain `ws://`). Tests of
/// the real binary build one from the port they gave it.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    /// Where the relay listens.
    pub addr: SocketAddr,
}

/// A relay server running in this process on its own Pingora threads; stopped on drop.
/// Derefs to its [`Endpoint`] (`relay.addr`, `relay.control(..)`, ...).
pub struct TestRelay {
    endpoint: Endpoint,
    /// The relay's admin listener (`/metrics`, `/ready`, `/drain`, `/resume`).
    pub admin: Endpoint,
    /// The hub the server uses (to observe session counts).
    pub hub: Arc<SessionHub>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// Logging for tests (`RUST_LOG=debug cargo test` to see it).
pub fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

impl TestRelay {
    /// Starts a relay with default tuning.
    pub async fn start() -> TestRelay {
        Self::start_with(RelayConf::default()).await
    }

    /// Starts a relay with `conf` and waits until it accepts connections.
    pub async fn start_with(conf: RelayConf) -> TestRelay {
        Self::start_routed(conf, Router::default()).await
    }

    /// Starts a relay with `conf` and `router` (routes to upstreams, trusted proxies) and
    /// waits until it accepts connections.
    pub async fn start_routed(conf: RelayConf, router: Router) -> TestRelay {
        Self::start_with_http(conf, router, HttpConf::default()).await
    }

    /// Starts a relay with `conf`, `router` and the HTTP deadlines `http`, and waits until
    /// it accepts connections.
    pub async fn start_with_http(conf: RelayConf, router: Router, http: HttpConf) -> TestRelay {
        init_log();
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let dir = std::env::temp_dir();
        let server_conf = ServerConf {
            threads: 1,
            grace_period_seconds: Some(0),
            graceful_shutdown_timeout_seconds: Some(1),
            pid_file: dir
                .join(format!("paseo-relay-test-{port}.pid"))
                .display()
                .to_string(),
            upgrade_sock: dir
                .join(format!("paseo-relay-test-{port}.sock"))
                .display()
                .to_string(),
            ..ServerConf::default()
        };
        let hub = SessionHub::new(conf);
        let (stop, stop_rx) = watch::channel(false);
        let mut server = Server::new_with_opt_and_conf(None, server_conf);
        server.bootstrap();
        let listeners = [Listener::plain(addr.to_string())];
        add_relay(
            &mut server,
            &hub,
            router,
            &listeners,
            Some(&admin.to_string()),
            &http,
            &Lifecycle::new(false),
            None,
        );
        let thread = std::thread::spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(WatchShutdown(stop_rx)),
            })
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).await.is_err() || TcpStream::connect(admin).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "relay did not start on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        TestRelay {
            endpoint: Endpoint { addr },
            admin: Endpoint { addr: admin },
            hub,
            stop,
            thread: Some(thread),
        }
    }
}

impl std::ops::Deref for TestRelay {
    type Target = Endpoint;
    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Endpoint {
    /// `ws://127.0.0.1:PORT/ws?QUERY`.
    pub fn url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// Opens a WebSocket with the given query; panics unless the relay answers 101.
    pub async fn ws(&self, query: &str) -> Ws {
        let (ws, resp) = tokio_tungstenite::connect_async(self.url(query))
            .await
            .unwrap_or_else(|e| panic!("connect {query}: {e}"));
        assert_eq!(resp.status(), 101);
        ws
    }

    /// v2 control socket of `server_id`.
    pub async fn control(&self, server_id: &str) -> Ws {
        self.ws(&format!("serverId={server_id}&role=server&v=2"))
            .await
    }

    /// v2 control socket of `server_id`, after reading and returning its first frame (`sync`).
    pub async fn control_synced(&self, server_id: &str) -> (Ws, String) {
        let mut c = self.control(server_id).await;
        let sync = recv_text(&mut c).await;
        (c, sync)
    }

    /// v2 data socket of `server_id` for connectionId `x`.
    pub async fn data(&self, server_id: &str, x: &str) -> Ws {
        self.ws(&format!(
            "serverId={server_id}&role=server&v=2&connectionId={x}"
        ))
        .await
    }

    /// v2 client socket of `server_id` for connectionId `x`.
    pub async fn client(&self, server_id: &str, x: &str) -> Ws {
        self.ws(&format!(
            "serverId={server_id}&role=client&v=2&connectionId={x}"
        ))
        .await
    }

    /// v1 socket of `server_id` with `role`.
    pub async fn v1(&self, server_id: &str, role: &str) -> Ws {
        self.ws(&format!("serverId={server_id}&role={role}")).await
    }

    /// Sends `raw` as-is on a new TCP connection and reads one HTTP response.
    pub async fn raw_http(&self, raw: &[u8]) -> HttpResponse {
        let mut tcp = TcpStream::connect(self.addr).await.expect("connect");
        tcp.write_all(raw).await.expect("write request");
        read_response(&mut tcp).await
    }

    /// A `/ws?QUERY` upgrade request with the given extra header lines (each ending in
    /// `\r\n`), for the answers to refused upgrades (a 101 is returned as-is too).
    pub async fn upgrade_raw(&self, query: &str, headers: &str) -> HttpResponse {
        let req = format!(
            "GET /ws?{query} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n"
        );
        self.raw_http(req.as_bytes()).await
    }

    /// `POST path` with an empty body.
    pub async fn post(&self, path: &str) -> HttpResponse {
        let req = format!("POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\n\r\n");
        self.raw_http(req.as_bytes()).await
    }

    /// `GET /metrics` on this endpoint (an admin listener): the Prometheus text.
    pub async fn scrape(&self) -> String {
        let resp = self.get("/metrics", "").await;
        assert_eq!(resp.status, 200, "scrape: {}", resp.body);
        resp.body
    }

    pub async fn get(&self, path: &str, headers: &str) -> HttpResponse {
        let req = format!("GET {path} HTTP/1.1\r\nHost: relay\r\n{headers}\r\n");
        self.raw_http(req.as_bytes()).await
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Upgrade header lines of a valid RFC 6455 handshake (RFC 6455 §1.3 example key).
pub const UPGRADE_HEADERS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines as (lower-case name, value).
    pub headers: Vec<(String, String)>,
    /// Body (by Content-Length; empty for 101).
    pub body: String,
}

impl HttpResponse {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response head and its Content-Length body.
pub async fn read_response(tcp: &mut TcpStream) -> HttpResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(WITHIN, tcp.read(&mut chunk))
            .await
            .expect("response within deadline")
            .expect("read response");
        assert!(
            n > 0,
            "connection closed before a response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap()[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = tokio::time::timeout(WITHIN, tcp.read(&mut chunk))
            .await
            .expect("body within deadline")
            .expect("read body");
        assert!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body[..len]).to_string(),
    }
}

/// The next data or close message, skipping RFC 6455 pings and pongs; panics after `within`.
pub async fn recv_within(ws: &mut Ws, within: Duration) -> Message {
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return m,
                Some(Err(e)) => panic!("socket error while waiting for a message: {e}"),
                None => panic!("socket ended while waiting for a message"),
            }
        }
    })
    .await
    .expect("a message within the deadline")
}

/// The next data or close message within [`WITHIN`].
pub async fn recv(ws: &mut Ws) -> Message {
    recv_within(ws, WITHIN).await
}

/// The next message, which must be a text frame; returns its text.
pub async fn recv_text(ws: &mut Ws) -> String {
    match recv(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// The next message, which must be a close frame; returns (code, reason).
pub async fn recv_close_within(ws: &mut Ws, within: Duration) -> (u16, String) {
    match recv_within(ws, within).await {
        Message::Close(Some(f)) => (u16::from(f.code), f.reason.to_string()),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// The next message within [`WITHIN`], which must be a close frame.
pub async fn recv_close(ws: &mut Ws) -> (u16, String) {
    recv_close_within(ws, WITHIN).await
}

/// Asserts that no data or close message arrives for `period` (pings are skipped).
pub async fn assert_silent(ws: &mut Ws, period: Duration) {
    let got = tokio::time::timeout(period, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return other,
            }
        }
    })
    .await;
    if let Ok(other) = got {
        panic!("expected silence, got {other:?}");
    }
}

/// Sends a text frame.
pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send text");
}

/// Sends a binary frame.
pub async fn send_binary(ws: &mut Ws, bytes: &[u8]) {
    ws.send(Message::binary(bytes.to_vec()))
        .await
        .expect("send binary");
}

/// Starts a close handshake with `code` and `reason`.
pub async fn send_close(ws: &mut Ws, code: u16, reason: &str) {
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    })))
    .await
    .expect("send close");
}

/// Parses control JSON and returns (`type`, sorted `connectionIds` or `[connectionId]`).
pub fn control_json(text: &str) -> (String, Vec<String>) {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let kind = v["type"].as_str().expect("type").to_string();
    let mut ids: Vec<String> = match (&v["connectionIds"], &v["connectionId"]) {
        (serde_json::Value::Array(a), _) => {
            a.iter().map(|i| i.as_str().unwrap().to_string()).collect()
        }
        (_, serde_json::Value::String(s)) => vec![s.clone()],
        _ => vec![],
    };
    ids.sort();
    (kind, ids)
}

/// The value of one series (`name` or `name{labels}` exactly as the text format writes
/// it) in a Prometheus scrape; `None` when absent.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// A unique serverId for one test.
pub fn sid(name: &str) -> String {
    format!("srv_{name}_{:08x}", rand::random::<u32>())
}

/// Round-trips an RFC 6455 ping on `ws`: the relay's reader handles a socket's frames in
/// order, so once the pong is back every frame sent before the ping has been processed.
/// Panics if a data frame arrives meanwhile.
pub async fn barrier(ws: &mut Ws) {
    ws.send(Message::Ping(b"barrier".to_vec().into()))
        .await
        .expect("send ping");
    tokio::time::timeout(WITHIN, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Pong(p))) if p.as_ref() == b"barrier" => return,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected the barrier pong, got {other:?}"),
            }
        }
    })
    .await
    .expect("barrier pong within the deadline")
}

impl Endpoint {
    /// A paired v2 connection `x` of `server_id`: control (its first frame is exactly the
    /// empty `sync`), client K(x) and data D(x); the control has received `connected` for x.
    pub async fn paired(&self, server_id: &str, x: &str) -> (Ws, Ws, Ws) {
        let (mut c, sync) = self.control_synced(server_id).await;
        assert_eq!(sync, r#"{"type":"sync","connectionIds":[]}"#);
        let k = self.client(server_id, x).await;
        let d = self.data(server_id, x).await;
        assert_eq!(
            recv_text(&mut c).await,
            format!(r#"{{"type":"connected","connectionId":"{x}"}}"#)
        );
        (c, k, d)
    }
}

/// Spec §9 case 36: text stays text, binary stays binary, bytes exact, both ways between a
/// client K and its data socket D, several frames in flight each way.
pub async fn assert_kind_and_bytes_preserved(k: &mut Ws, d: &mut Ws) {
    send_text(k, r#"{"type":"e2ee_hello","key":"k"}"#).await;
    send_binary(k, &[0x00, 0x01, 0xfe, 0xff]).await;
    send_text(d, "eA==").await;
    send_binary(d, &[0xde, 0xad]).await;
    assert_eq!(
        recv(d).await,
        Message::text(r#"{"type":"e2ee_hello","key":"k"}"#)
    );
    assert_eq!(recv(d).await, Message::binary(vec![0x00, 0x01, 0xfe, 0xff]));
    assert_eq!(recv(k).await, Message::text("eA=="));
    assert_eq!(recv(k).await, Message::binary(vec![0xde, 0xad]));
}

/// Asserts that a client K and its data socket D still relay a text frame each way.
pub async fn assert_relays_both_ways(k: &mut Ws, d: &mut Ws) {
    send_text(k, "k->d").await;
    assert_eq!(recv_text(d).await, "k->d");
    send_text(d, "d->k").await;
    assert_eq!(recv_text(k).await, "d->k");
}
