//! `compare`: two relays side by side in one run (issue 11). Each relay is a shell command
//! with `{port}` in it (a free loopback port is put there); for every round and workload
//! both relays are started fresh, A then B, run the same workload, and are killed. The
//! result is, per figure, the median of each side over the rounds and the ratio a/b.
//!
//! Workloads: `echo:PAIRSxWINDOW` (100-byte frames unless `--size`), `idle:SOCKETS` and
//! `large:MIB` (one message each way). Figures: CPU µs per relayed message, messages/s and
//! p50/p99 round trip for echo; RSS per idle socket; MB/s each way and peak RSS growth for
//! large. Everything stays on loopback and every step is bounded (a relay must accept
//! within 30 s of its start; each workload has its own bounds).

use crate::error::{BenchError, Result};
use crate::params::{EchoParams, IdleParams, LargeParams, LoadShape};
use crate::report::{Field, Record};
use crate::{run_echo, run_idle, run_large};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::{sleep, Instant};

/// How long a started relay may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Most rounds one run may take.
pub const MAX_ROUNDS: usize = 9;

/// `compare`: relay A and relay B, the same workloads, alternating.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareParams {
    /// Command that runs relay A (through `sh -c 'exec …'`), with `{port}` for the port it
    /// must listen on, e.g. `./target/release/paseo-relay --listen 127.0.0.1:{port}`.
    #[arg(long)]
    pub a: String,
    /// Command that runs relay B, likewise.
    #[arg(long)]
    pub b: String,
    /// Name of A in the results.
    #[arg(long, default_value = "a")]
    pub a_label: String,
    /// Name of B in the results.
    #[arg(long, default_value = "b")]
    pub b_label: String,
    /// Rounds (each runs every workload on a fresh A, then on a fresh B).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Workloads, comma-separated: `echo:PAIRSxWINDOW`, `idle:SOCKETS`, `large:MIB`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "echo:50x1,echo:1x1,echo:50x8,idle:4000,large:32"
    )]
    pub workloads: Vec<String>,
    /// Echo frame size, bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Echo warm-up, s.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Echo measured window, s.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Print every single run's record too (stderr shows progress either way).
    #[arg(long)]
    pub each: bool,
}

/// One workload of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// `echo` with this many pairs and frames in flight.
    Echo {
        /// Pairs.
        pairs: usize,
        /// Frames in flight per pair.
        window: usize,
    },
    /// `idle` with this many sockets.
    Idle(usize),
    /// `large` with one message of this many MiB.
    Large(usize),
}

impl Workload {
    /// Parses `echo:50x1`, `idle:4000` or `large:32`.
    pub fn parse(text: &str) -> Result<Workload> {
        let bad = || {
            BenchError::Invalid(format!(
                "--workloads {text:?}: expected echo:PAIRSxWINDOW, idle:SOCKETS or large:MIB"
            ))
        };
        let (kind, arg) = text.trim().split_once(':').ok_or_else(bad)?;
        let num = |s: &str| s.parse::<usize>().map_err(|_| bad());
        Ok(match kind {
            "echo" => {
                let (p, w) = arg.split_once('x').ok_or_else(bad)?;
                Workload::Echo {
                    pairs: num(p)?,
                    window: num(w)?,
                }
            }
            "idle" => Workload::Idle(num(arg)?),
            "large" => Workload::Large(num(arg)?),
            _ => return Err(bad()),
        })
    }

    /// The name used in results: `echo 50x1`, `idle 4000`, `large 32 MiB`.
    pub fn name(&self) -> String {
        match self {
            Workload::Echo { pairs, window } => format!("echo {pairs}x{window}"),
            Workload::Idle(n) => format!("idle {n}"),
            Workload::Large(mib) => format!("large {mib} MiB"),
        }
    }

    /// The figures it yields: `(name, key in the run's record)`; a growth figure is derived.
    fn figures(&self) -> &'static [&'static str] {
        match self {
            Workload::Echo { .. } => &[
                "relay_cpu_us_per_msg",
                "relayed_msgs_per_s",
                "latency_p50_us",
                "latency_p99_us",
            ],
            Workload::Idle(_) => &["rss_per_socket_bytes"],
            Workload::Large(_) => &[
                "app_to_daemon_mb_per_s",
                "daemon_to_app_mb_per_s",
                "rss_peak_growth_kb",
            ],
        }
    }
}

/// A relay process started for one run; killed when dropped.
struct Started {
    child: Child,
    port: u16,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::Io(format!("no free loopback port: {e}")))?;
    Ok(l.local_addr()
        .map_err(|e| BenchError::Io(e.to_string()))?
        .port())
}

/// Starts `command` with `{port}` replaced and waits until it accepts on 127.0.0.1:port.
async fn start(command: &str, label: &str) -> Result<Started> {
    if !command.contains("{port}") {
        return Err(BenchError::Invalid(format!(
            "--{label}: the command must contain {{port}}"
        )));
    }
    let port = free_port()?;
    let line = command.replace("{port}", &port.to_string());
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {line}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| BenchError::Io(format!("starting {label}: {e}")))?;
    let mut started = Started { child, port };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(started);
        }
        if let Ok(Some(status)) = started.child.try_wait() {
            return Err(BenchError::Io(format!("{label} exited at start: {status}")));
        }
        if Instant::now() > deadline {
            return Err(BenchError::Io(format!(
                "{label} did not accept on 127.0.0.1:{port} within {START_TIMEOUT:?}"
            )));
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `workload` once against a fresh relay from `command` and returns its figures.
async fn run_once(
    p: &CompareParams,
    workload: &Workload,
    command: &str,
    label: &str,
) -> Result<(Vec<f64>, Vec<Record>)> {
    let relay = start(command, label).await?;
    let pid = relay.child.id();
    let url = format!("ws://127.0.0.1:{}", relay.port);
    let records = match workload {
        Workload::Echo { pairs, window } => vec![
            run_echo(&EchoParams {
                url,
                shape: LoadShape {
                    pairs: *pairs,
                    size: p.size,
                    window: *window,
                    warmup: p.warmup,
                    seconds: p.seconds,
                },
                shared_server_id: false,
                pid: Some(pid),
                label: Some(label.to_string()),
            })
            .await?,
        ],
        Workload::Idle(sockets) => vec![
            run_idle(&IdleParams {
                url,
                sockets: *sockets,
                pid,
                pairs_per_server: 100,
                concurrency: 200,
                settle: 2,
                scrape_url: None,
            })
            .await?,
        ],
        Workload::Large(mib) => {
            run_large(&LargeParams {
                url,
                pid: Some(pid),
                sizes: vec![*mib],
            })
            .await?
        }
    };
    drop(relay);
    let record = records
        .first()
        .ok_or_else(|| BenchError::Io("no result".into()))?;
    let value = |key: &str| -> Result<f64> {
        let field = |k: &str| match record.get(k) {
            Some(Field::Real(v)) => Ok(*v),
            Some(Field::Count(v)) => Ok(*v as f64),
            other => Err(BenchError::Io(format!("{label}: {k} is {other:?}"))),
        };
        match key {
            "rss_peak_growth_kb" => Ok(field("rss_peak_kb")? - field("rss_before_kb")?),
            k => field(k),
        }
    };
    let figures = workload
        .figures()
        .iter()
        .map(|k| value(k))
        .collect::<Result<Vec<f64>>>()?;
    Ok((figures, records))
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs the comparison; returns one record per figure (and each run's record with
/// `--each`, first).
pub async fn run_compare(p: &CompareParams) -> Result<Vec<Record>> {
    if p.rounds == 0 || p.rounds > MAX_ROUNDS {
        return Err(BenchError::Invalid(format!(
            "--rounds must be 1 to {MAX_ROUNDS}, not {}",
            p.rounds
        )));
    }
    let workloads = p
        .workloads
        .iter()
        .map(|w| Workload::parse(w))
        .collect::<Result<Vec<_>>>()?;
    // runs[w][side][round] = figures
    let mut runs: Vec<[Vec<Vec<f64>>; 2]> = vec![[Vec::new(), Vec::new()]; workloads.len()];
    let mut each = Vec::new();
    for round in 0..p.rounds {
        for (w, workload) in workloads.iter().enumerate() {
            for (side, (command, label)) in [(&p.a, &p.a_label), (&p.b, &p.b_label)]
                .into_iter()
                .enumerate()
            {
                eprintln!(
                    "[compare] round {}/{} {} on {label}",
                    round + 1,
                    p.rounds,
                    workload.name()
                );
                let (figures, records) = run_once(p, workload, command, label).await?;
                runs[w][side].push(figures);
                if p.each {
                    each.extend(records);
                }
            }
        }
    }
    let mut out = each;
    for (w, workload) in workloads.iter().enumerate() {
        for (f, figure) in workload.figures().iter().enumerate() {
            let side = |s: usize| runs[w][s].iter().map(|r| r[f]).collect::<Vec<f64>>();
            let (a, b) = (side(0), side(1));
            let (ma, mb) = (median(&a), median(&b));
            let list = |v: &[f64]| {
                v.iter()
                    .map(|x| crate::report::format_real(*x))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let mut r = Record::new("compare");
            r.set("workload", workload.name())
                .set("figure", *figure)
                .set("a", p.a_label.as_str())
                .set("b", p.b_label.as_str())
                .set("a_median", ma)
                .set("b_median", mb)
                .set("ratio_a_over_b", ma / mb)
                .set("a_runs", list(&a))
                .set("b_runs", list(&b));
            out.push(r);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_parse_and_name() {
        assert_eq!(
            Workload::parse("echo:50x8").unwrap(),
            Workload::Echo {
                pairs: 50,
                window: 8
            }
        );
        assert_eq!(Workload::parse(" idle:4000").unwrap(), Workload::Idle(4000));
        assert_eq!(Workload::parse("large:32").unwrap().name(), "large 32 MiB");
        for bad in ["echo:50", "idle", "large:x", "udp:1"] {
            assert!(Workload::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
