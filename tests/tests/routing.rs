//! Mount and route (issue 4): the relay on a path prefix, every other path proxied by Pingora
//! to real upstream servers started here on ephemeral ports (`relay_tests::upstream`).
//!
//! Every request below is sent on a fresh TCP connection as raw HTTP/1.1, so that the status
//! line, headers and body the relay answers are checked byte for byte.

use relay_module::http::routes::Peers;
use relay_module::{RelayConf, RouteConf, Router};
use relay_tests::upstream::{Checksum, HttpUpstream, Pattern, SeenRequest, WsEchoUpstream, CHUNK};
use relay_tests::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEALTH: &str = r#"{"status":"ok"}"#;
/// Deadline of one small request through the relay.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of one 50 MiB transfer through the relay (debug build, 2 cores).
const TRANSFER_DEADLINE: Duration = Duration::from_secs(90);
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// Building relays

fn route(prefix: &str, peers: Peers) -> RouteConf {
    RouteConf {
        path_prefix: prefix.into(),
        upstream: peers,
        tls: false,
        sni: None,
        host_header: None,
        strip_prefix: false,
        health_check_interval_ms: 1000,
    }
}

fn one(addr: SocketAddr) -> Peers {
    Peers::One(addr.to_string())
}

/// A relay with `conf`, `routes` and `trusted_proxies`.
async fn routed(conf: RelayConf, routes: &[RouteConf], trusted: &[&str]) -> TestRelay {
    let trusted: Vec<String> = trusted.iter().map(|t| t.to_string()).collect();
    let router = Router::build(routes, &trusted).expect("valid routes");
    TestRelay::start_routed(conf, router).await
}

/// An address nobody listens on: an ephemeral port bound without `listen`, so connects to
/// it are refused and no other test can take the port while the socket is held.
fn dead_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(([127, 0, 0, 1], 0).into())
        .expect("bind an ephemeral port");
    let addr = socket.local_addr().expect("addr");
    (socket, addr)
}

// ---------------------------------------------------------------------------------------
// A raw HTTP/1.1 client

/// One response as it came over the wire.
#[derive(Debug)]
struct Reply {
    /// `HTTP/1.1 200 OK`.
    status_line: String,
    /// (lower-case name, value), in order.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// (status line, body): what most assertions compare.
    fn pair(&self) -> (&str, &str) {
        (self.status_line.as_str(), self.body.as_str())
    }
}

/// Reads a response head; returns (status line, headers, bytes read past the head).
async fn read_head(rd: &mut (impl AsyncRead + Unpin)) -> (String, Vec<(String, String)>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = rd.read(&mut chunk).await.expect("read response head");
        assert!(
            n > 0,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..end].to_vec()).expect("UTF-8 head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line").to_string();
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line");
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    (status_line, headers, buf[end..].to_vec())
}

/// Reads one complete response with a `Content-Length` body (or none, for a 101).
async fn read_reply(rd: &mut (impl AsyncRead + Unpin)) -> Reply {
    let (status_line, headers, mut body) = read_head(rd).await;
    let reply = Reply {
        status_line,
        headers,
        body: String::new(),
    };
    assert_eq!(
        reply.header("transfer-encoding"),
        None,
        "expected a Content-Length body: {reply:?}"
    );
    let len: usize = reply
        .header("content-length")
        .map_or(0, |v| v.parse().expect("Content-Length"));
    let mut chunk = [0u8; 4096];
    while body.len() < len {
        let n = rd.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "connection closed mid-body: {reply:?}");
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), len, "bytes past the body: {reply:?}");
    Reply {
        body: String::from_utf8(body).expect("UTF-8 body"),
        ..reply
    }
}

/// Sends `raw` on a new connection to `addr` and reads one response, within
/// [`REQUEST_DEADLINE`].
async fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
    tokio::time::timeout(REQUEST_DEADLINE, async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .expect("connect to the relay");
        tcp.write_all(raw).await.expect("write request");
        read_reply(&mut tcp).await
    })
    .await
    .unwrap_or_else(|_| panic!("no response within {REQUEST_DEADLINE:?} to {raw:?}"))
}

/// `GET path` with `Host: relay`.
async fn get(addr: SocketAddr, path: &str) -> Reply {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes(),
    )
    .await
}

fn ok(body: &str) -> (&'static str, &str) {
    ("HTTP/1.1 200 OK", body)
}

// ---------------------------------------------------------------------------------------
// 1. Prefix routing and precedence

#[tokio::test]
async fn prefix_routing_longest_prefix_by_segment_and_relay_paths_first() {
    let a = HttpUpstream::start("A").await;
    let b = HttpUpstream::start("B").await;
    let c = HttpUpstream::start("C").await;
    let relay = routed(
        RelayConf::default(),
        &[
            route("/", one(a.addr)),
            route("/app", one(b.addr)),
            route("/app/api", one(c.addr)),
        ],
        &[],
    )
    .await;
    let cases = [
        ("/x?q=1", "A GET /x?q=1"),
        ("/", "A GET /"),
        ("/apple", "A GET /apple"),
        ("/app", "B GET /app"),
        ("/app/", "B GET /app/"),
        ("/app?q=2", "B GET /app?q=2"),
        ("/app/x?q=1", "B GET /app/x?q=1"),
        ("/app/apix", "B GET /app/apix"),
        ("/app/api", "C GET /app/api"),
        ("/app/api/", "C GET /app/api/"),
        ("/app/api/v1/items?z=2&y", "C GET /app/api/v1/items?z=2&y"),
    ];
    for (path, expected) in cases {
        let r = get(relay.addr, path).await;
        assert_eq!(r.pair(), ok(expected), "GET {path}");
        assert_eq!(r.header("x-upstream"), Some(&expected[..1]), "GET {path}");
    }
    let r = exchange(
        relay.addr,
        b"DELETE /app/api/v1/items/7 HTTP/1.1\r\nHost: relay\r\n\r\n",
    )
    .await;
    assert_eq!(r.pair(), ok("C DELETE /app/api/v1/items/7"));

    // The relay's own paths win over the `/` route.
    let r = get(relay.addr, "/health").await;
    assert_eq!(r.pair(), ok(HEALTH));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = exchange(
        relay.addr,
        b"POST /health?x=1 HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(r.pair(), ok(HEALTH));
    let r = get(relay.addr, "/ws").await;
    assert_eq!(
        r.pair(),
        ("HTTP/1.1 400 Bad Request", "Missing serverId parameter")
    );
    assert!(
        a.requests()
            .iter()
            .all(|s| !s.target.starts_with("/health") && !s.target.starts_with("/ws")),
        "the relay's own paths reached the `/` upstream: {:?}",
        a.requests()
    );

    // Without a `/` route, an unmatched path is 404; strip_prefix and host_header.
    let mut stripped = route("/app", one(b.addr));
    stripped.strip_prefix = true;
    stripped.host_header = Some("backend.internal".into());
    let relay = routed(
        RelayConf::default(),
        &[stripped, route("/site", one(a.addr))],
        &[],
    )
    .await;
    for path in ["/", "/apple", "/sitemap", "/x/app", "/favicon.ico"] {
        let r = get(relay.addr, path).await;
        assert_eq!(
            r.pair(),
            ("HTTP/1.1 404 Not Found", "Not found"),
            "GET {path}"
        );
    }
    let r = get(relay.addr, "/health").await;
    assert_eq!(r.pair(), ok(HEALTH));
    for (path, expected) in [
        ("/app/x?q=1", "B GET /x?q=1"),
        ("/app/a/b/", "B GET /a/b/"),
        ("/app?q", "B GET /?q"),
        ("/app", "B GET /"),
        ("/app/", "B GET /"),
    ] {
        let r = get(relay.addr, path).await;
        assert_eq!(r.pair(), ok(expected), "GET {path}");
        let seen = b.last_request();
        assert_eq!(
            seen.headers_named("host"),
            ["backend.internal"],
            "GET {path}"
        );
        assert_eq!(seen.header("x-forwarded-host"), Some("relay"), "GET {path}");
    }
    let r = get(relay.addr, "/site/page?id=3").await;
    assert_eq!(r.pair(), ok("A GET /site/page?id=3"));
    assert_eq!(a.last_request().headers_named("host"), ["relay"]);
}

// ---------------------------------------------------------------------------------------
// 2. Headers kept and added

/// (lower-case name, value) pairs, sorted: header sets compared as multisets.
fn header_set<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pairs
        .into_iter()
        .map(|(n, val)| (n.to_ascii_lowercase(), val.to_string()))
        .collect();
    v.sort();
    v
}

fn seen_set(seen: &SeenRequest) -> Vec<(String, String)> {
    header_set(seen.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())))
}

#[tokio::test]
async fn proxied_requests_keep_everything_and_add_forwarded_headers() {
    let up = HttpUpstream::start("U").await;
    let body = "name=paseo&value=42&note=caf%C3%A9";
    let client_headers = [
        ("Host", "site.example:8443"),
        ("User-Agent", "routing-test/1.0"),
        ("Accept", "*/*"),
        ("X-Custom", "Hello, World"),
        ("X-Multi", "one"),
        ("X-Multi", "two"),
        ("Cookie", "session=abc; theme=dark"),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    let request = |extra: &[(&str, &str)]| {
        let mut raw = String::from("POST /form/submit?a=1&b=two%20words HTTP/1.1\r\n");
        for (n, v) in client_headers.iter().chain(extra) {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        raw.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        raw
    };
    let length = body.len().to_string();
    let expect_headers = |extra: &[(&str, &str)]| {
        header_set(
            client_headers
                .iter()
                .copied()
                .chain([("Content-Length", length.as_str())])
                .chain(extra.iter().copied()),
        )
    };
    let spoofed = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
    ];
    let answer = ok("U POST /form/submit?a=1&b=two%20words");

    // Not behind a trusted proxy: the relay's own values, whatever the client claims.
    let relay = routed(RelayConf::default(), &[route("/", one(up.addr))], &[]).await;
    let own = [
        ("X-Forwarded-For", "127.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "site.example:8443"),
    ];
    for extra in [&[][..], &spoofed[..]] {
        let r = exchange(relay.addr, request(extra).as_bytes()).await;
        assert_eq!(r.pair(), answer, "client sent {extra:?}");
        let seen = up.last_request();
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.target, "/form/submit?a=1&b=two%20words");
        assert_eq!(String::from_utf8_lossy(&seen.body), body);
        assert_eq!(seen.headers_named("x-multi"), ["one", "two"]);
        assert_eq!(
            seen_set(&seen),
            expect_headers(&own),
            "client sent {extra:?}"
        );
    }

    // From a trusted proxy: its X-Forwarded-For is kept and extended, -Proto and -Host kept.
    let relay = routed(
        RelayConf::default(),
        &[route("/", one(up.addr))],
        &["127.0.0.1"],
    )
    .await;
    let r = exchange(relay.addr, request(&spoofed).as_bytes()).await;
    assert_eq!(r.pair(), answer);
    let seen = up.last_request();
    assert_eq!(String::from_utf8_lossy(&seen.body), body);
    assert_eq!(
        seen_set(&seen),
        expect_headers(&[
            ("X-Forwarded-For", "6.6.6.6, 127.0.0.1"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
        ])
    );
    // A trusted proxy that sent no X-Forwarded-* gets the relay's own values.
    let r = exchange(relay.addr, request(&[]).as_bytes()).await;
    assert_eq!(r.pair(), answer);
    assert_eq!(seen_set(&up.last_request()), expect_headers(&own));
}

// ---------------------------------------------------------------------------------------
// 3. 50 MiB each way, streamed, with bounded memory

/// Resident set size of this process (VmRSS), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// Samples VmRSS every 5 ms on its own thread (not a tokio task: it must keep sampling
/// while the runtimes are busy) until stopped.
struct RssSampler {
    baseline: u64,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let baseline = rss_kib();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            loop {
                peak = peak.max(rss_kib());
                if flag.load(Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssSampler {
            baseline,
            stop,
            thread,
        }
    }

    /// (baseline, peak) in KiB.
    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        (self.baseline, self.thread.join().expect("sampler"))
    }
}

/// POSTs `total` bytes of [`Pattern`] to `path`, generated chunk by chunk while sending.
/// Returns (the upstream's reply, the summary of what was sent).
async fn upload(addr: SocketAddr, path: &str, total: u64) -> (Reply, String) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = tcp.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/octet-stream\r\nContent-Length: {total}\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await.expect("write head");
        let (mut pattern, mut sum) = (Pattern::default(), Checksum::default());
        let mut chunk = vec![0u8; CHUNK];
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            pattern.fill(&mut chunk[..n]);
            sum.update(&chunk[..n]);
            wr.write_all(&chunk[..n]).await.expect("write body");
            left -= n as u64;
        }
        (sum.summary(), wr) // the write half stays open until the reply is read
    });
    let reply = tokio::time::timeout(TRANSFER_DEADLINE, read_reply(&mut rd))
        .await
        .expect("upload answered within the deadline");
    let (sent, _wr) = writer.await.expect("writer");
    (reply, sent)
}

/// GETs `total` bytes from the upstream's download endpoint under `prefix`, reading and
/// checksumming chunk by chunk. Returns (status line, Content-Length, summary received).
async fn download(addr: SocketAddr, prefix: &str, total: u64) -> (String, Option<String>, String) {
    tokio::time::timeout(TRANSFER_DEADLINE, async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {prefix}/download?bytes={total} HTTP/1.1\r\nHost: relay\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.expect("write request");
        let (status_line, headers, first) = read_head(&mut tcp).await;
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.clone());
        let mut sum = Checksum::default();
        sum.update(&first);
        let mut chunk = vec![0u8; CHUNK];
        while sum.count() < total {
            let n = tcp.read(&mut chunk).await.expect("read body");
            assert!(n > 0, "download ended after {} bytes", sum.count());
            sum.update(&chunk[..n]);
        }
        (status_line, length, sum.summary())
    })
    .await
    .expect("download within the deadline")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_stream_both_ways_with_bounded_memory() {
    const TOTAL: u64 = 50 * MIB;
    // Peak RSS growth allowed during one transfer. The relay, the upstream and this client
    // share the process, so this bounds all three together; a relay that buffered a body
    // whole would add 50 MiB on its own.
    const MAX_GROWTH_KIB: u64 = 24 * 1024;
    let up = HttpUpstream::start("F").await;
    let relay = routed(RelayConf::default(), &[route("/files", one(up.addr))], &[]).await;

    // Warm-up: the same paths with 2 MiB, so that buffers, pools and allocator arenas made
    // once are part of the baseline.
    let (r, sent) = upload(relay.addr, "/files/upload", 2 * MIB).await;
    assert_eq!(r.pair(), ok(&sent));
    let (_, _, got) = download(relay.addr, "/files", 2 * MIB).await;
    assert_eq!(got, sent);

    let sampler = RssSampler::start();
    let started = Instant::now();
    let (r, sent) = upload(relay.addr, "/files/upload", TOTAL).await;
    let upload_time = started.elapsed();
    let (baseline, peak) = sampler.stop();
    assert!(sent.starts_with("52428800 "), "{sent}");
    assert_eq!(r.pair(), ok(&sent), "upstream's count and checksum");
    let seen = up.last_request();
    assert_eq!(
        (seen.method.as_str(), seen.target.as_str()),
        ("POST", "/files/upload")
    );
    assert_eq!(seen.header("content-length"), Some("52428800"));
    let growth = peak.saturating_sub(baseline);
    eprintln!("upload: {upload_time:?}, RSS {baseline} KiB -> peak {peak} KiB (+{growth} KiB)");
    assert!(
        growth < MAX_GROWTH_KIB,
        "RSS grew by {growth} KiB during a 50 MiB upload"
    );

    let sampler = RssSampler::start();
    let started = Instant::now();
    let (status_line, length, got) = download(relay.addr, "/files", TOTAL).await;
    let download_time = started.elapsed();
    let (baseline, peak) = sampler.stop();
    assert_eq!(status_line, "HTTP/1.1 200 OK");
    assert_eq!(length.as_deref(), Some("52428800"));
    assert_eq!(got, sent, "bytes received (count and checksum)");
    let growth = peak.saturating_sub(baseline);
    eprintln!("download: {download_time:?}, RSS {baseline} KiB -> peak {peak} KiB (+{growth} KiB)");
    assert!(
        growth < MAX_GROWTH_KIB,
        "RSS grew by {growth} KiB during a 50 MiB download"
    );
}

// ---------------------------------------------------------------------------------------
// 4. 502 on a dead upstream

#[tokio::test]
async fn dead_upstream_is_a_quick_502_and_the_rest_keeps_working() {
    let alive = HttpUpstream::start("L").await;
    // Held until the end: the ports stay reserved, and refuse connections.
    let (_d1, dead1) = dead_addr();
    let (_d2, dead2) = dead_addr();
    let (_d3, dead3) = dead_addr();
    let relay = routed(
        RelayConf::default(),
        &[
            route("/", one(alive.addr)),
            route("/dead", one(dead1)),
            RouteConf {
                health_check_interval_ms: 100,
                ..route(
                    "/dead-pair",
                    Peers::Many(vec![dead2.to_string(), dead3.to_string()]),
                )
            },
        ],
        &[],
    )
    .await;
    let bad_gateway = ("HTTP/1.1 502 Bad Gateway", "Bad gateway");
    let requests: [&[u8]; 4] = [
        b"GET /dead HTTP/1.1\r\nHost: relay\r\n\r\n",
        b"GET /dead/x?q=1 HTTP/1.1\r\nHost: relay\r\n\r\n",
        b"POST /dead/form HTTP/1.1\r\nHost: relay\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /dead-pair/x HTTP/1.1\r\nHost: relay\r\n\r\n",
    ];
    for round in 0..2 {
        for raw in requests {
            let started = Instant::now();
            let r = exchange(relay.addr, raw).await;
            let took = started.elapsed();
            let what = String::from_utf8_lossy(raw);
            assert_eq!(r.pair(), bad_gateway, "round {round}: {what}");
            assert!(took < Duration::from_secs(6), "{took:?} for {what}");
        }
        // The relay keeps serving its own paths and the other routes.
        assert_eq!(get(relay.addr, "/health").await.pair(), ok(HEALTH));
        assert_eq!(get(relay.addr, "/alive").await.pair(), ok("L GET /alive"));
        assert_eq!(get(relay.addr, "/deadx").await.pair(), ok("L GET /deadx"));
    }
}

// ---------------------------------------------------------------------------------------
// 5. Round robin, and a peer failing its health check

#[tokio::test]
async fn round_robin_skips_a_peer_that_fails_its_health_check() {
    let p1 = HttpUpstream::start("P1").await;
    let mut p2 = HttpUpstream::start("P2").await;
    let relay = routed(
        RelayConf::default(),
        &[RouteConf {
            health_check_interval_ms: 200,
            ..route(
                "/rr",
                Peers::Many(vec![p1.addr.to_string(), p2.addr.to_string()]),
            )
        }],
        &[],
    )
    .await;

    // Both up: strict alternation, from whichever peer comes first.
    let mut order = Vec::new();
    for i in 0..6 {
        let path = format!("/rr/{i}");
        let r = get(relay.addr, &path).await;
        let name = r.body.split(' ').next().unwrap_or("").to_string();
        assert_eq!(r.pair(), ok(&format!("{name} GET {path}")), "GET {path}");
        order.push(name);
    }
    let (first, second) = if order[0] == "P1" {
        ("P1", "P2")
    } else {
        ("P2", "P1")
    };
    assert_eq!(order, [first, second, first, second, first, second]);
    assert_eq!((p1.requests().len(), p2.requests().len()), (3, 3));

    // P2 goes away: connects to it are refused from now on.
    p2.stop().await;
    // A request that selects P2 before its health check (every 200 ms) notices gets a refused
    // connect and is retried once on the next peer, P1; after, P2 is not selected at all.
    // Either way no request fails.
    for i in 0..20 {
        let path = format!("/rr/after{i}");
        let r = get(relay.addr, &path).await;
        assert_eq!(r.pair(), ok(&format!("P1 GET {path}")), "GET {path}");
    }
    assert_eq!(p2.requests().len(), 3);
}

// ---------------------------------------------------------------------------------------
// 6. A proxied WebSocket that stays open while idle

/// Sends a text and a binary frame and expects each echoed back exactly.
async fn echo_round(ws: &mut Ws, round: &str) {
    let text = format!("hello through the proxy ({round})");
    let bytes = vec![0u8, 1, 2, 0x7f, 0x80, 0xfe, 0xff];
    send_text(ws, &text).await;
    assert_eq!(recv(ws).await, Message::text(text));
    send_binary(ws, &bytes).await;
    assert_eq!(recv(ws).await, Message::binary(bytes));
}

#[tokio::test]
async fn proxied_websocket_echoes_and_survives_70s_idle() {
    let echo = WsEchoUpstream::start().await;
    let relay = routed(RelayConf::default(), &[route("/echo", one(echo.addr))], &[]).await;
    let url = format!("ws://{}/echo?room=1", relay.addr);
    let (mut ws, resp) = tokio::time::timeout(WITHIN, tokio_tungstenite::connect_async(&url))
        .await
        .expect("handshake within the deadline")
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    assert_eq!(resp.status(), 101);
    // The upstream did the handshake; the relay did not take the socket as its own.
    let handshakes = echo.handshakes();
    assert_eq!(handshakes.len(), 1);
    assert_eq!(handshakes[0].target, "/echo?room=1");
    assert_eq!(handshakes[0].header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(relay.hub.socket_count(), 0);

    echo_round(&mut ws, "before").await;
    // Longer than Pingora's 60 s default downstream read timeout: nothing may arrive,
    // and the connection must not be closed.
    assert_silent(&mut ws, Duration::from_secs(70)).await;
    echo_round(&mut ws, "after 70 s idle").await;
    send_close(&mut ws, 1000, "done").await;
    let (code, _) = recv_close(&mut ws).await;
    assert_eq!(code, 1000);
}

// ---------------------------------------------------------------------------------------
// 7. The relay on /paseo, `/` routed upstream

/// A WebSocket to the relay mounted on `/paseo`; panics unless the answer is 101.
async fn paseo_ws(relay: &TestRelay, query: &str) -> Ws {
    let url = format!("ws://{}/paseo/ws?{query}", relay.addr);
    let (ws, resp) = tokio::time::timeout(WITHIN, tokio_tungstenite::connect_async(&url))
        .await
        .expect("handshake within the deadline")
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    assert_eq!(resp.status(), 101);
    ws
}

#[tokio::test]
async fn relay_on_paseo_pairs_while_ws_and_health_go_upstream() {
    let site = HttpUpstream::start("SITE").await;
    let conf = RelayConf {
        path_prefix: "/paseo/".into(),
        ..Default::default()
    };
    let relay = routed(conf, &[route("/", one(site.addr))], &[]).await;

    // The relay's surface, under /paseo.
    let r = get(relay.addr, "/paseo/health").await;
    assert_eq!(r.pair(), ok(HEALTH));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        get(relay.addr, "/paseo/ws").await.pair(),
        ("HTTP/1.1 400 Bad Request", "Missing serverId parameter")
    );
    assert_eq!(
        get(relay.addr, "/paseo/ws?serverId=S&role=server&v=2")
            .await
            .pair(),
        (
            "HTTP/1.1 426 Upgrade Required",
            "Expected WebSocket upgrade"
        )
    );

    // Everything else is the site's, /ws and /health included.
    for path in [
        "/health",
        "/ws",
        "/ws?serverId=S&role=server&v=2",
        "/paseo",
        "/paseo/",
        "/paseo/index.html",
        "/paseo/ws/x",
        "/paseox/ws",
    ] {
        let r = get(relay.addr, path).await;
        assert_eq!(r.pair(), ok(&format!("SITE GET {path}")), "GET {path}");
    }
    // A WebSocket upgrade on /ws is proxied too: the site answers it (here with a 200).
    let s = sid("paseo_up");
    let target = format!("/ws?serverId={s}&role=server&v=2");
    let r = exchange(
        relay.addr,
        format!("GET {target} HTTP/1.1\r\nHost: relay\r\n{UPGRADE_HEADERS}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.pair(), ok(&format!("SITE GET {target}")));
    let seen = site.last_request();
    assert_eq!(seen.target, target);
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(relay.hub.socket_count(), 0);

    // Pairing on /paseo/ws (relay-protocol.md §9 cases 21, 39, 36, 14).
    let s = sid("paseo");
    let mut c = paseo_ws(&relay, &format!("serverId={s}&role=server&v=2")).await;
    assert_eq!(
        recv_text(&mut c).await,
        r#"{"type":"sync","connectionIds":[]}"#
    );
    let mut k = paseo_ws(
        &relay,
        &format!("serverId={s}&role=client&v=2&connectionId=a"),
    )
    .await;
    assert_eq!(
        recv_text(&mut c).await,
        r#"{"type":"connected","connectionId":"a"}"#
    );
    let mut d = paseo_ws(
        &relay,
        &format!("serverId={s}&role=server&v=2&connectionId=a"),
    )
    .await;
    assert_relays_both_ways(&mut k, &mut d).await;
    assert_kind_and_bytes_preserved(&mut k, &mut d).await;
    // A second client on the same connectionId is announced again.
    let _k2 = paseo_ws(
        &relay,
        &format!("serverId={s}&role=client&v=2&connectionId=a"),
    )
    .await;
    assert_eq!(
        recv_text(&mut c).await,
        r#"{"type":"connected","connectionId":"a"}"#
    );

    // v1 on /paseo/ws: text and binary both ways.
    let s1 = sid("paseo_v1");
    let mut vs = paseo_ws(&relay, &format!("serverId={s1}&role=server")).await;
    let mut vk = paseo_ws(&relay, &format!("serverId={s1}&role=client")).await;
    send_text(&mut vk, "one").await;
    send_binary(&mut vk, &[0x00, 0xff, 0x01]).await;
    send_text(&mut vs, "two").await;
    send_binary(&mut vs, &[0x02]).await;
    assert_eq!(recv(&mut vs).await, Message::text("one"));
    assert_eq!(recv(&mut vs).await, Message::binary(vec![0x00, 0xff, 0x01]));
    assert_eq!(recv(&mut vk).await, Message::text("two"));
    assert_eq!(recv(&mut vk).await, Message::binary(vec![0x02]));

    // None of that reached the site.
    assert!(
        site.requests()
            .iter()
            .all(|r| !r.target.starts_with("/paseo/ws?")),
        "{:?}",
        site.requests()
    );
}
