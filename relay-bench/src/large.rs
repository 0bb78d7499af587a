//! `large`: one pair relays a binary message of each size from app to daemon and back; the
//! bytes are checked exactly, each direction is timed, and the relay's RSS is sampled every
//! 10 ms for its peak during the transfers.

use crate::error::{BenchError, Result};
use crate::params::{LargeParams, LARGE_TIMEOUT};
use crate::procfs::{self, mem_status, RssSampler};
use crate::report::{Field, Record};
use crate::v2::{next_message, open_pair, run_id, Control, Ws};
use bytes::Bytes;
use futures_util::SinkExt;
use std::time::Duration;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Runs `large` and returns one record per size.
pub async fn run_large(p: &LargeParams) -> Result<Vec<Record>> {
    let url = p.validate()?;
    if let Some(pid) = p.pid {
        procfs::check_pid(pid)?;
    }
    let server_id = format!("bench-{}-large", run_id());
    let control = Control::open(&url, &server_id).await?;
    let mut pair = open_pair(&url, &control, &server_id, "c0").await?;
    let mut records = Vec::new();
    for &mib in &p.sizes {
        let payload = Bytes::from(pseudo_random(mib << 20, mib as u64));
        let before = p.pid.map(mem_status).transpose()?;
        let sampler = p.pid.map(RssSampler::start);
        let cpu0 = cpu_now(p.pid);
        let to_daemon = transfer(&mut pair.app, &mut pair.data, &payload, "app → daemon").await;
        let to_app = match &to_daemon {
            Ok(_) => transfer(&mut pair.data, &mut pair.app, &payload, "daemon → app").await,
            Err(_) => Ok(Duration::ZERO),
        };
        let peak = sampler.map(RssSampler::finish);
        let (relay_cpu, bench_cpu) = cpu_spent(cpu0, cpu_now(p.pid));
        let (to_daemon, to_app) = (to_daemon?, to_app?);
        let hwm = p.pid.map(mem_status).transpose()?.map(|m| m.hwm_kb);
        let mb_per_s = |d: Duration| payload.len() as f64 / 1e6 / d.as_secs_f64();
        eprintln!(
            "[large] {mib} MiB: {:.0} MB/s app → daemon, {:.0} MB/s daemon → app",
            mb_per_s(to_daemon),
            mb_per_s(to_app)
        );
        let mut r = Record::new("large");
        r.set("url", url.as_str())
            .set("pid", p.pid.map(|p| Field::Id(p.into())))
            .set("size_mib", mib)
            .set("size_bytes", payload.len())
            .set("app_to_daemon_ms", to_daemon.as_secs_f64() * 1e3)
            .set("app_to_daemon_mb_per_s", mb_per_s(to_daemon))
            .set("daemon_to_app_ms", to_app.as_secs_f64() * 1e3)
            .set("daemon_to_app_mb_per_s", mb_per_s(to_app))
            .set("verified", true)
            .set("rss_before_kb", before.map(|m| m.rss_kb))
            .set("rss_peak_kb", peak)
            .set(
                "rss_peak_growth_kb",
                before.zip(peak).map(|(b, p)| p.saturating_sub(b.rss_kb)),
            )
            .set("rss_hwm_kb", hwm)
            .set("relay_cpu_s", relay_cpu)
            .set("bench_cpu_s", bench_cpu);
        records.push(r);
    }
    for ws in [&mut pair.app, &mut pair.data] {
        let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
    }
    control.close().await;
    Ok(records)
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

/// Sends `payload` on `from` while reading it on `to`; returns the time from the start of
/// the send until the whole message has arrived, after checking it byte for byte.
async fn transfer(from: &mut Ws, to: &mut Ws, payload: &Bytes, what: &str) -> Result<Duration> {
    let t0 = Instant::now();
    let send = async {
        match timeout(LARGE_TIMEOUT, from.send(Message::Binary(payload.clone()))).await {
            Ok(r) => r.map_err(|e| BenchError::Io(format!("{what}: send: {e}"))),
            Err(_) => Err(BenchError::Timeout(format!("{what}: send"))),
        }
    };
    let receive = async {
        let m = next_message(to, what, LARGE_TIMEOUT).await?;
        Ok::<_, BenchError>((t0.elapsed(), m))
    };
    let ((), (elapsed, m)) = tokio::try_join!(send, receive)?;
    match m {
        Message::Binary(got) if got == payload => Ok(elapsed),
        Message::Binary(got) => Err(BenchError::Protocol(format!(
            "{what}: {} bytes arrived altered or cut ({} bytes)",
            payload.len(),
            got.len()
        ))),
        other => Err(BenchError::Protocol(format!(
            "{what}: expected a binary message, got {}",
            kind_of(&other)
        ))),
    }
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
}
