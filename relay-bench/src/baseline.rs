//! `baseline`: the `echo` load through a minimal in-process TCP forwarder, the speed of
//! light of this machine for the relay's job. The forwarder pairs an app connection with a
//! daemon connection by a 9-byte hello (role `A`/`D`, pair id as a little-endian u64) and
//! then copies raw bytes both ways; it never looks at the frames. Frames are a 4-byte
//! big-endian length and the payload, written and read by the two ends only.
//!
//! ```text
//!   app ──len+payload──▶ forwarder ──same bytes──▶ daemon (echo)
//!   app ◀──────────────  forwarder ◀─────────────  daemon
//! ```
//!
//! The forwarder runs on its own Tokio runtime (as many worker threads as cores, the relay's
//! default), and the CPU time of those threads is reported as `relay_cpu_s`.

use crate::driver::{add_outcome, add_shape, run_load, PairHalves};
use crate::error::{BenchError, Result};
use crate::params::{BaselineParams, CONNECT_TIMEOUT, MAX_FRAME_BYTES, WAIT_TIMEOUT};
use crate::procfs;
use crate::report::{Field, Record};
use crate::v2::{open_bounded, FrameSink, FrameStream};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::timeout;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

const APP: u8 = b'A';
const DAEMON: u8 = b'D';

type Pending = Arc<Mutex<HashMap<u64, (Option<TcpStream>, Option<TcpStream>)>>>;

/// The raw TCP forwarder on `127.0.0.1:0`, running until dropped.
pub struct Forwarder {
    /// Where it listens.
    pub addr: SocketAddr,
    tids: Arc<Mutex<Vec<i32>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    /// Starts the forwarder with `threads` worker threads.
    pub fn start(threads: usize) -> Result<Forwarder> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let tids: Arc<Mutex<Vec<i32>>> = Arc::default();
        let record = tids.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("forwarder")
            .enable_all()
            .on_thread_start(move || lock(&record).push(procfs::current_tid()))
            .build()?;
        let (stop, stop_rx) = oneshot::channel::<()>();
        let record = tids.clone();
        let thread = std::thread::Builder::new()
            .name("forwarder".into())
            .spawn(move || {
                lock(&record).push(procfs::current_tid());
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = accept_loop(listener) => {}
                    }
                });
                runtime.shutdown_timeout(WAIT_TIMEOUT);
            })?;
        Ok(Forwarder {
            addr,
            tids,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// CPU time of the forwarder's threads so far, s.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let tids = lock(&self.tids).clone();
        let times: Vec<f64> = tids
            .into_iter()
            .filter_map(|t| procfs::thread_cpu_seconds(t).ok())
            .collect();
        (!times.is_empty()).then(|| times.iter().sum())
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock()
        .expect("the forwarder's locks should not be poisoned")
}

async fn accept_loop(listener: TcpListener) {
    let pending: Pending = Arc::default();
    loop {
        if let Ok((socket, _)) = listener.accept().await {
            let _ = socket.set_nodelay(true);
            tokio::spawn(pair_up(socket, pending.clone()));
        }
    }
}

/// Reads the hello, then either parks the socket or copies bytes between it and its peer.
async fn pair_up(mut socket: TcpStream, pending: Pending) {
    let mut hello = [0u8; 9];
    if !matches!(
        timeout(WAIT_TIMEOUT, socket.read_exact(&mut hello)).await,
        Ok(Ok(_))
    ) {
        return;
    }
    let id = u64::from_le_bytes(hello[1..].try_into().expect("8 bytes"));
    let both = {
        let mut map = lock(&pending);
        let slot = map.entry(id).or_default();
        match hello[0] {
            APP => slot.0 = Some(socket),
            DAEMON => slot.1 = Some(socket),
            _ => return,
        }
        match slot {
            (Some(_), Some(_)) => map.remove(&id),
            _ => None,
        }
    };
    if let Some((Some(mut app), Some(mut daemon))) = both {
        let _ = tokio::io::copy_bidirectional(&mut app, &mut daemon).await;
    }
}

/// Connects to the forwarder as `role` of pair `id`.
async fn connect(addr: SocketAddr, role: u8, id: u64) -> Result<(FrameSink, FrameStream)> {
    let mut s = match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(r) => r.map_err(|e| BenchError::Io(format!("connect {addr}: {e}")))?,
        Err(_) => return Err(BenchError::Timeout(format!("connect {addr}"))),
    };
    s.set_nodelay(true)?;
    let mut hello = [role; 9];
    hello[1..].copy_from_slice(&id.to_le_bytes());
    s.write_all(&hello).await?;
    let (r, w) = s.into_split();
    let codec = || {
        LengthDelimitedCodec::builder()
            .max_frame_length(MAX_FRAME_BYTES)
            .new_codec()
    };
    let sink = SinkExt::<Bytes>::sink_map_err(FramedWrite::new(w, codec()), |e: std::io::Error| {
        BenchError::from(e)
    });
    let stream =
        FramedRead::new(r, codec()).map(|f| f.map(BytesMut::freeze).map_err(BenchError::from));
    Ok((Box::pin(sink), Box::pin(stream)))
}

/// Runs `baseline` and returns its result record.
pub async fn run_baseline(p: &BaselineParams) -> Result<Record> {
    p.validate()?;
    let threads = p
        .forwarder_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let forwarder = Forwarder::start(threads)?;
    let addr = forwarder.addr;
    let halves = open_bounded(
        p.shape.pairs,
        crate::echo::OPEN_CONCURRENCY,
        |i| async move {
            let app = connect(addr, APP, i as u64).await?;
            let daemon = connect(addr, DAEMON, i as u64).await?;
            Ok(PairHalves { app, daemon })
        },
    )
    .await?;
    eprintln!(
        "forwarder on {addr} ({threads} threads), {} pairs",
        p.shape.pairs
    );
    let outcome = run_load(&p.shape, halves, || forwarder.cpu_seconds()).await?;
    drop(forwarder);

    let mut r = Record::new("baseline");
    r.set("label", "tcp-forwarder")
        .set("url", format!("tcp://{addr}"))
        .set("pid", Field::Missing);
    add_shape(&mut r, &p.shape);
    r.set("forwarder_threads", threads)
        .set("sockets", 2 * p.shape.pairs);
    add_outcome(&mut r, &p.shape, &outcome);
    Ok(r)
}
