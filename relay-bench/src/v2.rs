//! The daemon's and the app's side of the v2 relay protocol (relay-protocol.md §3): the
//! control socket that learns of clients, opening an app socket and its daemon data socket,
//! and binary-frame `Sink`/`Stream` halves of a socket for the load drivers.
//!
//! ```text
//!   daemon control  ── ?serverId=S&role=server&v=2 ──────────────▶ relay   (sync, connected X)
//!   app client      ── ?serverId=S&role=client&v=2&connectionId=X ▶ relay
//!   daemon data     ── ?serverId=S&role=server&v=2&connectionId=X ▶ relay   (after `connected`)
//! ```

use crate::error::{BenchError, Result};
use crate::params::{RelayUrl, CONNECT_TIMEOUT, WAIT_TIMEOUT};
use bytes::Bytes;
use futures_util::{future, Sink, SinkExt, Stream, StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client WebSocket to the relay.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Largest message and frame this client accepts, bytes (tungstenite's defaults, 64 MiB
/// and 16 MiB, would refuse a 32 MiB frame).
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 80 << 20;

/// The client's WebSocket configuration.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_CLIENT_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE_BYTES))
}

/// Opens a WebSocket (TCP_NODELAY) within [`CONNECT_TIMEOUT`].
pub async fn connect(url: &str) -> Result<Ws> {
    let fut = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true);
    match timeout(CONNECT_TIMEOUT, fut).await {
        Err(_) => Err(BenchError::Timeout(format!(
            "connect {url}: no 101 within {CONNECT_TIMEOUT:?}"
        ))),
        Ok(Err(e)) => Err(BenchError::Io(format!("connect {url}: {e}"))),
        Ok(Ok((ws, _))) => Ok(ws),
    }
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

/// A daemon control socket, read by its own task, which hands each `connected` to whoever
/// [`expect`](Control::expect)s it.
pub struct Control {
    waiters: Waiters,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Control {
    /// Opens the control socket of `server_id` and waits for its `sync`.
    pub async fn open(url: &RelayUrl, server_id: &str) -> Result<Control> {
        let mut ws = connect(&url.socket(&format!("serverId={server_id}&role=server&v=2"))).await?;
        let first = next_message(&mut ws, &format!("{server_id} control"), WAIT_TIMEOUT).await?;
        if !matches!(&first, Message::Text(t) if control_type(t).as_deref() == Some("sync")) {
            return Err(BenchError::Protocol(format!(
                "{server_id} control: first frame is not sync: {first:?}"
            )));
        }
        let waiters: Waiters = Arc::default();
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(read_control(ws, waiters.clone(), stop_rx));
        Ok(Control {
            waiters,
            stop: Some(stop),
            task,
        })
    }

    /// Resolves when `connected` for `connection_id` arrives; call before opening the app.
    pub fn expect(&self, connection_id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut w = self
            .waiters
            .lock()
            .expect("the waiters lock should not be poisoned");
        w.insert(connection_id.to_string(), tx);
        rx
    }

    /// Closes the socket (close handshake bounded by [`WAIT_TIMEOUT`]).
    pub async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = timeout(WAIT_TIMEOUT, &mut self.task).await;
        self.task.abort();
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_control(mut ws: Ws, waiters: Waiters, mut stop: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            _ = &mut stop => break,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Some(id) = connected_id(&t) {
                        let w = waiters.lock().expect("the waiters lock should not be poisoned")
                            .remove(&id);
                        if let Some(tx) = w {
                            let _ = tx.send(());
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    }
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}
}

fn control_type(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    Some(v.get("type")?.as_str()?.to_string())
}

fn connected_id(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v.get("type")?.as_str()? != "connected" {
        return None;
    }
    Some(v.get("connectionId")?.as_str()?.to_string())
}

/// Next data message within `within` (pings and pongs skipped).
pub async fn next_message(ws: &mut Ws, what: &str, within: Duration) -> Result<Message> {
    loop {
        let m = timeout(within, ws.next())
            .await
            .map_err(|_| BenchError::Timeout(format!("{what}: no frame within {within:?}")))?;
        match m {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(c))) => {
                return Err(BenchError::Protocol(format!(
                    "{what}: closed by the relay: {c:?}"
                )))
            }
            Some(Ok(m)) => return Ok(m),
            Some(Err(e)) => return Err(BenchError::Io(format!("{what}: {e}"))),
            None => return Err(BenchError::Protocol(format!("{what}: socket ended"))),
        }
    }
}

/// Runs `open(0..n)` with at most `concurrency` at once; the results keep their order.
pub async fn open_bounded<T, Fut>(
    n: usize,
    concurrency: usize,
    open: impl FnMut(usize) -> Fut,
) -> Result<Vec<T>>
where
    Fut: Future<Output = Result<T>>,
{
    futures_util::stream::iter(0..n)
        .map(open)
        .buffered(concurrency)
        .try_collect()
        .await
}

/// An id for one run, so that runs never share serverIds: 8 hex digits.
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:08x}",
        (nanos as u32) ^ std::process::id().rotate_left(16)
    )
}

/// An app socket and the daemon data socket it is paired with.
pub struct Pair {
    /// The app's client socket.
    pub app: Ws,
    /// The daemon's data socket.
    pub data: Ws,
}

/// Opens the app socket for `connection_id`, waits for the control's `connected`, then
/// opens the daemon data socket (relay-protocol.md §3.5).
pub async fn open_pair(
    url: &RelayUrl,
    control: &Control,
    server_id: &str,
    connection_id: &str,
) -> Result<Pair> {
    let connected = control.expect(connection_id);
    let q =
        |role: &str| format!("serverId={server_id}&role={role}&v=2&connectionId={connection_id}");
    let app = connect(&url.socket(&q("client"))).await?;
    match timeout(WAIT_TIMEOUT, connected).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            return Err(BenchError::Protocol(format!(
                "{server_id} control ended before `connected` {connection_id}"
            )))
        }
        Err(_) => {
            return Err(BenchError::Timeout(format!(
                "{server_id}: no `connected` {connection_id} within {WAIT_TIMEOUT:?}"
            )))
        }
    }
    let data = connect(&url.socket(&q("server"))).await?;
    Ok(Pair { app, data })
}

/// A socket as a sink of binary frames.
pub type FrameSink = std::pin::Pin<Box<dyn Sink<Bytes, Error = BenchError> + Send>>;
/// A socket as a stream of binary frames.
pub type FrameStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// Splits a socket into binary-frame halves: pings and pongs are skipped (tungstenite
/// answers pings), a text frame is a protocol error, a close ends the stream.
pub fn frame_halves(ws: Ws) -> (FrameSink, FrameStream) {
    let (sink, stream) = ws.split();
    let sink = sink.with(|b: Bytes| future::ready(Ok::<_, BenchError>(Message::Binary(b))));
    let stream = stream.filter_map(|m| {
        future::ready(match m {
            Ok(Message::Binary(b)) => Some(Ok(b)),
            Ok(Message::Text(_)) => Some(Err(BenchError::Protocol(
                "text frame on the binary data path".into(),
            ))),
            Ok(_) => None,
            Err(e) => Some(Err(e.into())),
        })
    });
    (Box::pin(sink), Box::pin(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_are_recognised() {
        assert_eq!(
            control_type(r#"{"type":"sync","connectionIds":[]}"#).as_deref(),
            Some("sync")
        );
        assert_eq!(
            connected_id(r#"{"type":"connected","connectionId":"c7"}"#).as_deref(),
            Some("c7")
        );
        assert_eq!(
            connected_id(r#"{"type":"disconnected","connectionId":"c7"}"#),
            None
        );
        assert_eq!(connected_id("not json"), None);
    }
}
