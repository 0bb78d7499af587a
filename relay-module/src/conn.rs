//! One accepted WebSocket: a reader task and a writer task that own its stream
//! (relay-protocol.md §0 "Frames and limits", "Liveness").
//!
//! ```text
//!   peer ──frames──▶ reader ──forward()──▶ other sockets' Outbox (bounded, waits ≤ 30 s)
//!                      │  JSON ping on control → pong on own priority lane
//!                      └─ silence 90 s → close 1001
//!   peer ◀──batch+flush── writer ◀── own Outbox (priority lane first, then data) + ping 30 s
//! ```
//!
//! The reader owns the read half and the session attachment; the writer owns the write half.
//! RFC 6455 pings are answered by tungstenite; peer closes are echoed. When the reader ends,
//! the writer is stopped and the socket is detached from its session.

use crate::hub::Attachment;
use crate::outbox::{Command, OutboxReceiver, SendError};
use crate::protocol::{close, is_json_ping, ControlMessage, SocketKind};
use crate::session::Forward;
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
/// bytes the peer sent behind its request head. Returns when the socket is gone.
pub async fn run<S>(stream: S, preread: Vec<u8>, att: Attachment, rx: OutboxReceiver)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conf = att.conf().clone();
    let config = ws_config(&att.kind, &conf);
    let (stream, activity) = Activity::new(stream);
    let ws =
        WebSocketStream::from_partially_read(stream, preread, WsRole::Server, Some(config)).await;
    let (sink, stream) = ws.split();
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        att.outbox.clone(),
        conf.ping_interval(),
    ));
    read_loop(stream, writer, &att, &conf, &activity).await;
    att.detach();
    info!("{}: closed", att.describe());
}

/// Wraps a socket's stream and records when bytes last arrived, so that any inbound
/// traffic (including the frames of a message still being reassembled) counts as life for
/// the ping timeout (spec §0 "Liveness").
struct Activity<S> {
    inner: S,
    clock: Arc<LastRead>,
}

/// Milliseconds from `base` to the last read that returned bytes.
struct LastRead {
    base: Instant,
    last_ms: AtomicU64,
}

impl LastRead {
    /// When bytes last arrived.
    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

impl<S> Activity<S> {
    fn new(inner: S) -> (Self, Arc<LastRead>) {
        let clock = Arc::new(LastRead {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        });
        (
            Activity {
                inner,
                clock: clock.clone(),
            },
            clock,
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
            let ms = self.clock.base.elapsed().as_millis() as u64;
            self.clock.last_ms.store(ms, Ordering::Relaxed);
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
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// How the writer ended.
enum WriterEnd {
    /// It sent the relay's close frame.
    SentClose,
    /// The connection failed or the queue was dropped.
    Failed,
}

async fn read_loop<S>(
    mut stream: SplitStream<WebSocketStream<S>>,
    mut writer: tokio::task::JoinHandle<WriterEnd>,
    att: &Attachment,
    conf: &crate::RelayConf,
    activity: &LastRead,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut grace: Option<Instant> = None;
    let mut stream_done = false;
    let mut writer_done = false;
    loop {
        let deadline = grace.unwrap_or(activity.last() + conf.ping_timeout());
        tokio::select! {
            biased;
            _ = att.outbox.closed(), if grace.is_none() => {
                grace = Some(Instant::now() + conf.close_grace());
            }
            end = &mut writer, if !writer_done => {
                writer_done = true;
                match end {
                    Ok(WriterEnd::SentClose) if !stream_done => {}
                    _ => return,
                }
            }
            _ = sleep_until(deadline) => {
                if grace.is_some() {
                    debug!("{}: no close reply within the grace period", att.describe());
                    break;
                }
                if activity.last() + conf.ping_timeout() > Instant::now() {
                    continue; // bytes arrived meanwhile: the deadline moved
                }
                info!("{}: nothing received for {:?}, closing", att.describe(), conf.ping_timeout());
                att.outbox.close(close::GOING_AWAY, close::PING_TIMEOUT);
            }
            frame = stream.next(), if !stream_done => match frame {
                None => break,
                Some(Ok(msg)) => on_message(msg, att, conf).await,
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
    if !matches!(msg, Message::Text(_) | Message::Binary(_)) {
        // Ping is answered by tungstenite, Close is echoed by it; Pong only counts as life.
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
    match att.forward(msg) {
        Forward::Drop | Forward::Buffered => {}
        Forward::OverBudget => {
            warn!(
                "{}: late-daemon buffer budget spent, closing 1013",
                att.describe()
            );
            att.outbox.close(close::TRY_AGAIN, close::INGRESS_CAPACITY);
        }
        Forward::One(to, msg) => deliver(att, &to, msg, conf.slow_consumer_timeout()).await,
        Forward::Many(all, msg) => {
            for to in &all {
                deliver(att, to, msg.clone(), conf.slow_consumer_timeout()).await;
            }
        }
    }
}

async fn deliver(
    att: &Attachment,
    to: &Arc<crate::outbox::Outbox>,
    msg: Message,
    deadline: Duration,
) {
    if let Err(SendError::TimedOut) = to.send_data(msg, deadline).await {
        warn!(
            "{}: a destination's queue stayed full for {deadline:?}, closing it 1013",
            att.describe()
        );
        to.close(close::TRY_AGAIN, close::SLOW_CONSUMER);
    }
}

/// Accounts a command taken off the priority lane (only `Send` counts toward the backlog).
fn taken(cmd: Command, outbox: &crate::outbox::Outbox) -> Command {
    if let Command::Send(_) = cmd {
        outbox.priority_taken();
    }
    cmd
}

async fn write_loop<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    mut rx: OutboxReceiver,
    outbox: Arc<crate::outbox::Outbox>,
    ping_every: Duration,
) -> WriterEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut held = 0usize;
        let mut batch_bytes = 0usize;
        let mut close_sent = false;
        let first = tokio::select! {
            biased;
            cmd = rx.priority.recv() => match cmd {
                Some(cmd) => taken(cmd, &outbox),
                None => return WriterEnd::Failed,
            },
            item = rx.data.recv() => match item {
                Some((msg, cost)) => { held += cost as usize; Command::Send(msg) }
                None => return WriterEnd::Failed,
            },
            _ = ping.tick() => Command::Send(Message::Ping(Bytes::new())),
        };
        let mut next = Some(first);
        let mut count = 0;
        while let Some(cmd) = next.take() {
            let msg = match cmd {
                Command::Send(msg) => msg,
                Command::Close(frame) => {
                    close_sent = true;
                    Message::Close(Some(frame))
                }
            };
            batch_bytes += msg.len();
            count += 1;
            if sink.feed(msg).await.is_err() {
                return WriterEnd::Failed;
            }
            if close_sent || count >= MAX_BATCH_MESSAGES || batch_bytes >= MAX_BATCH_BYTES {
                break;
            }
            next = match rx.priority.try_recv() {
                Ok(cmd) => Some(taken(cmd, &outbox)),
                Err(_) => match rx.data.try_recv() {
                    Ok((msg, cost)) => {
                        held += cost as usize;
                        Some(Command::Send(msg))
                    }
                    Err(_) => None,
                },
            };
        }
        if sink.flush().await.is_err() {
            return WriterEnd::Failed;
        }
        outbox.release(held);
        if close_sent {
            return WriterEnd::SentClose;
        }
    }
}
