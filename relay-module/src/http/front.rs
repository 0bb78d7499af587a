//! The front of every listener (issue 9 "HTTP deadlines"): what happens to a connection
//! between its accept and Pingora's HTTP code, and between two requests on it.
//!
//! Pingora alone applies only per-read timeouts to a request head, so a client that
//! trickles one byte every few seconds, or an idle HTTP/1.1 keep-alive connection (which
//! Pingora waits for without end), holds a file descriptor for as long as it likes.
//! [`Front`] is the Pingora `ServerApp` of a listening service instead of the bare
//! `HttpProxy`; per connection it
//!
//! 1. on a TLS listener, answers plain HTTP with a `400` and runs the TLS handshake under
//!    `http.tls_handshake_timeout_ms` (`ops::tls::accept`);
//! 2. wraps the stream in a [`HeadDeadline`] and runs Pingora's HTTP/1 keep-alive loop
//!    (as Pingora's own `ServerApp` for an `HttpServerApp` does), re-arming the wrapper
//!    after each request.
//!
//! [`HeadDeadline`] holds a request head back from Pingora until it is complete: it reads
//! the bytes itself until the empty line that ends the head, then hands head and what
//! followed to Pingora at once. When `http.request_head_timeout_ms` passes first (counted
//! from the accept for a connection's first request, from the first byte for a later one),
//! it writes `408 Request timeout` itself and reports end of stream: Pingora has read
//! nothing, so it closes the connection without logging an error. Between requests the
//! wrapper waits `http.keepalive_timeout_ms` for a first byte, then reports end of stream
//! (no answer). Once a head is handed over the wrapper is transparent: one branch per read,
//! no timer, so a WebSocket taken out of Pingora after its `101` pays nothing for it.
//!
//! The loop re-arms the wrapper when Pingora hands the stream back for reuse, not from
//! `ProxyHttp::logging`: Pingora calls `logging` before it drains an unread request body,
//! and body bytes must not go through the head detector. Pingora's own keep-alive timer is
//! kept off (`set_keepalive(Some(0))`), so the wrapper alone decides. A head that reaches
//! 1 MiB without its end is handed over whole: Pingora refuses it (400) from that buffer.
//!
//! Each expiry (head, keep-alive, TLS handshake) is counted in
//! `paseo_relay_request_timeouts_total` and logged at debug.

use crate::config::HttpConf;
use crate::ops::tls;
use async_trait::async_trait;
use log::{debug, warn};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::listeners::tls::{Acceptor, TlsSettings};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN, IO,
};
use pingora::proxy::{HttpProxy, ProxyHttp};
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Body of the `408` for a request head that did not arrive in time.
pub const REQUEST_TIMEOUT_BODY: &str = "Request timeout";

/// The whole `408` answer, written by [`HeadDeadline`] itself.
const REQUEST_TIMEOUT_RESPONSE: &[u8] = concat!(
    "HTTP/1.1 408 Request Timeout\r\n",
    "Content-Type: text/plain; charset=utf-8\r\n",
    "Content-Length: 15\r\n",
    "Connection: close\r\n",
    "\r\n",
    "Request timeout"
)
.as_bytes();

/// Most bytes of a head held back. Pingora refuses a head of this size (400) from what it
/// is handed, without reading again, so the deadline still bounds the connection.
const HEAD_CAP: usize = 1 << 20;
/// Largest single read while a head is held back.
const READ_CHUNK: usize = 4096;
/// After a `408`: how long the client's unread input is read and dropped, so that closing
/// the socket does not reset it before the client has read the answer.
const LINGER: Duration = Duration::from_secs(1);
/// After a `408`: most input bytes read and dropped.
const LINGER_BYTES: usize = 64 << 10;

/// The deadlines of one listening service and the counter of their expiries.
#[derive(Debug)]
pub struct Deadlines {
    head: Duration,
    keepalive: Duration,
    tls_handshake: Duration,
    expired: IntCounter,
}

impl Deadlines {
    /// The deadlines of `conf`; each expiry increments `expired`.
    pub fn new(conf: &HttpConf, expired: IntCounter) -> Arc<Deadlines> {
        Arc::new(Deadlines {
            head: conf.request_head_timeout(),
            keepalive: conf.keepalive_timeout(),
            tls_handshake: conf.tls_handshake_timeout(),
            expired,
        })
    }
}

/// A Pingora `ServerApp` in front of an `HttpProxy`: TLS handshake (on a TLS listener),
/// then the HTTP/1 keep-alive loop over a [`HeadDeadline`] stream. Each Pingora listening
/// service has one app for all its listeners: give plain and TLS listeners separate
/// services.
pub struct Front<SV> {
    proxy: Arc<HttpProxy<SV>>,
    tls: Option<Acceptor>,
    deadlines: Arc<Deadlines>,
}

impl<SV> Front<SV> {
    /// `proxy` (with its modules initialised, e.g. from `pingora::proxy::http_proxy`)
    /// behind the deadlines, speaking TLS with `tls` if given.
    pub fn new(proxy: HttpProxy<SV>, tls: Option<TlsSettings>, deadlines: Arc<Deadlines>) -> Self {
        Front {
            proxy: Arc::new(proxy),
            tls: tls.map(TlsSettings::build),
            deadlines,
        }
    }
}

#[async_trait]
impl<SV> ServerApp for Front<SV>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = Instant::now();
        if !stream.as_any().is::<L4Stream>() {
            // Not from a TCP or Unix listener: served as Pingora would, without deadlines.
            warn!("connection of an unexpected stream type: no HTTP deadlines for it");
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let l4 = *stream.into_any().downcast::<L4Stream>().ok()?;
        match &self.tls {
            None => {
                let head = HeadDeadline::new(l4, accepted, &self.deadlines);
                self.serve(head, shutdown).await;
            }
            Some(acceptor) => {
                let deadline = accepted + self.deadlines.tls_handshake;
                let expired = &self.deadlines.expired;
                let tls = tls::accept(acceptor, l4, deadline, expired).await?;
                // The head deadline of the first request counts from the accept too.
                let head = HeadDeadline::new(tls, accepted, &self.deadlines);
                self.serve(head, shutdown).await;
            }
        }
        None
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

impl<SV> Front<SV>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    /// Pingora's HTTP/1 keep-alive loop (`ServerApp` for an `HttpServerApp`), except that
    /// Pingora's own keep-alive timeout is off: the [`HeadDeadline`] decides.
    async fn serve<S: IO + 'static>(&self, mut stream: HeadDeadline<S>, shutdown: &ShutdownWatch) {
        // The first head is awaited here, not in Pingora: Pingora abandons a request still
        // waiting for its head when the service stops (`http_cleanup`), so a connection
        // accepted just before a graceful upgrade or a shutdown would be closed without an
        // answer. Bounded by the head deadline (408) and the process's grace period. An
        // idle keep-alive connection is still closed at once.
        std::future::poll_fn(|cx| stream.poll_head(cx)).await;
        let mut stream: Stream = Box::new(stream);
        let mut settings: Option<HttpPersistentSettings> = None;
        loop {
            let mut session = ServerSession::new_http1(stream);
            match settings.take() {
                Some(settings) => settings.apply_to_session(&mut session),
                None => session.set_keepalive_reuses_remaining(
                    self.proxy
                        .server_options()
                        .and_then(|o| o.keepalive_request_limit),
                ),
            }
            // `Some(0)`: no Pingora timeout on a head read (it would be 60 s for the first
            // request, none for later ones); `None` while stopping: no reuse.
            session.set_keepalive((!*shutdown.borrow()).then_some(0));
            let Some(reused) = self.proxy.process_new_http(session, shutdown).await else {
                return;
            };
            let (next, next_settings) = reused.consume();
            settings = next_settings;
            let Some(next) = rearm::<S>(next, &self.deadlines) else {
                return;
            };
            stream = next;
        }
    }
}

/// Puts a stream Pingora returns for reuse back to waiting for a head (keep-alive).
fn rearm<S: IO + 'static>(stream: Stream, deadlines: &Arc<Deadlines>) -> Option<Stream> {
    if !stream.as_any().is::<HeadDeadline<S>>() {
        return Some(stream);
    }
    let mut ours = stream.into_any().downcast::<HeadDeadline<S>>().ok()?;
    ours.await_next_head(deadlines);
    Some(ours)
}

/// Finds the end of a request head across reads: the first empty line (CRLF CRLF, LF LF or
/// a mix) after a non-empty one. Empty lines before the request line are skipped, as
/// Pingora's parser (httparse) skips them.
#[derive(Debug, Default, Clone, Copy)]
struct HeadEnd {
    /// A byte other than CR or LF was seen.
    content: bool,
    /// The last byte other than CR was LF.
    line_start: bool,
}

impl HeadEnd {
    /// Scans the next `bytes` of the stream; returns the index just past the head's end
    /// if it is in them.
    fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'\n' if self.line_start && self.content => return Some(i + 1),
                b'\n' => self.line_start = true,
                b'\r' => {}
                _ => {
                    self.content = true;
                    self.line_start = false;
                }
            }
        }
        None
    }
}

/// A stream that holds each request head back until it is complete, within its deadline
/// (see the module docs). Reads go straight through once the head is handed over; writes
/// always do.
pub struct HeadDeadline<S> {
    inner: S,
    state: State,
}

enum State {
    /// The head was handed over: reads go straight to the stream.
    Open,
    /// Waiting for (the rest of) a head, or answering its expiry.
    Waiting(Box<Wait>),
    /// A complete head and what followed it, `bytes[read..]` not yet read by Pingora.
    Handing { bytes: Vec<u8>, read: usize },
}

/// What a [`HeadDeadline`] does while it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between two requests: no byte of the next head yet (keep-alive deadline).
    Idle,
    /// A head is due (head deadline).
    Head,
    /// The head deadline passed: writing the `408`, `written` bytes of it so far.
    Answer { written: usize },
    /// The `408` is written: flushing it.
    Flush,
    /// Closing the write side.
    Shutdown,
    /// Reading and dropping the client's input (`dropped` bytes so far) before the close.
    Linger { dropped: usize },
    /// Over: reads report end of stream.
    Closed,
}

struct Wait {
    deadlines: Arc<Deadlines>,
    phase: Phase,
    /// The head so far (and, once complete, what followed it).
    buf: Vec<u8>,
    end: HeadEnd,
    /// The deadline of the phase.
    timer: Pin<Box<Sleep>>,
}

impl<S> HeadDeadline<S> {
    /// `inner`, accepted at `accepted`, waiting for its first request head.
    fn new(inner: S, accepted: Instant, deadlines: &Arc<Deadlines>) -> Self {
        let wait = Wait::new(deadlines, Phase::Head, accepted + deadlines.head);
        HeadDeadline {
            inner,
            state: State::Waiting(Box::new(wait)),
        }
    }

    /// Ready once the head is complete (handed to the reader next, none of it consumed) or
    /// the wait is over (expiry answered, closed, failed: the reader then sees the end).
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<()>
    where
        S: AsyncRead + AsyncWrite + GetSocketDigest + Unpin,
    {
        let State::Waiting(wait) = &mut self.state else {
            return Poll::Ready(());
        };
        // Closed or failed (not `Some`): the wait is in its closed phase, and reads end the
        // stream.
        if let Ok(Some(bytes)) = ready!(wait.poll(&mut self.inner, cx)) {
            self.state = State::Handing { bytes, read: 0 };
        }
        Poll::Ready(())
    }

    /// After a request: waits for the next head, first for `keepalive` idle time. Bytes of
    /// it already read (behind the last request) start its head deadline now.
    fn await_next_head(&mut self, deadlines: &Arc<Deadlines>) {
        let now = Instant::now();
        let mut wait = Wait::new(deadlines, Phase::Idle, now + deadlines.keepalive);
        self.state = match std::mem::replace(&mut self.state, State::Open) {
            State::Handing { mut bytes, read } => {
                bytes.drain(..read);
                wait.buf = bytes;
                match wait.received(0) {
                    Some(head) => State::Handing {
                        bytes: head,
                        read: 0,
                    },
                    None => State::Waiting(Box::new(wait)),
                }
            }
            _ => State::Waiting(Box::new(wait)),
        };
    }
}

impl Wait {
    fn new(deadlines: &Arc<Deadlines>, phase: Phase, deadline: Instant) -> Wait {
        Wait {
            deadlines: deadlines.clone(),
            phase,
            buf: Vec::new(),
            end: HeadEnd::default(),
            timer: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// Takes note of the bytes from `buf[from..]` on: the first byte after an idle time
    /// starts the head deadline. Returns the buffered bytes once the head is complete (or
    /// the cap is reached).
    fn received(&mut self, from: usize) -> Option<Vec<u8>> {
        if self.buf.len() == from {
            return None;
        }
        if self.phase == Phase::Idle {
            self.phase = Phase::Head;
            let deadline = Instant::now() + self.deadlines.head;
            self.timer.as_mut().reset(deadline);
        }
        if self.end.scan(&self.buf[from..]).is_some() {
            return Some(std::mem::take(&mut self.buf));
        }
        if !could_be_a_head(&self.buf) {
            // Garbage: Pingora answers it at once (400), as without the deadline.
            debug!("not an HTTP request head: handed to Pingora, which refuses it");
            return Some(std::mem::take(&mut self.buf));
        }
        if self.buf.len() >= HEAD_CAP {
            debug!("request head over {HEAD_CAP} bytes: handed to Pingora, which refuses it");
            return Some(std::mem::take(&mut self.buf));
        }
        None
    }

    /// The phase's deadline passed.
    fn expire(&mut self, peer: impl fmt::Display) {
        self.deadlines.expired.inc();
        if self.phase == Phase::Idle {
            debug!(
                "{peer}: keep-alive connection idle for {:?}: closed",
                self.deadlines.keepalive
            );
            self.phase = Phase::Closed;
        } else {
            debug!(
                "{peer}: request head not complete within {:?}: 408",
                self.deadlines.head
            );
            self.phase = Phase::Answer { written: 0 };
            self.timer.as_mut().reset(Instant::now() + LINGER);
        }
    }

    /// Drives the phase. Ready with `Some(bytes)` when a head is complete, `None` for end
    /// of stream.
    fn poll<S>(&mut self, io: &mut S, cx: &mut Context<'_>) -> Poll<io::Result<Option<Vec<u8>>>>
    where
        S: AsyncRead + AsyncWrite + GetSocketDigest + Unpin,
    {
        loop {
            let step = match self.phase {
                Phase::Idle | Phase::Head => {
                    let from = self.buf.len();
                    match poll_read_into(io, cx, &mut self.buf, HEAD_CAP.saturating_sub(from)) {
                        Poll::Ready(Ok(0)) => {
                            if from > 0 {
                                debug!("{}: closed within a request head", peer(io));
                            }
                            self.phase = Phase::Closed;
                            continue;
                        }
                        Poll::Ready(Ok(_)) => {
                            if let Some(head) = self.received(from) {
                                return Poll::Ready(Ok(Some(head)));
                            }
                            if Instant::now() < self.timer.deadline() {
                                continue;
                            }
                            Poll::Ready(())
                        }
                        Poll::Ready(Err(e)) => {
                            // Pingora has read nothing of this head: it closes silently.
                            self.phase = Phase::Closed;
                            return Poll::Ready(Err(e));
                        }
                        Poll::Pending => Poll::Pending,
                    }
                }
                Phase::Answer { written } => {
                    match Pin::new(&mut *io).poll_write(cx, &REQUEST_TIMEOUT_RESPONSE[written..]) {
                        Poll::Ready(Ok(n)) if n > 0 => {
                            let written = written + n;
                            self.phase = if written == REQUEST_TIMEOUT_RESPONSE.len() {
                                Phase::Flush
                            } else {
                                Phase::Answer { written }
                            };
                            continue;
                        }
                        Poll::Ready(_) => Poll::Ready(()),
                        Poll::Pending => Poll::Pending,
                    }
                }
                Phase::Flush => match Pin::new(&mut *io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.phase = Phase::Shutdown;
                        continue;
                    }
                    Poll::Ready(Err(_)) => Poll::Ready(()),
                    Poll::Pending => Poll::Pending,
                },
                Phase::Shutdown => match Pin::new(&mut *io).poll_shutdown(cx) {
                    Poll::Ready(Ok(())) => {
                        self.phase = Phase::Linger { dropped: 0 };
                        continue;
                    }
                    Poll::Ready(Err(_)) => Poll::Ready(()),
                    Poll::Pending => Poll::Pending,
                },
                Phase::Linger { dropped } => {
                    let mut scratch = [0u8; READ_CHUNK];
                    let mut rb = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                            let dropped = dropped + rb.filled().len();
                            if dropped < LINGER_BYTES {
                                self.phase = Phase::Linger { dropped };
                                continue;
                            }
                            Poll::Ready(())
                        }
                        Poll::Ready(_) => Poll::Ready(()),
                        Poll::Pending => Poll::Pending,
                    }
                }
                Phase::Closed => return Poll::Ready(Ok(None)),
            };
            // `step` is Ready when the phase cannot go on, Pending when it waits for I/O.
            if step.is_pending() {
                ready!(self.timer.as_mut().poll(cx));
            }
            match self.phase {
                Phase::Idle | Phase::Head => self.expire(peer(io)),
                _ => self.phase = Phase::Closed,
            }
        }
    }
}

/// Reads at most `limit` bytes (and at most [`READ_CHUNK`]) from `io` onto the end of `buf`.
/// Whether `buf`, an unfinished head, can still become a valid one: its request line parses
/// so far (httparse, as Pingora parses it; the headers are left to Pingora). A client that
/// sends garbage gets Pingora's 400 at once instead of waiting for the head deadline.
fn could_be_a_head(buf: &[u8]) -> bool {
    let mut no_headers: [httparse::Header<'_>; 0] = [];
    match httparse::Request::new(&mut no_headers).parse(buf) {
        Ok(_) | Err(httparse::Error::TooManyHeaders) => true,
        Err(_) => false,
    }
}

fn poll_read_into<S: AsyncRead + Unpin>(
    io: &mut S,
    cx: &mut Context<'_>,
    buf: &mut Vec<u8>,
    limit: usize,
) -> Poll<io::Result<usize>> {
    let mut chunk = [0u8; READ_CHUNK];
    let mut rb = ReadBuf::new(&mut chunk[..limit.min(READ_CHUNK)]);
    ready!(Pin::new(io).poll_read(cx, &mut rb))?;
    buf.extend_from_slice(rb.filled());
    Poll::Ready(Ok(rb.filled().len()))
}

/// The peer of `io` for logs.
fn peer<S: GetSocketDigest>(io: &S) -> impl fmt::Display {
    struct Peer(Option<SocketAddr>);
    impl fmt::Display for Peer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match &self.0 {
                Some(addr) => write!(f, "{addr}"),
                None => f.write_str("client"),
            }
        }
    }
    Peer(io.get_socket_digest().and_then(|d| d.peer_addr().cloned()))
}

impl<S> AsyncRead for HeadDeadline<S>
where
    S: AsyncRead + AsyncWrite + GetSocketDigest + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Open => return Pin::new(&mut this.inner).poll_read(cx, out),
                State::Handing { bytes, read } => {
                    let n = (bytes.len() - *read).min(out.remaining());
                    out.put_slice(&bytes[*read..*read + n]);
                    *read += n;
                    if *read == bytes.len() {
                        this.state = State::Open;
                    }
                    return Poll::Ready(Ok(()));
                }
                State::Waiting(wait) => match ready!(wait.poll(&mut this.inner, cx)) {
                    Ok(Some(bytes)) => this.state = State::Handing { bytes, read: 0 },
                    Ok(None) => return Poll::Ready(Ok(())),
                    Err(e) => return Poll::Ready(Err(e)),
                },
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl<S: Shutdown + Send> Shutdown for HeadDeadline<S> {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

#[async_trait]
impl<S: Peek + Send> Peek for HeadDeadline<S> {
    /// Peeks the stream once the head is handed over; no peeking before.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        match self.state {
            State::Open => self.inner.try_peek(buf).await,
            _ => Ok(false),
        }
    }
}

impl<S: UniqueID> UniqueID for HeadDeadline<S> {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl<S: Ssl> Ssl for HeadDeadline<S> {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl<S: GetTimingDigest> GetTimingDigest for HeadDeadline<S> {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl<S: GetProxyDigest> GetProxyDigest for HeadDeadline<S> {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl<S: GetSocketDigest> GetSocketDigest for HeadDeadline<S> {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

impl<S: fmt::Debug> fmt::Debug for HeadDeadline<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Open => "open".to_string(),
            State::Waiting(wait) => format!("{:?}", wait.phase),
            State::Handing { bytes, read } => format!("handing {} bytes", bytes.len() - read),
        };
        f.debug_struct("HeadDeadline")
            .field("inner", &self.inner)
            .field("state", &state)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::IntCounter;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    /// The end of the head of `chunks` read one after the other: (chunk index, offset).
    fn end_of(chunks: &[&[u8]]) -> Option<(usize, usize)> {
        let mut end = HeadEnd::default();
        chunks
            .iter()
            .enumerate()
            .find_map(|(i, c)| end.scan(c).map(|at| (i, at)))
    }

    #[test]
    fn garbage_is_not_held_back_but_a_partial_head_is() {
        for partial in [
            &b"GE"[..],
            b"GET /ws?serverId=a HTT",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Half",
            b"\r\nGET / HTTP/1.1\r\n",
        ] {
            assert!(
                could_be_a_head(partial),
                "{:?}",
                String::from_utf8_lossy(partial)
            );
        }
        for garbage in [
            &b"\x16\x03\x01\x02\x00\x01"[..],
            b"HELLO THERE\r\n",
            b"\x01\x02 /ws HTTP/1.1\r\n",
            b"GET / HTTP/9.9\r\n",
        ] {
            assert!(
                !could_be_a_head(garbage),
                "{:?}",
                String::from_utf8_lossy(garbage)
            );
        }
    }

    #[test]
    fn head_end_crlf_lf_and_mixed() {
        assert_eq!(
            end_of(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]),
            Some((0, 27))
        );
        assert_eq!(end_of(&[b"GET / HTTP/1.1\nHost: a\n\nbody"]), Some((0, 24)));
        assert_eq!(
            end_of(&[b"GET / HTTP/1.1\r\nHost: a\n\r\nX"]),
            Some((0, 26))
        );
        assert_eq!(end_of(&[b"GET / HTTP/1.1\r\n\r\n"]), Some((0, 18)));
        assert_eq!(end_of(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]), None);
        assert_eq!(end_of(&[b"GET / HTTP/1.1\r\nHost: a\r\n \r\n"]), None);
    }

    #[test]
    fn head_end_split_across_reads() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        // Every split point, and one byte per read.
        for at in 1..head.len() {
            let (a, b) = head.split_at(at);
            assert_eq!(end_of(&[a, b]), Some((1, head.len() - at)), "split at {at}");
        }
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert_eq!(end_of(&bytes), Some((head.len() - 1, 1)));
        assert_eq!(end_of(&[b"GET / HTTP/1.1\r\n\r", b"\n"]), Some((1, 1)));
        assert_eq!(end_of(&[b"GET / HTTP/1.1\n", b"\n"]), Some((1, 1)));
    }

    #[test]
    fn head_end_skips_leading_empty_lines() {
        assert_eq!(end_of(&[b"\r\n\r\n\n"]), None);
        assert_eq!(
            end_of(&[b"\r\n\r\n", b"\n", b"GET / HTTP/1.1\r\n\r\n"]),
            Some((2, 18))
        );
        assert_eq!(end_of(&[b"\n\nGET / HTTP/1.1\n\n"]), Some((0, 18)));
    }

    #[test]
    fn the_408_is_exact() {
        let text = std::str::from_utf8(REQUEST_TIMEOUT_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, REQUEST_TIMEOUT_BODY);
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
    }

    fn deadlines(head_ms: u64, keepalive_ms: u64) -> (Arc<Deadlines>, IntCounter) {
        let counter = IntCounter::new("t", "t").unwrap();
        let conf = HttpConf {
            request_head_timeout_ms: head_ms,
            keepalive_timeout_ms: keepalive_ms,
            ..HttpConf::default()
        };
        (Deadlines::new(&conf, counter.clone()), counter)
    }

    /// A head split over two writes reaches the reader whole, and the rest reads through.
    #[tokio::test]
    async fn hands_over_a_complete_head_at_once() {
        let (d, expired) = deadlines(1000, 1000);
        let (mut client, server) = duplex(1 << 16);
        let mut s = HeadDeadline::new(server, Instant::now(), &d);
        client.write_all(b"GET / HTTP/1.1\r\nHost").await.unwrap();
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await;
        assert!(early.is_err(), "no byte before the head is complete");
        client.write_all(b": a\r\n\r\nbody").await.unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody");
        assert!(matches!(s.state, State::Open));
        client.write_all(b"more").await.unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"more");
        assert_eq!(expired.get(), 0);
    }

    /// `serve` awaits the first head itself (Pingora would drop it on a shutdown): the wait
    /// ends once the head is complete, and the reader then gets all of it at once.
    #[tokio::test]
    async fn the_first_head_is_awaited_without_consuming_it() {
        let (d, expired) = deadlines(1000, 1000);
        let (mut client, server) = duplex(1 << 16);
        let mut s = HeadDeadline::new(server, Instant::now(), &d);
        client.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        let early = tokio::time::timeout(
            Duration::from_millis(50),
            std::future::poll_fn(|cx| s.poll_head(cx)),
        )
        .await;
        assert!(early.is_err(), "the head is not complete yet");
        client.write_all(b"Host: a\r\n\r\n").await.unwrap();
        std::future::poll_fn(|cx| s.poll_head(cx)).await;
        assert!(matches!(s.state, State::Handing { read: 0, .. }));
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(expired.get(), 0);
    }

    /// A late head: the 408, end of stream for the reader, the write side closed.
    #[tokio::test(start_paused = true)]
    async fn late_head_gets_408_and_eof() {
        let (d, expired) = deadlines(1000, 5000);
        let (mut client, server) = duplex(1 << 16);
        let mut s = HeadDeadline::new(server, Instant::now(), &d);
        client.write_all(b"GET / HTT").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        assert_eq!(expired.get(), 1);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, REQUEST_TIMEOUT_RESPONSE);
    }

    /// Idle after a request: end of stream, no answer; a first byte starts the head deadline.
    #[tokio::test(start_paused = true)]
    async fn keepalive_idle_then_head_deadline_from_the_first_byte() {
        let (d, expired) = deadlines(1000, 3000);
        let (mut client, server) = duplex(1 << 16);
        let mut s = HeadDeadline::new(server, Instant::now(), &d);
        s.state = State::Open;
        s.await_next_head(&d);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        client.write_all(b"G").await.unwrap();
        let mut buf = [0u8; 64];
        // The 408 one head deadline after the first byte (not at the keep-alive deadline),
        // then end of stream after the linger.
        let mut answer = vec![0u8; REQUEST_TIMEOUT_RESPONSE.len()];
        let (read, answered) = tokio::join!(s.read(&mut buf), async {
            client.read_exact(&mut answer).await.unwrap();
            start.elapsed()
        });
        assert_eq!(read.unwrap(), 0);
        assert_eq!(answered, Duration::from_millis(3500));
        assert_eq!(answer, REQUEST_TIMEOUT_RESPONSE);
        assert_eq!(expired.get(), 1);

        let (mut client, server) = duplex(1 << 16);
        let mut s = HeadDeadline::new(server, Instant::now(), &d);
        s.state = State::Open;
        s.await_next_head(&d);
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        assert_eq!(expired.get(), 2);
        drop(s);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "no answer to an idle connection");
    }
}
