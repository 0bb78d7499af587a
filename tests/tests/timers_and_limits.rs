//! Timers and limits: relay-protocol.md §9 cases 28-29 (control liveness), 57-62 (nudge and
//! reset, §3.8), 63-67 (robustness and limits, §0 "Frames and limits", "Liveness", §3.11),
//! plus the relay keepalive (RFC 6455 pings, ping timeout) and the process-wide buffer budget.
//!
//! The nudge tests use short timers (nudge 1 s, reset 2 s) except case 57, which runs once
//! at the default 10 s / 15 s. Timing windows: an event is not accepted more than
//! [`EARLY`] before its nominal time (measured from just before the triggering connect) and
//! must arrive within [`LATE`] after it (measured from just after the connect).
//!
//! The two long tests (cases 29 and 63, 75 s and 120 s) are named `idle_*` so that they sort
//! first and start at once: the test harness runs as many tests at a time as there are
//! cores, and everything else fits beside them.

use futures_util::{SinkExt, StreamExt};
use relay_module::RelayConf;
use relay_tests::*;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

/// The §9 reception deadline ("within 1 s").
const SPEC_1S: Duration = Duration::from_secs(1);
/// How much earlier than its nominal time a timed event may be observed.
const EARLY: Duration = Duration::from_millis(300);
/// How much later than its nominal time a timed event may be observed.
const LATE: Duration = Duration::from_secs(1);
/// Short nudge for the scaled nudge/reset cases.
const NUDGE: Duration = Duration::from_millis(1000);
/// Short reset for the scaled nudge/reset cases.
const RESET: Duration = Duration::from_millis(2000);

const SYNC_EMPTY: &str = r#"{"type":"sync","connectionIds":[]}"#;
const SYNC_A: &str = r#"{"type":"sync","connectionIds":["a"]}"#;
const CONNECTED_A: &str = r#"{"type":"connected","connectionId":"a"}"#;
const CONNECTED_B: &str = r#"{"type":"connected","connectionId":"b"}"#;
const DISCONNECTED_A: &str = r#"{"type":"disconnected","connectionId":"a"}"#;
const DISCONNECTED_B: &str = r#"{"type":"disconnected","connectionId":"b"}"#;
const JSON_PING: &str = r#"{"type":"ping"}"#;

fn short_timers() -> RelayConf {
    RelayConf {
        nudge_after_ms: NUDGE.as_millis() as u64,
        reset_after_ms: RESET.as_millis() as u64,
        ..RelayConf::default()
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A short description of a message for panic texts (never the whole payload).
fn describe(m: &Message) -> String {
    match m {
        Message::Text(t) => {
            let s = t.as_str();
            let head: String = s.chars().take(80).collect();
            format!("text({} bytes) {head:?}", s.len())
        }
        Message::Binary(b) => format!("binary({} bytes) {:02x?}", b.len(), &b[..b.len().min(16)]),
        Message::Ping(p) => format!("ping {p:?}"),
        Message::Pong(p) => format!("pong {p:?}"),
        Message::Close(c) => format!("close {c:?}"),
        Message::Frame(f) => format!("frame {:?}", f.header()),
    }
}

fn describe_next(m: &Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> String {
    match m {
        Some(Ok(m)) => describe(m),
        Some(Err(e)) => format!("error {e}"),
        None => "end of stream".to_string(),
    }
}

/// The next data or close message before `deadline`, skipping RFC 6455 pings (which must be
/// empty, spec §0) and pongs; `None` if nothing arrived by then.
async fn next_before<S>(
    ws: &mut WebSocketStream<S>,
    deadline: Instant,
    what: &str,
) -> Option<Message>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Ping(p)))) => {
                assert!(p.is_empty(), "{what}: relay ping carries data {p:?}");
            }
            Ok(Some(Ok(Message::Pong(_)))) => {}
            Ok(Some(Ok(m))) => return Some(m),
            Ok(other) => panic!("{what}: socket failed: {}", describe_next(&other)),
        }
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// Asserts that the next message is exactly the text `want` and that it arrives inside
/// `[lo, hi]`. Returns the arrival instant.
async fn expect_text_between(
    ws: &mut Ws,
    want: &str,
    lo: Instant,
    hi: Instant,
    what: &str,
) -> Instant {
    let got = next_before(ws, hi, what).await;
    let at = Instant::now();
    match got {
        Some(Message::Text(t)) => assert_eq!(t.as_str(), want, "{what}"),
        Some(m) => panic!("{what}: expected text {want}, got {}", describe(&m)),
        None => panic!("{what}: expected text {want} by the deadline, got nothing"),
    }
    assert!(
        at >= lo,
        "{what}: {want} arrived {} ms too early",
        ms(lo - at)
    );
    at
}

/// Asserts that the next message is a close frame `code`/`reason` arriving inside `[lo, hi]`.
async fn expect_close_between(
    ws: &mut Ws,
    code: u16,
    reason: &str,
    lo: Instant,
    hi: Instant,
    what: &str,
) -> Instant {
    let got = next_before(ws, hi, what).await;
    let at = Instant::now();
    match got {
        Some(Message::Close(Some(f))) => {
            assert_eq!(
                (u16::from(f.code), f.reason.as_str()),
                (code, reason),
                "{what}"
            )
        }
        Some(m) => panic!(
            "{what}: expected close {code} {reason:?}, got {}",
            describe(&m)
        ),
        None => panic!("{what}: expected close {code} {reason:?} by the deadline, got nothing"),
    }
    assert!(
        at >= lo,
        "{what}: close {code} arrived {} ms too early",
        ms(lo - at)
    );
    // Let the client library send its close reply so the relay finishes promptly.
    let _ = timeout(WITHIN, ws.next()).await;
    at
}

/// Asserts that no data or close message arrives before `deadline` (pings are skipped).
async fn silent_until(ws: &mut Ws, deadline: Instant, what: &str) {
    if let Some(m) = next_before(ws, deadline, what).await {
        panic!("{what}: expected silence, got {}", describe(&m));
    }
}

/// Reads until `deadline`; only RFC 6455 pings with an empty payload may arrive. Returns how
/// many arrived. Reading keeps the client library answering them with pongs.
async fn only_pings_until(ws: &mut Ws, deadline: Instant, what: &str) -> usize {
    let mut pings = 0;
    loop {
        match timeout_at(deadline, ws.next()).await {
            Err(_) => return pings,
            Ok(Some(Ok(Message::Ping(p)))) => {
                assert!(p.is_empty(), "{what}: relay ping carries data {p:?}");
                pings += 1;
            }
            Ok(other) => panic!(
                "{what}: expected only relay pings, got {}",
                describe_next(&other)
            ),
        }
    }
}

/// Checks a control pong: exactly the keys `type` and `ts`, `ts` an integer within ±5 s of
/// wall-clock milliseconds (case 24).
fn assert_pong(text: &str, what: &str) {
    let v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: {text}: {e}"));
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object: {text}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["ts", "type"], "{what}: {text}");
    assert_eq!(obj["type"], "pong", "{what}: {text}");
    let ts = obj["ts"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: ts is not an integer: {text}"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i128;
    assert!(
        (ts as i128 - now).abs() <= 5_000,
        "{what}: ts {ts} is not within 5 s of now {now}"
    );
    assert!(
        text.starts_with(r#"{"type":"pong","ts":"#),
        "{what}: compact JSON with type first: {text}"
    );
}

/// Sends `{"type":"ping"}` on a control socket and asserts that the next message is a pong
/// arriving within 1 s. Returns the round-trip time.
async fn json_ping(c: &mut Ws, what: &str) -> Duration {
    let t = Instant::now();
    send_text(c, JSON_PING).await;
    match next_before(c, t + SPEC_1S, what).await {
        Some(Message::Text(p)) => assert_pong(p.as_str(), what),
        Some(m) => panic!("{what}: expected a pong, got {}", describe(&m)),
        None => panic!("{what}: no pong within 1 s"),
    }
    t.elapsed()
}

/// Receives one data message within `within` and returns it (pings skipped).
async fn recv_data(ws: &mut Ws, within: Duration, what: &str) -> Message {
    match next_before(ws, Instant::now() + within, what).await {
        Some(m @ (Message::Text(_) | Message::Binary(_))) => m,
        Some(m) => panic!("{what}: expected a data message, got {}", describe(&m)),
        None => panic!("{what}: no message within {within:?}"),
    }
}

/// Asserts two byte strings are equal without printing megabytes on failure.
fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: {} bytes received, {} expected; first difference at {first:?}",
            got.len(),
            want.len()
        );
    }
}

/// `len` bytes of a position-dependent pattern.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 131 + seed as usize) % 251) as u8)
        .collect()
}

/// Valid UTF-8 text of exactly `len` bytes, with multi-byte characters throughout.
fn big_text(len: usize) -> String {
    let chunk = "Paseo relay é € 😀 0123456789 abcdefghijklmnopqrstuvwxyz\n";
    let mut s = String::with_capacity(len);
    while s.len() + chunk.len() <= len {
        s.push_str(chunk);
    }
    while s.len() < len {
        s.push('x');
    }
    assert_eq!(s.len(), len);
    s
}

/// Client config able to receive messages up to 64 MiB in one frame (the tungstenite
/// defaults stop at 16 MiB frames).
fn big_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_frame_size(Some(64 << 20))
        .max_message_size(Some(64 << 20))
}

async fn big_ws(relay: &TestRelay, query: &str) -> Ws {
    let (ws, resp) =
        tokio_tungstenite::connect_async_with_config(relay.url(query), Some(big_config()), false)
            .await
            .unwrap_or_else(|e| panic!("connect {query}: {e}"));
    assert_eq!(resp.status(), 101);
    ws
}

fn client_q(s: &str, x: &str) -> String {
    format!("serverId={s}&role=client&v=2&connectionId={x}")
}

fn data_q(s: &str, x: &str) -> String {
    format!("serverId={s}&role=server&v=2&connectionId={x}")
}

// --- A raw RFC 6455 client that never answers anything on its own ----------------------

/// Mask key of the raw client's frames.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
/// First header byte of a final frame: text, binary, close, ping, pong.
const FIN_TEXT: u8 = 0x81;
const FIN_BINARY: u8 = 0x82;
const FIN_CLOSE: u8 = 0x88;
const FIN_PING: u8 = 0x89;

/// Read side of a raw WebSocket client: parses the relay's (unmasked) frames.
struct RawReader {
    rd: OwnedReadHalf,
    buf: Vec<u8>,
}

/// Write side of a raw WebSocket client: writes masked frames.
struct RawWriter {
    wr: OwnedWriteHalf,
}

/// Opens `/ws?query` by hand and checks the 101; bytes behind the head are kept.
async fn raw_open(relay: &TestRelay, query: &str) -> (RawReader, RawWriter) {
    let tcp = TcpStream::connect(relay.addr).await.expect("connect");
    let (mut rd, mut wr) = tcp.into_split();
    wr.write_all(
        format!("GET /ws?{query} HTTP/1.1\r\nHost: relay\r\n{UPGRADE_HEADERS}\r\n").as_bytes(),
    )
    .await
    .expect("write handshake");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = timeout(WITHIN, rd.read(&mut chunk))
            .await
            .expect("101 within the deadline")
            .expect("read 101");
        assert!(n > 0, "connection closed before the 101");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    buf.drain(..head_end);
    (RawReader { rd, buf }, RawWriter { wr })
}

impl RawReader {
    /// The next frame as (first header byte, payload), or `None` when the connection ended
    /// (EOF or reset).
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (b0, b1) = (self.buf[0], self.buf[1]);
                assert_eq!(b1 & 0x80, 0, "server frames are never masked");
                let (len, header) = match b1 & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if header > 0 && self.buf.len() >= header + len {
                    let payload = self.buf[header..header + len].to_vec();
                    self.buf.drain(..header + len);
                    return Some((b0, payload));
                }
            }
            let mut chunk = vec![0u8; 64 << 10];
            match self.rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next frame that is not an (empty) relay ping, before `deadline`; counts the
    /// pings it skipped. Panics on a non-empty ping.
    async fn frame_skipping_pings(
        &mut self,
        deadline: Instant,
        pings: &mut usize,
        what: &str,
    ) -> Option<Option<(u8, Vec<u8>)>> {
        loop {
            match timeout_at(deadline, self.frame()).await {
                Err(_) => return None,
                Ok(Some((FIN_PING, p))) => {
                    assert!(p.is_empty(), "{what}: relay ping carries data {p:?}");
                    *pings += 1;
                }
                Ok(other) => return Some(other),
            }
        }
    }
}

impl RawWriter {
    /// Writes a masked frame header for a payload of `len` bytes.
    async fn header(&mut self, b0: u8, len: u64) {
        let mut h = vec![b0];
        if len < 126 {
            h.push(0x80 | len as u8);
        } else if len <= u16::MAX as u64 {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            h.push(0x80 | 127);
            h.extend_from_slice(&len.to_be_bytes());
        }
        h.extend_from_slice(&MASK);
        self.wr.write_all(&h).await.expect("write frame header");
    }

    /// Writes a whole masked frame.
    async fn frame(&mut self, b0: u8, payload: &[u8]) {
        self.header(b0, payload.len() as u64).await;
        let masked: Vec<u8> = payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ MASK[i % 4])
            .collect();
        self.wr
            .write_all(&masked)
            .await
            .expect("write frame payload");
    }
}

/// Close payload: code (big endian) then reason.
fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

// ---------------------------------------------------------------------------------------
// Cases 29 and 63: long idle periods (named to start first)
// ---------------------------------------------------------------------------------------

/// Case 29: a control that sends only an RFC 6455 ping every 10 s for 75 s (default
/// timers) is not closed; every ping is answered with a pong carrying its payload.
#[tokio::test]
async fn idle_case29_control_with_only_protocol_pings_stays_open_75s() {
    let relay = TestRelay::start().await;
    let s = sid("c29");
    let (mut c, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, SYNC_EMPTY);
    let start = Instant::now();
    let mut relay_pings = 0;
    for i in 0..8u32 {
        let tick = start + Duration::from_secs(10 * i as u64);
        relay_pings += only_pings_until(&mut c, tick, "case 29 between pings").await;
        let payload = format!("k{i}");
        let sent = Instant::now();
        c.send(Message::Ping(payload.clone().into_bytes().into()))
            .await
            .expect("send ping");
        loop {
            match timeout_at(sent + SPEC_1S, c.next()).await {
                Err(_) => panic!("case 29: no pong for ping {i} within 1 s"),
                Ok(Some(Ok(Message::Ping(p)))) => {
                    assert!(p.is_empty(), "relay ping carries data {p:?}");
                    relay_pings += 1;
                }
                Ok(Some(Ok(Message::Pong(p)))) => {
                    assert_eq!(&p[..], payload.as_bytes(), "case 29: pong payload");
                    break;
                }
                Ok(other) => panic!(
                    "case 29: control got {} after {} s",
                    describe_next(&other),
                    start.elapsed().as_secs()
                ),
            }
        }
    }
    relay_pings += only_pings_until(&mut c, start + Duration::from_secs(75), "case 29 end").await;
    // Still open and serving: a JSON ping is answered.
    json_ping(&mut c, "case 29 after 75 s").await;
    // Default interval 30 s: the relay pinged at about 30 s and 60 s.
    assert!(relay_pings >= 2, "relay pings seen in 75 s: {relay_pings}");
}

/// Case 63: C, K(a) and D(a) stay silent, sending no pings of their own, for 120 s at the
/// default timers. The client library answers the relay's pings while the sockets are read.
/// Nothing is closed, the relay pinged each socket (empty payload) at least 3 times, and
/// all paths still work afterwards.
#[tokio::test]
async fn idle_case63_silent_sockets_are_never_closed_120s() {
    let relay = TestRelay::start().await;
    silent_pair_stays_open(&relay, "c63", Duration::from_secs(120), 3..=5).await;
}

/// Opens a paired C, K(a), D(a); all three stay silent (only reading, so the client library
/// answers the relay's pings) for `period`. Each must receive a number of relay pings in
/// `pings`, nothing else, and all paths still work afterwards.
async fn silent_pair_stays_open(
    relay: &TestRelay,
    name: &str,
    period: Duration,
    pings: std::ops::RangeInclusive<usize>,
) {
    let s = sid(name);
    let (mut c, mut k, mut d) = relay.paired(&s, "a").await;
    let end = Instant::now() + period;
    let (pc, pk, pd) = tokio::join!(
        only_pings_until(&mut c, end, "C"),
        only_pings_until(&mut k, end, "K"),
        only_pings_until(&mut d, end, "D"),
    );
    println!("{name}: relay pings in {period:?}: C {pc}, K {pk}, D {pd}");
    for (socket, n) in [("C", pc), ("K", pk), ("D", pd)] {
        assert!(
            pings.contains(&n),
            "{name}: {socket} received {n} relay pings in {period:?}, expected {pings:?}"
        );
    }
    assert_relays_both_ways(&mut k, &mut d).await;
    json_ping(&mut c, name).await;
}

// ---------------------------------------------------------------------------------------
// Keepalive: relay pings, ping timeout, case 28
// ---------------------------------------------------------------------------------------

/// The relay pings every socket with empty RFC 6455 pings every `ping_interval`; sockets
/// that answer (the client library does while read) stay open well past `ping_timeout`.
#[tokio::test]
async fn keepalive_relay_pings_are_empty_and_answered_sockets_stay_open() {
    let relay = TestRelay::start_with(RelayConf {
        ping_interval_ms: 300,
        ping_timeout_ms: 1000,
        ..RelayConf::default()
    })
    .await;
    // 3 s = 3 ping timeouts, 10 ping intervals.
    silent_pair_stays_open(&relay, "ka", Duration::from_secs(3), 5..=11).await;
}

/// A raw client that never answers the relay's pings and sends nothing is closed 1001
/// `Ping timeout` after `ping_timeout` (half-open detection), then dropped after the close
/// grace; the cascade of the last client leaving follows. A raw client that never answers
/// pings but sends data frames stays open: any frame counts as life.
#[tokio::test]
async fn keepalive_unanswered_pings_close_1001_ping_timeout() {
    let relay = TestRelay::start_with(RelayConf {
        ping_interval_ms: 300,
        ping_timeout_ms: 1000,
        close_grace_ms: 500,
        ..RelayConf::default()
    })
    .await;
    let s = sid("pto");
    let (mut c, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, SYNC_EMPTY);
    let opened_lo = Instant::now();
    let (mut k1r, _k1w) = raw_open(&relay, &client_q(&s, "a")).await;
    let opened_hi = Instant::now();
    let (mut k2r, mut k2w) = raw_open(&relay, &client_q(&s, "b")).await;
    let mut d = relay.data(&s, "b").await;
    assert_eq!(recv_text(&mut c).await, CONNECTED_A);
    assert_eq!(recv_text(&mut c).await, CONNECTED_B);
    let end = opened_hi + Duration::from_secs(3);

    let silent_client = async {
        let mut pings = 0;
        let close = k1r
            .frame_skipping_pings(
                opened_hi + Duration::from_millis(1000) + LATE,
                &mut pings,
                "K1",
            )
            .await;
        let at = Instant::now();
        let (b0, payload) = close
            .expect("K1: no close within ping_timeout + 1 s")
            .expect("K1: connection dropped without a close frame");
        assert_eq!(
            b0, FIN_CLOSE,
            "K1: expected a close frame, got {b0:#04x} {payload:?}"
        );
        assert_eq!(
            payload,
            close_payload(1001, "Ping timeout"),
            "K1: close payload {:?}",
            String::from_utf8_lossy(&payload)
        );
        assert!(
            at >= opened_lo + Duration::from_millis(1000) - EARLY,
            "K1 closed {} ms after open",
            ms(at - opened_lo)
        );
        assert!(pings >= 2, "K1 saw {pings} pings before the timeout");
        // No reply from us: the relay drops the connection after the 500 ms close grace.
        let after = timeout(Duration::from_millis(500) + LATE, k1r.frame())
            .await
            .expect("K1: connection still open 1.5 s after the relay's close");
        assert!(after.is_none(), "K1: frame after close: {after:?}");
        println!(
            "ping timeout: K1 closed {} ms after open ({pings} pings), dropped {} ms later",
            ms(at - opened_lo),
            ms(at.elapsed())
        );
    };
    let chatty_client_writes = async {
        let mut t = Instant::now();
        while t < end {
            k2w.frame(FIN_TEXT, b"tick").await;
            t += Duration::from_millis(250);
            sleep_until(t).await;
        }
    };
    let chatty_client_reads = async {
        let mut pings = 0;
        if let Some(f) = k2r.frame_skipping_pings(end, &mut pings, "K2").await {
            panic!("K2 (sends data, never pongs) got {f:?}");
        }
        assert!(pings >= 5, "K2 saw {pings} relay pings in 3 s");
    };
    let data_reads = async {
        let mut ticks = 0;
        while let Some(m) = next_before(&mut d, end, "D(b)").await {
            assert_eq!(m, Message::text("tick"), "D(b)");
            ticks += 1;
        }
        assert!(ticks >= 8, "D(b) received {ticks} ticks");
    };
    let control_reads = async {
        let lo = opened_lo + Duration::from_millis(1000) - EARLY;
        expect_text_between(&mut c, DISCONNECTED_A, lo, end, "C after K1's timeout").await;
        silent_until(&mut c, end, "C").await;
    };
    tokio::join!(
        silent_client,
        chatty_client_writes,
        chatty_client_reads,
        data_reads,
        control_reads
    );
    // K2 is alive both ways.
    k2w.frame(FIN_TEXT, b"still").await;
    assert_eq!(recv_text(&mut d).await, "still");
    send_text(&mut d, "back").await;
    let mut pings = 0;
    let f = k2r
        .frame_skipping_pings(Instant::now() + WITHIN, &mut pings, "K2")
        .await;
    assert_eq!(f, Some(Some((FIN_TEXT, b"back".to_vec()))));
}

/// Liveness counts every frame (spec §0 "nothing (any frame, pong included) has arrived"):
/// a raw client that never answers pings but sends one message as fragments, a frame every
/// 200 ms for 2.4 s (more than twice the 1 s ping timeout), is not closed, and D(a)
/// receives the reassembled message.
#[tokio::test]
async fn keepalive_fragments_of_a_slow_message_count_as_life() {
    let relay = TestRelay::start_with(RelayConf {
        ping_interval_ms: 300,
        ping_timeout_ms: 1000,
        ..RelayConf::default()
    })
    .await;
    let s = sid("frag");
    let (mut kr, mut kw) = raw_open(&relay, &client_q(&s, "a")).await;
    let mut d = relay.data(&s, "a").await;
    let end = Instant::now() + Duration::from_millis(2400);
    let write = async {
        let mut whole = String::new();
        let mut t = Instant::now();
        let mut i = 0;
        while t < end {
            let part = format!("part{i};");
            // First frame: text, not final; then continuation frames, not final.
            kw.frame(if i == 0 { 0x01 } else { 0x00 }, part.as_bytes())
                .await;
            whole.push_str(&part);
            i += 1;
            t += Duration::from_millis(200);
            sleep_until(t).await;
        }
        kw.frame(0x80, b"end").await;
        whole.push_str("end");
        whole
    };
    let read = async {
        let mut pings = 0;
        if let Some(f) = kr.frame_skipping_pings(end, &mut pings, "K").await {
            panic!(
                "K (sending fragments every 200 ms) got {:?}",
                f.map(|(b0, p)| (b0, String::from_utf8_lossy(&p).to_string()))
            );
        }
        pings
    };
    // D is read meanwhile too, so that its client library answers the relay's pings.
    let dread = recv_within(&mut d, Duration::from_secs(6));
    let (whole, pings, got) = tokio::join!(write, read, dread);
    assert!(pings >= 4, "K saw {pings} relay pings");
    assert_eq!(got, Message::text(whole));
    kw.frame(FIN_TEXT, b"next").await;
    assert_eq!(recv_text(&mut d).await, "next");
}

/// Case 28: an RFC 6455 ping `p1` is answered with a pong `p1` within 1 s, on the control
/// and on data and client sockets; also with the largest control payload (125 bytes).
#[tokio::test]
async fn keepalive_case28_protocol_ping_answered_on_every_socket() {
    let relay = TestRelay::start().await;
    let s = sid("c28");
    let (mut c, mut k, mut d) = relay.paired(&s, "a").await;
    let long = vec![0xa5u8; 125];
    for (name, ws) in [("C", &mut c), ("K", &mut k), ("D", &mut d)] {
        for payload in [b"p1".to_vec(), long.clone()] {
            let t = Instant::now();
            ws.send(Message::Ping(payload.clone().into()))
                .await
                .expect("send ping");
            match timeout(SPEC_1S, ws.next()).await {
                Ok(Some(Ok(Message::Pong(p)))) => {
                    assert_eq!(&p[..], &payload[..], "{name}: pong payload")
                }
                Ok(other) => panic!("{name}: expected a pong, got {}", describe_next(&other)),
                Err(_) => panic!("{name}: no pong within 1 s"),
            }
            assert!(t.elapsed() <= SPEC_1S);
        }
    }
    // The pongs were not forwarded anywhere.
    assert_silent(&mut k, Duration::from_millis(300)).await;
    assert_silent(&mut d, Duration::from_millis(300)).await;
}

// ---------------------------------------------------------------------------------------
// Case 64: message size limits
// ---------------------------------------------------------------------------------------

/// Case 64: 16 MiB binary and 24 MiB text K→D, exactly 32 MiB binary K→D (the limit itself
/// is accepted) and 24 MiB text D→K, all byte-exact with their opcodes.
#[tokio::test]
async fn limits_case64_large_messages_are_delivered_byte_exact() {
    let relay = TestRelay::start().await;
    let s = sid("c64");
    let (mut c, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, SYNC_EMPTY);
    let mut k = big_ws(&relay, &client_q(&s, "a")).await;
    let mut d = big_ws(&relay, &data_q(&s, "a")).await;
    assert_eq!(recv_text(&mut c).await, CONNECTED_A);
    let big = Duration::from_secs(60);

    let bin16 = pattern(16 << 20, 1);
    let (_, got) = tokio::join!(
        send_binary(&mut k, &bin16),
        recv_data(&mut d, big, "16 MiB")
    );
    match got {
        Message::Binary(b) => assert_bytes_eq(&b, &bin16, "16 MiB binary K→D"),
        m => panic!("16 MiB: expected binary, got {}", describe(&m)),
    }
    drop(bin16);

    let text24 = big_text(24 << 20);
    let (_, got) = tokio::join!(send_text(&mut k, &text24), recv_data(&mut d, big, "24 MiB"));
    match got {
        Message::Text(t) => assert_bytes_eq(t.as_bytes(), text24.as_bytes(), "24 MiB text K→D"),
        m => panic!("24 MiB: expected text, got {}", describe(&m)),
    }

    let (_, got) = tokio::join!(
        send_text(&mut d, &text24),
        recv_data(&mut k, big, "24 MiB D→K")
    );
    match got {
        Message::Text(t) => assert_bytes_eq(t.as_bytes(), text24.as_bytes(), "24 MiB text D→K"),
        m => panic!("24 MiB D→K: expected text, got {}", describe(&m)),
    }
    drop(text24);

    let bin32 = pattern(32 << 20, 7);
    let (_, got) = tokio::join!(
        send_binary(&mut k, &bin32),
        recv_data(&mut d, big, "32 MiB")
    );
    match got {
        Message::Binary(b) => assert_bytes_eq(&b, &bin32, "exactly 32 MiB binary K→D"),
        m => panic!("32 MiB: expected binary, got {}", describe(&m)),
    }
    drop(bin32);

    // Small frames still flow and nothing was closed.
    send_text(&mut k, "small").await;
    assert_eq!(recv_text(&mut d).await, "small");
    json_ping(&mut c, "case 64 control").await;
}

/// Case 64: a message over 32 MiB closes only its sender 1009 `Message too big`: once as
/// two fragments (16 MiB + 16 MiB + 1 byte, over the limit only after reassembly), once as
/// a single frame whose header announces 32 MiB + 1 byte (raw client). The other client of
/// the same connectionId, the data socket and the control are undisturbed, and nothing of
/// the oversize messages is forwarded.
#[tokio::test]
async fn limits_case64_oversize_message_closes_only_the_sender_1009() {
    let relay = TestRelay::start().await;
    let s = sid("c64o");
    let (mut c, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, SYNC_EMPTY);
    let mut k1 = relay.client(&s, "a").await;
    assert_eq!(recv_text(&mut c).await, CONNECTED_A);
    let mut k2 = relay.client(&s, "a").await;
    assert_eq!(recv_text(&mut c).await, CONNECTED_A);
    let mut d = relay.data(&s, "a").await;

    let half = 16usize << 20;
    let first = Frame::message(vec![1u8; half], OpCode::Data(OpData::Binary), false);
    let last = Frame::message(vec![2u8; half + 1], OpCode::Data(OpData::Continue), true);
    k1.send(Message::Frame(first))
        .await
        .expect("send fragment 1");
    k1.send(Message::Frame(last))
        .await
        .expect("send fragment 2");
    assert_eq!(
        recv_close_within(&mut k1, Duration::from_secs(10)).await,
        (1009, "Message too big".to_string()),
        "fragmented 32 MiB + 1"
    );
    let _ = timeout(WITHIN, k1.next()).await;

    let (mut k3r, mut k3w) = raw_open(&relay, &client_q(&s, "a")).await;
    assert_eq!(recv_text(&mut c).await, CONNECTED_A);
    k3w.header(FIN_BINARY, (32 << 20) + 1).await;
    k3w.wr
        .write_all(&[0u8; 1024])
        .await
        .expect("write payload start");
    let mut pings = 0;
    let f = k3r
        .frame_skipping_pings(Instant::now() + WITHIN, &mut pings, "K3")
        .await
        .expect("K3: no close within the deadline");
    assert_eq!(
        f,
        Some((FIN_CLOSE, close_payload(1009, "Message too big"))),
        "single frame of 32 MiB + 1"
    );

    // K2 and D are undisturbed; D's next frame is K2's (nothing of K1 or K3 forwarded).
    send_text(&mut k2, "k2-after").await;
    assert_eq!(recv_text(&mut d).await, "k2-after");
    send_text(&mut d, "d-after").await;
    assert_eq!(recv_text(&mut k2).await, "d-after");
    // The control got no `disconnected` (K2 remains): its next frame is the pong.
    json_ping(&mut c, "case 64 control").await;
}

/// Case 64: on the control, a message of exactly 64 KiB is accepted (a padded JSON ping is
/// answered); 64 KiB + 1 byte closes the control 1009 `Message too big`, text or binary.
/// K↔D are undisturbed and a new control still sees the session.
#[tokio::test]
async fn limits_case64_control_message_over_64k_closes_1009() {
    let relay = TestRelay::start().await;
    let s = sid("c64c");
    let (mut c, mut k, mut d) = relay.paired(&s, "a").await;

    let prefix = r#"{"type":"ping","pad":""#;
    let pad = "x".repeat((64 << 10) - prefix.len() - 2);
    let ping64k = format!(r#"{prefix}{pad}"}}"#);
    assert_eq!(ping64k.len(), 64 << 10);
    send_text(&mut c, &ping64k).await;
    match recv(&mut c).await {
        Message::Text(t) => assert_pong(t.as_str(), "64 KiB JSON ping"),
        m => panic!("64 KiB JSON ping: expected a pong, got {}", describe(&m)),
    }

    send_text(&mut c, &"y".repeat((64 << 10) + 1)).await;
    assert_eq!(
        recv_close(&mut c).await,
        (1009, "Message too big".to_string()),
        "text of 64 KiB + 1 on the control"
    );
    let _ = timeout(WITHIN, c.next()).await;

    assert_relays_both_ways(&mut k, &mut d).await;

    let (mut c2, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, SYNC_A);
    send_binary(&mut c2, &vec![0u8; (64 << 10) + 1]).await;
    assert_eq!(
        recv_close(&mut c2).await,
        (1009, "Message too big".to_string()),
        "binary of 64 KiB + 1 on the control"
    );
    send_text(&mut k, "x2").await;
    assert_eq!(recv_text(&mut d).await, "x2");
}

// ---------------------------------------------------------------------------------------
// Case 65: slow consumer; buffer budget
// ---------------------------------------------------------------------------------------

/// One 64 KiB frame of the slow-consumer stream: its index, then a fixed pattern.
fn stream_frame(base: &[u8], i: u32) -> Vec<u8> {
    let mut f = base.to_vec();
    f[..4].copy_from_slice(&i.to_be_bytes());
    f
}

/// Case 65: K1(a) stops reading (4 KiB receive buffer, never polled), K2(a) reads, D(a)
/// streams 200 frames of 64 KiB with a 64 KiB outbound queue and a 1.5 s slow-consumer
/// timeout. K2 receives every frame in order with no gap longer than the timeout (+1 s);
/// C's JSON pings are answered within 1 s throughout; session S2 keeps working both ways
/// within 1 s; D→K2 and K2→D continue afterwards. K1, read at the end, gets a gap-free
/// prefix of the stream and then the end of the connection: the relay drops a socket whose
/// writes make no progress for the slow-consumer deadline (a close frame cannot be written
/// into a full window), even with a long close grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_case65_slow_consumer_is_closed_1013_and_others_continue() {
    const N: u32 = 200;
    let base = std::sync::Arc::new(pattern(64 << 10, 5));
    let slow = Duration::from_millis(1500);
    let relay = TestRelay::start_with(RelayConf {
        outbound_queue_bytes: 64 << 10,
        slow_consumer_timeout_ms: slow.as_millis() as u64,
        close_grace_ms: 30_000,
        ..RelayConf::default()
    })
    .await;
    let s = sid("c65");
    let s2 = sid("c65b");
    let (mut c, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, SYNC_EMPTY);
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(relay.addr).await.expect("connect K1");
    let (mut k1, resp) = tokio_tungstenite::client_async(relay.url(&client_q(&s, "a")), tcp)
        .await
        .expect("K1 handshake");
    assert_eq!(resp.status(), 101);
    let mut k2 = relay.client(&s, "a").await;
    let mut d = relay.data(&s, "a").await;
    assert_eq!(recv_text(&mut c).await, CONNECTED_A);
    assert_eq!(recv_text(&mut c).await, CONNECTED_A);
    let mut kb = relay.client(&s2, "b").await;
    let mut db = relay.data(&s2, "b").await;

    let base2 = base.clone();
    let sender = tokio::spawn(async move {
        for i in 0..N {
            send_binary(&mut d, &stream_frame(&base2, i)).await;
        }
        d
    });
    let base2 = base.clone();
    let receiver = tokio::spawn(async move {
        let mut last = Instant::now();
        let mut max_gap = Duration::ZERO;
        for i in 0..N {
            let m = recv_data(&mut k2, Duration::from_secs(30), "K2").await;
            let now = Instant::now();
            max_gap = max_gap.max(now - last);
            last = now;
            match m {
                Message::Binary(b) => {
                    assert_bytes_eq(&b, &stream_frame(&base2, i), &format!("K2 frame {i}"))
                }
                m => panic!("K2 frame {i}: {}", describe(&m)),
            }
        }
        (k2, max_gap)
    });

    let pinger = async {
        let mut worst = Duration::ZERO;
        let mut n = 0;
        while !receiver.is_finished() {
            worst = worst.max(json_ping(&mut c, "C during the stream").await);
            n += 1;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        (n, worst)
    };
    let other_session = async {
        let mut n = 0u32;
        let mut worst = Duration::ZERO;
        while !receiver.is_finished() {
            // Each direction within 1 s.
            let down = format!("s2-{n}");
            let t = Instant::now();
            send_text(&mut db, &down).await;
            assert_eq!(
                recv_data(&mut kb, SPEC_1S, "S2 K(b)").await,
                Message::text(down)
            );
            worst = worst.max(t.elapsed());
            let up = format!("up-{n}");
            let t = Instant::now();
            send_text(&mut kb, &up).await;
            assert_eq!(
                recv_data(&mut db, SPEC_1S, "S2 D(b)").await,
                Message::text(up)
            );
            worst = worst.max(t.elapsed());
            n += 1;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        (n, worst)
    };
    let ((pings, worst_pong), (s2_rounds, worst_s2)) = tokio::join!(pinger, other_session);
    let (mut k2, max_gap) = receiver.await.expect("K2 task");
    let mut d = sender.await.expect("D task");
    println!(
        "case 65: K2 longest gap {} ms; {pings} control pings, slowest pong {} ms; \
         {s2_rounds} S2 round trips, slowest leg {} ms",
        ms(max_gap),
        ms(worst_pong),
        ms(worst_s2)
    );
    assert!(
        max_gap <= slow + LATE,
        "K2 waited {} ms for a frame (slow-consumer timeout {} ms)",
        ms(max_gap),
        ms(slow)
    );

    // After K1's closure the relay continues D→K2 and K2→D.
    send_text(&mut d, "after").await;
    assert_eq!(recv_text(&mut k2).await, "after");
    send_text(&mut k2, "up-after").await;
    assert_eq!(recv_text(&mut d).await, "up-after");

    // K1: a gap-free prefix of the stream, then the end of the connection. Its queue stayed
    // full past the slow-consumer deadline (D's reader closed it 1013) and its writes made no
    // progress for as long, so the relay dropped the connection: with K1's receive window
    // full, not even the close frame could be written.
    let mut got = 0u32;
    let end = loop {
        match timeout(Duration::from_secs(10), k1.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                assert_bytes_eq(&b, &stream_frame(&base, got), &format!("K1 frame {got}"));
                got += 1;
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => break other,
            Err(_) => panic!("K1: still open 10 s after {got} frames"),
        }
    };
    println!("case 65: K1 received {got} of {N} frames, then {end:?}");
    assert!(
        matches!(end, None | Some(Err(_))),
        "K1 should see the connection end, got {end:?}"
    );
    assert!(got < N, "K1 received all {N} frames: it was never stalled");
    // K2 remains, so the control hears no `disconnected`; D→K2 still works.
    json_ping(&mut c, "C after K1's closure").await;
    send_text(&mut d, "final").await;
    assert_eq!(recv_text(&mut k2).await, "final");
}

/// Waits until the relay's late-daemon buffers hold exactly `bytes` (state observed through
/// the hub; the relay sends nothing when it buffers a frame).
async fn wait_buffered(relay: &TestRelay, bytes: usize) {
    let deadline = Instant::now() + WITHIN;
    while relay.hub.buffered_bytes() != bytes {
        assert!(
            Instant::now() < deadline,
            "buffered bytes stayed {} (expected {bytes})",
            relay.hub.buffered_bytes()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Process-wide buffer budget (spec §0): with a 10 000-byte budget, frames of clients
/// without a data socket may fill it exactly; a client frame that would exceed it closes
/// that client 1013 `Relay ingress capacity` (and the last-client cascade follows), while
/// the other buffering client is untouched and its frames, including the one that filled
/// the budget exactly, are flushed to its data socket, which gives the budget back.
#[tokio::test]
async fn limits_buffer_budget_exceeded_closes_1013_relay_ingress_capacity() {
    let relay = TestRelay::start_with(RelayConf {
        pending_budget_bytes: 10_000,
        ..RelayConf::default()
    })
    .await;
    let s = sid("budget");
    let (mut c, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, SYNC_EMPTY);
    let mut k1 = relay.client(&s, "a").await;
    let mut k2 = relay.client(&s, "b").await;
    assert_eq!(recv_text(&mut c).await, CONNECTED_A);
    assert_eq!(recv_text(&mut c).await, CONNECTED_B);

    let t1 = "A".repeat(4000);
    let b1 = pattern(4000, 3);
    send_text(&mut k1, &t1).await;
    send_binary(&mut k1, &b1).await;
    let t2 = "B".repeat(2000);
    send_text(&mut k2, &t2).await;
    wait_buffered(&relay, 10_000).await;

    send_binary(&mut k2, &[9u8]).await;
    assert_eq!(
        recv_close(&mut k2).await,
        (1013, "Relay ingress capacity".to_string())
    );
    let _ = timeout(WITHIN, k2.next()).await;
    assert_eq!(recv_text(&mut c).await, DISCONNECTED_B);
    assert_eq!(
        relay.hub.buffered_bytes(),
        8000,
        "b's buffer was given back"
    );

    let t3 = "C".repeat(2000);
    send_text(&mut k1, &t3).await;
    wait_buffered(&relay, 10_000).await;
    let mut d = relay.data(&s, "a").await;
    assert_eq!(
        relay.hub.buffered_bytes(),
        0,
        "the flush gives the budget back"
    );
    assert_eq!(recv(&mut d).await, Message::text(t1));
    assert_eq!(recv(&mut d).await, Message::binary(b1));
    assert_eq!(recv(&mut d).await, Message::text(t3));
    send_text(&mut k1, "live").await;
    assert_eq!(recv_text(&mut d).await, "live");
    send_text(&mut d, "down").await;
    assert_eq!(recv_text(&mut k1).await, "down");
    assert_silent(&mut c, Duration::from_millis(300)).await;
}

// ---------------------------------------------------------------------------------------
// Cases 57-62: nudge and reset
// ---------------------------------------------------------------------------------------

/// Case 57 at the default timers: `connected` at once, the nudge `sync` with `a` at
/// T0+10 s, close 1011 `Control unresponsive` at T0+15 s. The client is not closed.
#[tokio::test]
async fn nudge_case57_full_reset_at_default_10s_and_15s() {
    let relay = TestRelay::start().await;
    let s = sid("c57");
    let (mut c, mut k, t0_lo, t0_hi) = client_at_t0(&relay, &s).await;
    let nudge = Duration::from_secs(10);
    let reset = Duration::from_secs(15);
    let at = expect_text_between(
        &mut c,
        SYNC_A,
        t0_lo + nudge - EARLY,
        t0_hi + nudge + LATE,
        "nudge",
    )
    .await;
    println!("case 57: nudge sync at T0+{} ms", ms(at - t0_lo));
    let at = expect_close_between(
        &mut c,
        1011,
        "Control unresponsive",
        t0_lo + reset - EARLY,
        t0_hi + reset + LATE,
        "reset",
    )
    .await;
    println!("case 57: reset close at T0+{} ms", ms(at - t0_lo));
    assert_silent(&mut k, SPEC_1S).await;
}

/// Case 58 (nudge 1 s, reset 2 s): D(a) attaches at T0+1.5 s, after the nudge; the control
/// got the nudge `sync` and is not closed at T0+2 s.
#[tokio::test]
async fn nudge_case58_data_socket_after_the_nudge_prevents_the_reset() {
    let relay = TestRelay::start_with(short_timers()).await;
    let s = sid("c58");
    let (mut c, mut k, t0_lo, t0_hi) = client_at_t0(&relay, &s).await;
    expect_text_between(
        &mut c,
        SYNC_A,
        t0_lo + NUDGE - EARLY,
        t0_hi + NUDGE + LATE,
        "nudge",
    )
    .await;
    sleep_until(t0_hi + Duration::from_millis(1500)).await;
    let mut d = relay.data(&s, "a").await;
    silent_until(&mut c, t0_hi + RESET + LATE, "control after D attached").await;
    send_text(&mut k, "q").await;
    assert_eq!(recv_text(&mut d).await, "q");
    json_ping(&mut c, "case 58 control").await;
}

/// Nudge cases: a control (empty `sync`), then K(a) at T0, known to lie in `[t0_lo, t0_hi]`;
/// the control's `connected` for a arrives within 1 s of T0.
async fn client_at_t0(relay: &TestRelay, s: &str) -> (Ws, Ws, Instant, Instant) {
    let (mut c, sync) = relay.control_synced(s).await;
    assert_eq!(sync, SYNC_EMPTY);
    let t0_lo = Instant::now();
    let k = relay.client(s, "a").await;
    let t0_hi = Instant::now();
    expect_text_between(&mut c, CONNECTED_A, t0_lo, t0_hi + SPEC_1S, "connected").await;
    (c, k, t0_lo, t0_hi)
}

/// Case 59 (nudge 1 s, reset 2 s): D(a) at T0+0.5 s: no nudge, no reset.
#[tokio::test]
async fn nudge_case59_data_socket_before_the_nudge_prevents_both() {
    let relay = TestRelay::start_with(short_timers()).await;
    let s = sid("c59");
    let (mut c, mut k, t0_lo, t0_hi) = client_at_t0(&relay, &s).await;
    sleep_until(t0_lo + Duration::from_millis(500)).await;
    let mut d = relay.data(&s, "a").await;
    silent_until(&mut c, t0_hi + RESET + LATE, "control after D attached").await;
    send_text(&mut d, "q").await;
    assert_eq!(recv_text(&mut k).await, "q");
    json_ping(&mut c, "case 59 control").await;
}

/// Case 60 (nudge 1 s, reset 2 s): K closes at T0+0.5 s: `disconnected`, then no nudge and
/// no reset.
#[tokio::test]
async fn nudge_case60_client_gone_before_the_nudge() {
    let relay = TestRelay::start_with(short_timers()).await;
    let s = sid("c60");
    let (mut c, mut k, t0_lo, t0_hi) = client_at_t0(&relay, &s).await;
    sleep_until(t0_lo + Duration::from_millis(500)).await;
    send_close(&mut k, 1000, "bye").await;
    let (code, _) = recv_close(&mut k).await;
    assert_eq!(code, 1000, "close echo");
    assert_eq!(recv_text(&mut c).await, DISCONNECTED_A);
    silent_until(&mut c, t0_hi + RESET + LATE, "control after K left").await;
    json_ping(&mut c, "case 60 control").await;
}

/// Case 61 (nudge 1 s, reset 2 s): K(a) at T0 with no control: nothing happens. A control
/// at T0+3 s gets `sync` with `a` and is not closed by K(a)'s spent timer; a new K(b)
/// then starts a new timer whose nudge (`sync` {a,b}) and reset hit this control.
#[tokio::test]
async fn nudge_case61_no_control_attached() {
    let relay = TestRelay::start_with(short_timers()).await;
    let s = sid("c61");
    let t0 = Instant::now();
    let _k = relay.client(&s, "a").await;
    sleep_until(t0 + RESET + LATE).await;
    let (mut c, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, SYNC_A);
    silent_until(&mut c, Instant::now() + RESET, "late control").await;

    let t1_lo = Instant::now();
    let _kb = relay.client(&s, "b").await;
    let t1_hi = Instant::now();
    expect_text_between(&mut c, CONNECTED_B, t1_lo, t1_hi + SPEC_1S, "connected b").await;
    let got = next_before(&mut c, t1_hi + NUDGE + LATE, "nudge for b").await;
    let at = Instant::now();
    match got {
        Some(Message::Text(t)) => assert_eq!(
            control_json(t.as_str()),
            ("sync".to_string(), vec!["a".to_string(), "b".to_string()]),
            "nudge for b: {t}"
        ),
        other => panic!("nudge for b: {:?}", other.as_ref().map(describe)),
    }
    assert!(
        at >= t1_lo + NUDGE - EARLY,
        "nudge {} ms after K(b)",
        ms(at - t1_lo)
    );
    expect_close_between(
        &mut c,
        1011,
        "Control unresponsive",
        t1_lo + RESET - EARLY,
        t1_hi + RESET + LATE,
        "reset for b",
    )
    .await;
}

/// Case 62 (nudge 1 s, reset 2 s): C gets the nudge, is replaced by C2 at T0+1.5 s (C
/// closed 1008), C2's first frame is `sync` with `a`, and C2 is closed 1011 `Control
/// unresponsive` at T0+2 s.
#[tokio::test]
async fn nudge_case62_the_reset_hits_the_replacement_control() {
    let relay = TestRelay::start_with(short_timers()).await;
    let s = sid("c62");
    let (mut c, _k, t0_lo, t0_hi) = client_at_t0(&relay, &s).await;
    expect_text_between(
        &mut c,
        SYNC_A,
        t0_lo + NUDGE - EARLY,
        t0_hi + NUDGE + LATE,
        "nudge",
    )
    .await;
    sleep_until(t0_hi + Duration::from_millis(1500)).await;
    let mut c2 = relay.control(&s).await;
    assert_eq!(
        recv_close(&mut c).await,
        (1008, "Replaced by new connection".to_string())
    );
    expect_text_between(&mut c2, SYNC_A, t0_lo, Instant::now() + SPEC_1S, "C2 sync").await;
    expect_close_between(
        &mut c2,
        1011,
        "Control unresponsive",
        t0_lo + RESET - EARLY,
        t0_hi + RESET + LATE,
        "reset of C2",
    )
    .await;
}

/// Spec §3.8: the timer runs once per client socket and is never cancelled, only
/// re-checked (nudge 1 s, reset 2 s). K1(a) joins at T0 and leaves at T0+0.3 s; K2(a) joins
/// at T0+0.6 s. K1's timer still fires because `a` again has a client and no data socket:
/// the control gets two nudge `sync`s (about T0+1 s and T0+1.6 s) and is closed 1011 by
/// K1's reset at about T0+2 s.
#[tokio::test]
async fn nudge_timers_run_per_client_socket_and_are_never_cancelled() {
    let relay = TestRelay::start_with(short_timers()).await;
    let s = sid("nudge2");
    let (mut c, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, SYNC_EMPTY);
    let t0_lo = Instant::now();
    let mut k1 = relay.client(&s, "a").await;
    let t0_hi = Instant::now();
    expect_text_between(&mut c, CONNECTED_A, t0_lo, t0_hi + SPEC_1S, "connected K1").await;
    sleep_until(t0_lo + Duration::from_millis(300)).await;
    send_close(&mut k1, 1000, "bye").await;
    assert_eq!(recv_close(&mut k1).await.0, 1000);
    assert_eq!(recv_text(&mut c).await, DISCONNECTED_A);
    sleep_until(t0_lo + Duration::from_millis(600)).await;
    let t1_lo = Instant::now();
    let _k2 = relay.client(&s, "a").await;
    let t1_hi = Instant::now();
    expect_text_between(&mut c, CONNECTED_A, t1_lo, t1_hi + SPEC_1S, "connected K2").await;
    let first = expect_text_between(
        &mut c,
        SYNC_A,
        t0_lo + NUDGE - EARLY,
        t0_hi + NUDGE + LATE,
        "K1's nudge",
    )
    .await;
    let second = expect_text_between(
        &mut c,
        SYNC_A,
        t1_lo + NUDGE - EARLY,
        t1_hi + NUDGE + LATE,
        "K2's nudge",
    )
    .await;
    let close = expect_close_between(
        &mut c,
        1011,
        "Control unresponsive",
        t0_lo + RESET - EARLY,
        t0_hi + RESET + LATE,
        "K1's reset",
    )
    .await;
    println!(
        "per-socket timers: syncs at T0+{} and T0+{} ms, close at T0+{} ms",
        ms(first - t0_lo),
        ms(second - t0_lo),
        ms(close - t0_lo)
    );
}

// ---------------------------------------------------------------------------------------
// Cases 66 and 67: concurrency and ordering
// ---------------------------------------------------------------------------------------

/// One concurrent join of C and K(a); returns how C learnt `a`.
async fn concurrent_join(relay: &TestRelay, c_first: bool) -> &'static str {
    let s = sid("c66");
    let (mut c, _k) = if c_first {
        tokio::join!(relay.control(&s), relay.client(&s, "a"))
    } else {
        let (k, c) = tokio::join!(relay.client(&s, "a"), relay.control(&s));
        (c, k)
    };
    let first = recv_text(&mut c).await;
    let (kind, ids) = control_json(&first);
    assert_eq!(kind, "sync", "C's first frame must be sync: {first}");
    let how = if ids.is_empty() {
        assert_eq!(first, SYNC_EMPTY);
        assert_eq!(recv_text(&mut c).await, CONNECTED_A);
        "connected"
    } else {
        assert_eq!(first, SYNC_A);
        "sync"
    };
    // Exactly once: nothing else follows.
    assert_silent(&mut c, Duration::from_millis(300)).await;
    how
}

/// Case 66: C and K(a) connect in the same instant, 12 times in each order (all at once):
/// C's first frame is always `sync`, and C learns `a` exactly once, through `sync` or
/// `connected`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_case66_concurrent_join_control_first_frame_is_sync() {
    let relay = TestRelay::start().await;
    let runs = (0..24).map(|i| concurrent_join(&relay, i % 2 == 0));
    let hows = futures_util::future::join_all(runs).await;
    let via_sync = hows.iter().filter(|h| **h == "sync").count();
    println!(
        "case 66: learnt through sync {via_sync} times, through connected {} times",
        hows.len() - via_sync
    );
}

/// The numbered frame `i` of case 67: even numbers as text, odd ones as binary.
fn numbered(i: u32) -> Message {
    if i.is_multiple_of(2) {
        Message::text(i.to_string())
    } else {
        Message::binary(i.to_string().into_bytes())
    }
}

/// Parses a case-67 frame and checks its opcode matches its parity.
fn number_of(m: &Message) -> u32 {
    let (n, text) = match m {
        Message::Text(t) => (t.as_str().parse::<u32>().expect("number"), true),
        Message::Binary(b) => (
            std::str::from_utf8(b)
                .unwrap()
                .parse::<u32>()
                .expect("number"),
            false,
        ),
        m => panic!("case 67: unexpected {}", describe(m)),
    };
    assert_eq!(text, n.is_multiple_of(2), "frame {n} changed opcode");
    n
}

/// Case 67: K sends 10 000 numbered frames (alternating text and binary) while D attaches
/// mid-stream, after 3000 have been sent. D receives a gap-free, strictly increasing run
/// ending at 9999 that starts no later than the number sent when D's attach completed
/// (only buffer-overflow drops at the start). Then with fewer than 200 frames outstanding
/// at attach, D receives all 10 000.
#[tokio::test]
async fn order_case67_ordering_under_load_with_mid_stream_attach() {
    const TOTAL: u32 = 10_000;
    let relay = TestRelay::start().await;

    // Mid-stream attach.
    let s = sid("c67");
    let mut k = relay.client(&s, "a").await;
    let (sent_tx, mut sent_rx) = tokio::sync::watch::channel(0u32);
    let send_all = async {
        for i in 0..TOTAL {
            k.send(numbered(i)).await.expect("send");
            sent_tx.send_replace(i + 1);
            if i % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(2)).await; // pacing, so D joins mid-stream
            }
        }
    };
    let attach_and_read = async {
        sent_rx
            .wait_for(|n| *n >= 3000)
            .await
            .expect("sender alive");
        let mut d = relay.data(&s, "a").await;
        let sent_at_attach = *sent_rx.borrow();
        let first = number_of(&recv_data(&mut d, WITHIN, "D first").await);
        let mut expect = first + 1;
        while expect < TOTAL {
            let n = number_of(&recv_data(&mut d, WITHIN, "D").await);
            assert_eq!(n, expect, "D: frame {n} after {}", expect - 1);
            expect += 1;
        }
        (first, sent_at_attach, d)
    };
    let (_, (first, sent_at_attach, mut d)) = tokio::join!(send_all, attach_and_read);
    println!("case 67: D attached when {sent_at_attach} were sent; first received {first}");
    assert!(
        first <= sent_at_attach,
        "frames sent after D attached were lost: first received {first}, {sent_at_attach} sent at attach"
    );
    assert_silent(&mut d, Duration::from_millis(300)).await;

    // Fewer than 200 outstanding at attach: nothing is dropped.
    let s = sid("c67b");
    let mut k = relay.client(&s, "a").await;
    for i in 0..150 {
        k.send(numbered(i)).await.expect("send");
    }
    let mut d = relay.data(&s, "a").await;
    let rest = async {
        for i in 150..TOTAL {
            k.send(numbered(i)).await.expect("send");
        }
    };
    let read = async {
        for i in 0..TOTAL {
            let n = number_of(&recv_data(&mut d, WITHIN, "D").await);
            assert_eq!(n, i, "D (150 outstanding at attach)");
        }
    };
    tokio::join!(rest, read);
    assert_silent(&mut d, Duration::from_millis(300)).await;
}
