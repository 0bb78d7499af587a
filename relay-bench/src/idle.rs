//! `idle`: opens many paired idle sockets (half daemon data sockets, half app sockets) and
//! reads the relay's RSS: the growth per socket, then the RSS after closing them all.
//!
//! The reading after the close comes `--settle` s after it, or in burst mode (a non-zero
//! `--after-ms`) that many ms after it; `after_close_kb` and `after_close_ratio` compare it with
//! `rss_start_kb`, the RSS before any socket was opened.
//!
//! The control sockets the pairs need (one per `--pairs-per-server` pairs) are opened
//! first and measured apart: the per-socket figure covers data and app sockets only, and
//! the record gives the total socket count as well.
//!
//! Run it on a freshly started relay: memory that earlier sockets freed stays in the relay's
//! allocator and is reused, which hides the growth.

use crate::error::{BenchError, Result};
use crate::params::{IdleParams, RelayUrl, WAIT_TIMEOUT};
use crate::procfs::{self, mem_status};
use crate::report::{Field, Record};
use crate::v2::{open_bounded, open_pair, run_id, Control, Pair};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, Instant};

/// What every pair task shares.
struct Shared {
    url: RelayUrl,
    run: String,
    pairs_per_server: usize,
    controls: Vec<Control>,
    opening: Semaphore,
    /// Pairs with a socket the relay closed while it should have stayed open.
    closed_early: AtomicU64,
}

/// Runs `idle` and returns its result record.
pub async fn run_idle(p: &IdleParams) -> Result<Record> {
    let url = p.validate()?;
    let pid = p.pid;
    procfs::check_pid(pid)?;
    let settle = Duration::from_secs(p.settle);
    let (pairs, n_controls) = (p.sockets / 2, p.controls());
    let run = run_id();

    let rss_start = mem_status(pid)?.rss_kb;
    let controls = open_bounded(n_controls, p.concurrency, |i| {
        let (url, server) = (&url, format!("bench-{run}-{i}"));
        async move { Control::open(url, &server).await }
    })
    .await?;
    sleep(settle).await;
    let rss_controls = mem_status(pid)?.rss_kb;

    let shared = Arc::new(Shared {
        url: url.clone(),
        run,
        pairs_per_server: p.pairs_per_server,
        controls,
        opening: Semaphore::new(p.concurrency),
        closed_early: AtomicU64::new(0),
    });
    let (stop, stop_rx) = watch::channel(false);
    let (opened_tx, opened_rx) = mpsc::unbounded_channel();
    let mut holders = JoinSet::new();
    let t0 = Instant::now();
    for i in 0..pairs {
        holders.spawn(hold_pair(
            i,
            shared.clone(),
            opened_tx.clone(),
            stop_rx.clone(),
        ));
    }
    drop(opened_tx);
    let opened = wait_opened(pairs, opened_rx).await;
    let open_s = t0.elapsed().as_secs_f64();
    let measured = match opened {
        Ok(()) => {
            eprintln!(
                "opened {} sockets (+{n_controls} controls) in {open_s:.1} s",
                2 * pairs
            );
            sleep(settle).await;
            match &p.scrape_url {
                Some(u) => match time_scrapes(u).await {
                    Ok(times) => mem_status(pid).map(|m| (m, Some(times))),
                    Err(e) => Err(e),
                },
                None => mem_status(pid).map(|m| (m, None)),
            }
        }
        Err(e) => Err(e),
    };

    let _ = stop.send(true);
    let t1 = Instant::now();
    if timeout(WAIT_TIMEOUT * 3, async {
        while holders.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        holders.abort_all();
    }
    let close_s = t1.elapsed().as_secs_f64();
    let closed_early = shared.closed_early.load(Ordering::Relaxed);
    if let Ok(shared) = Arc::try_unwrap(shared) {
        futures_util::future::join_all(shared.controls.into_iter().map(Control::close)).await;
    }
    let (open, scrapes) = measured?;
    let after_close = after_close_wait(p);
    sleep(after_close).await;
    let after = mem_status(pid)?;

    let growth_kb = open.rss_kb.saturating_sub(rss_controls);
    let per_socket = |kb: u64, n: usize| (kb * 1024) as f64 / n as f64;
    let mut r = Record::new("idle");
    r.set("url", url.as_str())
        .set("pid", Field::Id(pid.into()))
        .set("sockets", p.sockets)
        .set("pairs", pairs)
        .set("controls", n_controls)
        .set("sockets_total", p.sockets + n_controls)
        .set("concurrency", p.concurrency)
        .set("settle_s", p.settle)
        .set("open_s", open_s)
        .set("rss_start_kb", rss_start)
        .set("rss_with_controls_kb", rss_controls)
        .set("rss_open_kb", open.rss_kb)
        .set("rss_growth_kb", growth_kb)
        .set("rss_per_socket_bytes", per_socket(growth_kb, p.sockets))
        .set(
            "rss_per_socket_incl_controls_bytes",
            per_socket(
                open.rss_kb.saturating_sub(rss_start),
                p.sockets + n_controls,
            ),
        )
        .set("pairs_closed_early", closed_early)
        .set("close_s", close_s)
        .set("after_close_ms", after_close.as_millis() as u64)
        .set("rss_after_close_kb", after.rss_kb)
        .set("after_close_kb", after.rss_kb as i64 - rss_start as i64)
        .set(
            "after_close_ratio",
            after.rss_kb as f64 / rss_start.max(1) as f64,
        )
        .set("rss_hwm_kb", after.hwm_kb);
    if let Some(s) = scrapes {
        r.set("scrape_ms_p50", s.p50_ms)
            .set("scrape_ms_max", s.max_ms)
            .set("scrape_bytes", s.bytes);
    }
    Ok(r)
}

/// How long after the close the last RSS reading comes: `--after-ms` when set, else
/// `--settle`.
pub fn after_close_wait(p: &IdleParams) -> Duration {
    if p.after_ms > 0 {
        Duration::from_millis(p.after_ms)
    } else {
        Duration::from_secs(p.settle)
    }
}

/// Times of [`SCRAPES`] sequential scrapes.
struct ScrapeTimes {
    p50_ms: f64,
    max_ms: f64,
    bytes: usize,
}

/// Scrapes timed while every socket is open.
const SCRAPES: usize = 10;

/// `GET`s `url` [`SCRAPES`] times, each on a new connection, and times the whole answer.
async fn time_scrapes(url: &str) -> Result<ScrapeTimes> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (authority, path) = crate::params::parse_http_url(url)?;
    let io = |e: std::io::Error| BenchError::Io(format!("scrape {url}: {e}"));
    let mut times = Vec::with_capacity(SCRAPES);
    let mut bytes = 0;
    for _ in 0..SCRAPES {
        let started = Instant::now();
        let body = timeout(WAIT_TIMEOUT, async {
            let mut tcp = tokio::net::TcpStream::connect(&authority).await?;
            let req =
                format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
            tcp.write_all(req.as_bytes()).await?;
            let mut all = Vec::new();
            tcp.read_to_end(&mut all).await?;
            Ok::<_, std::io::Error>(all)
        })
        .await
        .map_err(|_| BenchError::Io(format!("scrape {url}: no answer within {WAIT_TIMEOUT:?}")))?
        .map_err(io)?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
        if !body.starts_with(b"HTTP/1.1 200") {
            let head = String::from_utf8_lossy(&body[..body.len().min(40)]).to_string();
            return Err(BenchError::Io(format!("scrape {url}: {head}")));
        }
        bytes = body.len();
    }
    times.sort_by(f64::total_cmp);
    Ok(ScrapeTimes {
        p50_ms: times[SCRAPES / 2],
        max_ms: times[SCRAPES - 1],
        bytes,
    })
}

/// Waits until `pairs` pairs report open (a line on stderr every second); the first
/// failure ends the wait. Every pair reports within its own connect and wait deadlines.
async fn wait_opened(
    pairs: usize,
    mut opened_rx: mpsc::UnboundedReceiver<Result<()>>,
) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut opened = 0;
    while opened < pairs {
        tokio::select! {
            r = opened_rx.recv() => match r {
                Some(Ok(())) => opened += 1,
                Some(Err(e)) => return Err(e),
                None => return Err(BenchError::Io("pair tasks ended early".into())),
            },
            _ = tick.tick() => eprintln!("[idle] {}/{} sockets open", 2 * opened, 2 * pairs),
        }
    }
    Ok(())
}

/// Opens pair `i`, reports it, keeps both sockets read (so pings are answered) until `stop`,
/// then closes both.
async fn hold_pair(
    i: usize,
    shared: Arc<Shared>,
    opened: mpsc::UnboundedSender<Result<()>>,
    mut stop: watch::Receiver<bool>,
) {
    let server = i / shared.pairs_per_server;
    let server_id = format!("bench-{}-{server}", shared.run);
    let permit = shared.opening.acquire().await.expect("never closed");
    let pair = open_pair(
        &shared.url,
        &shared.controls[server],
        &server_id,
        &format!("c{i}"),
    )
    .await;
    drop(permit);
    let Pair { mut app, mut data } = match pair {
        Ok(pair) => {
            let _ = opened.send(Ok(()));
            pair
        }
        Err(e) => {
            let _ = opened.send(Err(e));
            return;
        }
    };
    let early = loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break 0,
            m = app.next() => if !matches!(m, Some(Ok(_))) { break 1 },
            m = data.next() => if !matches!(m, Some(Ok(_))) { break 1 },
        }
    };
    shared.closed_early.fetch_add(early, Ordering::Relaxed);
    for ws in [&mut app, &mut data] {
        let _ = timeout(WAIT_TIMEOUT, ws.close(None)).await;
        let _ = timeout(WAIT_TIMEOUT, async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_close_reading_waits_after_ms_in_burst_mode_else_settle() {
        let mut p = IdleParams {
            url: "ws://127.0.0.1:1".into(),
            sockets: 5000,
            pid: 1,
            pairs_per_server: 100,
            concurrency: 200,
            settle: 2,
            scrape_url: None,
            after_ms: 0,
        };
        assert_eq!(after_close_wait(&p), Duration::from_secs(2));
        p.after_ms = 10_000;
        assert_eq!(after_close_wait(&p), Duration::from_secs(10));
    }
}
