//! The closed-loop load shared by `echo` and `baseline`, over any transport that carries
//! binary frames: each app keeps `window` frames in flight and times each round trip; each
//! daemon echoes what it receives. Also the run's schedule (warm-up, measured window), the
//! per-second progress line, and the result record.
//!
//! Counting: a round trip is two relayed messages (app → daemon, daemon → app). A round
//! trip counts, and its latency (app send → app receives the echo) is recorded, when its
//! echo arrives inside the measured window.

use crate::error::{BenchError, Result};
use crate::params::{LoadShape, WAIT_TIMEOUT};
use crate::procfs;
use crate::report::{group_thousands, latency_histogram, LatencySummary, Record};
use crate::v2::{FrameSink, FrameStream};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, Instant};

/// Filler byte of echo frames.
const FILL: u8 = 0x5a;

/// When a run's phases begin and end.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Load starts.
    pub start: Instant,
    /// Warm-up ends and the measured window begins.
    pub measure_from: Instant,
    /// The measured window ends; apps stop sending.
    pub measure_until: Instant,
}

impl Schedule {
    /// A schedule starting now.
    pub fn from_now(warmup: Duration, measured: Duration) -> Schedule {
        let start = Instant::now();
        Schedule {
            start,
            measure_from: start + warmup,
            measure_until: start + warmup + measured,
        }
    }

    /// True if `t` lies in the measured window.
    pub fn is_measured(&self, t: Instant) -> bool {
        t >= self.measure_from && t < self.measure_until
    }
}

/// One app's and one daemon's socket halves.
pub struct PairHalves {
    /// The app side (sends, times the echoes).
    pub app: (FrameSink, FrameStream),
    /// The daemon side (echoes).
    pub daemon: (FrameSink, FrameStream),
}

/// What one app measured.
pub struct PairOutcome {
    /// Round trips completed in the measured window.
    pub round_trips: u64,
    /// Their latencies, ns.
    pub latency_ns: Histogram<u64>,
}

/// What a whole load run measured.
pub struct LoadOutcome {
    /// Round trips completed in the measured window, all pairs.
    pub round_trips: u64,
    /// Round-trip latency.
    pub latency: LatencySummary,
    /// CPU time of the target (relay or forwarder) over the window, s.
    pub target_cpu_s: Option<f64>,
    /// CPU time of this whole process over the window, s.
    pub bench_cpu_s: Option<f64>,
}

/// Runs the load on `pairs` and measures it; `target_cpu` reads the target's CPU seconds.
pub async fn run_load(
    shape: &LoadShape,
    pairs: Vec<PairHalves>,
    target_cpu: impl Fn() -> Option<f64>,
) -> Result<LoadOutcome> {
    let schedule = Schedule::from_now(
        Duration::from_secs(shape.warmup),
        Duration::from_secs(shape.seconds),
    );
    let echoed = Arc::new(AtomicU64::new(0));
    let mut daemons = JoinSet::new();
    let mut apps = JoinSet::new();
    for (i, p) in pairs.into_iter().enumerate() {
        daemons.spawn(echo_back(p.daemon.0, p.daemon.1));
        let (sink, stream) = p.app;
        let app = App {
            pair: i as u64,
            size: shape.size,
            window: shape.window,
            schedule,
            echoed: echoed.clone(),
        };
        apps.spawn(app.run(sink, stream));
    }
    let progress = tokio::spawn(show_progress(schedule, echoed));
    let mut done = Vec::new();
    let result = async {
        wait_until(schedule.measure_from, &mut apps, &mut done).await?;
        let cpu0 = (
            target_cpu(),
            procfs::process_cpu_seconds(std::process::id()).ok(),
        );
        wait_until(schedule.measure_until, &mut apps, &mut done).await?;
        let cpu1 = (
            target_cpu(),
            procfs::process_cpu_seconds(std::process::id()).ok(),
        );
        timeout(WAIT_TIMEOUT * 2, wait_all(&mut apps, &mut done))
            .await
            .map_err(|_| BenchError::Timeout("apps did not finish after the window".into()))??;
        Ok::<_, BenchError>((cpu0, cpu1))
    }
    .await;
    progress.abort();
    apps.abort_all();
    if timeout(WAIT_TIMEOUT, async {
        while daemons.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        daemons.abort_all();
    }
    let ((t0, s0), (t1, s1)) = result?;
    let mut latency_ns = latency_histogram();
    let mut round_trips = 0;
    for o in &done {
        round_trips += o.round_trips;
        latency_ns
            .add(&o.latency_ns)
            .expect("histograms of one shape should add");
    }
    Ok(LoadOutcome {
        round_trips,
        latency: LatencySummary::from_ns(&latency_ns),
        target_cpu_s: t0.zip(t1).map(|(a, b)| b - a),
        bench_cpu_s: s0.zip(s1).map(|(a, b)| b - a),
    })
}

/// Waits for `deadline`, collecting apps that end meanwhile; an app's error ends the run.
async fn wait_until(
    deadline: Instant,
    apps: &mut JoinSet<Result<PairOutcome>>,
    done: &mut Vec<PairOutcome>,
) -> Result<()> {
    loop {
        tokio::select! {
            _ = sleep_until(deadline) => return Ok(()),
            Some(joined) = apps.join_next() => done.push(joined_outcome(joined)?),
        }
    }
}

async fn wait_all(
    apps: &mut JoinSet<Result<PairOutcome>>,
    done: &mut Vec<PairOutcome>,
) -> Result<()> {
    while let Some(joined) = apps.join_next().await {
        done.push(joined_outcome(joined)?);
    }
    Ok(())
}

fn joined_outcome(
    joined: std::result::Result<Result<PairOutcome>, tokio::task::JoinError>,
) -> Result<PairOutcome> {
    joined.map_err(|e| BenchError::Io(format!("app task failed: {e}")))?
}

/// One app: sends frames while it holds credits (`window` of them), gets a credit back per
/// echo, and stops sending when the measured window ends.
struct App {
    pair: u64,
    size: usize,
    window: usize,
    schedule: Schedule,
    echoed: Arc<AtomicU64>,
}

impl App {
    async fn run(self, mut sink: FrameSink, mut stream: FrameStream) -> Result<PairOutcome> {
        let credits = Semaphore::new(self.window);
        let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<Instant>();
        let this = &self;
        let credits = &credits;
        let send = async move {
            let mut seq = 0u64;
            loop {
                credits.acquire().await.expect("never closed").forget();
                if Instant::now() >= this.schedule.measure_until {
                    break;
                }
                loop {
                    let _ = sent_tx.send(Instant::now());
                    sink.feed(make_frame(this.pair, seq, this.size)).await?;
                    seq += 1;
                    match credits.try_acquire() {
                        Ok(p) => p.forget(),
                        Err(_) => break,
                    }
                }
                sink.flush().await?;
            }
            Ok::<_, BenchError>(sink)
        };
        let receive = async {
            let mut latency_ns = latency_histogram();
            let mut round_trips = 0;
            let mut seq = 0u64;
            while let Some(sent_at) = sent_rx.recv().await {
                let frame = next_frame(&mut stream, this.pair).await?;
                let now = Instant::now();
                check_frame(&frame, this.pair, seq, this.size)?;
                seq += 1;
                this.echoed.fetch_add(1, Ordering::Relaxed);
                if this.schedule.is_measured(now) {
                    let ns = (now - sent_at).as_nanos().max(1) as u64;
                    latency_ns.saturating_record(ns);
                    round_trips += 1;
                }
                credits.add_permits(1);
            }
            Ok::<_, BenchError>(PairOutcome {
                round_trips,
                latency_ns,
            })
        };
        let (mut sink, outcome) = tokio::try_join!(send, receive)?;
        // Close and wait for the other side's close (bounded); errors here change nothing.
        let _ = timeout(WAIT_TIMEOUT, sink.close()).await;
        let _ = timeout(WAIT_TIMEOUT, async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
        Ok(outcome)
    }
}

async fn next_frame(stream: &mut FrameStream, pair: u64) -> Result<Bytes> {
    match timeout(WAIT_TIMEOUT, stream.next()).await {
        Err(_) => Err(BenchError::Timeout(format!(
            "pair {pair}: no echo within {WAIT_TIMEOUT:?}"
        ))),
        Ok(None) => Err(BenchError::Protocol(format!(
            "pair {pair}: app socket ended during the run"
        ))),
        Ok(Some(frame)) => frame,
    }
}

/// Frame `seq` of `pair`: `size` bytes; when there is room, the pair and sequence numbers
/// (little-endian u64s) come first, so a misrouted or reordered echo is caught.
pub fn make_frame(pair: u64, seq: u64, size: usize) -> Bytes {
    let mut b = vec![FILL; size];
    if size >= 16 {
        b[..8].copy_from_slice(&pair.to_le_bytes());
        b[8..16].copy_from_slice(&seq.to_le_bytes());
    }
    Bytes::from(b)
}

/// Checks that `frame` is the echo of frame `seq` of `pair`.
pub fn check_frame(frame: &[u8], pair: u64, seq: u64, size: usize) -> Result<()> {
    let expected_head = &make_frame(pair, seq, size.min(16))[..];
    if frame.len() != size || (size >= 16 && &frame[..16] != expected_head) {
        return Err(BenchError::Protocol(format!(
            "pair {pair}: echo {seq} is not the frame sent ({} bytes, expected {size})",
            frame.len()
        )));
    }
    Ok(())
}

/// The daemon side: echoes every frame, writing a batch of ready frames with one flush;
/// ends when its socket ends. Returns the frames echoed.
pub async fn echo_back(mut sink: FrameSink, mut stream: FrameStream) -> Result<u64> {
    let mut echoed = 0;
    while let Some(first) = stream.next().await {
        sink.feed(first?).await?;
        echoed += 1;
        let mut ended = false;
        loop {
            match stream.next().now_or_never() {
                Some(Some(frame)) => {
                    sink.feed(frame?).await?;
                    echoed += 1;
                }
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        sink.flush().await?;
        if ended {
            break;
        }
    }
    let _ = timeout(WAIT_TIMEOUT, sink.close()).await;
    Ok(echoed)
}

/// Prints `[5/10 s] 36 512 msg/s` (relayed messages in the last second) to stderr.
async fn show_progress(schedule: Schedule, echoed: Arc<AtomicU64>) {
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(schedule.start + second, second);
    let (mut last_n, mut last_t) = (0, schedule.start);
    let secs = |d: Duration| d.as_secs_f64().round() as u64;
    loop {
        let now = tick.tick().await;
        if now > schedule.measure_until {
            return;
        }
        let n = echoed.load(Ordering::Relaxed);
        let rate = ((n - last_n) * 2) as f64 / (now - last_t).as_secs_f64();
        (last_n, last_t) = (n, now);
        let rate = group_thousands(rate.round() as u64);
        if now <= schedule.measure_from {
            let (at, of) = (now - schedule.start, schedule.measure_from - schedule.start);
            eprintln!("[warm-up {}/{} s] {rate} msg/s", secs(at), secs(of));
        } else {
            let at = now - schedule.measure_from;
            let of = schedule.measure_until - schedule.measure_from;
            eprintln!("[{}/{} s] {rate} msg/s", secs(at), secs(of));
        }
    }
}

/// Adds the load's shape to `r`: `pairs`, `size_bytes`, `window`, `warmup_s`, `seconds`.
pub fn add_shape(r: &mut Record, shape: &LoadShape) {
    r.set("pairs", shape.pairs)
        .set("size_bytes", shape.size)
        .set("window", shape.window)
        .set("warmup_s", shape.warmup)
        .set("seconds", shape.seconds);
}

/// Adds the measured figures to `r`: counts, rates, latency, CPU (`relay_cpu_*` is the
/// target's: the relay, or the forwarder for `baseline`).
pub fn add_outcome(r: &mut Record, shape: &LoadShape, o: &LoadOutcome) {
    let relayed = o.round_trips * 2;
    let per_s = relayed as f64 / shape.seconds as f64;
    r.set("round_trips", o.round_trips)
        .set("relayed_msgs", relayed)
        .set("relayed_msgs_per_s", per_s)
        .set("relayed_bytes_per_s", per_s * shape.size as f64);
    o.latency.add_to(r);
    let per_msg = o
        .target_cpu_s
        .filter(|_| relayed > 0)
        .map(|c| c * 1e6 / relayed as f64);
    r.set("relay_cpu_s", o.target_cpu_s)
        .set("relay_cpu_us_per_msg", per_msg)
        .set("bench_cpu_s", o.bench_cpu_s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Field;

    #[test]
    fn frames_carry_pair_and_sequence_when_there_is_room() {
        let f = make_frame(3, 7, 100);
        assert_eq!(f.len(), 100);
        assert!(check_frame(&f, 3, 7, 100).is_ok());
        assert!(check_frame(&f, 3, 8, 100).is_err());
        assert!(check_frame(&f, 4, 7, 100).is_err());
        assert!(check_frame(&f[..99], 3, 7, 100).is_err());
        let tiny = make_frame(3, 7, 5);
        assert_eq!(&tiny[..], &[FILL; 5]);
        assert!(check_frame(&tiny, 9, 9, 5).is_ok());
    }

    #[test]
    fn the_record_counts_two_relayed_messages_per_round_trip() {
        let shape = LoadShape {
            pairs: 2,
            size: 100,
            window: 1,
            warmup: 0,
            seconds: 2,
        };
        let o = LoadOutcome {
            round_trips: 1000,
            latency: LatencySummary::from_ns(&latency_histogram()),
            target_cpu_s: Some(0.5),
            bench_cpu_s: None,
        };
        let mut r = Record::new("echo");
        add_shape(&mut r, &shape);
        add_outcome(&mut r, &shape, &o);
        assert_eq!(r.get("relayed_msgs"), Some(&Field::Count(2000)));
        assert_eq!(r.get("relayed_msgs_per_s"), Some(&Field::Real(1000.0)));
        assert_eq!(r.get("relayed_bytes_per_s"), Some(&Field::Real(100_000.0)));
        assert_eq!(r.get("relay_cpu_us_per_msg"), Some(&Field::Real(250.0)));
        assert_eq!(r.get("bench_cpu_s"), Some(&Field::Missing));
    }
}
