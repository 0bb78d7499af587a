//! `large`: `--pairs` pairs (1 by default) each relay one message of each size from app to
//! daemon, all at the same time, then the same bytes back; binary messages of pseudo-random
//! bytes, or with `--text` text messages of pseudo-random printable ASCII. Every message is
//! checked exactly on arrival and each direction is timed (from its start until the last
//! pair's message has arrived).
//!
//! With `--pid`, the relay's RSS (VmRSS, kB) is read:
//!
//! ```text
//!   rss_start_kb        before the pairs are opened (once per run)
//!   rss_before_kb       before each size: the base of rss_peak_growth_kb and kept_kb
//!   ├ app → daemon      sampled every 10 ms: rss_peak_growth_kb_to_daemon (from rss_before_kb)
//!   ├ rss_before_to_app_kb
//!   ├ daemon → app      sampled every 10 ms: rss_peak_growth_kb_to_app (from rss_before_to_app_kb)
//!   └ --settle-ms, pairs still open: kept_kb = rss_kept_kb − rss_before_kb
//!   all sockets closed, --after-ms: after_close_kb = rss_after_close_kb − rss_start_kb
//! ```
//!
//! `growth_x*` is a peak growth in bytes over the bytes sent in that direction (pairs ×
//! size). The close reading is once per run, at its end: every record of the run repeats it.

use crate::error::{BenchError, Result};
use crate::params::{LargeParams, LARGE_TIMEOUT, WAIT_TIMEOUT};
use crate::procfs::{self, mem_status, RssSampler};
use crate::report::{Field, Record};
use crate::v2::{next_message, open_bounded, open_pair, run_id, Control, Pair, Ws};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// One pair's message of one size: what is sent and the bytes that must arrive.
#[derive(Clone)]
struct Payload {
    message: Message,
    bytes: Bytes,
}

impl Payload {
    /// `len` pseudo-random bytes from `seed`, as a binary message or (`text`) mapped to
    /// printable ASCII as a text message.
    fn new(len: usize, seed: u64, text: bool) -> Payload {
        if text {
            let s = pseudo_random_text(len, seed);
            let bytes = Bytes::copy_from_slice(s.as_bytes());
            Payload {
                message: Message::Text(Utf8Bytes::from(s)),
                bytes,
            }
        } else {
            let bytes = Bytes::from(pseudo_random(len, seed));
            Payload {
                message: Message::Binary(bytes.clone()),
                bytes,
            }
        }
    }
}

/// The seed of pair `pair`'s message of `mib` MiB: every pair sends other bytes, so a
/// message delivered to the wrong pair fails the check.
fn seed(mib: usize, pair: usize) -> u64 {
    mib as u64 | (pair as u64) << 32
}

/// VmRSS of `pid` now, kB (`None` without a pid).
fn rss_now(pid: Option<u32>) -> Result<Option<u64>> {
    pid.map(|pid| mem_status(pid).map(|m| m.rss_kb)).transpose()
}

/// `b − a`, kB, when both were read.
fn delta(a: Option<u64>, b: Option<u64>) -> Option<i64> {
    a.zip(b).map(|(a, b)| b as i64 - a as i64)
}

/// Peak growth over the bytes sent: `growth_kb × 1024 / bytes`.
pub fn growth_x(growth_kb: u64, bytes: usize) -> f64 {
    (growth_kb * 1024) as f64 / bytes as f64
}

/// The peaks of one direction: RSS just before it, its sampled peak, kB.
struct Peak {
    before_kb: Option<u64>,
    peak_kb: Option<u64>,
}

impl Peak {
    fn growth_kb(&self) -> Option<u64> {
        self.before_kb
            .zip(self.peak_kb)
            .map(|(b, p)| p.saturating_sub(b))
    }
}

/// Runs `large` and returns one record per size.
pub async fn run_large(p: &LargeParams) -> Result<Vec<Record>> {
    let url = p.validate()?;
    let pid = p.pid;
    if let Some(pid) = pid {
        procfs::check_pid(pid)?;
    }
    let message_kind = if p.text { "text" } else { "binary" };
    let rss_start = rss_now(pid)?;
    let server_id = format!("bench-{}-large", run_id());
    let control = Control::open(&url, &server_id).await?;
    let mut pairs = open_bounded(p.pairs, p.pairs, |i| {
        let (url, control, server_id, id) = (&url, &control, &server_id, format!("c{i}"));
        async move { open_pair(url, control, server_id, &id).await }
    })
    .await?;
    let mut records = Vec::new();
    for &mib in &p.sizes {
        let payloads: Vec<Payload> = (0..p.pairs)
            .map(|i| Payload::new(mib << 20, seed(mib, i), p.text))
            .collect();
        let size = mib << 20;
        let in_flight = size * p.pairs;

        let before = rss_now(pid)?;
        let cpu0 = cpu_now(pid);
        let sampler = pid.map(RssSampler::start);
        let (back, to_daemon) = direction(pairs, &payloads, true).await?;
        let down = Peak {
            before_kb: before,
            peak_kb: sampler.map(RssSampler::finish),
        };
        let before_to_app = rss_now(pid)?;
        let sampler = pid.map(RssSampler::start);
        let (back, to_app) = direction(back, &payloads, false).await?;
        pairs = back;
        let up = Peak {
            before_kb: before_to_app,
            peak_kb: sampler.map(RssSampler::finish),
        };
        let (relay_cpu, bench_cpu) = cpu_spent(cpu0, cpu_now(pid));
        let hwm = pid.map(mem_status).transpose()?.map(|m| m.hwm_kb);
        let peak = down.peak_kb.max(up.peak_kb);
        if pid.is_some() {
            sleep(Duration::from_millis(p.settle_ms)).await;
        }
        let kept = rss_now(pid)?;

        let mb_per_s = |d: Duration| in_flight as f64 / 1e6 / d.as_secs_f64();
        let x = |g: Option<u64>| g.map(|g| growth_x(g, in_flight));
        let growth = before.zip(peak).map(|(b, p)| p.saturating_sub(b));
        eprintln!(
            "[large] {} × {mib} MiB {message_kind}: {:.0} MB/s app → daemon, {:.0} MB/s daemon → app",
            p.pairs,
            mb_per_s(to_daemon),
            mb_per_s(to_app)
        );
        let mut r = Record::new("large");
        r.set("url", url.as_str())
            .set("pid", pid.map(|p| Field::Id(p.into())))
            .set("message", message_kind)
            .set("pairs", p.pairs)
            .set("size_mib", mib)
            .set("size_bytes", size)
            .set("bytes_per_direction", in_flight)
            .set("app_to_daemon_ms", to_daemon.as_secs_f64() * 1e3)
            .set("app_to_daemon_mb_per_s", mb_per_s(to_daemon))
            .set("daemon_to_app_ms", to_app.as_secs_f64() * 1e3)
            .set("daemon_to_app_mb_per_s", mb_per_s(to_app))
            .set("verified", true)
            .set("rss_start_kb", rss_start)
            .set("rss_before_kb", before)
            .set("rss_peak_kb", peak)
            .set("rss_peak_growth_kb", growth)
            .set("growth_x", x(growth))
            .set("rss_peak_to_daemon_kb", down.peak_kb)
            .set("rss_peak_growth_kb_to_daemon", down.growth_kb())
            .set("growth_x_to_daemon", x(down.growth_kb()))
            .set("rss_before_to_app_kb", up.before_kb)
            .set("rss_peak_to_app_kb", up.peak_kb)
            .set("rss_peak_growth_kb_to_app", up.growth_kb())
            .set("growth_x_to_app", x(up.growth_kb()))
            .set("rss_hwm_kb", hwm)
            .set("relay_cpu_s", relay_cpu)
            .set("bench_cpu_s", bench_cpu)
            .set("settle_ms", p.settle_ms)
            .set("rss_kept_kb", kept)
            .set("kept_kb", delta(before, kept));
        records.push(r);
    }

    futures_util::future::join_all(pairs.into_iter().map(close_pair)).await;
    control.close().await;
    let after = if pid.is_some() && p.after_ms > 0 {
        sleep(Duration::from_millis(p.after_ms)).await;
        rss_now(pid)?
    } else {
        None
    };
    let ratio = rss_start
        .zip(after)
        .map(|(s, a)| a as f64 / s.max(1) as f64);
    for r in &mut records {
        r.set("after_ms", p.after_ms)
            .set("rss_after_close_kb", after)
            .set("after_close_kb", delta(rss_start, after))
            .set("after_close_ratio", ratio);
    }
    Ok(records)
}

/// Closes both sockets of a pair (close handshake and drain, each bounded).
async fn close_pair(mut pair: Pair) {
    for ws in [&mut pair.app, &mut pair.data] {
        let _ = timeout(WAIT_TIMEOUT, ws.close(None)).await;
        let _ = timeout(WAIT_TIMEOUT, async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
}

/// Every pair sends its payload at once (app → daemon when `to_daemon`, else back), each on
/// its own task; returns the pairs and the time until the last message had arrived, checked.
async fn direction(
    pairs: Vec<Pair>,
    payloads: &[Payload],
    to_daemon: bool,
) -> Result<(Vec<Pair>, Duration)> {
    let what = if to_daemon {
        "app → daemon"
    } else {
        "daemon → app"
    };
    let t0 = Instant::now();
    let tasks: Vec<_> = pairs
        .into_iter()
        .zip(payloads.iter().cloned())
        .enumerate()
        .map(|(i, (mut pair, payload))| {
            tokio::spawn(async move {
                let (from, to) = if to_daemon {
                    (&mut pair.app, &mut pair.data)
                } else {
                    (&mut pair.data, &mut pair.app)
                };
                transfer(from, to, &payload, &format!("pair {i} {what}"))
                    .await
                    .map(|()| pair)
            })
        })
        .collect();
    let mut back = Vec::with_capacity(tasks.len());
    let mut failed = None;
    for task in tasks {
        match task.await {
            Ok(Ok(pair)) => back.push(pair),
            Ok(Err(e)) => {
                failed.get_or_insert(e);
            }
            Err(e) => {
                failed.get_or_insert(BenchError::Io(format!("{what}: {e}")));
            }
        }
    }
    let elapsed = t0.elapsed();
    match failed {
        Some(e) => Err(e),
        None => Ok((back, elapsed)),
    }
}

/// CPU seconds so far of the relay (if `pid`) and of this process.
fn cpu_now(pid: Option<u32>) -> (Option<f64>, Option<f64>) {
    let cpu = |pid: u32| procfs::process_cpu_seconds(pid).ok();
    (pid.and_then(cpu), cpu(std::process::id()))
}

/// CPU seconds spent between two [`cpu_now`] readings: (relay, this process).
fn cpu_spent(
    a: (Option<f64>, Option<f64>),
    b: (Option<f64>, Option<f64>),
) -> (Option<f64>, Option<f64>) {
    let d = |x: Option<f64>, y: Option<f64>| x.zip(y).map(|(x, y)| y - x);
    (d(a.0, b.0), d(a.1, b.1))
}

/// Sends `payload` on `from` while reading it on `to`, until the whole message has arrived
/// and has been checked byte for byte (and for its kind, binary or text).
async fn transfer(from: &mut Ws, to: &mut Ws, payload: &Payload, what: &str) -> Result<()> {
    let send = async {
        match timeout(LARGE_TIMEOUT, from.send(payload.message.clone())).await {
            Ok(r) => r.map_err(|e| BenchError::Io(format!("{what}: send: {e}"))),
            Err(_) => Err(BenchError::Timeout(format!("{what}: send"))),
        }
    };
    let receive = next_message(to, what, LARGE_TIMEOUT);
    let ((), m) = tokio::try_join!(send, receive)?;
    let want = &payload.bytes[..];
    let got: &[u8] = match (&payload.message, &m) {
        (Message::Binary(_), Message::Binary(got)) => got,
        (Message::Text(_), Message::Text(got)) => got.as_bytes(),
        (sent, other) => {
            return Err(BenchError::Protocol(format!(
                "{what}: sent a {} message, got {}",
                kind_of(sent),
                kind_of(other)
            )))
        }
    };
    if got != want {
        return Err(BenchError::Protocol(format!(
            "{what}: {} bytes arrived altered or cut ({} bytes)",
            want.len(),
            got.len()
        )));
    }
    Ok(())
}

fn kind_of(m: &Message) -> &'static str {
    match m {
        Message::Text(_) => "text",
        Message::Binary(_) => "binary",
        Message::Close(_) => "close",
        _ => "control frame",
    }
}

/// `len` bytes of xorshift64* output: incompressible, reproducible from `seed`.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `len` characters of printable ASCII (`' '..='~'`) from the bytes of [`pseudo_random`]:
/// valid UTF-8, one byte a character, reproducible from `seed`.
pub fn pseudo_random_text(len: usize, seed: u64) -> String {
    let bytes = pseudo_random(len, seed)
        .into_iter()
        .map(|b| b' ' + b % 95)
        .collect();
    String::from_utf8(bytes).expect("printable ASCII is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_random_bytes_are_reproducible_and_varied() {
        let a = pseudo_random(1 << 20, 1);
        assert_eq!(a.len(), 1 << 20);
        assert_eq!(a, pseudo_random(1 << 20, 1));
        assert_ne!(a[..64], pseudo_random(64, 2)[..]);
        let zeros = a.iter().filter(|&&b| b == 0).count();
        assert!(zeros < 8192, "{zeros} zero bytes in 1 MiB");
        assert_eq!(pseudo_random(5, 3).len(), 5);
    }

    #[test]
    fn text_payloads_are_printable_ascii_and_checked_as_text() {
        let t = pseudo_random_text(1 << 16, 7);
        assert_eq!(t.len(), 1 << 16);
        assert!(t.bytes().all(|b| (b' '..=b'~').contains(&b)));
        assert_eq!(t, pseudo_random_text(1 << 16, 7));
        let distinct = t.bytes().collect::<std::collections::HashSet<_>>().len();
        assert_eq!(distinct, 95);
        let p = Payload::new(1000, seed(1, 3), true);
        assert!(matches!(&p.message, Message::Text(s) if s.as_bytes() == &p.bytes[..]));
        let b = Payload::new(1000, seed(1, 3), false);
        assert!(matches!(&b.message, Message::Binary(x) if x == &b.bytes));
        assert_ne!(b.bytes, Payload::new(1000, seed(1, 4), false).bytes);
        assert_eq!(seed(32, 0), 32, "pair 0 keeps the seed of one-pair runs");
    }

    #[test]
    fn growth_and_deltas() {
        assert_eq!(growth_x(40 << 10, 32 << 20), 1.25);
        assert_eq!(delta(Some(100), Some(90)), Some(-10));
        assert_eq!(delta(None, Some(90)), None);
        let p = Peak {
            before_kb: Some(100),
            peak_kb: Some(90),
        };
        assert_eq!(p.growth_kb(), Some(0));
    }
}
