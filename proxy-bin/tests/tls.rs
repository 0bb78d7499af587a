//! TLS through the real binary: `/health` and WebSockets over TLS, a plain and a TLS listener
//! sharing sessions, SIGHUP certificate reload (good pair, bad pair, no TLS, a burst), and
//! the `400` for plain HTTP sent to a TLS port.

mod common;

use common::{alive, free_port, temp_dir, wait_until, write_conf, Relay};
use futures_util::{SinkExt, StreamExt};
use pingora::tls::{
    install_default_crypto_provider, CertificateDer, ClientConfig, ClientTlsStream, RootCertStore,
    ServerName, TlsConnector,
};
use relay_tests::{sid, Endpoint, Message, UPGRADE_HEADERS, WITHIN};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;

/// A WebSocket over TLS.
type Wss = WebSocketStream<ClientTlsStream<TcpStream>>;

/// Body of the 400 sent to plain HTTP on a TLS port.
const PLAIN_BODY: &str =
    "This port speaks TLS only: connect with wss:// or https:// (Paseo: enable useTls)";
/// The log's reason for that connection.
const PLAIN_REASON: &str =
    "plain HTTP on a TLS listener: the client must use TLS (Paseo daemon: useTls)";
const RELOADED: &str = "SIGHUP: TLS certificate reloaded from ";
const RELOAD_FAILED: &str = "SIGHUP: TLS reload failed, keeping the current certificate: ";
const SYNC_EMPTY: &str = r#"{"type":"sync","connectionIds":[]}"#;

fn local(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// A self-signed certificate for `localhost` and its key.
struct Pair {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn new_pair() -> Pair {
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    Pair {
        cert_pem: pair.cert.pem(),
        key_pem: pair.key_pair.serialize_pem(),
        der: CertificateDer::from(pair.cert.der().to_vec()),
    }
}

/// The certificate and key files the relay is started with.
struct Files {
    cert: String,
    key: String,
}

impl Files {
    fn in_dir(dir: &Path) -> Files {
        let path = |name: &str| dir.join(name).display().to_string();
        Files {
            cert: path("cert.pem"),
            key: path("key.pem"),
        }
    }

    /// (Over)writes both files with `pair`.
    fn write(&self, pair: &Pair) {
        std::fs::write(&self.cert, &pair.cert_pem).expect("write cert");
        std::fs::write(&self.key, &pair.key_pem).expect("write key");
    }
}

/// A TLS client configuration that trusts exactly `trusted`.
fn connector(trusted: &[&Pair]) -> TlsConnector {
    install_default_crypto_provider();
    let mut roots = RootCertStore::empty();
    for pair in trusted {
        roots.add(pair.der.clone()).expect("trust anchor");
    }
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// A TLS connection to `addr` for the name `localhost`, trusting exactly `trusted`. Each
/// connection gets a fresh client configuration, hence no session resumption: a resumed
/// TLS 1.3 session reports the certificate of the session it resumes, not the server's
/// current one.
async fn tls_connect(
    addr: SocketAddr,
    trusted: &[&Pair],
) -> std::io::Result<ClientTlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    tokio::time::timeout(WITHIN, connector(trusted).connect(name, tcp))
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            ))
        })
}

/// The certificate the server presented on `tls` (leaf, DER).
fn peer_cert(tls: &ClientTlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("peer certificates")[0]
        .clone()
}

/// Reads one HTTP/1.1 response: (status line, headers as lower-case name and value, body by
/// Content-Length).
async fn read_http<S: AsyncRead + Unpin>(s: &mut S) -> (String, Vec<(String, String)>, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(WITHIN, s.read(&mut chunk))
            .await
            .expect("response within the deadline")
            .expect("read response");
        assert!(n > 0, "closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().to_string();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line");
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().expect("content-length"));
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = tokio::time::timeout(WITHIN, s.read(&mut chunk))
            .await
            .expect("body within the deadline")
            .expect("read body");
        assert!(n > 0, "closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    (
        status,
        headers,
        String::from_utf8_lossy(&body[..len]).to_string(),
    )
}

/// `GET /health` over a new TLS connection: asserts 200 `{"status":"ok"}` and returns the
/// certificate the server presented.
async fn https_health(addr: SocketAddr, trusted: &[&Pair]) -> CertificateDer<'static> {
    let mut tls = tls_connect(addr, trusted).await.expect("TLS handshake");
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("send request");
    let (status, headers, body) = read_http(&mut tls).await;
    let content_type = headers
        .iter()
        .find(|(n, _)| n == "content-type")
        .map(|(_, v)| v.as_str());
    assert_eq!(
        (status.as_str(), content_type, body.as_str()),
        (
            "HTTP/1.1 200 OK",
            Some("application/json"),
            r#"{"status":"ok"}"#
        )
    );
    peer_cert(&tls)
}

/// A WebSocket over TLS to `/ws?query`; panics unless the relay answers 101.
async fn wss(addr: SocketAddr, trusted: &[&Pair], query: &str) -> Wss {
    let tls = tls_connect(addr, trusted).await.expect("TLS handshake");
    let url = format!("wss://localhost:{}/ws?{query}", addr.port());
    let (ws, resp) = tokio::time::timeout(WITHIN, tokio_tungstenite::client_async(url, tls))
        .await
        .expect("WebSocket handshake within the deadline")
        .unwrap_or_else(|e| panic!("WebSocket handshake {query}: {e}"));
    assert_eq!(resp.status(), 101);
    ws
}

/// The next text frame (pings and pongs skipped) within [`WITHIN`].
async fn next_text<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> String {
    tokio::time::timeout(WITHIN, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("a text frame within the deadline")
}

async fn send_text<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, text: &str) {
    ws.send(Message::text(text)).await.expect("send text");
}

/// A client K and its data socket D relay a text frame each way.
async fn relays_both_ways<K, D>(k: &mut WebSocketStream<K>, d: &mut WebSocketStream<D>, tag: &str)
where
    K: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    send_text(k, &format!("k->d {tag}")).await;
    assert_eq!(next_text(d).await, format!("k->d {tag}"));
    send_text(d, &format!("d->k {tag}")).await;
    assert_eq!(next_text(k).await, format!("d->k {tag}"));
}

fn control_query(server: &str) -> String {
    format!("serverId={server}&role=server&v=2")
}

fn data_query(server: &str, x: &str) -> String {
    format!("serverId={server}&role=server&v=2&connectionId={x}")
}

fn client_query(server: &str, x: &str) -> String {
    format!("serverId={server}&role=client&v=2&connectionId={x}")
}

fn connected(x: &str) -> String {
    format!(r#"{{"type":"connected","connectionId":"{x}"}}"#)
}

/// Control (first frame: the empty sync), client and data for `x`, all over TLS.
async fn tls_paired(addr: SocketAddr, trusted: &[&Pair], server: &str, x: &str) -> (Wss, Wss, Wss) {
    let mut control = wss(addr, trusted, &control_query(server)).await;
    assert_eq!(next_text(&mut control).await, SYNC_EMPTY);
    let client = wss(addr, trusted, &client_query(server, x)).await;
    let data = wss(addr, trusted, &data_query(server, x)).await;
    assert_eq!(next_text(&mut control).await, connected(x));
    (control, client, data)
}

/// Starts the relay (`-c` a config in `dir`, `--log-level info`, then `args`) and waits
/// until a TLS handshake trusting `trusted` succeeds on `addr`.
async fn start_tls(dir: &Path, args: &[&str], addr: SocketAddr, trusted: &[&Pair]) -> Relay {
    let conf = write_conf(dir, "");
    let conf = conf.display().to_string();
    let mut all = vec!["-c", conf.as_str(), "--log-level", "info"];
    all.extend_from_slice(args);
    let mut relay = Relay::spawn(dir, "relay.log", &all);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = relay.child.try_wait() {
            panic!("paseo-relay exited with {status}; log:\n{}", relay.log());
        }
        match tls_connect(addr, trusted).await {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "no TLS on {addr}: {e}; log:\n{}",
                relay.log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay
}

/// Starts a relay with one TLS listener on `addr` and the files of `dir` (already written).
async fn start_tls_only(dir: &Path, files: &Files, addr: SocketAddr, trusted: &[&Pair]) -> Relay {
    let listen = addr.to_string();
    start_tls(
        dir,
        &[
            "--tls-cert",
            &files.cert,
            "--tls-key",
            &files.key,
            "--listen",
            &listen,
        ],
        addr,
        trusted,
    )
    .await
}

/// Waits until the relay has installed its SIGHUP handler (before, SIGHUP is ignored):
/// bit 0 of `SigCgt` in `/proc/PID/status`.
fn wait_sighup_handled(pid: i32) {
    wait_until(Duration::from_secs(20), "the SIGHUP handler", || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & 1 == 1)
    });
}

/// Lines of the relay's log containing `needle`.
fn lines_with(relay: &Relay, needle: &str) -> Vec<String> {
    relay
        .log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// What the log's start lines (`paseo-relay starting on ...`) list.
fn start_lines(relay: &Relay) -> Vec<String> {
    relay
        .log()
        .lines()
        .filter_map(|l| {
            l.split_once("paseo-relay starting on ")
                .map(|(_, on)| on.to_string())
        })
        .collect()
}

/// Waits until the log has `n` lines containing `needle` and returns them.
fn wait_lines(relay: &Relay, needle: &str, n: usize) -> Vec<String> {
    wait_until(
        Duration::from_secs(20),
        &format!("{n} log line(s) with {needle:?}"),
        || lines_with(relay, needle).len() >= n,
    );
    lines_with(relay, needle)
}

/// The relay's open-fd count once it holds still (the same on 5 reads 20 ms apart).
fn settled_fds(relay: &Relay) -> usize {
    let mut last = relay.open_fds();
    let mut same = 0;
    wait_until(Duration::from_secs(20), "a stable fd count", || {
        let now = relay.open_fds();
        same = if now == last { same + 1 } else { 0 };
        last = now;
        same >= 5
    });
    last
}

/// `/health` and a WebSocket pair over TLS, with the configured certificate.
#[tokio::test]
async fn tls_listener_serves_health_and_websockets() {
    let dir = temp_dir("tls-basic");
    let pair = new_pair();
    let files = Files::in_dir(&dir);
    files.write(&pair);
    let addr = local(free_port());
    let trust = [&pair];
    let relay = start_tls_only(&dir, &files, addr, &trust).await;
    assert_eq!(start_lines(&relay), [format!("tls://{addr}")]);

    assert_eq!(https_health(addr, &trust).await, pair.der);

    let server = sid("tls_basic");
    let (control, mut client, mut data) = tls_paired(addr, &trust, &server, "x1").await;
    assert_eq!(peer_cert(control.get_ref()), pair.der);
    relays_both_ways(&mut client, &mut data, "tls").await;

    // A client that does not trust the certificate fails its handshake.
    let stranger = new_pair();
    assert!(tls_connect(addr, &[&stranger]).await.is_err());
}

/// A plain listener (`tcp://`) and a TLS one share sessions: daemon on plain, app on TLS.
#[tokio::test]
async fn plain_and_tls_listeners_share_sessions() {
    let dir = temp_dir("tls-mixed");
    let pair = new_pair();
    let files = Files::in_dir(&dir);
    files.write(&pair);
    let (a, b) = (local(free_port()), local(free_port()));
    let plain = format!("tcp://{a}");
    let secure = b.to_string();
    let trust = [&pair];
    let relay = start_tls(
        &dir,
        &[
            "--listen",
            &plain,
            "--listen",
            &secure,
            "--tls-cert",
            &files.cert,
            "--tls-key",
            &files.key,
        ],
        b,
        &trust,
    )
    .await;
    common::wait_listening(a);
    assert_eq!(start_lines(&relay), [format!("{a}, tls://{b}")]);

    // A speaks plain HTTP, B only TLS.
    let on_a = Endpoint { addr: a };
    let health = on_a.get("/health", "").await;
    assert_eq!(
        (health.status, health.body.as_str()),
        (200, r#"{"status":"ok"}"#)
    );
    let refused = Endpoint { addr: b }.get("/health", "").await;
    assert_eq!((refused.status, refused.body.as_str()), (400, PLAIN_BODY));
    assert_eq!(https_health(b, &trust).await, pair.der);

    let server = sid("tls_mixed");
    let (mut control, sync) = on_a.control_synced(&server).await;
    assert_eq!(sync, SYNC_EMPTY);
    let mut client = wss(b, &trust, &client_query(&server, "x1")).await;
    let mut data = on_a.data(&server, "x1").await;
    assert_eq!(next_text(&mut control).await, connected("x1"));
    relays_both_ways(&mut client, &mut data, "mixed").await;
}

/// SIGHUP after new files: new handshakes get the new certificate; a WebSocket opened
/// before keeps relaying, and its control still sees new clients.
#[tokio::test]
async fn sighup_rotates_the_certificate_for_new_handshakes_only() {
    let dir = temp_dir("tls-rotate");
    let (old, new) = (new_pair(), new_pair());
    let files = Files::in_dir(&dir);
    files.write(&old);
    let addr = local(free_port());
    let both = [&old, &new];
    let relay = start_tls_only(&dir, &files, addr, &both).await;
    wait_sighup_handled(relay.pid());

    let server = sid("tls_rotate");
    let (mut control, mut client, mut data) = tls_paired(addr, &both, &server, "x1").await;
    assert_eq!(peer_cert(control.get_ref()), old.der);
    relays_both_ways(&mut client, &mut data, "before").await;

    files.write(&new);
    relay.signal(libc::SIGHUP);
    let reloaded = wait_lines(&relay, RELOADED, 1);
    assert_eq!(reloaded.len(), 1, "{reloaded:?}");
    assert!(
        reloaded[0].ends_with(&format!("{RELOADED}{}", files.cert)),
        "{reloaded:?}"
    );
    assert!(reloaded[0].contains(" INFO "), "{reloaded:?}");

    // New handshakes: the new certificate; a client trusting only the old one fails.
    let tls = tls_connect(addr, &both).await.expect("TLS handshake");
    assert_eq!(peer_cert(&tls), new.der);
    drop(tls);
    assert_eq!(https_health(addr, &both).await, new.der);
    assert!(tls_connect(addr, &[&old]).await.is_err());

    // The sockets from before: still relaying, the control still told of new clients.
    relays_both_ways(&mut client, &mut data, "after").await;
    let mut client2 = wss(addr, &both, &client_query(&server, "x2")).await;
    assert_eq!(peer_cert(client2.get_ref()), new.der);
    let mut data2 = wss(addr, &both, &data_query(&server, "x2")).await;
    assert_eq!(next_text(&mut control).await, connected("x2"));
    relays_both_ways(&mut client2, &mut data2, "new pair").await;
    relays_both_ways(&mut client, &mut data, "old pair again").await;
    assert!(alive(relay.pid()));
}

/// A bad pair on SIGHUP (mismatched key, then a cert file that is not PEM): one ERROR line
/// each naming the file, the old certificate stays, the process lives; a good pair later
/// is picked up.
#[tokio::test]
async fn sighup_with_a_bad_pair_keeps_the_old_certificate() {
    let dir = temp_dir("tls-bad-reload");
    let (old, new) = (new_pair(), new_pair());
    let files = Files::in_dir(&dir);
    files.write(&old);
    let addr = local(free_port());
    let both = [&old, &new];
    let relay = start_tls_only(&dir, &files, addr, &both).await;
    wait_sighup_handled(relay.pid());

    // The new key with the old certificate.
    std::fs::write(&files.key, &new.key_pem).unwrap();
    relay.signal(libc::SIGHUP);
    let failed = wait_lines(&relay, RELOAD_FAILED, 1);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].contains(" ERROR "), "{failed:?}");
    assert!(
        failed[0].ends_with(&format!(
            "{RELOAD_FAILED}{}: the private key does not match the certificate in {}",
            files.key, files.cert
        )),
        "{failed:?}"
    );
    assert!(alive(relay.pid()));
    assert_eq!(https_health(addr, &both).await, old.der);

    // A certificate file that is not PEM.
    std::fs::write(&files.cert, "not a certificate\n").unwrap();
    relay.signal(libc::SIGHUP);
    let failed = wait_lines(&relay, RELOAD_FAILED, 2);
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed[1].contains(" ERROR "), "{failed:?}");
    assert!(
        failed[1].ends_with(&format!(
            "{RELOAD_FAILED}{}: no PEM certificate in the file",
            files.cert
        )),
        "{failed:?}"
    );
    assert!(alive(relay.pid()));
    assert_eq!(https_health(addr, &both).await, old.der);
    assert_eq!(lines_with(&relay, RELOADED), Vec::<String>::new());

    // A good pair again: picked up.
    files.write(&new);
    relay.signal(libc::SIGHUP);
    let reloaded = wait_lines(&relay, RELOADED, 1);
    assert_eq!(reloaded.len(), 1, "{reloaded:?}");
    assert_eq!(https_health(addr, &both).await, new.der);
    assert_eq!(lines_with(&relay, RELOAD_FAILED).len(), 2);
}

/// SIGHUP on a relay without TLS: logged, ignored, still serving.
#[tokio::test]
async fn sighup_without_tls_is_logged_and_ignored() {
    let dir = temp_dir("tls-none");
    let conf = write_conf(&dir, "");
    let addr = local(free_port());
    let listen = addr.to_string();
    let relay = Relay::spawn(
        &dir,
        "relay.log",
        &[
            "-c",
            conf.to_str().unwrap(),
            "--log-level",
            "info",
            "--listen",
            &listen,
        ],
    );
    common::wait_listening(addr);
    wait_sighup_handled(relay.pid());
    relay.signal(libc::SIGHUP);
    let lines = wait_lines(&relay, "SIGHUP: no TLS listener, nothing to reload", 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(" INFO "), "{lines:?}");
    assert!(alive(relay.pid()));
    let health = Endpoint { addr }.get("/health", "").await;
    assert_eq!(
        (health.status, health.body.as_str()),
        (200, r#"{"status":"ok"}"#)
    );
    assert_eq!(lines_with(&relay, "SIGHUP").len(), 1);
}

/// 20 SIGHUPs within a second: the relay lives, serves, and holds no more fds than before.
#[tokio::test]
async fn sighup_burst_leaves_the_relay_serving_without_leaks() {
    let dir = temp_dir("tls-burst");
    let pair = new_pair();
    let files = Files::in_dir(&dir);
    files.write(&pair);
    let addr = local(free_port());
    let trust = [&pair];
    let relay = start_tls_only(&dir, &files, addr, &trust).await;
    wait_sighup_handled(relay.pid());
    assert_eq!(https_health(addr, &trust).await, pair.der);
    let before = settled_fds(&relay);

    // 20 signals 25 ms apart (pacing, not synchronisation): half a second.
    for _ in 0..20 {
        relay.signal(libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(25));
    }

    // Signals sent close together may coalesce: at least one reload, at most 20.
    wait_lines(&relay, RELOADED, 1);
    wait_until(Duration::from_secs(20), "the fd count to return", || {
        relay.open_fds() == before
    });
    let reloads = lines_with(&relay, RELOADED);
    assert!(
        (1..=20).contains(&reloads.len()),
        "{} reloads",
        reloads.len()
    );
    assert_eq!(lines_with(&relay, RELOAD_FAILED), Vec::<String>::new());
    assert!(alive(relay.pid()));

    // Still serving, with the same certificate; afterwards the same fds as before.
    assert_eq!(https_health(addr, &trust).await, pair.der);
    let server = sid("tls_burst");
    {
        let (_control, mut client, mut data) = tls_paired(addr, &trust, &server, "x1").await;
        relays_both_ways(&mut client, &mut data, "burst").await;
    }
    wait_until(Duration::from_secs(20), "the fd count to return", || {
        relay.open_fds() == before
    });
    assert_eq!(settled_fds(&relay), before);
}

/// Plain HTTP to a TLS port: at once `400` with a body naming `useTls`, then EOF, and one
/// log line for that connection. The same for a plain WebSocket upgrade.
#[tokio::test]
async fn plain_http_on_a_tls_port_gets_400() {
    let dir = temp_dir("tls-plain-http");
    let pair = new_pair();
    let files = Files::in_dir(&dir);
    files.write(&pair);
    let addr = local(free_port());
    let trust = [&pair];
    let relay = start_tls_only(&dir, &files, addr, &trust).await;
    let expected = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{PLAIN_BODY}",
        PLAIN_BODY.len()
    );
    let server = sid("tls_plain");
    let requests = [
        "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string(),
        format!(
            "GET /ws?{} HTTP/1.1\r\nHost: localhost\r\n{UPGRADE_HEADERS}\r\n",
            control_query(&server)
        ),
    ];
    for (i, request) in requests.iter().enumerate() {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let me = tcp.local_addr().unwrap();
        let sent = Instant::now();
        tcp.write_all(request.as_bytes()).await.expect("send");
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut got))
            .await
            .expect("response and EOF within 2 s")
            .expect("read to EOF");
        assert!(sent.elapsed() < Duration::from_secs(2));
        assert_eq!(String::from_utf8_lossy(&got), expected, "{request}");

        let lines = wait_lines(&relay, "useTls", i + 1);
        assert_eq!(lines.len(), i + 1, "{lines:?}");
        let line = &lines[i];
        assert!(line.contains(&format!("from {me}")), "{me}: {line}");
        assert!(line.contains(PLAIN_REASON), "{line}");
        assert!(line.contains(" ERROR "), "{line}");
    }
    // Still serving TLS.
    assert_eq!(https_health(addr, &trust).await, pair.der);
    assert_eq!(lines_with(&relay, "useTls").len(), 2);
}
