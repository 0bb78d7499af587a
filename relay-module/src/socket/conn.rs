//! One accepted WebSocket: a reader task and a writer task that own its stream
//! (relay-protocol.md §0 "Frames and limits", "Liveness").
//!
//! ```text
//!   peer ──frames──▶ reader ──forward()──▶ other sockets' Outbox (bounded, waits ≤ 30 s)
//!                      │  JSON ping on control → pong on own priority lane
//!                      └─ silence 90 s → close 1001
//!   peer ◀──batch+flush── writer ◀── own Outbox (priority lane first, then data) + ping 30 s
//!                           └─ no write progress for 30 s → connection dropped
//! ```
//!
//! The reader owns the read half and the session attachment; the writer owns the write half.
//! RFC 6455 pings are answered by tungstenite; peer closes are echoed. A relay-initiated
//! close waits at most `close_grace_ms` for the peer's reply. When the reader ends, the
//! writer is stopped and the socket is detached from its session.
//!
//! Every byte in either direction passes [`Activity`]: inbound, the frame headers reserve
//! partly received messages in the ingress budget ([`crate::socket::ingress`]); outbound,
//! the headers show which frame is the close the relay sends (its own, or tungstenite's
//! echo of the peer's), counted in `paseo_relay_closes_total` and in the socket's close line.

use crate::protocol::{close, is_json_ping, ControlMessage, Role, SocketKind, Version};
use crate::session::hub::{short_id, Attachment, SessionHub};
use crate::session::Forward;
use crate::socket::ingress::{FrameCursor, Ingress, Refusal, Step, LARGE_FRAME_BYTES};
use crate::socket::outbox::{Command, Outbox, OutboxReceiver, SendError, Taken};
use futures_util::future::join_all;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use log::{debug, info, warn};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;

/// Most messages one writer batch takes before it flushes.
const MAX_BATCH_MESSAGES: usize = 64;
/// Most payload bytes one writer batch takes before it flushes.
const MAX_BATCH_BYTES: usize = 256 << 10;
/// Messages up to this size are copied out of tungstenite's read allocation before they are
/// queued or buffered: a small frame sliced from a large read would otherwise keep the whole
/// allocation (up to a 32 MiB message) alive while the budgets count only its own bytes.
const UNSHARE_BELOW_BYTES: usize = 16 << 10;
/// RFC 6455 pings a peer may send while the relay cannot write to it (each needs a pong it
/// is not reading); past this the connection is dropped.
const MAX_PINGS_WHILE_BLOCKED: u32 = 64;
/// tungstenite read buffer per socket, in bytes. tungstenite allocates it up front and
/// never reads more than this per call, so it is small (an idle socket holds it), and
/// [`READAHEAD_BYTES`] keeps large messages from costing one syscall per 1 KiB.
const READ_BUFFER_BYTES: usize = 1 << 10;
/// While the peer streams (a read fills tungstenite's whole buffer), the socket is read in
/// chunks this large into a buffer that is freed once the socket is drained.
const READAHEAD_BYTES: usize = 16 << 10;
/// tungstenite write buffer target, in bytes: once more is buffered it is written out, and
/// a flush always writes everything. Small messages are written together up to about this
/// much; with [`MAX_FRAME_OUT_BYTES`] it bounds what the buffer ever holds (and keeps
/// allocated) to about twice it.
const WRITE_BUFFER_BYTES: usize = 8 << 10;
/// Largest frame payload the relay writes, in bytes. A longer data message goes out as a
/// fragmented message (RFC 6455 §5.4: an intermediary may change the fragmentation of a
/// message without extensions; opcode and bytes are unchanged, spec §0) whose frames are
/// slices of the one received payload: tungstenite's write buffer copies one fragment at a
/// time instead of the whole message, so a 32 MiB message is held once, not twice, and no
/// socket keeps a message-sized write buffer after it (issue 11).
const MAX_FRAME_OUT_BYTES: usize = 8 << 10;

/// Where the read loop's timer is parked after it fired, until the top of the loop sets the
/// next deadline (always earlier than this). Should it fire anyway (a configured timeout
/// over a day), the loop finds the deadline not reached and sets it again: harmless.
const NEVER: Duration = Duration::from_secs(24 * 3600);

/// Largest payload of a close frame the relay sends (RFC 6455 §5.5: 125 bytes).
const MAX_CLOSE_PAYLOAD: usize = 125;
/// The code `paseo_relay_closes_total` counts a close frame without a status code under
/// (RFC 6455 §7.4.1: 1005, "no status code was present").
const NO_STATUS_CODE: u16 = 1005;

/// The largest message on a socket of `kind` (spec §0: 64 KiB on a control socket).
fn message_limit(kind: &SocketKind, conf: &crate::RelayConf) -> usize {
    match kind {
        SocketKind::Control => conf.max_control_message_bytes,
        _ => conf.max_message_bytes,
    }
}

/// tungstenite settings for a socket of `kind`: message limits of spec §0 (64 KiB on a
/// control socket), never unmasked client frames.
pub fn ws_config(kind: &SocketKind, conf: &crate::RelayConf) -> WebSocketConfig {
    let max = message_limit(kind, conf);
    // A generous cap on what tungstenite may buffer (since issue 11 the writer buffers at most
    // about 2 x WRITE_BUFFER_BYTES, a message's fragments being written as they go): one
    // largest message plus a batch, a large `sync` and a few pongs. Beyond it tungstenite
    // refuses to buffer.
    let max_write_buffer =
        conf.max_message_bytes + MAX_BATCH_BYTES + WRITE_BUFFER_BYTES + (1 << 20);
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(max_write_buffer)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// Runs a socket whose 101 has been written: `stream` is the raw connection and `preread` the
/// bytes the peer sent behind its request head. The returned future (to spawn as the
/// socket's reader task) ends when the socket is gone; dropping the attachment then detaches
/// it from its session. Called on the runtime: it spawns the socket's writer task at once.
pub fn run<S>(
    stream: S,
    preread: Vec<u8>,
    att: Attachment,
    rx: OutboxReceiver,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Set up outside the task's future: whatever an async fn holds across an await (its
    // arguments, tungstenite's stream before the split, the writer's future before the
    // spawn) is reserved in the task for the socket's whole life (idle memory, issue 11).
    let started = start(stream, preread, &att, rx);
    async move {
        let Some((stream, mut writer, io)) = started else {
            return; // dropping `att` detaches the socket
        };
        // Borrowed from the attachment, not copied: each copy would live in every socket's
        // task.
        let conf = att.conf();
        let (stream, end, received) = read_loop(stream, &mut writer, &att, conf, &io).await;
        // Senders still waiting for room in this socket's queue give up at once, and the
        // session's cascades run now, not after the goodbye below.
        att.outbox.shut();
        att.detach();
        match end {
            ReadEnd::Linger(sink) => {
                Box::pin(linger(
                    stream,
                    sink,
                    writer,
                    &att.outbox,
                    conf.close_grace(),
                ))
                .await
            }
            ReadEnd::Drop => writer.abort(),
        }
        // What is still queued will never be written.
        att.outbox.settle();
        log_closed(&att, &io, &received);
    }
}

/// tungstenite over [`Activity`], split into the read half (returned) and the write half
/// (moved into the writer task, spawned here). `None` if tokio-tungstenite's constructor did
/// not complete at once (it always does: it only wraps the stream).
#[allow(clippy::type_complexity)]
fn start<S>(
    stream: S,
    preread: Vec<u8>,
    att: &Attachment,
    rx: OutboxReceiver,
) -> Option<(
    Stream<S>,
    tokio::task::JoinHandle<(WriterEnd, Sink<S>)>,
    Arc<IoClock>,
)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conf = att.conf();
    let config = ws_config(&att.kind, conf);
    // The pipelined bytes go through the ingress tracker like every later byte.
    let (stream, io) = Activity::new(stream, preread, att.hub(), message_limit(&att.kind, conf));
    let Some(ws) =
        WebSocketStream::from_raw_socket(stream, WsRole::Server, Some(config)).now_or_never()
    else {
        warn!("{}: the WebSocket stream did not start", att.describe());
        return None;
    };
    let (sink, stream) = ws.split();
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        att.outbox.clone(),
        io.clone(),
        conf.ping_interval(),
        conf.slow_consumer_timeout(),
    ));
    Some((stream, writer, io))
}

/// What the reader saw of the peer: its data messages and its close frame.
#[derive(Debug, Default)]
struct Received {
    msgs: u64,
    bytes: u64,
    /// The peer's close: its code (none in an empty close frame) and reason.
    close: Option<Box<(Option<u16>, String)>>,
}

/// `1000 "reason"`, `none` (no close frame), or `no code` (an empty close frame).
fn describe_close(close: Option<&(Option<u16>, String)>) -> String {
    match close {
        None => "none".to_string(),
        Some((None, _)) => "no code".to_string(),
        Some((Some(code), reason)) => format!("{code} \"{}\"", reason.escape_debug()),
    }
}

/// The one info line of a socket that ended: who it was, the closes both ways, how long it
/// lived and the traffic each way (never payload). Also as key-value fields for a
/// structured log formatter: `kind`, `version`, `server_id`, `connection_id`,
/// `close_sent_code`, `close_sent_reason`, `close_received_code`, `close_received_reason`,
/// `duration_ms`, `in_msgs`, `in_bytes`, `out_msgs`, `out_bytes` (ids cut to 8 characters
/// and escaped; reasons escaped; a code or reason that does not exist is null).
fn log_closed(att: &Attachment, io: &IoClock, received: &Received) {
    let (version, server_id) = att.key();
    let (kind, connection_id) = match &att.kind {
        SocketKind::Control => ("control", None),
        SocketKind::Data(x) => ("data", Some(short_id(x))),
        SocketKind::Client(x) => ("client", Some(short_id(x))),
        SocketKind::V1(Role::Server) => ("v1 server", None),
        SocketKind::V1(Role::Client) => ("v1 client", None),
    };
    let version_label = match version {
        Version::V1 => "v1",
        Version::V2 => "v2",
    };
    let server_id = short_id(server_id);
    let sent = io.sent_close.get().map(|b| &**b);
    let got = received.close.as_deref();
    let reason = |c: Option<&(Option<u16>, String)>| c.map(|(_, r)| r.escape_debug().to_string());
    let (sent_reason, got_reason) = (reason(sent), reason(got));
    let duration_ms = io.base.elapsed().as_millis() as u64;
    let (out_msgs, out_bytes) = (
        io.out_msgs.load(Ordering::Relaxed),
        io.out_bytes.load(Ordering::Relaxed),
    );
    info!(
        kind = kind,
        version = version_label,
        server_id = server_id.as_str(),
        connection_id = connection_id.as_deref(),
        close_sent_code = sent.and_then(|c| c.0),
        close_sent_reason = sent_reason.as_deref(),
        close_received_code = got.and_then(|c| c.0),
        close_received_reason = got_reason.as_deref(),
        duration_ms = duration_ms,
        in_msgs = received.msgs,
        in_bytes = received.bytes,
        out_msgs = out_msgs,
        out_bytes = out_bytes;
        "session {server_id} ({version:?}) {kind}{}{} closed: sent {}, received {}, {duration_ms} ms, \
         in {} msgs {} B, out {out_msgs} msgs {out_bytes} B",
        if connection_id.is_some() { " " } else { "" },
        connection_id.as_deref().unwrap_or(""),
        describe_close(sent),
        describe_close(got),
        received.msgs,
        received.bytes,
    );
}

/// Wraps a socket's stream and records when bytes last moved in each direction: any inbound
/// bytes (including the frames of a message still being reassembled) count as life for the
/// ping timeout, and outbound progress tells a slow reader from a stuck one (spec §0).
/// Inbound bytes reach tungstenite only as the ingress budget admits them; outbound frame
/// headers are followed to find the close frame.
struct Activity<S> {
    inner: S,
    io: Arc<IoClock>,
    /// The last write found the send buffer full.
    write_blocked: bool,
    /// Read-ahead while a large message streams in (or bytes the budget has not admitted
    /// yet, or the bytes pipelined behind the request head); `None` on an idle socket.
    ahead: Option<ReadAhead>,
    /// The last direct read filled the caller's whole buffer: read ahead next time.
    streaming: bool,
    ingress: Ingress,
    egress: Egress,
    /// The reader task's waker (from [`IoClock::reader`] once the read loop has started),
    /// registered for read readiness instead of the waker tokio-tungstenite passes, which
    /// wakes the reader *and* the writer task on every inbound frame: a spurious poll of the
    /// writer and, with two runnable tasks, a wake-up of another worker thread per relayed
    /// message (issue 11). Only the reader reads: the writer's sink operations (tungstenite
    /// 0.30 `write`, `flush`, `close`; TCP and tokio-rustls writes) never call `poll_read`.
    /// One exception, on a connection that is failing anyway: tokio-rustls writes a TLS
    /// alert from inside a read that failed to decode, registering the reader's waker for
    /// write readiness; a writer blocked at that moment is then bounded by its stall timer.
    reader: Option<std::task::Waker>,
}

/// Follows the frames the relay writes, to catch its close frame.
#[derive(Debug, Default)]
struct Egress {
    frames: FrameCursor,
    /// The payload of a close frame being written.
    // Boxed on purpose: 8 bytes instead of 24 in every idle socket's state (spec §0 memory).
    #[allow(clippy::box_collection)]
    close: Option<Box<Vec<u8>>>,
}

impl Egress {
    /// `bytes` were accepted by the socket, in order.
    fn written(&mut self, bytes: &[u8], io: &IoClock) {
        let mut pos = 0;
        while pos < bytes.len() {
            let rest = &bytes[pos..];
            match self.frames.peek(rest) {
                Step::Payload(n) => {
                    if let Some(close) = &mut self.close {
                        let room = MAX_CLOSE_PAYLOAD.saturating_sub(close.len());
                        close.extend_from_slice(&rest[..n.min(room)]);
                    }
                    pos += n;
                    if self.frames.pass(n) {
                        self.frame_ended(io);
                    }
                }
                Step::Partial(n) => {
                    self.frames.keep(&rest[..n]);
                    pos += n;
                }
                Step::Header(h, k) => {
                    pos += k;
                    if h.opcode == 0x8 {
                        self.close = Some(Box::default());
                    }
                    if self.frames.commit(&h) {
                        self.frame_ended(io);
                    }
                }
            }
        }
    }

    fn frame_ended(&mut self, io: &IoClock) {
        if let Some(payload) = self.close.take() {
            io.close_written(&payload);
        }
    }
}

/// Bytes read from the socket and not yet handed to tungstenite: `buf[pos..len]`.
struct ReadAhead {
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    /// The last fill was small (the peer stopped streaming): free the buffer once consumed.
    drained: bool,
}

/// Milliseconds from `base` (when the socket started) to the last read that returned bytes,
/// the last write that accepted some, and the last write that completed after the socket's
/// send buffer had been full (proof that the peer is taking data); and what was sent.
struct IoClock {
    base: Instant,
    last_read_ms: AtomicU64,
    last_write_ms: AtomicU64,
    last_drain_ms: AtomicU64,
    /// The last write found the send buffer full (the peer is not taking data).
    write_blocked: std::sync::atomic::AtomicBool,
    /// Data and control messages written, and their payload bytes.
    out_msgs: AtomicU64,
    out_bytes: AtomicU64,
    /// The close frame the relay wrote (there is at most one): code and reason.
    sent_close: OnceLock<Box<(Option<u16>, String)>>,
    /// The reader task's waker, set by the read loop's first poll (see [`Activity`]).
    reader: OnceLock<std::task::Waker>,
    hub: Arc<SessionHub>,
}

impl IoClock {
    /// The socket accepted the last byte of a close frame with `payload`.
    fn close_written(&self, payload: &[u8]) {
        let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
        let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
        if self.sent_close.set(Box::new((code, reason))).is_ok() {
            self.hub
                .metrics()
                .close_sent(code.unwrap_or(NO_STATUS_CODE));
        }
    }

    fn at(&self, ms: &AtomicU64) -> Instant {
        self.base + Duration::from_millis(ms.load(Ordering::Relaxed))
    }
    fn stamp(&self, ms: &AtomicU64) {
        ms.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// When bytes last arrived.
    fn last_read(&self) -> Instant {
        self.at(&self.last_read_ms)
    }
    /// When a write last made progress.
    fn last_write(&self) -> Instant {
        self.at(&self.last_write_ms)
    }
    /// When the peer was last seen alive: bytes arrived, or a full send buffer drained.
    fn last_alive(&self) -> Instant {
        self.last_read().max(self.at(&self.last_drain_ms))
    }
}

impl<S> Activity<S> {
    /// Wraps `inner`, whose first bytes are `preread` (read behind the request head); its
    /// messages are at most `limit` bytes, reserved in `hub`'s ingress budget.
    fn new(
        inner: S,
        preread: Vec<u8>,
        hub: &Arc<SessionHub>,
        limit: usize,
    ) -> (Self, Arc<IoClock>) {
        let io = Arc::new(IoClock {
            base: Instant::now(),
            last_read_ms: AtomicU64::new(0),
            last_write_ms: AtomicU64::new(0),
            last_drain_ms: AtomicU64::new(0),
            write_blocked: std::sync::atomic::AtomicBool::new(false),
            out_msgs: AtomicU64::new(0),
            out_bytes: AtomicU64::new(0),
            sent_close: OnceLock::new(),
            reader: OnceLock::new(),
            hub: hub.clone(),
        });
        let ahead = (!preread.is_empty()).then(|| ReadAhead {
            len: preread.len(),
            buf: preread.into_boxed_slice(),
            pos: 0,
            drained: true,
        });
        (
            Activity {
                inner,
                io: io.clone(),
                write_blocked: false,
                ahead,
                streaming: false,
                ingress: Ingress::new(hub.ingress().clone(), limit),
                egress: Egress::default(),
                reader: None,
            },
            io,
        )
    }

    /// The reader is done with frames (the socket is ending): later bytes are only drained,
    /// never held back by the ingress budget, and the reservation goes back.
    fn stop_ingress(&mut self) {
        self.ingress.stop();
    }
}

impl ReadAhead {
    /// A buffer holding exactly `bytes`, freed once they are consumed.
    fn holding(bytes: &[u8]) -> ReadAhead {
        ReadAhead {
            buf: bytes.into(),
            pos: 0,
            len: bytes.len(),
            drained: true,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.reader.is_none() {
            this.reader = this.io.reader.get().cloned();
        }
        // Moved out and back, not cloned: no reference count traffic per read.
        let reader = this.reader.take();
        let res = match &reader {
            Some(waker) => this.read_woken(&mut Context::from_waker(waker), buf),
            None => this.read_woken(cx, buf),
        };
        this.reader = reader;
        res
    }
}

impl<S: AsyncRead + Unpin> Activity<S> {
    /// [`AsyncRead::poll_read`], woken through `cx`.
    fn read_woken(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self;
        if this.ahead.is_none() && this.streaming {
            this.ahead = Some(ReadAhead {
                buf: vec![0u8; READAHEAD_BYTES].into_boxed_slice(),
                pos: 0,
                len: 0,
                drained: false,
            });
        }
        let Some(ahead) = &mut this.ahead else {
            // Idle or small frames: straight into tungstenite's buffer.
            let wanted = buf.remaining();
            let before = buf.filled().len();
            let res = Pin::new(&mut this.inner).poll_read(cx, buf);
            let got = buf.filled().len() - before;
            if matches!(res, Poll::Ready(Ok(()))) && got > 0 {
                this.io.stamp(&this.io.last_read_ms);
                // tungstenite asks for a whole buffer only while a frame is incomplete;
                // small requests (the tail of its buffer) say nothing about streaming.
                this.streaming = wanted >= READ_BUFFER_BYTES && got == wanted;
                let admitted = this.ingress.admit(&buf.filled()[before..], cx);
                if !matches!(admitted, Poll::Ready(Ok(n)) if n == got) {
                    // The budget holds some of these bytes back: keep them for later.
                    let n = match admitted {
                        Poll::Ready(Ok(n)) => n,
                        _ => 0,
                    };
                    this.ahead = Some(ReadAhead::holding(&buf.filled()[before + n..]));
                    buf.set_filled(before + n);
                    return admitted.map_ok(|_| ());
                }
            }
            return res;
        };
        if ahead.pos == ahead.len {
            let mut fill = ReadBuf::new(&mut ahead.buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut fill) {
                Poll::Ready(Ok(())) => {
                    let got = fill.filled().len();
                    if got == 0 {
                        this.ahead = None;
                        this.streaming = false;
                        return Poll::Ready(Ok(())); // end of stream
                    }
                    this.io.stamp(&this.io.last_read_ms);
                    // Only a small read means the stream has ended: a large message usually
                    // arrives in reads well below the buffer size, and freeing and zeroing
                    // the buffer on each of them would cost more than it saves.
                    (ahead.pos, ahead.len, ahead.drained) = (0, got, got < READ_BUFFER_BYTES);
                }
                Poll::Pending => {
                    // Nothing more for now: an idle socket keeps no read-ahead buffer.
                    this.ahead = None;
                    this.streaming = false;
                    return Poll::Pending;
                }
                other => return other,
            }
        }
        let n = (ahead.len - ahead.pos).min(buf.remaining());
        let n = match this.ingress.admit(&ahead.buf[ahead.pos..ahead.pos + n], cx) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        buf.put_slice(&ahead.buf[ahead.pos..ahead.pos + n]);
        ahead.pos += n;
        if ahead.pos == ahead.len && ahead.drained {
            this.ahead = None;
            this.streaming = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        match res {
            Poll::Ready(Ok(n)) if n > 0 => {
                this.egress.written(&buf[..n], &this.io);
                this.io.stamp(&this.io.last_write_ms);
                if std::mem::take(&mut this.write_blocked) {
                    this.io.stamp(&this.io.last_drain_ms);
                    this.io.write_blocked.store(false, Ordering::Relaxed);
                }
            }
            Poll::Pending => {
                this.write_blocked = true;
                this.io.write_blocked.store(true, Ordering::Relaxed);
            }
            _ => {}
        }
        res
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How the writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterEnd {
    /// It sent the relay's close frame.
    SentClose,
    /// It was asked to stop ([`Outbox::finish`]).
    Finished,
    /// The connection failed or the queue was dropped.
    Failed,
    /// Writes made no progress for the slow-consumer deadline: the peer stopped reading.
    Stalled,
}

type Sink<S> = SplitSink<WebSocketStream<Activity<S>>, Message>;
type Stream<S> = SplitStream<WebSocketStream<Activity<S>>>;

/// What to do with the connection once reading is over.
enum ReadEnd<S> {
    /// Flush, half-close and drain it briefly, so the last frames (a close echo, a relay
    /// close) reach the peer instead of being cut by a reset. The write half, if the writer
    /// has already handed it back.
    Linger(Option<Sink<S>>),
    /// Drop it now: the peer is gone, unresponsive or not reading.
    Drop,
}

async fn read_loop<S>(
    mut stream: Stream<S>,
    writer: &mut tokio::task::JoinHandle<(WriterEnd, Sink<S>)>,
    att: &Attachment,
    conf: &crate::RelayConf,
    io: &IoClock,
) -> (Stream<S>, ReadEnd<S>, Received)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut received = Received::default();
    // Time spent waiting on back-pressure is not the peer's silence.
    let mut last_progress = Instant::now();
    // Once the relay closes: how long it still waits for the peer (see `closed` below).
    let mut grace: Option<Instant> = None;
    let mut stream_done = false;
    let mut pings_while_blocked = 0u32;
    let mut returned: Option<(WriterEnd, Sink<S>)> = None;
    // The payload of the last large message, held until the next read has started (see
    // `ingress::LARGE_FRAME_BYTES`).
    let mut held: Option<Bytes> = None;
    // The close signal and the timer live across iterations: made anew per message, each
    // would register in (and leave) the signal's waiter list and the timer wheel per
    // relayed message (issue 11). The timer is moved earlier at once, later only when it
    // fires (most messages move the deadline a little later).
    let closed = att.outbox.closed();
    tokio::pin!(closed);
    let mut armed = Instant::now() + conf.ping_timeout();
    let timer = tokio::time::sleep_until(armed);
    tokio::pin!(timer);
    let end = loop {
        let alive = io.last_alive().max(last_progress);
        let deadline = grace.unwrap_or(alive + conf.ping_timeout());
        if deadline < armed {
            armed = deadline;
            timer.as_mut().reset(deadline);
        }
        tokio::select! {
            biased;
            _ = &mut closed, if grace.is_none() => {
                // The close frame may sit behind queued data: the writer's own stall check
                // bounds the drain; this is the outer bound.
                grace = Some(Instant::now() + conf.slow_consumer_timeout() + conf.close_grace());
            }
            end = &mut *writer, if returned.is_none() => {
                let Ok((end, sink)) = end else { break ReadEnd::Drop };
                match end {
                    WriterEnd::Stalled => {
                        info!("{}: peer stopped reading for {:?}, dropping the connection", att.describe(), conf.slow_consumer_timeout());
                        att.outbox.count_slow_consumer();
                        break ReadEnd::Drop;
                    }
                    _ if stream_done => break ReadEnd::Linger(Some(sink)),
                    WriterEnd::SentClose => grace = Some(Instant::now() + conf.close_grace()),
                    // Nothing more will be written: keep reading briefly so that a close the
                    // peer started is still echoed by tungstenite.
                    _ => att.outbox.shut(),
                }
                returned = Some((end, sink));
            }
            _ = &mut timer => {
                // Fired: disarmed until the top of the loop sets the deadline again.
                armed = Instant::now() + NEVER;
                timer.as_mut().reset(armed);
                if deadline > Instant::now() {
                    continue; // the deadline moved later since the timer was set
                }
                if grace.is_some() {
                    debug!("{}: no close reply within the grace period", att.describe());
                    break ReadEnd::Drop;
                }
                if io.last_alive().max(last_progress) + conf.ping_timeout() > Instant::now() {
                    continue; // the peer showed life meanwhile: the deadline moved
                }
                info!("{}: nothing received for {:?}, closing 1001", att.describe(), conf.ping_timeout());
                if att.outbox.close(close::GOING_AWAY, close::PING_TIMEOUT) {
                    att.hub().metrics().ping_timeouts.inc();
                }
            }
            frame = ReleaseAfterPoll { inner: stream.next(), held: &mut held, io }, if !stream_done => match frame {
                None => break ReadEnd::Linger(returned.take().map(|(_, sink)| sink)),
                Some(Ok(msg)) => {
                    if let Message::Ping(_) = msg {
                        // tungstenite queues a pong for each; a peer that floods pings while
                        // not reading them would make that queue grow without end.
                        if !io.write_blocked.load(Ordering::Relaxed) {
                            pings_while_blocked = 0;
                        } else if pings_while_blocked == MAX_PINGS_WHILE_BLOCKED {
                            info!("{}: pings keep coming while the peer reads nothing, dropping the connection", att.describe());
                            att.outbox.count_slow_consumer();
                            break ReadEnd::Drop;
                        } else {
                            pings_while_blocked += 1;
                        }
                    }
                    match &msg {
                        Message::Text(_) | Message::Binary(_) => {
                            received.msgs += 1;
                            received.bytes += msg.len() as u64;
                            if msg.len() as u64 >= LARGE_FRAME_BYTES {
                                held = match &msg {
                                    Message::Binary(b) => Some(b.clone()),
                                    Message::Text(t) => Some(Bytes::from(t.clone())),
                                    _ => None,
                                };
                            }
                        }
                        Message::Close(frame) => {
                            let close = frame.as_ref().map(|f| (u16::from(f.code), f.reason.as_str()));
                            received.close = Some(Box::new(match close {
                                Some((code, reason)) => (Some(code), reason.to_string()),
                                None => (None, String::new()),
                            }));
                        }
                        _ => {}
                    }
                    if on_message(msg, att, conf).await == Delivery::Waited {
                        last_progress = Instant::now();
                    }
                }
                Some(Err(e)) => {
                    stream_done = true;
                    match close_for_error(&e) {
                        Some((code, reason)) => {
                            info!("{}: {e}; closing {code}", att.describe());
                            att.outbox.close(code, reason);
                        }
                        None => {
                            debug!("{}: connection ended: {e}", att.describe());
                            break ReadEnd::Drop;
                        }
                    }
                    if let Some((_, sink)) = returned.take() {
                        break ReadEnd::Linger(Some(sink));
                    }
                }
            }
        }
    };
    (stream, end, received)
}

/// Polls `inner` (the next frame) and then drops `held`: the payload of the last large
/// message stays referenced while tungstenite starts its next read, so that its read
/// buffer, of which the payload is a slice, is replaced instead of kept (see
/// `ingress::LARGE_FRAME_BYTES`).
/// Its first poll also records the reader task's waker in `io` (see [`Activity`]).
struct ReleaseAfterPoll<'a, F> {
    inner: F,
    held: &'a mut Option<Bytes>,
    io: &'a IoClock,
}

impl<F: std::future::Future + Unpin> std::future::Future for ReleaseAfterPoll<'_, F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if this.io.reader.get().is_none() {
            let _ = this.io.reader.set(cx.waker().clone());
        }
        let out = Pin::new(&mut this.inner).poll(cx);
        *this.held = None;
        out
    }
}

/// Ends a connection politely within `grace`: takes the write half back from the writer,
/// flushes what tungstenite wrote (a close echo it buffered),
/// half-closes, and reads and discards until the peer closes too, so unread input does not
/// turn the close into a reset.
async fn linger<S>(
    stream: Stream<S>,
    sink: Option<Sink<S>>,
    mut writer: tokio::task::JoinHandle<(WriterEnd, Sink<S>)>,
    outbox: &Outbox,
    grace: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + grace;
    let sink = match sink {
        Some(sink) => sink,
        None => {
            outbox.finish();
            match tokio::time::timeout_at(deadline, &mut writer).await {
                Ok(Ok((_, sink))) => sink,
                _ => {
                    writer.abort();
                    return;
                }
            }
        }
    };
    let Ok(ws) = stream.reunite(sink) else {
        return;
    };
    let mut raw = ws.into_inner();
    // Only draining from here: nothing waits for the ingress budget any more.
    raw.stop_ingress();
    let _ = tokio::time::timeout_at(deadline, async {
        raw.flush().await?;
        raw.shutdown().await?;
        let mut scratch = [0u8; 1024];
        while raw.read(&mut scratch).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// The close code and reason for a read error, or `None` when the connection is simply gone.
fn close_for_error(e: &WsError) -> Option<(u16, &'static str)> {
    match e {
        WsError::Io(e) => match Refusal::of(e)? {
            Refusal::Capacity => Some((close::TRY_AGAIN, close::INGRESS_CAPACITY)),
            Refusal::TooBig => Some((close::TOO_BIG, close::TOO_BIG_REASON)),
            Refusal::BadControl => Some((close::PROTOCOL_ERROR, close::PROTOCOL_ERROR_REASON)),
        },
        WsError::Capacity(_) => Some((close::TOO_BIG, close::TOO_BIG_REASON)),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some((close::PROTOCOL_ERROR, close::PROTOCOL_ERROR_REASON)),
        WsError::Utf8(_) => Some((close::INVALID_PAYLOAD, close::INVALID_UTF8)),
        _ => None,
    }
}

/// Whether handling a message waited (for room in a destination's queue): that time is
/// not the peer's silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    AtOnce,
    Waited,
}

async fn on_message(msg: Message, att: &Attachment, conf: &crate::RelayConf) -> Delivery {
    if !matches!(msg, Message::Text(_) | Message::Binary(_)) || att.outbox.is_closing() {
        // Ping is answered by tungstenite, Close is echoed by it; Pong only counts as life.
        // A socket the relay is closing forwards nothing more.
        return Delivery::AtOnce;
    }
    if att.kind == SocketKind::Control {
        if let Message::Text(text) = &msg {
            if is_json_ping(text) {
                let pong = ControlMessage::pong_now().to_json();
                att.outbox.push_control(Message::text(pong));
            }
        }
        return Delivery::AtOnce;
    }
    // Fast path, almost every message: one destination with room queues without waiting.
    // Waiting for room, fan-out and re-routing run in a boxed future, so that every socket's
    // task does not reserve room for their state (it is most of an idle socket's task).
    let msg = unshare(msg);
    let len = msg.len();
    let route = match att.forward(msg) {
        Forward::Drop => return Delivery::AtOnce,
        Forward::Buffered => {
            forwarded(att, len);
            return Delivery::AtOnce;
        }
        Forward::One(to, msg) => {
            forwarded(att, len);
            match to.try_send_data(msg) {
                Ok(()) => return Delivery::AtOnce,
                Err(msg) => Forward::One(to, msg),
            }
        }
        many @ Forward::Many(..) => {
            forwarded(att, len);
            many
        }
        Forward::OverBudget => Forward::OverBudget,
    };
    Box::pin(forward_waiting(route, att, conf)).await;
    Delivery::Waited
}

/// Counts a data message of `len` payload bytes that the relay accepted for forwarding:
/// routed to its destination(s) or kept for a late daemon (once, however many destinations).
fn forwarded(att: &Attachment, len: usize) {
    let m = att.hub().metrics();
    m.frames_forwarded.inc();
    m.bytes_forwarded.inc_by(len as u64);
    m.frame_size.observe(len as f64);
}

/// Delivers a routed message that could not be queued at once (see [`on_message`]).
async fn forward_waiting(mut route: Forward, att: &Attachment, conf: &crate::RelayConf) {
    let deadline = conf.slow_consumer_timeout();
    // A destination that closes while a frame is in flight to it (a replaced data socket)
    // gets the frame routed once more: to its successor, or into the late-daemon buffer.
    for retry in [true, false] {
        match route {
            Forward::Drop | Forward::Buffered => {}
            Forward::OverBudget => {
                warn!(
                    "{}: late-daemon buffer budget spent, closing 1013",
                    att.describe()
                );
                att.outbox.close(close::TRY_AGAIN, close::INGRESS_CAPACITY);
            }
            Forward::One(to, msg) => {
                let again = msg.clone();
                if deliver(att, &to, msg, deadline).await == Err(SendError::Closed) && retry {
                    route = att.forward(again);
                    continue;
                }
            }
            Forward::Many(all, msg) => {
                // Each destination waits for room on its own, all under the same deadline.
                join_all(all.iter().map(|to| deliver(att, to, msg.clone(), deadline))).await;
            }
        }
        return;
    }
}

/// A small message gets its own allocation (see [`UNSHARE_BELOW_BYTES`]); a large one keeps
/// its zero-copy payload, which then is most of its allocation anyway.
fn unshare(msg: Message) -> Message {
    match msg {
        Message::Binary(b) if b.len() < UNSHARE_BELOW_BYTES => {
            Message::Binary(Bytes::copy_from_slice(&b))
        }
        Message::Text(t) if t.len() < UNSHARE_BELOW_BYTES => Message::text(t.as_str()),
        other => other,
    }
}

/// Queues `msg` on `to`; a destination whose queue stays full for `deadline` is closed
/// 1013 `Slow consumer` (spec §0).
async fn deliver(
    att: &Attachment,
    to: &Arc<Outbox>,
    msg: Message,
    deadline: Duration,
) -> Result<(), SendError> {
    let res = to.send_data(msg, deadline).await;
    if res == Err(SendError::TimedOut) {
        warn!(
            "{}: a destination's queue stayed full for {deadline:?}, closing it 1013",
            att.describe()
        );
        to.close_slow_consumer();
    }
    res
}

/// An item taken from the queue: the command, the data-queue bytes it holds, and whether
/// it came from the data lane (its payload then counts in `outbound_queued_bytes`).
struct Item {
    cmd: Command,
    cost: usize,
    data: bool,
}

impl Item {
    fn priority(cmd: Command) -> Item {
        Item {
            cmd,
            cost: 0,
            data: false,
        }
    }
    fn data(cmd: Command, cost: u32) -> Item {
        Item {
            cmd,
            cost: cost as usize,
            data: true,
        }
    }
}

/// What a written batch held in the queue and what it carried to the peer.
#[derive(Debug, Default)]
struct Batch {
    /// Data-queue bytes (as the items carried them) and data payload bytes.
    cost: usize,
    payload: usize,
    /// Text and binary messages written, and their payload bytes.
    msgs: u64,
    bytes: u64,
}

/// Takes the next queued item without waiting: priority lane first.
fn next_item(rx: &mut OutboxReceiver, outbox: &Outbox) -> Option<Item> {
    if let Ok((cmd, cost)) = rx.priority.try_recv() {
        outbox.priority_taken(cost);
        return Some(Item::priority(cmd));
    }
    rx.data
        .try_recv()
        .ok()
        .map(|(cmd, cost)| Item::data(cmd, cost))
}

/// Writes one batch: `first`, then whatever is queued, up to the batch limits; one flush.
/// Returns what the batch held and carried, and how the writer ends if the batch ended it
/// (close frame sent, or asked to finish).
async fn write_batch<S>(
    sink: &mut Sink<S>,
    rx: &mut OutboxReceiver,
    outbox: &Outbox,
    first: Item,
) -> Result<(Batch, Option<WriterEnd>), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut batch = Batch::default();
    let (mut size, mut count) = (0, 0);
    let mut next = Some(first);
    while let Some(item) = next.take() {
        batch.cost += item.cost;
        let (msg, is_close) = match item.cmd {
            Command::Send(msg) => (msg, false),
            Command::Close(frame) => (Message::Close(Some(frame)), true),
            Command::Finish => {
                sink.flush().await?;
                return Ok((batch, Some(WriterEnd::Finished)));
            }
        };
        if item.data {
            batch.payload += msg.len();
        }
        if matches!(msg, Message::Text(_) | Message::Binary(_)) {
            batch.msgs += 1;
            batch.bytes += msg.len() as u64;
        }
        size += msg.len();
        count += 1;
        feed(sink, msg).await?;
        if is_close {
            sink.flush().await?;
            return Ok((batch, Some(WriterEnd::SentClose)));
        }
        if count < MAX_BATCH_MESSAGES && size < MAX_BATCH_BYTES {
            next = next_item(rx, outbox);
        }
    }
    sink.flush().await?;
    Ok((batch, None))
}

/// Buffers `msg` in tungstenite (writing out what exceeds its buffer): a data message longer
/// than [`MAX_FRAME_OUT_BYTES`] as consecutive fragments sliced from its payload (no copy of
/// the payload, no other data frame in between: this task is the socket's only writer of
/// data frames; the reader's pongs and close echo are control frames, which RFC 6455 §5.4
/// lets come between fragments).
async fn feed<S>(sink: &mut Sink<S>, msg: Message) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (payload, first) = match msg {
        Message::Binary(b) if b.len() > MAX_FRAME_OUT_BYTES => (b, OpData::Binary),
        Message::Text(t) if t.len() > MAX_FRAME_OUT_BYTES => (Bytes::from(t), OpData::Text),
        other => return sink.feed(other).await,
    };
    let mut opcode = OpCode::Data(first);
    for start in (0..payload.len()).step_by(MAX_FRAME_OUT_BYTES) {
        let end = (start + MAX_FRAME_OUT_BYTES).min(payload.len());
        let frame = Frame::message(payload.slice(start..end), opcode, end == payload.len());
        sink.feed(Message::Frame(frame)).await?;
        opcode = OpCode::Data(OpData::Continue);
    }
    Ok(())
}

async fn write_loop<S>(
    mut sink: Sink<S>,
    mut rx: OutboxReceiver,
    outbox: Arc<Outbox>,
    io: Arc<IoClock>,
    ping_every: Duration,
    stall: Duration,
) -> (WriterEnd, Sink<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The ping comes first: it is due at most once per interval, and a steady stream of
        // data must not starve it (a silent peer that reads proves life by its pongs).
        let first = tokio::select! {
            biased;
            _ = ping.tick() => Item::priority(Command::Send(Message::Ping(Bytes::new()))),
            taken = rx.recv() => match taken {
                Taken::Priority(cmd, cost) => { outbox.priority_taken(cost); Item::priority(cmd) }
                Taken::Data(cmd, cost) => Item::data(cmd, cost),
            },
        };
        let started = Instant::now();
        let result = {
            // Boxed: the batch's state (sink futures, one message) lives only while writing,
            // not in every idle socket's task.
            let mut batch = Box::pin(write_batch(&mut sink, &mut rx, &outbox, first));
            // A peer may read slowly, but a write that makes no progress at all for the
            // slow-consumer deadline means it stopped reading: give up on the socket.
            loop {
                let progress = io.last_write().max(started);
                // Biased, the batch first: a batch written at once never registers the timer.
                tokio::select! {
                    biased;
                    r = &mut batch => break Some(r),
                    _ = sleep_until(progress + stall) => {
                        if io.last_write().max(started) + stall <= Instant::now() {
                            break None;
                        }
                    }
                }
            }
        };
        match result {
            Some(Ok((batch, end))) => {
                outbox.release(batch.cost, batch.payload);
                io.out_msgs.fetch_add(batch.msgs, Ordering::Relaxed);
                io.out_bytes.fetch_add(batch.bytes, Ordering::Relaxed);
                if let Some(end) = end {
                    return (end, sink);
                }
            }
            Some(Err(_)) => return (WriterEnd::Failed, sink),
            None => return (WriterEnd::Stalled, sink),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_payloads_leave_the_read_allocation_large_ones_stay() {
        let read = Bytes::from(vec![7u8; 1 << 20]);
        let small = read.slice(10..11);
        match unshare(Message::Binary(small.clone())) {
            Message::Binary(b) => {
                assert_eq!(b, small);
                assert_ne!(b.as_ptr(), small.as_ptr(), "copied out");
            }
            other => panic!("{other:?}"),
        }
        let large = read.slice(..UNSHARE_BELOW_BYTES);
        match unshare(Message::Binary(large.clone())) {
            Message::Binary(b) => assert_eq!(b.as_ptr(), large.as_ptr(), "zero-copy"),
            other => panic!("{other:?}"),
        }
        assert_eq!(unshare(Message::text("héllo")), Message::text("héllo"));
    }

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads exactly `n` bytes in tungstenite-sized requests.
    async fn read_n<S: AsyncRead + Unpin>(a: &mut Activity<S>, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        let mut chunk = [0u8; READ_BUFFER_BYTES];
        while out.len() < n {
            let want = (n - out.len()).min(READ_BUFFER_BYTES);
            let got = a.read(&mut chunk[..want]).await.unwrap();
            assert!(got > 0, "unexpected end of stream");
            out.extend_from_slice(&chunk[..got]);
        }
        out
    }

    #[tokio::test]
    async fn read_ahead_while_streaming_and_freed_after() {
        let (mut peer, inner) = tokio::io::duplex(1 << 20);
        let hub = SessionHub::new(crate::RelayConf::default());
        let (mut a, _io) = Activity::new(inner, Vec::new(), &hub, 1 << 20);
        // Arbitrary bytes, not frames: only the read-ahead is under test here.
        a.stop_ingress();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        peer.write_all(&big).await.unwrap();
        let mut got = read_n(&mut a, 10_000).await;
        assert!(
            a.ahead.is_some(),
            "a full first read switches to read-ahead"
        );
        got.extend(read_n(&mut a, big.len() - 10_000).await);
        assert_eq!(got, big, "bytes exact");
        // Nothing more is sent: the read waits, and the buffer is given back meanwhile.
        let mut one = [0u8; 1];
        let waited = tokio::time::timeout(Duration::from_millis(20), a.read(&mut one)).await;
        assert!(waited.is_err(), "nothing to read");
        assert!(
            a.ahead.is_none(),
            "a waiting socket holds no read-ahead buffer"
        );
        // A small frame later: the read-ahead is drained and given back.
        peer.write_all(b"tail").await.unwrap();
        assert_eq!(read_n(&mut a, 4).await, b"tail");
        assert!(
            a.ahead.is_none(),
            "an idle socket holds no read-ahead buffer"
        );
        assert!(!a.streaming);
        drop(peer);
        let mut rest = Vec::new();
        assert_eq!(a.read_to_end(&mut rest).await.unwrap(), 0);
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicU64);
    impl futures_util::task::ArcWake for Wakes {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A stream with nothing to read that keeps the waker of its last `poll_read`.
    #[derive(Default)]
    struct Silent(Option<std::task::Waker>);
    impl AsyncRead for Silent {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.0 = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn the_read_loops_poll_records_its_waker_and_releases_the_held_payload() {
        let hub = SessionHub::new(crate::RelayConf::default());
        let (_a, io) = Activity::new(Silent::default(), Vec::new(), &hub, 1 << 20);
        let task = Arc::new(Wakes::default());
        let waker = futures_util::task::waker(task.clone());
        let mut held = Some(Bytes::from(vec![0u8; LARGE_FRAME_BYTES as usize]));
        let mut next = ReleaseAfterPoll {
            inner: std::future::pending::<()>(),
            held: &mut held,
            io: &io,
        };
        let polled =
            std::future::Future::poll(Pin::new(&mut next), &mut Context::from_waker(&waker));
        assert!(polled.is_pending());
        assert!(held.is_none(), "released after the poll");
        io.reader.get().expect("recorded").wake_by_ref();
        assert_eq!(task.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn read_readiness_wakes_the_reader_task_not_the_caller() {
        let hub = SessionHub::new(crate::RelayConf::default());
        let (mut a, io) = Activity::new(Silent::default(), Vec::new(), &hub, 1 << 20);
        let (reader, other) = (Arc::new(Wakes::default()), Arc::new(Wakes::default()));
        // What the read loop's first poll records.
        let _ = io.reader.set(futures_util::task::waker(reader.clone()));
        // tokio-tungstenite polls with a waker that would wake the writer task too.
        let waker = futures_util::task::waker(other.clone());
        let mut space = [0u8; 16];
        let mut buf = ReadBuf::new(&mut space);
        let polled = Pin::new(&mut a).poll_read(&mut Context::from_waker(&waker), &mut buf);
        assert!(polled.is_pending());
        a.inner
            .0
            .take()
            .expect("the inner stream was polled")
            .wake();
        assert_eq!(reader.0.load(Ordering::Relaxed), 1);
        assert_eq!(other.0.load(Ordering::Relaxed), 0);
        assert!(a.reader.is_some(), "kept for the next read");
        // Before the read loop has started, reads are woken through the caller.
        let (mut b, _io) = Activity::new(Silent::default(), Vec::new(), &hub, 1 << 20);
        let mut buf = ReadBuf::new(&mut space);
        let polled = Pin::new(&mut b).poll_read(&mut Context::from_waker(&waker), &mut buf);
        assert!(polled.is_pending());
        b.inner
            .0
            .take()
            .expect("the inner stream was polled")
            .wake();
        assert_eq!(other.0.load(Ordering::Relaxed), 1);
    }

    /// A masked client frame with the all-zero key and `len` zero bytes of payload.
    fn client_frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut f = vec![(u8::from(fin) << 7) | opcode];
        match len {
            0..=125 => f.push(0x80 | len as u8),
            126..=0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        f.resize(f.len() + 4 + len, 0);
        f
    }

    #[tokio::test]
    async fn pipelined_bytes_pass_the_budget_and_a_full_budget_holds_the_rest_back() {
        let conf = crate::RelayConf {
            ingress_budget_bytes: 1000,
            ..crate::RelayConf::default()
        };
        let hub = SessionHub::new(conf);
        assert!(
            hub.ingress().try_reserve(900),
            "another socket holds 900 bytes"
        );
        let (mut peer, inner) = tokio::io::duplex(1 << 16);
        let small = client_frame(true, 2, 10);
        let big = client_frame(false, 2, 500);
        let mut preread = small.clone();
        preread.extend_from_slice(&big[..20]);
        let (mut a, _io) = Activity::new(inner, preread, &hub, 1 << 20);
        // The complete message and all but the last byte of the next header go through.
        let got = read_n(&mut a, small.len() + 7).await;
        assert_eq!(got[..], [&small[..], &big[..7]].concat()[..]);
        // Then nothing: 500 more bytes would not fit, even though they are here.
        peer.write_all(&big[20..]).await.unwrap();
        let mut one = [0u8; 1];
        let waited = tokio::time::timeout(Duration::from_millis(50), a.read(&mut one)).await;
        assert!(waited.is_err(), "held back by the budget");
        assert!(a.ingress.is_waiting());
        // Room frees: the reader is woken and the rest of the frame comes through.
        hub.ingress().release(900);
        let rest = tokio::time::timeout(WITHIN_TEST, read_n(&mut a, big.len() - 7))
            .await
            .expect("woken when room frees");
        assert_eq!(rest, big[7..]);
        assert_eq!(
            hub.ingress().reserved(),
            500,
            "the unfinished message is held"
        );
        drop(a);
        assert_eq!(
            hub.ingress().reserved(),
            0,
            "and given back with the socket"
        );
    }

    const WITHIN_TEST: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn the_close_frame_written_is_recorded_and_counted_once() {
        let hub = SessionHub::new(crate::RelayConf::default());
        let (mut peer, inner) = tokio::io::duplex(1 << 16);
        let (mut a, io) = Activity::new(inner, Vec::new(), &hub, 1 << 20);
        // Server frames are unmasked: a 300-byte binary frame (16-bit length), a ping, then
        // a close split in the middle of its header and of its reason.
        let mut out = vec![0x82, 126, 0x01, 0x2c];
        out.resize(out.len() + 300, 0x88);
        out.extend_from_slice(&[0x89, 0x00]);
        let mut close = vec![0x88, 2 + 12];
        close.extend_from_slice(&1001u16.to_be_bytes());
        close.extend_from_slice(b"Ping timeout");
        out.extend_from_slice(&close);
        for part in [&out[..305], &out[305..307], &out[307..310], &out[310..]] {
            a.write_all(part).await.unwrap();
            if std::ptr::eq(part, &out[..305]) {
                assert!(io.sent_close.get().is_none());
            }
        }
        assert_eq!(
            io.sent_close.get().map(|c| (c.0, c.1.as_str())),
            Some((Some(1001), "Ping timeout"))
        );
        // An empty close (tungstenite's echo of an empty one) is 1005 in the metric; only
        // the first close of a socket is recorded.
        a.write_all(&[0x88, 0x00]).await.unwrap();
        let text = hub.render_metrics();
        assert!(
            text.contains("paseo_relay_closes_total{code=\"1001\"} 1"),
            "{text}"
        );
        assert!(!text.contains("code=\"1005\""), "{text}");
        let mut sent = vec![0u8; out.len() + 2];
        peer.read_exact(&mut sent).await.unwrap();
        assert_eq!(sent[..out.len()], out[..], "bytes pass unchanged");

        let hub = SessionHub::new(crate::RelayConf::default());
        let (inner, _peer) = tokio::io::duplex(1 << 16);
        let (mut a, io) = Activity::new(inner, Vec::new(), &hub, 1 << 20);
        a.write_all(&[0x88, 0x00]).await.unwrap();
        assert_eq!(io.sent_close.get().map(|c| c.0), Some(None));
        assert!(hub
            .render_metrics()
            .contains("paseo_relay_closes_total{code=\"1005\"} 1"));
    }
}
