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

use crate::protocol::{close, is_json_ping, ControlMessage, SocketKind};
use crate::session::hub::Attachment;
use crate::session::Forward;
use crate::socket::outbox::{Command, Outbox, OutboxReceiver, SendError};
use futures_util::future::join_all;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use log::{debug, info, warn};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
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
/// tungstenite write buffer target, in bytes; a flush always writes everything.
const WRITE_BUFFER_BYTES: usize = 64 << 10;

/// tungstenite settings for a socket of `kind`: message limits of spec §0 (64 KiB on a
/// control socket), never unmasked client frames.
pub fn ws_config(kind: &SocketKind, conf: &crate::RelayConf) -> WebSocketConfig {
    let max = match kind {
        SocketKind::Control => conf.max_control_message_bytes,
        _ => conf.max_message_bytes,
    };
    // What the writer can legitimately have buffered: one batch plus one largest message,
    // plus room for a large `sync` and a few pongs. Beyond it tungstenite refuses to buffer.
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
/// bytes the peer sent behind its request head. Returns when the socket is gone; dropping
/// the attachment then detaches it from its session.
pub async fn run<S>(stream: S, preread: Vec<u8>, att: Attachment, rx: OutboxReceiver)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Borrowed from the attachment, not copied: each copy would live in every socket's task.
    let conf = att.conf();
    let config = ws_config(&att.kind, conf);
    let (stream, io) = Activity::new(stream);
    // Boxed, like the end of the socket below: one-off steps whose state would otherwise be
    // reserved in the task for the socket's whole life (idle memory, spec §0 targets).
    let ws = Box::pin(WebSocketStream::from_partially_read(
        stream,
        preread,
        WsRole::Server,
        Some(config),
    ))
    .await;
    let (sink, stream) = ws.split();
    let mut writer = tokio::spawn(write_loop(
        sink,
        rx,
        att.outbox.clone(),
        io.clone(),
        conf.ping_interval(),
        conf.slow_consumer_timeout(),
    ));
    let (stream, end) = read_loop(stream, &mut writer, &att, conf, &io).await;
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
    info!("{}: closed", att.describe());
}

/// Wraps a socket's stream and records when bytes last moved in each direction: any inbound
/// bytes (including the frames of a message still being reassembled) count as life for the
/// ping timeout, and outbound progress tells a slow reader from a stuck one (spec §0).
struct Activity<S> {
    inner: S,
    io: Arc<IoClock>,
    /// The last write found the send buffer full.
    write_blocked: bool,
    /// Read-ahead while a large message streams in; `None` on an idle socket.
    ahead: Option<ReadAhead>,
    /// The last direct read filled the caller's whole buffer: read ahead next time.
    streaming: bool,
}

/// Bytes read from the socket and not yet handed to tungstenite: `buf[pos..len]`.
struct ReadAhead {
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    /// The last fill was small (the peer stopped streaming): free the buffer once consumed.
    drained: bool,
}

/// Milliseconds from `base` to the last read that returned bytes, the last write that
/// accepted some, and the last write that completed after the socket's send buffer had been
/// full (proof that the peer is taking data).
struct IoClock {
    base: Instant,
    last_read_ms: AtomicU64,
    last_write_ms: AtomicU64,
    last_drain_ms: AtomicU64,
    /// The last write found the send buffer full (the peer is not taking data).
    write_blocked: std::sync::atomic::AtomicBool,
}

impl IoClock {
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
    fn new(inner: S) -> (Self, Arc<IoClock>) {
        let io = Arc::new(IoClock {
            base: Instant::now(),
            last_read_ms: AtomicU64::new(0),
            last_write_ms: AtomicU64::new(0),
            last_drain_ms: AtomicU64::new(0),
            write_blocked: std::sync::atomic::AtomicBool::new(false),
        });
        (
            Activity {
                inner,
                io: io.clone(),
                write_blocked: false,
                ahead: None,
                streaming: false,
            },
            io,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
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
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        match res {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.io.stamp(&self.io.last_write_ms);
                if std::mem::take(&mut self.write_blocked) {
                    self.io.stamp(&self.io.last_drain_ms);
                    self.io.write_blocked.store(false, Ordering::Relaxed);
                }
            }
            Poll::Pending => {
                self.write_blocked = true;
                self.io.write_blocked.store(true, Ordering::Relaxed);
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
) -> (Stream<S>, ReadEnd<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Time spent waiting on back-pressure is not the peer's silence.
    let mut last_progress = Instant::now();
    // Once the relay closes: how long it still waits for the peer (see `closed` below).
    let mut grace: Option<Instant> = None;
    let mut stream_done = false;
    let mut pings_while_blocked = 0u32;
    let mut returned: Option<(WriterEnd, Sink<S>)> = None;
    let end = loop {
        let alive = io.last_alive().max(last_progress);
        let deadline = grace.unwrap_or(alive + conf.ping_timeout());
        tokio::select! {
            biased;
            _ = att.outbox.closed(), if grace.is_none() => {
                // The close frame may sit behind queued data: the writer's own stall check
                // bounds the drain; this is the outer bound.
                grace = Some(Instant::now() + conf.slow_consumer_timeout() + conf.close_grace());
            }
            end = &mut *writer, if returned.is_none() => {
                let Ok((end, sink)) = end else { break ReadEnd::Drop };
                match end {
                    WriterEnd::Stalled => {
                        info!("{}: peer stopped reading for {:?}, dropping the connection", att.describe(), conf.slow_consumer_timeout());
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
            _ = sleep_until(deadline) => {
                if grace.is_some() {
                    debug!("{}: no close reply within the grace period", att.describe());
                    break ReadEnd::Drop;
                }
                if io.last_alive().max(last_progress) + conf.ping_timeout() > Instant::now() {
                    continue; // the peer showed life meanwhile: the deadline moved
                }
                info!("{}: nothing received for {:?}, closing 1001", att.describe(), conf.ping_timeout());
                att.outbox.close(close::GOING_AWAY, close::PING_TIMEOUT);
            }
            frame = stream.next(), if !stream_done => match frame {
                None => break ReadEnd::Linger(returned.take().map(|(_, sink)| sink)),
                Some(Ok(msg)) => {
                    if let Message::Ping(_) = msg {
                        // tungstenite queues a pong for each; a peer that floods pings while
                        // not reading them would make that queue grow without end.
                        if !io.write_blocked.load(Ordering::Relaxed) {
                            pings_while_blocked = 0;
                        } else if pings_while_blocked == MAX_PINGS_WHILE_BLOCKED {
                            info!("{}: pings keep coming while the peer reads nothing, dropping the connection", att.describe());
                            break ReadEnd::Drop;
                        } else {
                            pings_while_blocked += 1;
                        }
                    }
                    on_message(msg, att, conf).await;
                    last_progress = Instant::now();
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
    (stream, end)
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
        WsError::Capacity(_) => Some((close::TOO_BIG, close::TOO_BIG_REASON)),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some((close::PROTOCOL_ERROR, close::PROTOCOL_ERROR_REASON)),
        WsError::Utf8(_) => Some((close::INVALID_PAYLOAD, close::INVALID_UTF8)),
        _ => None,
    }
}

async fn on_message(msg: Message, att: &Attachment, conf: &crate::RelayConf) {
    if !matches!(msg, Message::Text(_) | Message::Binary(_)) || att.outbox.is_closing() {
        // Ping is answered by tungstenite, Close is echoed by it; Pong only counts as life.
        // A socket the relay is closing forwards nothing more.
        return;
    }
    if att.kind == SocketKind::Control {
        if let Message::Text(text) = &msg {
            if is_json_ping(text) {
                let pong = ControlMessage::pong_now().to_json();
                att.outbox.push_control(Message::text(pong));
            }
        }
        return;
    }
    // Fast path, almost every message: one destination with room queues without waiting.
    // Waiting for room, fan-out and re-routing run in a boxed future, so that every socket's
    // task does not reserve room for their state (it is most of an idle socket's task).
    let route = match att.forward(unshare(msg)) {
        Forward::Drop | Forward::Buffered => return,
        Forward::One(to, msg) => match to.try_send_data(msg) {
            Ok(()) => return,
            Err(msg) => Forward::One(to, msg),
        },
        other => other,
    };
    Box::pin(forward_waiting(route, att, conf)).await;
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
        to.close(close::TRY_AGAIN, close::SLOW_CONSUMER);
    }
    res
}

/// Takes the next queued item without waiting: priority lane first.
fn next_item(rx: &mut OutboxReceiver, outbox: &Outbox) -> Option<(Command, usize)> {
    if let Ok((cmd, cost)) = rx.priority.try_recv() {
        outbox.priority_taken(cost);
        return Some((cmd, 0));
    }
    rx.data
        .try_recv()
        .ok()
        .map(|(cmd, cost)| (cmd, cost as usize))
}

/// Writes one batch: `first`, then whatever is queued, up to the batch limits; one flush.
/// Returns the data-queue bytes the batch held, and how the writer ends if the batch ended
/// it (close frame sent, or asked to finish).
async fn write_batch<S>(
    sink: &mut Sink<S>,
    rx: &mut OutboxReceiver,
    outbox: &Outbox,
    first: (Command, usize),
) -> Result<(usize, Option<WriterEnd>), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut held, mut bytes, mut count) = (0, 0, 0);
    let mut next = Some(first);
    while let Some((cmd, cost)) = next.take() {
        held += cost;
        let (msg, is_close) = match cmd {
            Command::Send(msg) => (msg, false),
            Command::Close(frame) => (Message::Close(Some(frame)), true),
            Command::Finish => {
                sink.flush().await?;
                return Ok((held, Some(WriterEnd::Finished)));
            }
        };
        bytes += msg.len();
        count += 1;
        sink.feed(msg).await?;
        if is_close {
            sink.flush().await?;
            return Ok((held, Some(WriterEnd::SentClose)));
        }
        if count < MAX_BATCH_MESSAGES && bytes < MAX_BATCH_BYTES {
            next = next_item(rx, outbox);
        }
    }
    sink.flush().await?;
    Ok((held, None))
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
            _ = ping.tick() => (Command::Send(Message::Ping(Bytes::new())), 0),
            item = rx.priority.recv() => match item {
                Some((cmd, cost)) => { outbox.priority_taken(cost); (cmd, 0) }
                None => return (WriterEnd::Failed, sink),
            },
            item = rx.data.recv() => match item {
                Some((cmd, cost)) => (cmd, cost as usize),
                None => return (WriterEnd::Failed, sink),
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
                tokio::select! {
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
            Some(Ok((held, end))) => {
                outbox.release(held);
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
        let (mut a, _io) = Activity::new(inner);
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
}
