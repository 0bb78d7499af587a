//! A small echo load against a running relay, kept because BENCHMARKS.md quotes it for the
//! figure before this work; use `relay-bench` (workspace member) for measurements.
//! N daemon/app pairs (v2: control, data and client sockets, one serverId per pair); each
//! app sends S-byte binary frames one at a time (W=1) and its daemon data socket echoes them
//! back. Prints relayed messages per second and, given the
//! relay's pid, the relay's CPU seconds over the measured window (from /proc).
//!
//! Run: `cargo run --release -p relay-tests --example echo_load -- ws://127.0.0.1:8080 50 10 100 <pid>`

use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().ok()? + fields[12].parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = args.get(1).cloned().unwrap_or("ws://127.0.0.1:8080".into());
    let pairs: usize = args.get(2).map_or(50, |a| a.parse().expect("PAIRS"));
    let secs: u64 = args.get(3).map_or(10, |a| a.parse().expect("SECONDS"));
    let size: usize = args.get(4).map_or(100, |a| a.parse().expect("SIZE"));
    let pid = args.get(5).cloned();
    let run = format!("{:08x}", rand::random::<u32>());

    let mut tasks = Vec::new();
    let start_at = Instant::now() + Duration::from_secs(1);
    let end_at = start_at + Duration::from_secs(secs);
    for i in 0..pairs {
        let base = base.clone();
        let sid = format!("load_{run}_{i}");
        tasks.push(tokio::spawn(async move {
            let url = |q: &str| format!("{base}/ws?serverId={sid}&{q}");
            let (_control, _) = tokio_tungstenite::connect_async(url("role=server&v=2"))
                .await
                .expect("control");
            let (mut app, _) =
                tokio_tungstenite::connect_async(url("role=client&v=2&connectionId=a"))
                    .await
                    .expect("client");
            let (mut data, _) =
                tokio_tungstenite::connect_async(url("role=server&v=2&connectionId=a"))
                    .await
                    .expect("data");
            let echo = tokio::spawn(async move {
                while let Some(Ok(m)) = data.next().await {
                    if m.is_binary() && data.send(m).await.is_err() {
                        break;
                    }
                }
            });
            let payload = Message::binary(vec![7u8; size]);
            tokio::time::sleep_until(start_at.into()).await;
            let mut round_trips = 0u64;
            while Instant::now() < end_at {
                app.send(payload.clone()).await.expect("send");
                loop {
                    match app.next().await {
                        Some(Ok(Message::Binary(_))) => break,
                        Some(Ok(_)) => continue,
                        other => panic!("app socket ended: {other:?}"),
                    }
                }
                round_trips += 1;
            }
            echo.abort();
            round_trips
        }));
    }
    tokio::time::sleep_until((start_at).into()).await;
    let cpu_before = pid.as_deref().and_then(cpu_seconds);
    let mut total = 0u64;
    for t in tasks {
        total += t.await.expect("pair task");
    }
    let cpu_after = pid.as_deref().and_then(cpu_seconds);
    let relayed = total * 2;
    println!(
        "pairs={pairs} size={size}B window={secs}s round_trips={total} relayed_msgs={relayed} relayed_msgs_per_s={:.0}",
        relayed as f64 / secs as f64
    );
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        let cpu = b - a;
        println!(
            "relay_cpu_s={cpu:.2} relay_cpu_us_per_msg={:.2}",
            cpu * 1e6 / relayed as f64
        );
    }
}
