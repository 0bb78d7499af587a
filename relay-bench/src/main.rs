//! `relay-bench`: the command line of the relay-bench library (see its docs and the README
//! in this crate). Results go to stdout (a table, or JSON lines with `--json`); progress
//! and notes go to stderr.

use clap::{Parser, Subcommand};
use relay_bench::{
    procfs, table, BaselineParams, CompareParams, EchoParams, IdleParams, LargeParams, PlotParams,
    Record,
};
use std::process::ExitCode;

/// Benchmark any Paseo v2 relay on loopback (echo load, idle sockets, large messages), a raw
/// TCP forwarder as the baseline, and a latency-against-load plot.
#[derive(Parser)]
#[command(name = "relay-bench", version)]
struct Cli {
    /// Print one JSON object per result line instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N daemon/app pairs echoing S-byte frames, W in flight per pair: msgs/s, latency, CPU.
    Echo(EchoParams),
    /// N idle sockets (half daemon data, half app, paired): the relay's RSS per socket.
    Idle(IdleParams),
    /// Messages of a few MiB from app to daemon and back: MB/s and the relay's peak RSS.
    Large(LargeParams),
    /// The echo load through an in-process raw TCP forwarder: this machine's speed of light.
    Baseline(BaselineParams),
    /// Latency percentiles against load, as a PNG, from echo/baseline JSON lines.
    Plot(PlotParams),
    /// Two relay commands side by side, fresh per run, alternating: medians and ratios.
    Compare(CompareParams),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match procfs::raise_nofile_limit() {
        Ok((old, new)) if old != new => {
            eprintln!("raised this process's open-file limit from {old} to {new}")
        }
        Ok(_) => {}
        Err(e) => eprintln!("could not raise the open-file limit: {e}"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime should start");
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Echo(p) => relay_bench::run_echo(p).await.map(|r| vec![r]),
            Command::Idle(p) => relay_bench::run_idle(p).await.map(|r| vec![r]),
            Command::Large(p) => relay_bench::run_large(p).await,
            Command::Baseline(p) => relay_bench::run_baseline(p).await.map(|r| vec![r]),
            Command::Plot(p) => relay_bench::run_plot(p).map(|r| vec![r]),
            Command::Compare(p) => relay_bench::run_compare(p).await,
        }
    });
    match result {
        Ok(records) => {
            print(&records, cli.json);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print(records: &[Record], json: bool) {
    if json {
        for r in records {
            println!("{}", r.to_json_line());
        }
    } else {
        print!("{}", table(records));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_consistent_and_parses_the_documented_forms() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "relay-bench",
            "echo",
            "--url",
            "ws://127.0.0.1:8080",
            "--pairs",
            "50",
            "--size",
            "100",
            "--window",
            "1",
            "--warmup",
            "2",
            "--seconds",
            "5",
            "--pid",
            "42",
            "--shared-server-id",
            "--json",
        ])
        .unwrap();
        assert!(cli.json);
        let Command::Echo(p) = cli.command else {
            panic!("not echo")
        };
        assert_eq!((p.shape.pairs, p.shape.window, p.pid), (50, 1, Some(42)));
        assert!(p.shared_server_id);
        let cli = Cli::try_parse_from(["relay-bench", "large", "--pid", "7", "--sizes", "1,8,32"])
            .unwrap();
        let Command::Large(p) = cli.command else {
            panic!("not large")
        };
        assert_eq!(p.sizes, [1, 8, 32]);
        assert!(Cli::try_parse_from(["relay-bench", "idle", "--sockets", "10"]).is_err());
    }
}
