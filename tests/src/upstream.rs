//! Upstream servers for the routing tests (issue 4), each on an ephemeral port of 127.0.0.1
//! and stopped on drop:
//!
//! - [`HttpUpstream`]: a small HTTP/1.1 server (keep-alive, `Content-Length` bodies). Every
//!   request is recorded ([`SeenRequest`]) and answered `200` with the body
//!   `<name> <METHOD> <target>`, except two streaming endpoints: a path ending in `/upload`
//!   reads its body in chunks and answers `<byte count> <checksum>` ([`Checksum`]), and a
//!   path ending in `/download` with `?bytes=N` sends N bytes of [`Pattern`] in chunks.
//! - [`WsEchoUpstream`]: a WebSocket server that echoes every text and binary message.

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// Size of the chunks the streaming endpoints read and write.
pub const CHUNK: usize = 64 * 1024;

/// A deterministic byte stream (splitmix64 of the word index, little endian), so that a
/// sender and a receiver agree on 50 MiB without either holding it.
#[derive(Debug, Default)]
pub struct Pattern {
    pos: u64,
}

fn splitmix64(i: u64) -> u64 {
    let mut z = i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Pattern {
    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() {
            let word = splitmix64(self.pos / 8).to_le_bytes();
            let off = (self.pos % 8) as usize;
            let n = (8 - off).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&word[off..off + n]);
            i += n;
            self.pos += n as u64;
        }
    }
}

/// Byte count and an order-sensitive 64-bit checksum of a byte stream fed in pieces of any
/// size (the result does not depend on where the pieces are cut).
#[derive(Debug, Default)]
pub struct Checksum {
    count: u64,
    hash: u64,
    pending: [u8; 8],
    npending: usize,
}

impl Checksum {
    fn mix(&mut self, word: u64) {
        self.hash = (self.hash ^ word)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }

    /// Adds `data` to the stream.
    pub fn update(&mut self, mut data: &[u8]) {
        self.count += data.len() as u64;
        if self.npending > 0 {
            let take = (8 - self.npending).min(data.len());
            self.pending[self.npending..self.npending + take].copy_from_slice(&data[..take]);
            self.npending += take;
            data = &data[take..];
            if self.npending < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.pending));
            self.npending = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.mix(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let rest = words.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.npending = rest.len();
    }

    /// Bytes seen so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// `<count> <checksum as 16 hex digits>`: what the `/upload` endpoint answers.
    pub fn summary(&self) -> String {
        let mut h = self.hash;
        let mut tail = [0u8; 8];
        tail[..self.npending].copy_from_slice(&self.pending[..self.npending]);
        h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(0x0000_0100_0000_01b3);
        h = (h ^ self.count).wrapping_mul(0x0000_0100_0000_01b3);
        format!("{} {h:016x}", self.count)
    }
}

/// A request as an upstream received it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Request target as received (path and query).
    pub target: String,
    /// Header lines in the order received, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body (empty for `/upload`, whose body is only counted).
    pub body: Vec<u8>,
}

impl SeenRequest {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The values of every header named `name` (case-insensitive), in order.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

type Log = Arc<Mutex<Vec<SeenRequest>>>;

/// Binds an ephemeral port of 127.0.0.1.
async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind an upstream port");
    let addr = listener.local_addr().expect("upstream address");
    (listener, addr)
}

/// Accepts connections until aborted; aborting drops the listener (new connects are
/// refused) and every connection task with it.
fn accept_loop<F, Fut>(listener: TcpListener, serve: F) -> JoinHandle<()>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => {
                        conns.spawn(serve(tcp));
                    }
                    Err(e) => panic!("upstream accept: {e}"),
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    })
}

/// A small HTTP/1.1 upstream named `name` (see the module docs for what it answers).
pub struct HttpUpstream {
    /// Its name, the first word of its default answer.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    log: Log,
    task: Option<JoinHandle<()>>,
}

impl HttpUpstream {
    /// Starts an upstream named `name` on an ephemeral port.
    pub async fn start(name: &str) -> HttpUpstream {
        let (listener, addr) = bind().await;
        let log: Log = Arc::default();
        let (shared_name, shared_log) = (Arc::<str>::from(name), log.clone());
        let task = accept_loop(listener, move |tcp| {
            let (name, log) = (shared_name.clone(), shared_log.clone());
            async move {
                if let Err(e) = serve_http(tcp, &name, &log).await {
                    log::debug!("upstream {name}: connection ended: {e}");
                }
            }
        });
        HttpUpstream {
            name: name.to_string(),
            addr,
            log,
            task: Some(task),
        }
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.log.lock().expect("log").clone()
    }

    /// The last request received; panics if there is none.
    pub fn last_request(&self) -> SeenRequest {
        self.log
            .lock()
            .expect("log")
            .last()
            .cloned()
            .unwrap_or_else(|| panic!("upstream {} received no request", self.name))
    }

    /// Stops it: the listening socket is closed (connects are refused) and every open
    /// connection is dropped. Returns once the listener is gone.
    pub async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn plain_response(status: &str, body: &str, name: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Upstream: {name}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves HTTP/1.1 requests on one connection until the peer closes it.
async fn serve_http(mut tcp: TcpStream, name: &str, log: &Log) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let (head_len, method, target, headers) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut slots);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Vec<(String, String)> = req
                        .headers
                        .iter()
                        .map(|h| {
                            let value = String::from_utf8_lossy(h.value).into_owned();
                            (h.name.to_string(), value)
                        })
                        .collect();
                    let method = req.method.unwrap_or("").to_string();
                    let target = req.path.unwrap_or("").to_string();
                    break (n, method, target, headers);
                }
                Ok(httparse::Status::Partial) => {
                    let n = tcp.read(&mut chunk).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) => {
                    let body = format!("{name}: bad request: {e}");
                    tcp.write_all(&plain_response("400 Bad Request", &body, name))
                        .await?;
                    return Ok(());
                }
            }
        };
        buf.drain(..head_len);
        let mut seen = SeenRequest {
            method,
            target,
            headers,
            body: Vec::new(),
        };
        if seen
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
        {
            let body = format!("{name}: chunked request bodies are not supported");
            tcp.write_all(&plain_response("501 Not Implemented", &body, name))
                .await?;
            log.lock().expect("log").push(seen);
            return Ok(());
        }
        let mut remaining: usize = match seen.header("content-length") {
            Some(v) => v.trim().parse().map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "bad Content-Length")
            })?,
            None => 0,
        };
        let close = seen
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let (path, query) = seen
            .target
            .split_once('?')
            .unwrap_or((seen.target.as_str(), ""));
        let upload = path.ends_with("/upload");
        let download = path.ends_with("/download").then(|| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix("bytes="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        });

        // The body: counted and checksummed for /upload, kept otherwise.
        let mut sum = Checksum::default();
        let mut consume = |piece: &[u8], seen: &mut SeenRequest| {
            if upload {
                sum.update(piece);
            } else {
                seen.body.extend_from_slice(piece);
            }
        };
        let take = buf.len().min(remaining);
        consume(&buf[..take], &mut seen);
        buf.drain(..take);
        remaining -= take;
        while remaining > 0 {
            let want = remaining.min(CHUNK);
            let n = tcp.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Ok(()); // the peer gave up mid-body
            }
            consume(&chunk[..n], &mut seen);
            remaining -= n;
        }
        let reply = if upload { Some(sum.summary()) } else { None };
        log.lock().expect("log").push(seen.clone());

        if let Some(total) = download {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {total}\r\nX-Upstream: {name}\r\n\r\n"
            );
            tcp.write_all(head.as_bytes()).await?;
            let mut pattern = Pattern::default();
            let mut left = total;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                pattern.fill(&mut chunk[..n]);
                tcp.write_all(&chunk[..n]).await?;
                left -= n as u64;
            }
        } else {
            let body = reply.unwrap_or_else(|| format!("{name} {} {}", seen.method, seen.target));
            tcp.write_all(&plain_response("200 OK", &body, name))
                .await?;
        }
        if close {
            return Ok(());
        }
    }
}

/// A WebSocket upstream that echoes every text and binary message, recording each
/// handshake request (method `GET`, target and headers; no body).
pub struct WsEchoUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    log: Log,
    task: Option<JoinHandle<()>>,
}

impl WsEchoUpstream {
    /// Starts an echo server on an ephemeral port.
    pub async fn start() -> WsEchoUpstream {
        let (listener, addr) = bind().await;
        let log: Log = Arc::default();
        let shared_log = log.clone();
        let task = accept_loop(listener, move |tcp| {
            let log = shared_log.clone();
            async move { serve_ws_echo(tcp, log).await }
        });
        WsEchoUpstream {
            addr,
            log,
            task: Some(task),
        }
    }

    /// Every handshake request received so far, oldest first.
    pub fn handshakes(&self) -> Vec<SeenRequest> {
        self.log.lock().expect("log").clone()
    }
}

impl Drop for WsEchoUpstream {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

// The callback type is tungstenite's: its error is a whole HTTP response.
#[allow(clippy::result_large_err)]
async fn serve_ws_echo(tcp: TcpStream, log: Log) {
    let record = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let headers = req
            .headers()
            .iter()
            .map(|(n, v)| {
                let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (n.as_str().to_string(), value)
            })
            .collect();
        log.lock().expect("log").push(SeenRequest {
            method: req.method().to_string(),
            target: req.uri().to_string(),
            headers,
            body: Vec::new(),
        });
        Ok(resp)
    };
    let mut ws = match tokio_tungstenite::accept_hdr_async(tcp, record).await {
        Ok(ws) => ws,
        Err(e) => {
            log::debug!("echo upstream: handshake failed: {e}");
            return;
        }
    };
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                if ws.send(m).await.is_err() {
                    return;
                }
            }
            // Pings are answered and closes acknowledged by tungstenite itself.
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_does_not_depend_on_the_cuts() {
        let mut data = vec![0u8; 1000];
        Pattern::default().fill(&mut data);
        let mut whole = Checksum::default();
        whole.update(&data);
        let mut cut = Checksum::default();
        for piece in data.chunks(7) {
            cut.update(piece);
        }
        assert_eq!(whole.summary(), cut.summary());
        let mut pieces = Pattern::default();
        let mut a = vec![0u8; 13];
        let mut b = vec![0u8; 987];
        pieces.fill(&mut a);
        pieces.fill(&mut b);
        assert_eq!([a, b].concat(), data);
        data.swap(3, 900);
        let mut swapped = Checksum::default();
        swapped.update(&data);
        assert_ne!(whole.summary(), swapped.summary());
    }
}
