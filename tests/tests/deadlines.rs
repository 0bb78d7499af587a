//! HTTP deadlines (issue 9, `http:`): a request head must arrive whole within
//! `request_head_timeout_ms` (408 otherwise, however slowly it trickles), an idle keep-alive
//! connection is closed after `keepalive_timeout_ms`, each expiry is counted in
//! `paseo_relay_request_timeouts_total`, and neither touches upgraded WebSockets or routes.
//! The real server on ephemeral ports, with short deadlines.

use relay_module::config::HttpConf;
use relay_module::{RelayConf, RouteConf, Router};
use relay_tests::upstream::HttpUpstream;
use relay_tests::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEAD: Duration = Duration::from_millis(1000);
const KEEPALIVE: Duration = Duration::from_millis(1500);
/// Lateness allowed to an expiry on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);
/// The whole answer to a late head.
const TIMEOUT_RESPONSE: &str = "HTTP/1.1 408 Request Timeout\r\n\
    Content-Type: text/plain; charset=utf-8\r\n\
    Content-Length: 15\r\n\
    Connection: close\r\n\
    \r\n\
    Request timeout";
const HEALTH_REQUEST: &[u8] = b"GET /health HTTP/1.1\r\nHost: relay\r\n\r\n";

fn http_conf() -> HttpConf {
    HttpConf {
        request_head_timeout_ms: HEAD.as_millis() as u64,
        keepalive_timeout_ms: KEEPALIVE.as_millis() as u64,
        ..HttpConf::default()
    }
}

async fn start() -> TestRelay {
    TestRelay::start_with_http(RelayConf::default(), Router::default(), http_conf()).await
}

/// `paseo_relay_request_timeouts_total`, from the admin listener's `/metrics`.
async fn timeouts(relay: &TestRelay) -> u64 {
    let metrics = relay.admin.get("/metrics", "").await;
    assert_eq!(metrics.status, 200);
    metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix("paseo_relay_request_timeouts_total "))
        .expect("the request timeouts counter")
        .parse()
        .expect("a count")
}

/// Everything `rd` yields until end of stream (or a reset), and when the stream ended.
async fn read_to_eof(rd: &mut (impl AsyncRead + Unpin), within: Duration) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return (got, Instant::now()),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("end of stream within the deadline")
}

/// Sends `GET /health` on `tcp` and checks the answer.
async fn health_on(tcp: &mut TcpStream) {
    tcp.write_all(HEALTH_REQUEST).await.expect("send");
    let r = read_response(tcp).await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"status":"ok"}"#));
}

/// Sends `head` one byte every 200 ms on a connection to `addr` (never finishing it) and
/// reads until end of stream. Returns what was read and how long after the first byte the
/// stream ended.
async fn trickle(tcp: TcpStream, head: &'static [u8]) -> (Vec<u8>, Duration) {
    let (mut rd, mut wr) = tcp.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        for byte in head.iter().cycle().take(200) {
            if wr.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (got, ended) = read_to_eof(&mut rd, Duration::from_secs(20)).await;
    writer.abort();
    (got, ended - started)
}

const ENDLESS_HEAD: &[u8] = b"GET /health HTTP/1.1\r\nHost: relay\r\nX-Slow: abcdefghijklmnop";

/// A head trickled one byte every 200 ms gets exactly the 408 one head deadline after the
/// accept, then end of stream; the expiry is counted once.
#[tokio::test]
async fn trickled_head_gets_408_at_the_deadline() {
    let relay = start().await;
    let before = timeouts(&relay).await;
    let tcp = TcpStream::connect(relay.addr).await.expect("connect");
    let (got, after) = trickle(tcp, ENDLESS_HEAD).await;
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text, TIMEOUT_RESPONSE);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 408 "), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; charset=utf-8\r\n"),
        "{head}"
    );
    assert_eq!(body, "Request timeout");
    assert!(
        after >= HEAD - Duration::from_millis(50) && after < HEAD + SLACK,
        "{after:?}"
    );
    assert_eq!(timeouts(&relay).await, before + 1);
}

/// A connection that sends nothing gets the 408 too (its clock starts at the accept), on
/// the relay's listener and on the admin listener.
#[tokio::test]
async fn silent_connection_gets_408_on_every_listener() {
    let relay = start().await;
    let before = timeouts(&relay).await;
    for addr in [relay.addr, relay.admin.addr] {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let connected = Instant::now();
        let (got, ended) = read_to_eof(&mut tcp, Duration::from_secs(20)).await;
        assert_eq!(String::from_utf8_lossy(&got), TIMEOUT_RESPONSE, "{addr}");
        let after = ended - connected;
        assert!(
            after >= HEAD - Duration::from_millis(50) && after < HEAD + SLACK,
            "{addr}: {after:?}"
        );
    }
    assert_eq!(timeouts(&relay).await, before + 2);
}

/// A head that arrives in pieces (split inside the final CRLF CRLF) within the deadline is
/// answered as usual; so is one with LF line ends and empty lines before it.
#[tokio::test]
async fn head_in_pieces_within_the_deadline_is_served() {
    let relay = start().await;
    let mut tcp = TcpStream::connect(relay.addr).await.expect("connect");
    for piece in [
        &b"GET /hea"[..],
        b"lth HTTP/1.1\r\nHost: re",
        b"lay\r\n\r",
        b"\n",
    ] {
        tcp.write_all(piece).await.expect("send");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = read_response(&mut tcp).await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"status":"ok"}"#));
    // Same connection: empty lines, then an LF-only head.
    tcp.write_all(b"\r\n\nGET /health HTTP/1.1\nHost: relay\n\n")
        .await
        .expect("send");
    let r = read_response(&mut tcp).await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"status":"ok"}"#));
    assert_eq!(timeouts(&relay).await, 0);
}

/// After a request, a connection idle for the keep-alive deadline is closed without a
/// byte; the expiry is counted.
#[tokio::test]
async fn idle_keepalive_connection_is_closed_silently() {
    let relay = start().await;
    let before = timeouts(&relay).await;
    let mut tcp = TcpStream::connect(relay.addr).await.expect("connect");
    health_on(&mut tcp).await;
    let answered = Instant::now();
    let (got, ended) = read_to_eof(&mut tcp, Duration::from_secs(20)).await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    let idle = ended - answered;
    assert!(
        idle >= KEEPALIVE - Duration::from_millis(100) && idle < KEEPALIVE + SLACK,
        "{idle:?}"
    );
    assert_eq!(timeouts(&relay).await, before + 1);
}

/// A second request within the keep-alive deadline (idle longer than the head deadline:
/// the keep-alive one applies between requests) is served on the same connection.
#[tokio::test]
async fn second_request_within_the_keepalive_deadline_is_served() {
    let relay = start().await;
    let mut tcp = TcpStream::connect(relay.addr).await.expect("connect");
    health_on(&mut tcp).await;
    // The idle time is what is tested.
    tokio::time::sleep(HEAD + Duration::from_millis(200)).await;
    health_on(&mut tcp).await;
    health_on(&mut tcp).await;
    assert_eq!(timeouts(&relay).await, 0);
}

/// A slow head on a keep-alive connection is timed from its first byte, not from the end
/// of the previous request.
#[tokio::test]
async fn slow_head_on_a_keepalive_connection_is_timed_from_its_first_byte() {
    let relay = start().await;
    let before = timeouts(&relay).await;
    let mut tcp = TcpStream::connect(relay.addr).await.expect("connect");
    health_on(&mut tcp).await;
    // Idle for most of the keep-alive deadline and past the head deadline.
    tokio::time::sleep(HEAD + Duration::from_millis(200)).await;
    let (got, after) = trickle(tcp, ENDLESS_HEAD).await;
    assert_eq!(String::from_utf8_lossy(&got), TIMEOUT_RESPONSE);
    assert!(
        after >= HEAD - Duration::from_millis(50) && after < HEAD + SLACK,
        "{after:?}"
    );
    assert_eq!(timeouts(&relay).await, before + 1);
}

/// A WebSocket pair silent for longer than both deadlines still relays: the deadlines end
/// with the `101`.
#[tokio::test]
async fn silent_websockets_outlive_both_deadlines() {
    let relay = start().await;
    let server = sid("deadlines");
    let (mut c, mut k, mut d) = relay.paired(&server, "conn_1").await;
    let before = timeouts(&relay).await;
    assert_silent(&mut k, HEAD + KEEPALIVE).await;
    assert_relays_both_ways(&mut k, &mut d).await;
    send_text(&mut c, r#"{"type":"ping"}"#).await;
    assert_eq!(control_json(&recv_text(&mut c).await).0, "pong");
    assert_eq!(timeouts(&relay).await, before);
}

/// A proxied route answers as before, twice on one connection, and the connection then
/// closes at the keep-alive deadline.
#[tokio::test]
async fn routed_requests_are_served_and_kept_alive() {
    let upstream = HttpUpstream::start("app").await;
    let routes = [RouteConf {
        path_prefix: "/app".into(),
        upstream: relay_module::http::routes::Peers::One(upstream.addr.to_string()),
        tls: false,
        sni: None,
        host_header: None,
        strip_prefix: false,
        health_check_interval_ms: 1000,
    }];
    let router = Router::build(&routes, &[]).expect("valid routes");
    let relay = TestRelay::start_with_http(RelayConf::default(), router, http_conf()).await;
    let before = timeouts(&relay).await;
    let mut tcp = TcpStream::connect(relay.addr).await.expect("connect");
    for path in ["/app/one", "/app/two"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.expect("send");
        let r = read_response(&mut tcp).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.body, format!("app GET {path}"));
    }
    assert_eq!(upstream.requests().len(), 2);
    let (got, _) = read_to_eof(&mut tcp, KEEPALIVE + SLACK + SLACK).await;
    assert!(got.is_empty());
    assert_eq!(timeouts(&relay).await, before + 1);
}
