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

use crate::hub::Attachment;
use crate::outbox::{Command, Outbox, OutboxReceiver, SendError};
use crate::protocol::{close, is_json_ping, ControlMessage, SocketKind};
use crate::session::Forward;
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
/// tungstenite read buffer per socket, in bytes (eagerly allocated, so kept small).
const READ_BUFFER_BYTES: usize = 8 << 10;
/// tungstenite write buffer target, in bytes; a flush always writes everything.
const WRITE_BUFFER_BYTES: usize = 64 << 10;

/// tungstenite settings for a socket of `kind`: message limits of spec §0 (64 KiB on a
/// control socket), never unmasked client frames.
pub fn ws_config(kind: &SocketKind, conf: &crate::RelayConf) -> WebSocketConfig {
    let max = match kind {
        SocketKind::Control => conf.max_control_message_bytes,
        _ => conf.max_message_bytes,
    };
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
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
    let conf = att.conf().clone();
    let config = ws_config(&att.kind, &conf);
    let (stream, io) = Activity::new(stream);
    let ws =
        WebSocketStream::from_partially_read(stream, preread, WsRole::Server, Some(config)).await;
    let (sink, stream) = ws.split();
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        att.outbox.clone(),
        io.clone(),
        conf.clone(),
    ));
    read_loop(stream, writer, &att, &conf, &io).await;
    // Senders still waiting for room in this socket's queue give up at once.
    att.outbox.shut();
    info!("{}: closed", att.describe());
}

/// Wraps a socket's stream and records when bytes last moved in each direction: any inbound
/// bytes (including the frames of a message still being reassembled) count as life for the
/// ping timeout, and outbound progress tells a slow reader from a stuck one (spec §0).
struct Activity<S> {
    inner: S,
    io: Arc<IoClock>,
}

/// Milliseconds from `base` to the last read that returned bytes and the last write that
/// accepted some.
struct IoClock {
    base: Instant,
    last_read_ms: AtomicU64,
    last_write_ms: AtomicU64,
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
}

impl<S> Activity<S> {
    fn new(inner: S) -> (Self, Arc<IoClock>) {
        let io = Arc::new(IoClock {
            base: Instant::now(),
            last_read_ms: AtomicU64::new(0),
            last_write_ms: AtomicU64::new(0),
        });
        (
            Activity {
                inner,
                io: io.clone(),
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
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.io.stamp(&self.io.last_read_ms);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.io.stamp(&self.io.last_write_ms);
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
enum WriterEnd {
    /// It sent the relay's close frame.
    SentClose,
    /// The connection failed or the queue was dropped.
    Failed,
    /// Writes made no progress for the slow-consumer deadline: the peer stopped reading.
    Stalled,
}

async fn read_loop<S>(
    mut stream: SplitStream<WebSocketStream<Activity<S>>>,
    mut writer: tokio::task::JoinHandle<WriterEnd>,
    att: &Attachment,
    conf: &crate::RelayConf,
    io: &IoClock,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Time spent waiting on back-pressure is not the peer's silence.
    let mut last_progress = Instant::now();
    let mut grace: Option<Instant> = None;
    let mut stream_done = false;
    let mut writer_done = false;
    loop {
        let alive = io.last_read().max(last_progress);
        let deadline = grace.unwrap_or(alive + conf.ping_timeout());
        tokio::select! {
            biased;
            _ = att.outbox.closed(), if grace.is_none() => {
                grace = Some(Instant::now() + conf.close_grace());
            }
            end = &mut writer, if !writer_done => {
                writer_done = true;
                if let Ok(WriterEnd::Stalled) = end {
                    // Nothing, not even a close frame, can be written to it: drop it now.
                    info!("{}: peer stopped reading for {:?}, dropping the connection", att.describe(), conf.slow_consumer_timeout());
                    break;
                }
                if stream_done || !matches!(end, Ok(WriterEnd::SentClose)) {
                    // Nothing more will be written; keep reading briefly so that a close the
                    // peer started is still echoed by tungstenite, then drop.
                    if stream_done {
                        break;
                    }
                    att.outbox.shut();
                }
            }
            _ = sleep_until(deadline) => {
                if grace.is_some() {
                    debug!("{}: no close reply within the grace period", att.describe());
                    break;
                }
                if io.last_read().max(last_progress) + conf.ping_timeout() > Instant::now() {
                    continue; // bytes arrived meanwhile: the deadline moved
                }
                info!("{}: nothing received for {:?}, closing 1001", att.describe(), conf.ping_timeout());
                att.outbox.close(close::GOING_AWAY, close::PING_TIMEOUT);
            }
            frame = stream.next(), if !stream_done => match frame {
                None => break,
                Some(Ok(msg)) => {
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
                            break;
                        }
                    }
                    if writer_done {
                        break;
                    }
                }
            }
        }
    }
    writer.abort();
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
    let deadline = conf.slow_consumer_timeout();
    match att.forward(msg) {
        Forward::Drop | Forward::Buffered => {}
        Forward::OverBudget => {
            warn!(
                "{}: late-daemon buffer budget spent, closing 1013",
                att.describe()
            );
            att.outbox.close(close::TRY_AGAIN, close::INGRESS_CAPACITY);
        }
        Forward::One(to, msg) => {
            if deliver(att, &to, msg.clone(), deadline).await == Err(SendError::Closed) {
                // The destination closed while the frame was in flight (replaced data
                // socket): route it again, to the successor or the late-daemon buffer.
                if let Forward::One(next, msg) = att.forward(msg) {
                    if !Arc::ptr_eq(&next, &to) {
                        let _ = deliver(att, &next, msg, deadline).await;
                    }
                }
            }
        }
        Forward::Many(all, msg) => {
            // Each destination waits for room on its own, all under the same deadline.
            join_all(all.iter().map(|to| deliver(att, to, msg.clone(), deadline))).await;
        }
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
/// Returns the data-queue bytes the batch held and whether it sent the close frame.
async fn write_batch<S>(
    sink: &mut SplitSink<WebSocketStream<Activity<S>>, Message>,
    rx: &mut OutboxReceiver,
    outbox: &Outbox,
    first: (Command, usize),
) -> Result<(usize, bool), WsError>
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
        };
        bytes += msg.len();
        count += 1;
        sink.feed(msg).await?;
        if is_close {
            sink.flush().await?;
            return Ok((held, true));
        }
        if count < MAX_BATCH_MESSAGES && bytes < MAX_BATCH_BYTES {
            next = next_item(rx, outbox);
        }
    }
    sink.flush().await?;
    Ok((held, false))
}

async fn write_loop<S>(
    mut sink: SplitSink<WebSocketStream<Activity<S>>, Message>,
    mut rx: OutboxReceiver,
    outbox: Arc<Outbox>,
    io: Arc<IoClock>,
    conf: crate::RelayConf,
) -> WriterEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ping_every = conf.ping_interval();
    let stall = conf.slow_consumer_timeout();
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            biased;
            item = rx.priority.recv() => match item {
                Some((cmd, cost)) => { outbox.priority_taken(cost); (cmd, 0) }
                None => return WriterEnd::Failed,
            },
            item = rx.data.recv() => match item {
                Some((cmd, cost)) => (cmd, cost as usize),
                None => return WriterEnd::Failed,
            },
            _ = ping.tick() => (Command::Send(Message::Ping(Bytes::new())), 0),
        };
        let started = Instant::now();
        let batch = write_batch(&mut sink, &mut rx, &outbox, first);
        tokio::pin!(batch);
        // A peer may read slowly, but a write that makes no progress at all for the
        // slow-consumer deadline means it stopped reading: give up on the socket.
        let result = loop {
            let progress = io.last_write().max(started);
            tokio::select! {
                r = &mut batch => break Some(r),
                _ = sleep_until(progress + stall) => {
                    if io.last_write().max(started) + stall <= Instant::now() {
                        break None;
                    }
                }
            }
        };
        match result {
            Some(Ok((held, sent_close))) => {
                outbox.release(held);
                if sent_close {
                    return WriterEnd::SentClose;
                }
            }
            Some(Err(_)) => return WriterEnd::Failed,
            None => return WriterEnd::Stalled,
        }
    }
}
