//! Hostile input: malformed frames, malformed HTTP, malformed queries, abrupt TCP resets and
//! stalled connections get the status or close code of relay-protocol.md §0 ("HTTP surface",
//! "Frames and limits", "Liveness") and §9 (cases 52, 55, 56, 64), never crash the process,
//! never disturb other sockets, and the relay keeps serving afterwards.
//!
//! Every test keeps a healthy paired session ([`Healthy`]: v2 control C, data D(a), client
//! K(a) on its own serverId) open throughout and checks at the end that it still relays text
//! both ways, that C still answers a JSON ping, and that `GET /health` is still 200.
//!
//! Inputs the client library refuses to produce are written by hand on raw TCP ([`Raw`]): the
//! upgrade is done with [`UPGRADE_HEADERS`], then frames come from the tiny encoder below
//! (client frames masked unless a case says otherwise). Frames from the relay are decoded and
//! must be unmasked with RSV bits clear. Every read is bounded by [`WITHIN`].

use relay_tests::*;
use std::collections::HashSet;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const SYNC_EMPTY: &str = r#"{"type":"sync","connectionIds":[]}"#;
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

const PROTOCOL_ERROR: (u16, &str) = (1002, "Protocol error");
const INVALID_UTF8: (u16, &str) = (1007, "Invalid UTF-8");
const TOO_BIG: (u16, &str) = (1009, "Message too big");
const CLIENT_DISCONNECTED: (u16, &str) = (1001, "Client disconnected");
const SERVER_DISCONNECTED: (u16, &str) = (1012, "Server disconnected");

/// 32 MiB: the largest message on a data, client or v1 socket (spec §0).
const MAX_MESSAGE: usize = 32 << 20;
/// 64 KiB: the largest message on a control socket (spec §0).
const MAX_CONTROL_MESSAGE: usize = 64 << 10;

// ---------------------------------------------------------------------------------------------
// Frame encoder / decoder (RFC 6455 §5.2)
// ---------------------------------------------------------------------------------------------

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

const RSV1: u8 = 0x40;
const RSV2: u8 = 0x20;
const RSV3: u8 = 0x10;

/// The masking key of hand-written client frames.
const MASK: [u8; 4] = [0x5a, 0x13, 0xc7, 0x88];

/// A frame header: FIN, RSV bits (`RSV1 | …`), opcode, optional masking key, payload length.
fn frame_header(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, len: u64) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | rsv | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= 0xffff {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    out
}

/// A complete frame; the payload is masked with `mask` when one is given.
fn frame(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = frame_header(fin, rsv, opcode, mask, payload.len() as u64);
    match mask {
        Some(key) => out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4])),
        None => out.extend_from_slice(payload),
    }
    out
}

/// A well-formed, final, masked client frame.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(true, 0, opcode, Some(MASK), payload)
}

/// A close frame payload: code (big endian) then reason.
fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// A frame sent by the relay.
#[derive(Debug, PartialEq, Eq)]
struct ServerFrame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

impl ServerFrame {
    /// (code, reason) of a close frame.
    fn close(&self) -> (u16, String) {
        assert_eq!(
            self.opcode, OP_CLOSE,
            "expected a close frame, got {self:?}"
        );
        assert!(
            self.payload.len() >= 2,
            "close frame without a code: {self:?}"
        );
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        let reason = String::from_utf8(self.payload[2..].to_vec()).expect("UTF-8 close reason");
        (code, reason)
    }
}

/// Decodes one relay frame from the front of `buf`: `None` until it is complete. Relay frames
/// must be unmasked (RFC 6455 §5.1) with RSV bits clear (nothing is negotiated).
fn parse_server_frame(buf: &[u8]) -> Option<(ServerFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (b0, b1) = (buf[0], buf[1]);
    assert_eq!(b0 & 0x70, 0, "relay frame with RSV bits set: {b0:#04x}");
    assert_eq!(b1 & 0x80, 0, "relay frames must not be masked");
    let (len, at) = match b1 & 0x7f {
        126 if buf.len() < 4 => return None,
        126 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() < 10 => return None,
        127 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    if buf.len() < at + len {
        return None;
    }
    let f = ServerFrame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        payload: buf[at..at + len].to_vec(),
    };
    Some((f, at + len))
}

// ---------------------------------------------------------------------------------------------
// Raw TCP client
// ---------------------------------------------------------------------------------------------

/// The upgrade request for `/ws?query`.
fn upgrade_request(query: &str) -> String {
    format!("GET /ws?{query} HTTP/1.1\r\nHost: relay\r\n{UPGRADE_HEADERS}\r\n")
}

/// A hand-driven WebSocket (or plain TCP) connection to the relay.
struct Raw {
    tcp: TcpStream,
    /// Bytes read but not yet consumed.
    buf: Vec<u8>,
}

impl Raw {
    async fn tcp(relay: &TestRelay) -> Raw {
        let tcp = TcpStream::connect(relay.addr).await.expect("connect");
        Raw {
            tcp,
            buf: Vec::new(),
        }
    }

    /// Upgrades `/ws?query` by hand and reads exactly the 101 head (frames behind it stay
    /// buffered).
    async fn connect(relay: &TestRelay, query: &str) -> Raw {
        let mut raw = Raw::tcp(relay).await;
        raw.send(upgrade_request(query).as_bytes()).await;
        raw.expect_101().await;
        raw
    }

    async fn expect_101(&mut self) {
        let head = self.read_head().await;
        assert!(
            head.starts_with("HTTP/1.1 101 "),
            "expected a 101, got {head:?}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
    }

    /// Reads a response head up to and including the blank line.
    async fn read_head(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..i + 4).collect();
                return String::from_utf8_lossy(&head).into_owned();
            }
            assert!(
                self.fill().await,
                "connection closed before a response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.expect("write to the relay");
    }

    /// Reads more bytes into the buffer: false on EOF. A reset or silence for [`WITHIN`]
    /// fails the test.
    async fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 64 << 10];
        match tokio::time::timeout(WITHIN, self.tcp.read(&mut chunk)).await {
            Err(_) => panic!("the relay sent nothing and did not close for {WITHIN:?}"),
            Ok(Ok(0)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Ok(Err(e)) => panic!("read failed ({e}): the relay reset instead of closing"),
        }
    }

    /// The next relay frame, or `None` at a clean EOF.
    async fn next_frame(&mut self) -> Option<ServerFrame> {
        loop {
            if let Some((f, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(f);
            }
            if !self.fill().await {
                assert!(
                    self.buf.is_empty(),
                    "EOF inside a relay frame: {:?}",
                    self.buf
                );
                return None;
            }
        }
    }

    async fn expect_frame(&mut self) -> ServerFrame {
        self.next_frame()
            .await
            .expect("a frame from the relay, got EOF")
    }

    async fn expect_text(&mut self) -> String {
        let f = self.expect_frame().await;
        assert_eq!((f.fin, f.opcode), (true, OP_TEXT), "expected text: {f:?}");
        String::from_utf8(f.payload).expect("UTF-8 text frame")
    }

    /// The relay's next frame is exactly close `code` `reason`, and then the TCP connection
    /// ends cleanly (EOF, not a reset), without the client having to answer.
    async fn expect_close_then_eof(&mut self, (code, reason): (u16, &str)) {
        let f = self.expect_frame().await;
        assert!(f.fin, "fragmented close frame {f:?}");
        assert_eq!(f.close(), (code, reason.to_string()));
        let after = self.next_frame().await;
        assert!(
            after.is_none(),
            "expected EOF after the close, got {after:?}"
        );
    }

    /// Kills the connection abruptly: `SO_LINGER` 0 then drop, so the kernel sends RST.
    fn reset(self) {
        self.tcp.set_zero_linger().expect("SO_LINGER 0");
        drop(self.tcp);
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

fn connected(x: &str) -> (String, Vec<String>) {
    ("connected".to_string(), vec![x.to_string()])
}

fn disconnected(x: &str) -> (String, Vec<String>) {
    ("disconnected".to_string(), vec![x.to_string()])
}

async fn next_event(c: &mut Ws) -> (String, Vec<String>) {
    control_json(&recv_text(c).await)
}

async fn assert_health(relay: &TestRelay) {
    let r = relay.get("/health", "").await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"status":"ok"}"#));
}

/// A healthy paired session C + D(a) + K(a) on its own serverId, kept open through a test.
struct Healthy {
    c: Ws,
    d: Ws,
    k: Ws,
    rounds: u32,
}

impl Healthy {
    async fn open(relay: &TestRelay) -> Healthy {
        let s = sid("healthy");
        let (mut c, sync) = relay.control_synced(&s).await;
        assert_eq!(sync, SYNC_EMPTY);
        let d = relay.data(&s, "a").await;
        let k = relay.client(&s, "a").await;
        assert_eq!(next_event(&mut c).await, connected("a"));
        let mut h = Healthy { c, d, k, rounds: 0 };
        h.roundtrip().await;
        h
    }

    /// K→D and D→K text, and a JSON ping on C answered by a pong; each is the next message on
    /// its socket, so anything the relay sent these sockets in between fails the test.
    async fn roundtrip(&mut self) {
        self.rounds += 1;
        let up = format!("up {}", self.rounds);
        send_text(&mut self.k, &up).await;
        assert_eq!(recv_text(&mut self.d).await, up);
        let down = format!("down {}", self.rounds);
        send_text(&mut self.d, &down).await;
        assert_eq!(recv_text(&mut self.k).await, down);
        send_text(&mut self.c, r#"{"type":"ping"}"#).await;
        assert_eq!(next_event(&mut self.c).await.0, "pong");
    }

    /// The session was not disturbed and the process still serves.
    async fn assert_intact(mut self, relay: &TestRelay) {
        self.roundtrip().await;
        assert_health(relay).await;
    }
}

/// A hostile raw client K(a) on its own serverId, with that session's control C and data
/// socket D(a) (attached first, so no nudge timer runs).
struct Hostile {
    c: Ws,
    d: Ws,
    k: Raw,
}

impl Hostile {
    async fn open(relay: &TestRelay) -> Hostile {
        Self::open_with(relay, false).await
    }

    /// With `big_d`, D(a) accepts messages of any size (tungstenite clients stop at 16 MiB
    /// frames by default).
    async fn open_with(relay: &TestRelay, big_d: bool) -> Hostile {
        let s = sid("hostile");
        let (mut c, sync) = relay.control_synced(&s).await;
        assert_eq!(sync, SYNC_EMPTY);
        let d = if big_d {
            let config = WebSocketConfig::default()
                .max_frame_size(None)
                .max_message_size(None);
            let url = relay.url(&format!("serverId={s}&role=server&v=2&connectionId=a"));
            tokio_tungstenite::connect_async_with_config(url, Some(config), false)
                .await
                .expect("connect D(a)")
                .0
        } else {
            relay.data(&s, "a").await
        };
        let k = Raw::connect(
            relay,
            &format!("serverId={s}&role=client&v=2&connectionId=a"),
        )
        .await;
        assert_eq!(next_event(&mut c).await, connected("a"));
        Hostile { c, d, k }
    }

    /// K(a) is gone from its session: the last-client cascade closed D(a) 1001 and told C.
    /// D's next message is that close, so nothing K sent leaked through.
    async fn assert_client_gone(mut self) {
        client_gone(&mut self.c, &mut self.d).await;
    }
}

/// The last-client cascade of K(a): D(a) closed 1001 (as its next message) and C told.
async fn client_gone(c: &mut Ws, d: &mut Ws) {
    assert_eq!(recv_close(d).await, owned(CLIENT_DISCONNECTED));
    assert_eq!(next_event(c).await, disconnected("a"));
}

fn owned((code, reason): (u16, &str)) -> (u16, String) {
    (code, reason.to_string())
}

/// Opens a hostile client, writes `input`, expects the relay's close `want` then EOF, and
/// checks the socket left its session like any closed client.
async fn hostile_client_case(relay: &TestRelay, what: &str, input: &[u8], want: (u16, &str)) {
    log::info!("hostile case: {what}");
    let mut h = Hostile::open(relay).await;
    h.k.send(input).await;
    h.k.expect_close_then_eof(want).await;
    h.assert_client_gone().await;
}

// ---------------------------------------------------------------------------------------------
// 1-5: malformed frames
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn garbage_after_the_101_is_protocol_error() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    // Each garbage decodes to a header with a reserved opcode or without a mask, so the relay
    // fails the connection as soon as it has read the first header.
    let text = b"this is not a websocket frame\r\n".repeat(10);
    let http = b"GET /ws?serverId=x&role=client&v=2 HTTP/1.1\r\nHost: relay\r\n\r\n".to_vec();
    let zeros = vec![0u8; 256];
    let tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".repeat(20);
    for (what, input) in [
        ("text", text),
        ("http request", http),
        ("zeros", zeros),
        ("TLS ClientHello", tls_hello),
    ] {
        hostile_client_case(&relay, what, &input, PROTOCOL_ERROR).await;
    }
    healthy.assert_intact(&relay).await;
}

#[tokio::test]
async fn rsv_bits_are_protocol_error() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    for rsv in [RSV1, RSV2, RSV3, RSV1 | RSV2 | RSV3] {
        for opcode in [OP_TEXT, OP_BINARY] {
            let input = frame(true, rsv, opcode, Some(MASK), b"hi");
            hostile_client_case(&relay, &format!("rsv {rsv:#x}"), &input, PROTOCOL_ERROR).await;
        }
    }
    // RSV1 on a control frame too (permessage-deflate is never negotiated).
    let input = frame(true, RSV1, OP_PING, Some(MASK), b"p");
    hostile_client_case(&relay, "rsv1 ping", &input, PROTOCOL_ERROR).await;
    healthy.assert_intact(&relay).await;
}

#[tokio::test]
async fn unknown_opcodes_are_protocol_error() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    for opcode in [0x3, 0x7, 0xB, 0xF] {
        let input = client_frame(opcode, b"x");
        hostile_client_case(
            &relay,
            &format!("opcode {opcode:#x}"),
            &input,
            PROTOCOL_ERROR,
        )
        .await;
    }
    healthy.assert_intact(&relay).await;
}

#[tokio::test]
async fn unmasked_client_frames_are_protocol_error() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    for (opcode, payload) in [
        (OP_TEXT, &b"hello"[..]),
        (OP_BINARY, &[0u8, 1, 2][..]),
        (OP_PING, &b"p"[..]),
    ] {
        let input = frame(true, 0, opcode, None, payload);
        hostile_client_case(
            &relay,
            &format!("unmasked {opcode:#x}"),
            &input,
            PROTOCOL_ERROR,
        )
        .await;
    }
    // A masked first frame is fine; the unmasked one after it still fails the connection.
    let mut h = Hostile::open(&relay).await;
    h.k.send(&client_frame(OP_TEXT, b"masked")).await;
    assert_eq!(recv_text(&mut h.d).await, "masked");
    h.k.send(&frame(true, 0, OP_TEXT, None, b"unmasked")).await;
    h.k.expect_close_then_eof(PROTOCOL_ERROR).await;
    h.assert_client_gone().await;
    healthy.assert_intact(&relay).await;
}

#[tokio::test]
async fn invalid_utf8_text_is_1007() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("0xff", client_frame(OP_TEXT, &[b'o', b'k', 0xff])),
        ("lone continuation byte", client_frame(OP_TEXT, &[0x80])),
        ("overlong encoding", client_frame(OP_TEXT, &[0xc0, 0xaf])),
        ("surrogate", client_frame(OP_TEXT, &[0xed, 0xa0, 0x80])),
        (
            "truncated sequence",
            client_frame(OP_TEXT, &[b'a', 0xe2, 0x82]),
        ),
        (
            "close reason",
            client_frame(OP_CLOSE, &[0x03, 0xe8, b'o', 0xff]),
        ),
        ("fragmented", {
            // "€" split across fragments is valid; the second fragment then breaks it.
            let mut v = frame(false, 0, OP_TEXT, Some(MASK), &[b'a', 0xe2]);
            v.extend(frame(false, 0, OP_CONT, Some(MASK), &[0x82]));
            v.extend(frame(true, 0, OP_CONT, Some(MASK), &[0x28]));
            v
        }),
    ];
    for (what, input) in cases {
        hostile_client_case(&relay, what, &input, INVALID_UTF8).await;
    }
    // Valid UTF-8 split across fragments is one text message.
    let mut h = Hostile::open(&relay).await;
    let euro = "€".as_bytes();
    let mut input = frame(false, 0, OP_TEXT, Some(MASK), &[b'a', euro[0]]);
    input.extend(frame(false, 0, OP_CONT, Some(MASK), &euro[1..2]));
    input.extend(frame(true, 0, OP_CONT, Some(MASK), &euro[2..]));
    h.k.send(&input).await;
    assert_eq!(recv_text(&mut h.d).await, "a€");
    healthy.assert_intact(&relay).await;
}

// ---------------------------------------------------------------------------------------------
// 6-7: message limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn announced_oversized_frame_is_1009_right_after_the_header() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    // Only the header is sent: the relay must answer without waiting for (or buffering) the
    // announced payload.
    for len in [64u64 << 20, MAX_MESSAGE as u64 + 1, u64::MAX >> 1] {
        for opcode in [OP_BINARY, OP_TEXT] {
            let header = frame_header(true, 0, opcode, Some(MASK), len);
            hostile_client_case(&relay, &format!("announce {len}"), &header, TOO_BIG).await;
        }
    }
    // On a control socket the limit is 64 KiB.
    for len in [MAX_CONTROL_MESSAGE as u64 + 1, 64 << 20] {
        let s = sid("ctl1009");
        let mut c = Raw::connect(&relay, &format!("serverId={s}&role=server&v=2")).await;
        assert_eq!(c.expect_text().await, SYNC_EMPTY);
        c.send(&frame_header(true, 0, OP_TEXT, Some(MASK), len))
            .await;
        c.expect_close_then_eof(TOO_BIG).await;
    }
    healthy.assert_intact(&relay).await;
}

/// A client that keeps streaming the payload of an oversized frame still reads the relay's
/// 1009: the relay flushes its close, half-closes and discards the rest of the input until
/// the client stops, instead of resetting the connection with unread data (which would
/// destroy the close frame on its way).
#[tokio::test]
async fn oversized_upload_still_reads_1009_and_a_clean_end() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    let mut h = Hostile::open(&relay).await;
    let raw = &mut h.k;
    raw.send(&frame_header(true, 0, OP_BINARY, Some(MASK), 64 << 20))
        .await;
    let (mut rd, mut wr) = raw.tcp.split();
    let stop = tokio::sync::Notify::new();
    let upload = async {
        let chunk = vec![0u8; 256 << 10];
        let mut sent = 0usize;
        loop {
            tokio::select! {
                _ = stop.notified() => break,
                r = wr.write_all(&chunk) => {
                    r.expect("the relay accepts the upload until the client stops");
                    sent += chunk.len();
                }
            }
        }
        wr.shutdown().await.expect("half-close");
        sent
    };
    let read = async {
        let mut buf = std::mem::take(&mut raw.buf);
        let mut chunk = vec![0u8; 4096];
        let frame = loop {
            if let Some((f, used)) = parse_server_frame(&buf) {
                buf.drain(..used);
                break f;
            }
            let n = tokio::time::timeout(WITHIN, rd.read(&mut chunk))
                .await
                .expect("the relay answers while the upload goes on")
                .expect("no reset before the close frame");
            assert!(n > 0, "EOF before the close frame");
            buf.extend_from_slice(&chunk[..n]);
        };
        stop.notify_one();
        assert_eq!(frame.close(), (1009, "Message too big".to_string()));
        let n = tokio::time::timeout(WITHIN, rd.read(&mut chunk))
            .await
            .expect("the relay ends the connection")
            .expect("a clean end, not a reset");
        assert_eq!(n, 0, "nothing after the close frame");
    };
    let (sent, ()) = tokio::join!(upload, read);
    assert!(sent > 0);
    h.assert_client_gone().await;
    healthy.assert_intact(&relay).await;
}

/// A client that floods RFC 6455 pings while reading nothing (so the pongs it is owed pile
/// up) is dropped once the relay can no longer write to it, instead of growing the relay's
/// memory without end; other sessions are undisturbed.
#[tokio::test]
async fn ping_flood_from_a_socket_that_never_reads_is_dropped() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(relay.addr).await.unwrap();
    let s = sid("pingflood");
    let request = upgrade_request(&format!("serverId={s}&role=client&v=2&connectionId=a"));
    tcp.write_all(request.as_bytes()).await.unwrap();
    // Never read: the relay's pongs fill this socket's window, then the relay's send buffer.
    let ping = frame(true, 0, OP_PING, Some(MASK), &[0x55; 125]);
    let batch: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 512)
        .collect();
    let flood = async {
        let mut sent = 0usize;
        loop {
            match tcp.write_all(&batch).await {
                Ok(()) => sent += 512,
                Err(_) => return sent,
            }
        }
    };
    // Well before the 30 s write-stall limit would drop it anyway.
    let sent = tokio::time::timeout(Duration::from_secs(10), flood)
        .await
        .expect("the relay drops a flooding socket that reads nothing");
    assert!(
        sent > 512,
        "the flood was accepted for a while ({sent} pings)"
    );
    healthy.assert_intact(&relay).await;
}

/// `n` zero bytes masked with the all-zero key (valid; keeps the test cheap).
fn zero_key_frame(fin: bool, opcode: u8, n: usize) -> Vec<u8> {
    let mut f = frame_header(fin, 0, opcode, Some([0; 4]), n as u64);
    f.resize(f.len() + n, 0);
    f
}

#[tokio::test]
async fn fragmented_message_over_32mib_is_1009() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    let half = MAX_MESSAGE / 2;
    let mut h = Hostile::open_with(&relay, true).await;
    // Exactly 32 MiB in two fragments is one message, delivered.
    let mut input = zero_key_frame(false, OP_BINARY, half);
    input.extend(zero_key_frame(true, OP_CONT, half));
    h.k.send(&input).await;
    match recv_within(&mut h.d, Duration::from_secs(30)).await {
        Message::Binary(b) => assert!(b.len() == MAX_MESSAGE && b.iter().all(|&x| x == 0)),
        other => panic!("expected the 32 MiB binary message, got {other:?}"),
    }
    // 32 MiB + 1 in three fragments, each under the frame limit: 1009.
    let mut input = zero_key_frame(false, OP_BINARY, half);
    input.extend(zero_key_frame(false, OP_CONT, half));
    input.extend(zero_key_frame(true, OP_CONT, 1));
    h.k.send(&input).await;
    h.k.expect_close_then_eof(TOO_BIG).await;
    h.assert_client_gone().await;

    // Text fragments count the same way.
    let mut h = Hostile::open(&relay).await;
    let mut input = zero_key_frame(false, OP_TEXT, half);
    input.extend(zero_key_frame(false, OP_CONT, half));
    input.extend(zero_key_frame(true, OP_CONT, 1));
    h.k.send(&input).await;
    h.k.expect_close_then_eof(TOO_BIG).await;
    h.assert_client_gone().await;

    // A control socket: 64 KiB + 1 in fragments.
    let s = sid("ctlfrag");
    let mut c = Raw::connect(&relay, &format!("serverId={s}&role=server&v=2")).await;
    assert_eq!(c.expect_text().await, SYNC_EMPTY);
    let mut input = zero_key_frame(false, OP_TEXT, MAX_CONTROL_MESSAGE / 2);
    input.extend(zero_key_frame(false, OP_CONT, MAX_CONTROL_MESSAGE / 2));
    input.extend(zero_key_frame(true, OP_CONT, 1));
    c.send(&input).await;
    c.expect_close_then_eof(TOO_BIG).await;
    healthy.assert_intact(&relay).await;
}

// ---------------------------------------------------------------------------------------------
// 8: control frames and fragmentation rules
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_control_frames_and_fragmentation_are_protocol_error() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    let big = vec![b'p'; 126];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("ping of 126 bytes", client_frame(OP_PING, &big)),
        ("pong of 126 bytes", client_frame(OP_PONG, &big)),
        ("close of 126 bytes", {
            let mut p = close_payload(1000, "");
            p.resize(126, b'r');
            client_frame(OP_CLOSE, &p)
        }),
        (
            "fragmented ping",
            frame(false, 0, OP_PING, Some(MASK), b"p"),
        ),
        (
            "fragmented close",
            frame(false, 0, OP_CLOSE, Some(MASK), &close_payload(1000, "")),
        ),
        ("continuation without a start", client_frame(OP_CONT, b"x")),
        ("new message inside a fragmented one", {
            let mut v = frame(false, 0, OP_TEXT, Some(MASK), b"a");
            v.extend(client_frame(OP_TEXT, b"b"));
            v
        }),
        (
            "close with a 1-byte payload",
            client_frame(OP_CLOSE, &[0x03]),
        ),
    ];
    for (what, input) in cases {
        hostile_client_case(&relay, what, &input, PROTOCOL_ERROR).await;
    }

    // The legal edges on one socket: a 125-byte ping is answered with the same payload, and a
    // ping between the fragments of a message is answered without breaking the message.
    let mut h = Hostile::open(&relay).await;
    let p125 = vec![b'q'; 125];
    h.k.send(&client_frame(OP_PING, &p125)).await;
    let pong = h.k.expect_frame().await;
    assert_eq!(
        pong,
        ServerFrame {
            fin: true,
            opcode: OP_PONG,
            payload: p125
        }
    );
    let mut input = frame(false, 0, OP_TEXT, Some(MASK), b"hel");
    input.extend(client_frame(OP_PING, b"mid"));
    input.extend(frame(true, 0, OP_CONT, Some(MASK), b"lo"));
    h.k.send(&input).await;
    let pong = h.k.expect_frame().await;
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (OP_PONG, &b"mid"[..])
    );
    assert_eq!(recv_text(&mut h.d).await, "hello");
    healthy.assert_intact(&relay).await;
}

// ---------------------------------------------------------------------------------------------
// 9: abrupt resets
// ---------------------------------------------------------------------------------------------

/// Points after the 101 at which a raw socket is killed: what it has written by then.
fn reset_points() -> Vec<(&'static str, Vec<u8>)> {
    let mut mid_frame = frame_header(true, 0, OP_BINARY, Some(MASK), 100);
    mid_frame.extend_from_slice(&[7; 10]);
    let mut after_message_mid_frame = client_frame(OP_TEXT, b"whole");
    after_message_mid_frame.extend_from_slice(&frame_header(true, 0, OP_TEXT, Some(MASK), 50));
    vec![
        ("idle after the 101", vec![]),
        ("one header byte", vec![0x82]),
        ("partial extended length", vec![0x82, 0xfe, 0x01]),
        ("partial masking key", vec![0x82, 0x85, MASK[0], MASK[1]]),
        (
            "header without payload",
            frame_header(true, 0, OP_TEXT, Some(MASK), 5),
        ),
        ("mid frame", mid_frame),
        (
            "mid fragmented message",
            frame(false, 0, OP_TEXT, Some(MASK), b"part"),
        ),
        ("mid frame after a whole message", after_message_mid_frame),
    ]
}

#[tokio::test]
async fn client_reset_at_every_point_cascades_like_a_close() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    for (what, bytes) in reset_points() {
        log::info!("client reset: {what}");
        let mut h = Hostile::open(&relay).await;
        h.k.send(&bytes).await;
        if what == "mid frame after a whole message" {
            assert_eq!(recv_text(&mut h.d).await, "whole");
        }
        let Hostile { mut c, mut d, k } = h;
        k.reset();
        client_gone(&mut c, &mut d).await;
    }
    // The same with an orderly FIN (no close frame) in the middle of a frame.
    let mut h = Hostile::open(&relay).await;
    h.k.send(&frame_header(true, 0, OP_TEXT, Some(MASK), 9))
        .await;
    h.k.tcp.shutdown().await.expect("shutdown");
    h.assert_client_gone().await;
    healthy.assert_intact(&relay).await;
}

/// Case 52: D(x) killed abruptly at every point closes its clients 1012, then `disconnected`.
#[tokio::test]
async fn data_socket_reset_closes_its_clients_1012() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    for (what, bytes) in reset_points() {
        log::info!("data reset: {what}");
        let s = sid("dreset");
        let (mut c, sync) = relay.control_synced(&s).await;
        assert_eq!(sync, SYNC_EMPTY);
        let mut d = Raw::connect(
            &relay,
            &format!("serverId={s}&role=server&v=2&connectionId=x"),
        )
        .await;
        let mut k1 = relay.client(&s, "x").await;
        let mut k2 = relay.client(&s, "x").await;
        let mut kb = relay.client(&s, "b").await;
        let mut db = relay.data(&s, "b").await;
        for _ in 0..3 {
            let (kind, ids) = next_event(&mut c).await;
            assert_eq!(kind, "connected");
            assert!(ids == ["x"] || ids == ["b"], "{ids:?}");
        }
        send_text(&mut k1, "to d").await;
        assert_eq!(d.expect_text().await, "to d");
        d.send(&bytes).await;
        if what == "mid frame after a whole message" {
            assert_eq!(recv_text(&mut k1).await, "whole");
            assert_eq!(recv_text(&mut k2).await, "whole");
        }
        d.reset();
        assert_eq!(
            recv_close(&mut k1).await,
            owned(SERVER_DISCONNECTED),
            "{what}"
        );
        assert_eq!(
            recv_close(&mut k2).await,
            owned(SERVER_DISCONNECTED),
            "{what}"
        );
        assert_eq!(next_event(&mut c).await, disconnected("x"));
        // The other connectionId of the same session is untouched.
        send_text(&mut kb, "b up").await;
        assert_eq!(recv_text(&mut db).await, "b up");
        send_text(&mut db, "b down").await;
        assert_eq!(recv_text(&mut kb).await, "b down");
    }
    healthy.assert_intact(&relay).await;
}

#[tokio::test]
async fn reset_mid_request_head_leaves_no_trace() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    let s = sid("headreset");
    let (mut c, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, SYNC_EMPTY);
    let full = upgrade_request(&format!("serverId={s}&role=client&v=2&connectionId=x"));
    let cuts = [
        2,
        "GET /ws?serverI".len(),
        full.find(" HTTP/1.1").unwrap(),
        full.find("\r\n").unwrap() + 2,
        full.find("Upgrade:").unwrap() + 4,
        full.len() - 3,
        full.len() - 1,
    ];
    for cut in cuts {
        for linger0 in [true, false] {
            let mut raw = Raw::tcp(&relay).await;
            raw.send(&full.as_bytes()[..cut]).await;
            if linger0 {
                raw.reset();
            } else {
                drop(raw);
            }
        }
    }
    // None of them attached: the first event C sees is the probe's.
    let _probe = relay.client(&s, "probe").await;
    assert_eq!(next_event(&mut c).await, connected("probe"));
    healthy.assert_intact(&relay).await;
}

#[tokio::test]
async fn reset_after_the_head_before_the_101_is_read() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    let s = sid("pre101");
    let (mut c, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, SYNC_EMPTY);

    // Deterministic: the socket is registered (C hears `connected`) while its 101 sits unread
    // in the client's receive buffer; then the client resets.
    for i in 0..5 {
        let x = format!("x{i}");
        let mut raw = Raw::tcp(&relay).await;
        raw.send(
            upgrade_request(&format!("serverId={s}&role=client&v=2&connectionId={x}")).as_bytes(),
        )
        .await;
        assert_eq!(next_event(&mut c).await, connected(&x));
        raw.reset();
        assert_eq!(next_event(&mut c).await, disconnected(&x));
    }

    // Racing: reset right after writing the head. Each socket either never attaches or
    // attaches and is detached again.
    let racy: HashSet<String> = (0..20).map(|i| format!("r{i}")).collect();
    for x in &racy {
        let mut raw = Raw::tcp(&relay).await;
        raw.send(
            upgrade_request(&format!("serverId={s}&role=client&v=2&connectionId={x}")).as_bytes(),
        )
        .await;
        raw.reset();
    }
    let _probe = relay.client(&s, "probe").await;
    let mut open = HashSet::new();
    let mut probe_seen = false;
    while !(probe_seen && open.is_empty()) {
        let (kind, ids) = next_event(&mut c).await;
        let x = ids.into_iter().next().expect("an id");
        match kind.as_str() {
            "connected" if x == "probe" => probe_seen = true,
            "connected" if racy.contains(&x) => assert!(open.insert(x), "twice connected"),
            "disconnected" if open.remove(&x) => {}
            _ => panic!("unexpected {kind} {x} (open: {open:?})"),
        }
    }
    healthy.assert_intact(&relay).await;
}

// ---------------------------------------------------------------------------------------------
// 10: malformed HTTP
// ---------------------------------------------------------------------------------------------

/// What the relay did with a raw request.
#[derive(Debug)]
enum Outcome {
    /// A response: status and body.
    Status(u16, String),
    /// The connection was closed (EOF or reset) without a response.
    Closed,
}

/// Writes `raw` (in a separate task: the relay may stop reading and close) and waits, bounded
/// by [`WITHIN`], for a response head or the end of the connection.
async fn send_hostile_http(relay: &TestRelay, raw: Vec<u8>) -> Outcome {
    let tcp = TcpStream::connect(relay.addr).await.expect("connect");
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        // A write error means the relay closed first, which the read side observes.
        let _ = wr.write_all(&raw).await;
        wr
    });
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    let outcome = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).into_owned();
            let status: u16 = head
                .get(9..12)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            let mut body = buf[i + 4..].to_vec();
            while body.len() < len {
                match tokio::time::timeout(WITHIN, rd.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
                    Ok(_) => break,
                    Err(_) => panic!("response body not complete within {WITHIN:?}"),
                }
            }
            break Outcome::Status(status, String::from_utf8_lossy(&body).into_owned());
        }
        match tokio::time::timeout(WITHIN, rd.read(&mut chunk)).await {
            Err(_) => panic!("the relay neither answered nor closed within {WITHIN:?} (hang)"),
            Ok(Ok(0)) | Ok(Err(_)) => break Outcome::Closed,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    writer.abort();
    outcome
}

fn assert_rejected(what: &str, outcome: &Outcome) {
    if let Outcome::Status(status, body) = outcome {
        log::info!("{what}: {status} {body:?}");
    }
    match outcome {
        Outcome::Status(s, _) if (400..500).contains(s) => {}
        Outcome::Closed => {}
        other => panic!("{what}: expected a 4xx or a closed connection, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_http_is_rejected_and_the_relay_keeps_serving() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    let mut blob = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec();
    blob.extend((0..2000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    let many_headers: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage request line", b"HELLO THERE\r\n\r\n".to_vec()),
        (
            "garbage request line with a target",
            b"\x01\x02 /ws HTTP/1.1\r\nHost: r\r\n\r\n".to_vec(),
        ),
        ("spaces only", b"   \r\n\r\n".to_vec()),
        (
            "bad version",
            b"GET /health HTTP/9.9.9\r\nHost: r\r\n\r\n".to_vec(),
        ),
        (
            "header without a colon",
            b"GET /health HTTP/1.1\r\nHost r\r\n\r\n".to_vec(),
        ),
        (
            "NUL in a header value",
            b"GET /health HTTP/1.1\r\nHost: r\0x\r\n\r\n".to_vec(),
        ),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
        ("binary blob", blob),
        (
            "300 headers",
            format!("GET /health HTTP/1.1\r\nHost: r\r\n{many_headers}\r\n").into_bytes(),
        ),
        (
            "2 MiB header",
            format!(
                "GET /health HTTP/1.1\r\nHost: r\r\nX-Big: {}\r\n\r\n",
                "a".repeat(2 << 20)
            )
            .into_bytes(),
        ),
    ];
    for (what, raw) in cases {
        let outcome = send_hostile_http(&relay, raw).await;
        assert_rejected(what, &outcome);
        assert_health(&relay).await;
    }
    healthy.assert_intact(&relay).await;
}

/// A single header over 64 KiB is refused (4xx or close), on any path, and the relay keeps
/// serving. (Pingora's own request-head limit is 1 MiB, covered by the 2 MiB case above.)
#[tokio::test]
async fn header_over_64kib_is_rejected() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    let big = "a".repeat((64 << 10) + 1);
    let mut outcomes = Vec::new();
    for path in ["/health", "/ws?serverId=S&role=server&v=2", "/nope"] {
        let raw =
            format!("GET {path} HTTP/1.1\r\nHost: r\r\n{UPGRADE_HEADERS}X-Big: {big}\r\n\r\n");
        let outcome = send_hostile_http(&relay, raw.into_bytes()).await;
        assert_health(&relay).await;
        outcomes.push((path, outcome));
    }
    healthy.assert_intact(&relay).await;
    for (path, outcome) in &outcomes {
        match outcome {
            Outcome::Status(431, body) => {
                assert_eq!(body.as_str(), "Request header fields too large", "{path}")
            }
            other => panic!("{path}: a 64 KiB + 1 header got {other:?}, expected 431"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 11: malformed queries
// ---------------------------------------------------------------------------------------------

async fn upgrade_status(relay: &TestRelay, query: &str) -> HttpResponse {
    relay.get(&format!("/ws?{query}"), UPGRADE_HEADERS).await
}

#[tokio::test]
async fn malformed_queries() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    let baseline = relay.hub.session_count();

    // Invalid escapes stay literal (WHATWG): serverId "%ZZ" is the session that a client
    // naming it properly (%25ZZ) joins. The same for a lone "%" and a truncated "%Z".
    for (raw_id, encoded) in [
        ("%ZZ", "%25ZZ"),
        ("%", "%25"),
        ("%Z", "%25Z"),
        ("a%2", "a%252"),
    ] {
        let mut c = Raw::connect(&relay, &format!("serverId={raw_id}&role=server&v=2")).await;
        assert_eq!(c.expect_text().await, SYNC_EMPTY, "{raw_id}");
        let _k = relay
            .ws(&format!(
                "serverId={encoded}&role=client&v=2&connectionId=q"
            ))
            .await;
        assert_eq!(
            c.expect_text().await,
            r#"{"type":"connected","connectionId":"q"}"#,
            "{raw_id}"
        );
    }
    // %00 decodes to a NUL character, a valid (non-empty) serverId; %FF decodes to U+FFFD.
    for (raw_id, same) in [("%00", "%00"), ("%FF", "%EF%BF%BD")] {
        let mut c = Raw::connect(&relay, &format!("serverId={raw_id}&role=server&v=2")).await;
        assert_eq!(c.expect_text().await, SYNC_EMPTY, "{raw_id}");
        let _k = relay
            .ws(&format!("serverId={same}&role=client&v=2&connectionId=q"))
            .await;
        assert_eq!(
            c.expect_text().await,
            r#"{"type":"connected","connectionId":"q"}"#,
            "{raw_id}"
        );
    }

    // Very long queries.
    let ten_k = "x".repeat(10_000);
    let rejections = [
        (
            format!("serverId={ten_k}&role=server&v=2"),
            "serverId is too long",
        ),
        (
            format!("serverId=S&role=client&v=2&connectionId={ten_k}"),
            "connectionId is too long",
        ),
        // Length is counted in bytes after decoding: 257 x "%41" is 771 characters.
        (
            format!("serverId={}&role=server&v=2", "%41".repeat(257)),
            "serverId is too long",
        ),
        // The length check precedes v and role.
        (format!("serverId={ten_k}&v=9"), "serverId is too long"),
    ];
    for (query, body) in &rejections {
        let r = upgrade_status(&relay, query).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (400, *body),
            "{}",
            &query[..40]
        );
        assert_eq!(r.header("content-type"), Some(TEXT_PLAIN));
        // Without an upgrade the parameter checks come first too.
        let r = relay.get(&format!("/ws?{query}"), "").await;
        assert_eq!((r.status, r.body.as_str()), (400, *body));
    }
    assert_eq!(
        relay.hub.session_count(),
        baseline,
        "rejected requests create no state"
    );
    // 256 bytes after decoding (768 characters) is accepted, and 10 KB of unknown parameters
    // are ignored.
    let accepted = [
        format!("serverId={}&role=server&v=2", "%41".repeat(256)),
        format!("serverId=S10k&role=server&v=2&pad={ten_k}"),
    ];
    for query in &accepted {
        let mut c = Raw::connect(&relay, query).await;
        assert_eq!(c.expect_text().await, SYNC_EMPTY);
    }
    healthy.assert_intact(&relay).await;
}

// ---------------------------------------------------------------------------------------------
// 12: stalled connections
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn two_hundred_stalled_handshakes_do_not_block_others() {
    // Every connection comes from 127.0.0.1: raise the per-address limits (their own
    // tests are in operator.rs), so the 200 stalled upgrades all reach the relay.
    let relay = TestRelay::start_with(relay_module::RelayConf {
        max_websockets_per_ip: 1000,
        upgrade_burst_per_ip: 1000,
        ..relay_module::RelayConf::default()
    })
    .await;
    let mut healthy = Healthy::open(&relay).await;
    let s = sid("stall");
    let mut half_heads = Vec::new();
    let mut unread_101s = Vec::new();
    for i in 0..200 {
        let full = upgrade_request(&format!("serverId={s}&role=client&v=2&connectionId=k{i}"));
        let mut raw = Raw::tcp(&relay).await;
        if i % 2 == 0 {
            // Half a request head, then silence.
            let cut = full.len() / 2;
            raw.send(&full.as_bytes()[..cut]).await;
            half_heads.push((raw, full[cut..].to_string()));
        } else {
            // A whole head whose 101 is never read, then silence (no frames).
            raw.send(full.as_bytes()).await;
            unread_101s.push(raw);
        }
    }
    // Existing sessions keep relaying, new sessions pair, /health answers.
    healthy.roundtrip().await;
    assert_health(&relay).await;
    let fresh = Healthy::open(&relay).await;
    fresh.assert_intact(&relay).await;
    // The stalled heads are still being waited for: finishing some of them upgrades them.
    let mut finished = Vec::new();
    for (mut raw, rest) in half_heads.drain(..10) {
        raw.send(rest.as_bytes()).await;
        raw.expect_101().await;
        finished.push(raw);
    }
    // A control on the stalled session sees every attached client: the 100 whole heads and
    // the 10 finished ones.
    let (c, sync) = relay.control_synced(&s).await;
    let v: serde_json::Value = serde_json::from_str(&sync).unwrap();
    assert_eq!(v["connectionIds"].as_array().unwrap().len(), 110, "{sync}");
    drop(c);
    drop((half_heads, unread_101s, finished));
    healthy.assert_intact(&relay).await;
}

// ---------------------------------------------------------------------------------------------
// Close echo and app-defined close codes (cases 55, 56)
// ---------------------------------------------------------------------------------------------

/// C, D(a), K(a) on a fresh serverId, with C's `connected` consumed.
async fn paired(relay: &TestRelay) -> (Ws, Ws, Ws) {
    let s = sid("pair");
    let (mut c, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, SYNC_EMPTY);
    let d = relay.data(&s, "a").await;
    let k = relay.client(&s, "a").await;
    assert_eq!(next_event(&mut c).await, connected("a"));
    (c, d, k)
}

/// After its close was echoed, the socket ends (no 1006 left to a timeout).
async fn assert_ends(ws: &mut Ws) {
    use futures_util::StreamExt;
    let end = tokio::time::timeout(WITHIN, ws.next())
        .await
        .expect("the socket ends after the close handshake");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
}

/// Case 55: the relay echoes a peer's close, on the wire exactly.
#[tokio::test]
async fn case55_close_is_echoed() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    let (mut c, mut d, mut k) = paired(&relay).await;
    send_close(&mut k, 1000, "bye").await;
    assert_eq!(recv_close(&mut k).await, (1000, "bye".to_string()));
    assert_ends(&mut k).await;
    assert_eq!(recv_close(&mut d).await, owned(CLIENT_DISCONNECTED));
    assert_eq!(next_event(&mut c).await, disconnected("a"));

    // Raw: the echo is an unmasked close frame 1000 "bye", then the relay closes the TCP
    // connection.
    let mut h = Hostile::open(&relay).await;
    h.k.send(&client_frame(OP_CLOSE, &close_payload(1000, "bye")))
        .await;
    h.k.expect_close_then_eof((1000, "bye")).await;
    h.assert_client_gone().await;
    // An empty close is echoed empty.
    let mut h = Hostile::open(&relay).await;
    h.k.send(&client_frame(OP_CLOSE, &[])).await;
    let f = h.k.expect_frame().await;
    assert_eq!((f.opcode, f.payload.len()), (OP_CLOSE, 0));
    assert!(h.k.next_frame().await.is_none());
    h.assert_client_gone().await;
    healthy.assert_intact(&relay).await;
}

/// Close codes a peer may not send (RFC 6455 §7.4: 1005, 1006, 1015, below 1000, 1016-2999):
/// the relay answers 1002 instead of echoing them.
///
/// The reason here is tungstenite's own close reply ("Protocol violation",
/// tungstenite-0.30.0/src/protocol/mod.rs:724-733), not the relay's "Protocol error" of
/// `conn.rs` `close_for_error`: the peer's close is answered inside tungstenite's close
/// handshake before the relay sees it. The code is what the spec requires; the reason is
/// pinned so a change to either is noticed.
#[tokio::test]
async fn forbidden_close_codes_are_protocol_error() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999] {
        let input = client_frame(OP_CLOSE, &close_payload(code, "x"));
        let what = format!("close {code}");
        hostile_client_case(&relay, &what, &input, (1002, "Protocol violation")).await;
    }
    // 3000-4999 are application codes: echoed as sent.
    for code in [3000u16, 4999] {
        let mut h = Hostile::open(&relay).await;
        h.k.send(&client_frame(OP_CLOSE, &close_payload(code, "app")))
            .await;
        h.k.expect_close_then_eof((code, "app")).await;
        h.assert_client_gone().await;
    }
    healthy.assert_intact(&relay).await;
}

/// Case 56: K closing 4001 cascades like case 48; D closing 1011 cascades like case 51.
#[tokio::test]
async fn case56_app_close_codes_cascade() {
    let relay = TestRelay::start().await;
    let healthy = Healthy::open(&relay).await;

    let (mut c, mut d, mut k) = paired(&relay).await;
    send_close(&mut k, 4001, "E2EE handshake failed").await;
    assert_eq!(
        recv_close(&mut k).await,
        (4001, "E2EE handshake failed".to_string())
    );
    assert_eq!(recv_close(&mut d).await, owned(CLIENT_DISCONNECTED));
    assert_eq!(next_event(&mut c).await, disconnected("a"));

    let (mut c, mut d, mut k) = paired(&relay).await;
    send_close(&mut d, 1011, "E2EE handshake failed").await;
    assert_eq!(
        recv_close(&mut d).await,
        (1011, "E2EE handshake failed".to_string())
    );
    assert_eq!(recv_close(&mut k).await, owned(SERVER_DISCONNECTED));
    assert_eq!(next_event(&mut c).await, disconnected("a"));
    healthy.assert_intact(&relay).await;
}

/// A data message over 8 KiB leaves the relay as one fragmented message of 8 KiB frames
/// (RFC 6455 §5.4; issue 11): binary then continuation frames, FIN on the last only, the
/// bytes unchanged; a text message likewise with opcode 1; a small one stays one frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_leave_the_relay_as_8_kib_fragments() {
    let relay = TestRelay::start().await;
    let mut h = Hostile::open(&relay).await;
    let bytes: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let text = "x".repeat(16_385);
    send_binary(&mut h.d, &bytes).await;
    send_text(&mut h.d, &text).await;
    send_binary(&mut h.d, &bytes[..8192]).await;
    let mut frames = Vec::new();
    for i in 0..6 {
        let f = h.k.expect_frame().await;
        if i < 3 {
            assert_eq!(
                f.payload[..],
                bytes[i * 8192..][..f.payload.len()],
                "frame {i}"
            );
        } else {
            assert!(f.payload.iter().all(|&b| b == b'x'), "frame {i}");
        }
        frames.push((f.fin, f.opcode, f.payload.len()));
    }
    assert_eq!(
        frames,
        [
            (false, 2, 8192),
            (false, 0, 8192),
            (true, 0, 20_000 - 2 * 8192),
            (false, 1, 8192),
            (false, 0, 8192),
            (true, 0, 1),
        ]
    );
    let small = h.k.expect_frame().await;
    assert_eq!((small.fin, small.opcode), (true, 2));
    assert_eq!(small.payload, bytes[..8192]);
}
