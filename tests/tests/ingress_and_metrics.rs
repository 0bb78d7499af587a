//! Issue 9: the socket metrics counted on the data path (forwarded messages and bytes, frame
//! sizes, closes by code, outbound queue bytes, slow consumers, send waits), the close line
//! of each WebSocket, and the process-wide ingress budget for partly received messages.
//!
//! Every test owns its relay, so the metrics it reads are its own; deltas are still taken
//! from a scrape before the exchange. The log capture is process-wide: records are told
//! apart by a serverId whose first 8 characters are unique to the test.

use futures_util::{SinkExt, StreamExt};
use log::kv::{Key, Value, VisitSource};
use relay_module::RelayConf;
use relay_tests::*;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// Helpers: scrapes, log capture, raw frames
// ---------------------------------------------------------------------------------------------

/// The admin listener's `/metrics` text.
async fn metrics(relay: &TestRelay) -> String {
    let resp = relay.admin.get("/metrics", "").await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    resp.body
}

/// The value of `series` (`name` or `name{labels}` as written) in a scrape; 0 when absent
/// (labelled counters appear on first use).
fn value(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Waits until the relay holds no socket (their tasks, and so their metrics, are done).
async fn no_sockets_left(relay: &TestRelay) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.hub.socket_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "sockets still open: {}",
            relay.hub.socket_count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `series` until it reads `want` (gauges of sockets that are ending settle shortly
/// after their task); panics after 5 s.
async fn settles_at(relay: &TestRelay, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = value(&metrics(relay).await, series);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{series} = {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One captured log record: its message and its key-value fields (as text).
#[derive(Debug, Clone)]
struct Captured {
    message: String,
    fields: BTreeMap<String, String>,
}

static CAPTURED: Mutex<Vec<Captured>> = Mutex::new(Vec::new());

struct Capture;

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        self.0.insert(key.to_string(), value.to_string());
        Ok(())
    }
}

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info && m.target().starts_with("relay_module::socket")
    }
    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut fields = BTreeMap::new();
        let _ = record.key_values().visit(&mut Fields(&mut fields));
        CAPTURED.lock().unwrap().push(Captured {
            message: record.args().to_string(),
            fields,
        });
    }
    fn flush(&self) {}
}

/// Captures the relay's socket log lines in this process (instead of printing them).
fn capture_logs() {
    static CAPTURE: Capture = Capture;
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// The close lines logged for sockets of a serverId starting with `prefix` (8 characters).
fn close_lines(prefix: &str) -> Vec<Captured> {
    CAPTURED
        .lock()
        .unwrap()
        .iter()
        .filter(|c| {
            c.fields
                .get("server_id")
                .is_some_and(|s| s.starts_with(prefix))
        })
        .cloned()
        .collect()
}

/// A serverId whose first 8 characters are unique to this run.
fn unique_sid() -> String {
    format!("{:08x}_ingress_metrics_test", rand::random::<u32>())
}

/// A masked client frame header with the all-zero key (so zero payload bytes go out as-is).
fn zero_key_header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out.extend_from_slice(&[0; 4]);
    out
}

/// A raw client socket after its 101 (the head is read exactly; nothing else is buffered
/// because the relay sends a client nothing on attach).
async fn raw_client(relay: &TestRelay, server_id: &str, x: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    let req = format!(
        "GET /ws?serverId={server_id}&role=client&v=2&connectionId={x} HTTP/1.1\r\n\
         Host: relay\r\n{UPGRADE_HEADERS}\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "EOF in the 101");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// Reads relay frames from `rd` until a close frame; returns its (code, reason).
async fn read_close(rd: &mut (impl AsyncReadExt + Unpin), within: Duration) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            while buf.len() >= 2 {
                let len = match buf[1] & 0x7f {
                    126 if buf.len() >= 4 => u16::from_be_bytes([buf[2], buf[3]]) as usize,
                    n if n < 126 => n as usize,
                    _ => break,
                };
                let at = if buf[1] & 0x7f == 126 { 4 } else { 2 };
                if buf.len() < at + len {
                    break;
                }
                let frame: Vec<u8> = buf.drain(..at + len).collect();
                if frame[0] & 0x0f == 0x8 {
                    let p = &frame[at..];
                    return (
                        u16::from_be_bytes([p[0], p[1]]),
                        String::from_utf8(p[2..].to_vec()).unwrap(),
                    );
                }
            }
            let n = rd.read(&mut chunk).await.expect("read from the relay");
            assert!(n > 0, "EOF before a close frame");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("a close frame within the deadline")
}

/// Reads `ws` to its end (answering a close, as a client library does).
async fn drain_to_end(ws: &mut Ws) {
    tokio::time::timeout(WITHIN, async { while let Some(Ok(_)) = ws.next().await {} })
        .await
        .expect("the socket ends");
}

/// The process's resident set (VmRSS) in bytes; the in-process relay shares it.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

// ---------------------------------------------------------------------------------------------
// Metrics of an exchange, and the close lines
// ---------------------------------------------------------------------------------------------

/// A daemon control, data socket and app client pair up, exchange 10 messages each way of
/// known sizes, and close. The scrape after shows exactly those messages, sockets and
/// closes, and every gauge back at 0; each socket logged one close line with its traffic.
#[tokio::test]
async fn a_scripted_exchange_is_counted_exactly_and_every_gauge_returns_to_zero() {
    capture_logs();
    let relay = TestRelay::start().await;
    let before = metrics(&relay).await;
    let s = unique_sid();
    let (mut c, mut k, mut d) = relay.paired(&s, "conn_metrics_x").await;
    let (mut sent_k, mut sent_d) = (0usize, 0usize);
    for i in 0..10 {
        let up = vec![i as u8; 100 + i];
        let down = vec![0xd0; 1000 + 10 * i];
        send_binary(&mut k, &up).await;
        send_binary(&mut d, &down).await;
        assert_eq!(recv(&mut d).await, Message::binary(up.clone()));
        assert_eq!(recv(&mut k).await, Message::binary(down.clone()));
        sent_k += up.len();
        sent_d += down.len();
    }
    // While the pair is open: one session, three sockets, nothing queued or reserved.
    let open = metrics(&relay).await;
    assert_eq!(value(&open, "paseo_relay_active_sessions"), 1.0);
    for kind in ["control", "data", "client"] {
        let series = format!("paseo_relay_active_websockets{{kind=\"{kind}\"}}");
        assert_eq!(value(&open, &series), 1.0, "{series}");
    }
    // The app closes 1000 (the relay echoes it); the data socket is closed 1001 `Client
    // disconnected` (the client library answers); the daemon closes its control 1000.
    send_close(&mut k, 1000, "bye").await;
    assert_eq!(recv_close(&mut k).await, (1000, "bye".to_string()));
    drain_to_end(&mut k).await;
    assert_eq!(
        recv_close(&mut d).await,
        (1001, "Client disconnected".to_string())
    );
    drain_to_end(&mut d).await;
    assert_eq!(
        recv_text(&mut c).await,
        r#"{"type":"disconnected","connectionId":"conn_metrics_x"}"#
    );
    send_close(&mut c, 1000, "").await;
    assert_eq!(recv_close(&mut c).await, (1000, String::new()));
    drain_to_end(&mut c).await;
    no_sockets_left(&relay).await;

    let after = metrics(&relay).await;
    let delta = |series: &str| value(&after, series) - value(&before, series);
    let bytes = (sent_k + sent_d) as f64;
    assert_eq!(delta("paseo_relay_frames_forwarded_total"), 20.0);
    assert_eq!(delta("paseo_relay_bytes_forwarded_total"), bytes);
    assert_eq!(delta("paseo_relay_frame_size_bytes_count"), 20.0);
    assert_eq!(delta("paseo_relay_frame_size_bytes_sum"), bytes);
    // 100-109 B up (le 256), 1000-1090 B down (le 1024 for 1000-1020, le 4096 after).
    assert_eq!(delta("paseo_relay_frame_size_bytes_bucket{le=\"64\"}"), 0.0);
    assert_eq!(
        delta("paseo_relay_frame_size_bytes_bucket{le=\"256\"}"),
        10.0
    );
    assert_eq!(
        delta("paseo_relay_frame_size_bytes_bucket{le=\"1024\"}"),
        13.0
    );
    assert_eq!(
        delta("paseo_relay_frame_size_bytes_bucket{le=\"4096\"}"),
        20.0
    );
    for kind in ["control", "data", "client"] {
        let series = format!("paseo_relay_websockets_accepted_total{{kind=\"{kind}\"}}");
        assert_eq!(delta(&series), 1.0, "{series}");
    }
    assert_eq!(
        delta("paseo_relay_websockets_accepted_total{kind=\"v1\"}"),
        0.0
    );
    // Echoes of the app's and the daemon's 1000, and the relay's own 1001 to the data socket.
    assert_eq!(delta("paseo_relay_closes_total{code=\"1000\"}"), 2.0);
    assert_eq!(delta("paseo_relay_closes_total{code=\"1001\"}"), 1.0);
    assert_eq!(delta("paseo_relay_closes_total{code=\"1013\"}"), 0.0);
    assert_eq!(delta("paseo_relay_slow_consumer_disconnects_total"), 0.0);
    assert_eq!(delta("paseo_relay_ping_timeouts_total"), 0.0);
    assert_eq!(
        delta("paseo_relay_send_wait_seconds_count"),
        0.0,
        "no sender waited"
    );
    let gauges: Vec<&str> = after
        .lines()
        .filter(|l| l.starts_with("paseo_relay_active_"))
        .collect();
    assert_eq!(gauges.len(), 5, "{gauges:?}");
    for line in gauges {
        assert!(line.ends_with(" 0"), "{line}");
    }
    for series in [
        "paseo_relay_outbound_queued_bytes",
        "paseo_relay_ingress_reserved_bytes",
        "paseo_relay_pending_bytes",
    ] {
        assert_eq!(value(&after, series), 0.0, "{series}");
    }

    // One close line per socket, with its fields.
    let lines = close_lines(&s[..8]);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let line = |kind: &str| {
        let l = lines.iter().find(|l| l.fields["kind"] == kind);
        l.unwrap_or_else(|| panic!("no {kind} line in {lines:#?}"))
            .clone()
    };
    let client = line("client");
    let prefix = format!("session {}… (V2) client conn_met… closed: ", &s[..8]);
    assert_eq!(
        client.message,
        format!(
            "{prefix}sent 1000 \"bye\", received 1000 \"bye\", {} ms, in 10 msgs {sent_k} B, \
             out 10 msgs {sent_d} B",
            client.fields["duration_ms"]
        )
    );
    let want: BTreeMap<String, String> = [
        ("kind", "client".to_string()),
        ("version", "v2".to_string()),
        ("server_id", format!("{}…", &s[..8])),
        ("connection_id", "conn_met…".to_string()),
        ("close_sent_code", "1000".to_string()),
        ("close_sent_reason", "bye".to_string()),
        ("close_received_code", "1000".to_string()),
        ("close_received_reason", "bye".to_string()),
        ("duration_ms", client.fields["duration_ms"].clone()),
        ("in_msgs", "10".to_string()),
        ("in_bytes", sent_k.to_string()),
        ("out_msgs", "10".to_string()),
        ("out_bytes", sent_d.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(client.fields, want);
    let data = line("data");
    assert!(
        data.message.contains(
            "data conn_met… closed: sent 1001 \"Client disconnected\", \
             received 1001 \"Client disconnected\", "
        ),
        "{}",
        data.message
    );
    assert!(data
        .message
        .ends_with(&format!("in 10 msgs {sent_d} B, out 10 msgs {sent_k} B")));
    let control = line("control");
    // The control got sync, connected and disconnected (3 messages) and sent nothing.
    assert!(
        control
            .message
            .contains("control closed: sent 1000 \"\", received 1000 \"\", "),
        "{}",
        control.message
    );
    assert!(
        control.message.contains(", in 0 msgs 0 B, out 3 msgs "),
        "{}",
        control.message
    );
    // A null value (a control has no connectionId) reads `None` as text.
    assert_eq!(control.fields["connection_id"], "None");
}

/// A destination that stops reading makes its sender wait for room (observed in
/// `send_wait`), is closed 1013 `Slow consumer`, and is counted once as a slow consumer
/// although its writer then stalls too; the queued bytes it held go back.
#[tokio::test]
async fn a_slow_consumer_is_counted_once_and_its_sender_waits_are_observed() {
    capture_logs();
    let relay = TestRelay::start_with(RelayConf {
        slow_consumer_timeout_ms: 1000,
        outbound_queue_bytes: 64 << 10,
        ..RelayConf::default()
    })
    .await;
    let before = metrics(&relay).await;
    let s = sid("slow");
    let (mut c, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, r#"{"type":"sync","connectionIds":[]}"#);
    let k = relay.client(&s, "x").await;
    assert_eq!(
        recv_text(&mut c).await,
        r#"{"type":"connected","connectionId":"x"}"#
    );
    // A data socket with a tiny receive window that never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(relay.addr).await.unwrap();
    let (d, _) = tokio_tungstenite::client_async(
        format!(
            "ws://{}/ws?serverId={s}&role=server&v=2&connectionId=x",
            relay.addr
        ),
        tcp,
    )
    .await
    .expect("data socket");
    let chunk = Message::binary(vec![0x5a; 32 << 10]);
    let (mut k_tx, mut k_rx) = k.split();
    let flood = tokio::spawn(async move {
        loop {
            if k_tx.send(chunk.clone()).await.is_err() {
                return;
            }
        }
    });
    // The client hears the cascade once the stuck data socket is gone: 1012.
    let close = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match k_rx.next().await {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string())
                }
                Some(Ok(_)) => continue,
                other => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("the client is closed once its data socket is dropped");
    assert_eq!(close, (1012, "Server disconnected".to_string()));
    flood.abort();
    drop((d, k_rx, c));
    no_sockets_left(&relay).await;
    let after = metrics(&relay).await;
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(delta("paseo_relay_slow_consumer_disconnects_total"), 1.0);
    assert!(
        delta("paseo_relay_send_wait_seconds_count") >= 1.0,
        "{after}"
    );
    assert!(
        delta("paseo_relay_send_wait_seconds_sum") >= 0.9,
        "the sender waited the whole second at least once"
    );
    assert_eq!(delta("paseo_relay_closes_total{code=\"1012\"}"), 1.0);
    settles_at(&relay, "paseo_relay_outbound_queued_bytes", 0.0).await;
}

// ---------------------------------------------------------------------------------------------
// The ingress budget
// ---------------------------------------------------------------------------------------------

const FRAGMENT: u64 = 3 << 19; // 1.5 MiB

/// Sends the first fragment (FIN=0, 1.5 MiB of zeros) of a binary message and nothing
/// more; the write runs on its own so a relay that stops reading does not block the test.
fn send_unfinished_fragment(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        if wr
            .write_all(&zero_key_header(false, 0x2, FRAGMENT))
            .await
            .is_err()
        {
            return;
        }
        let mut left = FRAGMENT as usize;
        while left > 0 {
            let n = left.min(ZEROS.len());
            if wr.write_all(&ZEROS[..n]).await.is_err() {
                return;
            }
            left -= n;
        }
        // Keep the write half open (no FIN) until the test drops the task.
        std::future::pending::<()>().await;
    })
}

/// Issue 9 "Ingress budget": with a 4 MiB budget, two unfinished 1.5 MiB messages fit and
/// keep their reservation; 18 more sockets trying the same are not read, and after
/// `slow_consumer_timeout_ms` (1 s) each is closed 1013 `Relay ingress capacity`. An
/// unrelated pair keeps relaying both ways meanwhile; the reserved bytes show in the scrape
/// and go back to 0 when the sockets close; the process's memory stays bounded.
#[tokio::test]
async fn the_ingress_budget_bounds_partly_received_messages() {
    capture_logs();
    let relay = TestRelay::start_with(RelayConf {
        ingress_budget_bytes: 4 << 20,
        slow_consumer_timeout_ms: 1000,
        ..RelayConf::default()
    })
    .await;
    let s = sid("ingress");
    let (_c, mut k0, mut d0) = relay.paired(&s, "bystander").await;
    assert_relays_both_ways(&mut k0, &mut d0).await;
    let rss_before = rss_bytes();

    // Two fit: each holds 1.5 MiB.
    let mut holders = Vec::new();
    for i in 0..2 {
        let tcp = raw_client(&relay, &s, &format!("holder{i}")).await;
        let (rd, wr) = tcp.into_split();
        holders.push((rd, send_unfinished_fragment(wr)));
        let want = (i + 1) as usize * FRAGMENT as usize;
        let deadline = Instant::now() + Duration::from_secs(5);
        while relay.hub.ingress().reserved() != want {
            assert!(
                Instant::now() < deadline,
                "reserved {}",
                relay.hub.ingress().reserved()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // 18 more do not fit: each waits, then is closed 1013.
    let started = Instant::now();
    let mut waiting = Vec::new();
    for i in 0..18 {
        let tcp = raw_client(&relay, &s, &format!("waiter{i}")).await;
        let (rd, wr) = tcp.into_split();
        waiting.push((rd, send_unfinished_fragment(wr)));
    }
    // Meanwhile the unrelated pair relays as usual, and the budget shows what is held.
    for _ in 0..5 {
        assert_relays_both_ways(&mut k0, &mut d0).await;
    }
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "checked while they wait"
    );
    let scrape = metrics(&relay).await;
    assert_eq!(
        value(&scrape, "paseo_relay_ingress_reserved_bytes"),
        (2 * FRAGMENT) as f64
    );
    let closes: Vec<_> = futures_util::future::join_all(
        waiting
            .iter_mut()
            .map(|(rd, _)| read_close(rd, Duration::from_secs(10))),
    )
    .await;
    let waited = started.elapsed();
    for close in &closes {
        assert_eq!(close, &(1013, "Relay ingress capacity".to_string()));
    }
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_secs(5),
        "closed after about 1 s: {waited:?}"
    );
    let rss_growth = rss_bytes().saturating_sub(rss_before);
    // Unbounded, 20 sockets x 1.5 MiB would be held (30 MiB); bounded, 3 MiB and small
    // per-socket read buffers.
    assert!(
        rss_growth < 12 << 20,
        "RSS grew {rss_growth} bytes with 20 unfinished 1.5 MiB messages attempted"
    );
    // The holders keep their reservation, and the pair still relays.
    assert_eq!(relay.hub.ingress().reserved(), 2 * FRAGMENT as usize);
    assert_relays_both_ways(&mut k0, &mut d0).await;
    let scrape = metrics(&relay).await;
    assert_eq!(
        value(&scrape, "paseo_relay_closes_total{code=\"1013\"}"),
        18.0
    );
    assert_eq!(
        value(&scrape, "paseo_relay_slow_consumer_disconnects_total"),
        0.0
    );

    // Closing the holders gives their reservation back.
    for (rd, writer) in waiting.into_iter().chain(holders) {
        writer.abort();
        drop(rd);
    }
    settles_at(&relay, "paseo_relay_ingress_reserved_bytes", 0.0).await;
    assert_eq!(relay.hub.ingress().reserved(), 0);
    assert_relays_both_ways(&mut k0, &mut d0).await;
}

/// The bytes a client pipelines behind its request head go through the budget like the
/// rest: an unfinished fragment sent with the upgrade request is reserved too.
#[tokio::test]
async fn pipelined_bytes_are_reserved_like_the_rest() {
    capture_logs();
    let relay = TestRelay::start().await;
    let s = sid("preread");
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    let mut req = format!(
        "GET /ws?serverId={s}&role=client&v=2&connectionId=p HTTP/1.1\r\n\
         Host: relay\r\n{UPGRADE_HEADERS}\r\n"
    )
    .into_bytes();
    req.extend(zero_key_header(false, 0x2, 5000));
    req.extend_from_slice(&[0; 100]);
    tcp.write_all(&req).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay.hub.ingress().reserved() != 5000 {
        assert!(
            Instant::now() < deadline,
            "reserved {}",
            relay.hub.ingress().reserved()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(tcp);
    no_sockets_left(&relay).await;
    settles_at(&relay, "paseo_relay_ingress_reserved_bytes", 0.0).await;
}
