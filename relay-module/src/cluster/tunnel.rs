//! The tunnel of a `/ws` to the node that owns its serverId: connect (walking the ring past
//! the nodes that refuse), send the client's request head with `X-Forwarded-For` and the hop
//! marker, read the owner's answer, and once it is a 101 splice the two connections.
//!
//! Why not Pingora's proxy (`request_filter` → `Ok(false)` → `upstream_peer`): Pingora
//! 0.9.1's HTTP/1 duplex sends the empty request body's end before the upstream answers, and
//! ends an upgraded connection when that end is consumed after the 101 has been read
//! (`proxy_h1.rs`, "An upgraded request is terminated when either side is done"). Which of
//! the two its upstream half sees first is a `select!` race that a loaded node loses: in a
//! benchmark of 150 tunnels opened at once, one tunnel in a few runs was closed right after
//! its 101. A reconnect storm after a node loss is exactly that load, so the entry node
//! speaks the little HTTP/1.1 a WebSocket handshake needs itself, to its own kind: the owner
//! is a paseo-relay node.

use crate::cluster::{Cluster, OpenTunnel, Tunnel, CONNECT_TIMEOUT};
use crate::ops::metrics::ForwardFailure;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long the owner may take to answer the upgrade (its head and a refusal's body).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer head (and refusal body) read from an owner.
pub const MAX_ANSWER_BYTES: usize = 16 << 10;
/// Buffer of each direction of a tunnel.
const SPLICE_BUFFER: usize = 4 << 10;

/// The owner's answer to a tunnelled upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Its status: 101 opens the tunnel.
    pub status: u16,
    /// Its headers, in order, as (name, value).
    pub headers: Vec<(String, String)>,
    /// The body of a refusal (by `Content-Length`); for a 101, the first bytes of the
    /// upgraded stream that came with the head (the owner's on-connect frames).
    pub body: Vec<u8>,
}

impl Answer {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed response head: status, headers (name, value), and the head's length in bytes.
type Head = (u16, Vec<(String, String)>, usize);

/// Parses an HTTP/1.1 response head (`buf` holds at least the head). Returns the status,
/// the headers and the head's length.
fn parse_head(buf: &[u8]) -> io::Result<Option<Head>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("answer: {what}"));
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':').ok_or_else(|| bad("bad header line"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    Ok(Some((status, headers, end + 4)))
}

/// Reads the owner's answer from `owner`: the head, then a refusal's body.
pub async fn read_answer<S: AsyncRead + Unpin>(owner: &mut S) -> io::Result<Answer> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let (status, headers, head_len) = loop {
        if let Some(head) = parse_head(&buf)? {
            break head;
        }
        if buf.len() > MAX_ANSWER_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "answer: head too large",
            ));
        }
        let n = owner.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut body = buf.split_off(head_len);
    let mut answer = Answer {
        status,
        headers,
        body: Vec::new(),
    };
    if status != 101 {
        let len = answer
            .header("Content-Length")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(0)
            .min(MAX_ANSWER_BYTES);
        while body.len() < len {
            let n = owner.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(len);
    }
    answer.body = body;
    Ok(answer)
}

/// Connects to the owner of `tunnel` and sends `request` (a complete request head): the
/// first up node on the ring that accepts within [`CONNECT_TIMEOUT`] and answers within
/// [`ANSWER_TIMEOUT`]; each one that does not is failed for this request (and suspected,
/// see [`Cluster::connect_failed`]) and the walk goes on. `Ok(None)` when the walk reaches
/// this node itself or no node is left: serve it here.
pub async fn open(
    cluster: &Cluster,
    tunnel: &mut Tunnel,
    request: &[u8],
) -> Option<(SocketAddr, TcpStream, Answer)> {
    while let Some(addr) = cluster.next_node(tunnel) {
        let attempt = async {
            let mut owner = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            owner.set_nodelay(true)?;
            let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
                owner.write_all(request).await?;
                read_answer(&mut owner).await
            })
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            Ok::<_, io::Error>((owner, answer))
        };
        match attempt.await {
            Ok((owner, answer)) => return Some((addr, owner, answer)),
            Err(e) => cluster.connect_failed(tunnel, addr, &e),
        }
    }
    None
}

/// Moves bytes both ways between the client and the owner until the owner's side ends (then
/// the client's connection is closed at once), or the client's side ends and the owner's
/// follows (at most `grace` later). `to_owner` and `to_client` go first: bytes the client
/// pipelined behind its request, the owner's first frames. Counted in
/// `paseo_relay_cluster_tunnels` while it runs.
pub async fn splice<C>(
    client: C,
    to_owner: Vec<u8>,
    owner: TcpStream,
    to_client: Vec<u8>,
    grace: Duration,
    open: OpenTunnel,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (client_read, mut client_write) = tokio::io::split(client);
    let (owner_read, mut owner_write) = owner.into_split();
    let down = async {
        // The 101 may still be in the client stream's write buffer: flush it now.
        let first = async {
            client_write.write_all(&to_client).await?;
            client_write.flush().await
        };
        if first.await.is_ok() {
            let mut from = BufReader::with_capacity(SPLICE_BUFFER, owner_read);
            let _ = tokio::io::copy_buf(&mut from, &mut client_write).await;
        }
        let _ = client_write.shutdown().await;
    };
    let up = async {
        if owner_write.write_all(&to_owner).await.is_ok() {
            let mut from = BufReader::with_capacity(SPLICE_BUFFER, client_read);
            let _ = tokio::io::copy_buf(&mut from, &mut owner_write).await;
        }
        let _ = owner_write.shutdown().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        () = down => {}
        () = up => {}
    }
    drop(open);
}

/// The request head sent to the owner: the client's request line and headers as Pingora
/// parsed them, after [`crate::http::routes::Router::forwarded_headers`] and the hop marker.
pub fn request_head(req: &pingora::http::RequestHeader) -> Vec<u8> {
    let target = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(format!("{} {target} HTTP/1.1\r\n", req.method).as_bytes());
    for (name, value) in req.headers.iter() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Counts `answer` (a refusal is a forward failure; the owner's answer goes to the client).
pub(crate) fn count_answer(cluster: &Cluster, answer: &Answer) {
    if answer.status != 101 {
        cluster.metrics.forward_failed(ForwardFailure::Status).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tunnel_answers_are_parsed_with_their_body_or_first_frames() {
        let refusal = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; \
                        charset=utf-8\r\nContent-Length: 14\r\nRetry-After: 5\r\n\r\nRelay draining";
        let answer = read_answer(&mut &refusal[..]).await.unwrap();
        assert_eq!(answer.status, 503);
        assert_eq!(answer.header("retry-after"), Some("5"));
        assert_eq!(answer.body, b"Relay draining");
        let upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                        Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n\x81\x02{}";
        let answer = read_answer(&mut &upgrade[..]).await.unwrap();
        assert_eq!(answer.status, 101);
        assert_eq!(answer.header("Sec-WebSocket-Accept"), Some("x"));
        assert_eq!(answer.body, b"\x81\x02{}", "the owner's first frame");
        let cut = b"HTTP/1.1 101 Switching";
        assert!(read_answer(&mut &cut[..]).await.is_err());
        let junk = b"SSH-2.0-OpenSSH\r\n\r\n";
        assert!(read_answer(&mut &junk[..]).await.is_err());
    }

    #[test]
    fn tunnel_request_head_keeps_the_request_and_adds_the_hop_marker() {
        let mut req =
            pingora::http::RequestHeader::build("GET", b"/ws?serverId=s&role=server&v=2", None)
                .unwrap();
        req.insert_header("Host", "relay.example").unwrap();
        req.insert_header("Sec-WebSocket-Key", "k").unwrap();
        Cluster::mark_hop(&mut req).unwrap();
        let head = String::from_utf8(request_head(&req)).unwrap();
        assert_eq!(
            head,
            "GET /ws?serverId=s&role=server&v=2 HTTP/1.1\r\nhost: relay.example\r\n\
             sec-websocket-key: k\r\nx-paseo-relay-hop: 1\r\n\r\n"
        );
    }
}
