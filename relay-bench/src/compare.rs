//! `compare`: two relays side by side in one run (issue 11). Each relay is a shell command
//! with `{port}` in it (a free loopback port is put there); for every round and workload
//! both relays are started fresh, A then B, run the same workload, and are killed. The
//! result is, per figure, the median of each side over the rounds and the ratio a/b.
//!
//! Workloads: `echo:PAIRSxWINDOW` (100-byte frames unless `--size`), `idle:SOCKETS`,
//! `burst:SOCKETS` (idle, then the RSS 10 s after every socket closed), `large:MIB` (one
//! binary message each way), `large-text:MIB` (one text message each way) and
//! `large-pairs:PAIRSxMIB` (that many pairs sending at once). Figures: CPU µs per relayed
//! message, messages/s and p50/p99 round trip for echo; RSS per idle socket; RSS after the
//! burst over the RSS before it; for large MB/s and peak RSS growth over the bytes sent,
//! each way, the memory an open pair keeps after it (kB) and the RSS 10 s after the close
//! over the RSS at the start. Everything stays on loopback and every step is bounded (a relay must accept
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
    /// Workloads, comma-separated: `echo:PAIRSxWINDOW`, `idle:SOCKETS`, `burst:SOCKETS`,
    /// `large:MIB`, `large-text:MIB`, `large-pairs:PAIRSxMIB`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "echo:50x1,echo:1x1,echo:50x8,idle:4000,burst:5000,large:32,large-text:32,large-pairs:8x30"
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
    /// `idle` with this many sockets, read [`BURST_AFTER_MS`] after they all closed.
    Burst(usize),
    /// `large`: `pairs` pairs each send one message of `mib` MiB each way at once.
    Large {
        /// Message size, MiB.
        mib: usize,
        /// Text messages instead of binary ones.
        text: bool,
        /// Pairs sending at once.
        pairs: usize,
    },
}

/// How long after a burst (or a large run) closed the RSS is read, ms (issue 11: "RSS
/// 10 s after a burst").
pub const BURST_AFTER_MS: u64 = 10_000;

impl Workload {
    /// Parses `echo:50x1`, `idle:4000`, `burst:5000`, `large:32`, `large-text:32` or
    /// `large-pairs:8x30`.
    pub fn parse(text: &str) -> Result<Workload> {
        let bad = || {
            BenchError::Invalid(format!(
                "--workloads {text:?}: expected echo:PAIRSxWINDOW, idle:SOCKETS, \
                 burst:SOCKETS, large:MIB, large-text:MIB or large-pairs:PAIRSxMIB"
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
            "burst" => Workload::Burst(num(arg)?),
            "large" | "large-text" => Workload::Large {
                mib: num(arg)?,
                text: kind == "large-text",
                pairs: 1,
            },
            "large-pairs" => {
                let (p, m) = arg.split_once('x').ok_or_else(bad)?;
                Workload::Large {
                    mib: num(m)?,
                    text: false,
                    pairs: num(p)?,
                }
            }
            _ => return Err(bad()),
        })
    }

    /// The name used in results: `echo 50x1`, `idle 4000`, `burst 5000`, `large 32 MiB`,
    /// `large 32 MiB text`, `large 8x30 MiB`.
    pub fn name(&self) -> String {
        match self {
            Workload::Echo { pairs, window } => format!("echo {pairs}x{window}"),
            Workload::Idle(n) => format!("idle {n}"),
            Workload::Burst(n) => format!("burst {n}"),
            Workload::Large {
                mib,
                text: false,
                pairs: 1,
            } => format!("large {mib} MiB"),
            Workload::Large {
                mib,
                text: true,
                pairs: 1,
            } => format!("large {mib} MiB text"),
            Workload::Large { mib, text, pairs } => {
                format!(
                    "large {pairs}x{mib} MiB{}",
                    if *text { " text" } else { "" }
                )
            }
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
            Workload::Burst(_) => &["after_close_ratio"],
            Workload::Large { pairs: 1, .. } => &[
                "app_to_daemon_mb_per_s",
                "daemon_to_app_mb_per_s",
                "growth_x_to_daemon",
                "growth_x_to_app",
                "kept_kb",
                "after_close_ratio",
            ],
            Workload::Large { .. } => &[
                "rss_peak_growth_kb",
                "growth_x",
                "kept_kb",
                "after_close_ratio",
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
        Workload::Idle(sockets) | Workload::Burst(sockets) => vec![
            run_idle(&IdleParams {
                url,
                sockets: *sockets,
                pid,
                pairs_per_server: 100,
                concurrency: 200,
                settle: 2,
                scrape_url: None,
                after_ms: match workload {
                    Workload::Burst(_) => BURST_AFTER_MS,
                    _ => 0,
                },
            })
            .await?,
        ],
        Workload::Large { mib, text, pairs } => {
            run_large(&LargeParams {
                text: *text,
                pairs: *pairs,
                after_ms: BURST_AFTER_MS,
                ..LargeParams::new(url, Some(pid), vec![*mib])
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
            Some(Field::Signed(v)) => Ok(*v as f64),
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
        assert_eq!(
            Workload::parse("large-text:32").unwrap().name(),
            "large 32 MiB text"
        );
        assert_eq!(
            Workload::parse("large-pairs:8x30").unwrap(),
            Workload::Large {
                mib: 30,
                text: false,
                pairs: 8
            }
        );
        assert_eq!(
            Workload::parse("large-pairs:8x30").unwrap().name(),
            "large 8x30 MiB"
        );
        assert_eq!(Workload::parse("burst:5000").unwrap().name(), "burst 5000");
        for bad in [
            "echo:50",
            "idle",
            "large:x",
            "udp:1",
            "large-pairs:30",
            "burst:",
        ] {
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
