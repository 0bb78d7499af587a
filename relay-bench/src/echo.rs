//! `echo`: the closed-loop load through a relay over the v2 protocol. Each pair is a daemon
//! control socket (per pair, or one shared by all pairs), an app client socket and the
//! daemon data socket that echoes.

use crate::driver::{add_outcome, add_shape, run_load, PairHalves};
use crate::error::Result;
use crate::params::EchoParams;
use crate::procfs;
use crate::report::{Field, Record};
use crate::v2::{frame_halves, open_bounded, open_pair, run_id, Control};
use std::time::Instant;

/// Sockets being opened at once while setting up.
pub const OPEN_CONCURRENCY: usize = 200;

/// Runs `echo` and returns its result record.
pub async fn run_echo(p: &EchoParams) -> Result<Record> {
    let url = p.validate()?;
    if let Some(pid) = p.pid {
        procfs::check_pid(pid)?;
    }
    let run = run_id();
    let shared = p.shared_server_id;
    let server_of = |i: usize| match shared {
        true => format!("bench-{run}"),
        false => format!("bench-{run}-{i}"),
    };
    let pairs = p.shape.pairs;
    let n_controls = if shared { 1 } else { pairs };
    let t0 = Instant::now();
    let controls = open_bounded(n_controls, OPEN_CONCURRENCY, |i| {
        let (url, server) = (&url, server_of(i));
        async move { Control::open(url, &server).await }
    })
    .await?;
    let opened = open_bounded(pairs, OPEN_CONCURRENCY, |i| {
        let (url, server) = (&url, server_of(i));
        let control = &controls[if shared { 0 } else { i }];
        async move { open_pair(url, control, &server, &format!("c{i}")).await }
    })
    .await?;
    let sockets = n_controls + 2 * pairs;
    eprintln!(
        "opened {pairs} pairs ({sockets} sockets) in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let halves = opened
        .into_iter()
        .map(|pair| PairHalves {
            app: frame_halves(pair.app),
            daemon: frame_halves(pair.data),
        })
        .collect();
    let cpu = || p.pid.and_then(|pid| procfs::process_cpu_seconds(pid).ok());
    let outcome = run_load(&p.shape, halves, cpu).await;
    futures_util::future::join_all(controls.into_iter().map(Control::close)).await;
    let outcome = outcome?;

    let mut r = Record::new("echo");
    r.set(
        "label",
        p.label.clone().unwrap_or_else(|| url.as_str().into()),
    )
    .set("url", url.as_str())
    .set("pid", p.pid.map(|p| Field::Id(p.into())));
    add_shape(&mut r, &p.shape);
    r.set("shared_server_id", shared).set("sockets", sockets);
    add_outcome(&mut r, &p.shape, &outcome);
    let mem = p.pid.and_then(|pid| procfs::mem_status(pid).ok());
    r.set("relay_rss_kb", mem.map(|m| m.rss_kb));
    Ok(r)
}
