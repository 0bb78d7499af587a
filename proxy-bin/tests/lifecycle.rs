//! Stopping and upgrading the real binary (relay-protocol.md §0 "Shutdown and upgrade"):
//! SIGTERM closes every WebSocket 1001 and exits early, SIGINT stops at once, a graceful
//! upgrade (`--upgrade` + SIGQUIT) hands the listeners over without refusing a connection
//! and the old process closes its sockets 1012, and `-d` daemon mode still runs the timers.

mod common;

use common::{alive, free_port, temp_dir, wait_listening, wait_until, write_conf, Relay};
use futures_util::StreamExt;
use relay_tests::{assert_relays_both_ways, recv_close_within, recv_text, sid, Endpoint, Ws};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn local(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// Starts the binary in a fresh directory with `extra` config YAML on a free port and waits
/// until it listens. Returns the process and its address.
fn start(name: &str, extra: &str) -> (Relay, SocketAddr) {
    let dir = temp_dir(name);
    let conf = write_conf(&dir, extra);
    let addr = local(free_port());
    let relay = Relay::spawn(
        &dir,
        "relay.log",
        &["-c", conf.to_str().unwrap(), "--listen", &addr.to_string()],
    );
    wait_listening(addr);
    (relay, addr)
}

/// Polls the child until it exits, without blocking the test's runtime.
async fn exited_within(relay: &mut Relay, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = relay.child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Expects the close `code`/`reason`, completes the closing handshake, and hangs up as real
/// peers do (the relay half-closed first and waits for our end of the TCP connection).
async fn expect_close(mut ws: Ws, within: Duration, code: u16, reason: &str, which: &str) {
    assert_eq!(
        recv_close_within(&mut ws, within).await,
        (code, reason.to_string()),
        "{which}"
    );
    // Reading on sends our close reply (tungstenite queues it) and sees the relay end the
    // connection: the closing handshake completes.
    match tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
        Ok(None) => {}
        other => panic!("{which}: expected the end of the stream, got {other:?}"),
    }
}

#[tokio::test]
async fn sigterm_closes_every_socket_1001_and_exits_within_the_grace_period() {
    let (mut relay, addr) = start("sigterm", "");
    let relay_end = Endpoint { addr };
    let s = sid("sigterm");
    let (c, mut k, mut d) = relay_end.paired(&s, "x").await;
    assert_relays_both_ways(&mut k, &mut d).await;
    let v1_server = relay_end.v1(&s, "server").await;
    let v1_client = relay_end.v1(&s, "client").await;

    let started = Instant::now();
    relay.signal(libc::SIGTERM);
    let within = Duration::from_secs(5);
    for (ws, which) in [
        (c, "control"),
        (k, "client"),
        (d, "data"),
        (v1_server, "v1 server"),
        (v1_client, "v1 client"),
    ] {
        expect_close(ws, within, 1001, "Relay shutting down", which).await;
    }
    let status = exited_within(&mut relay, Duration::from_secs(10))
        .await
        .expect("exit within grace_period_seconds (10 s)");
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0));
    // Every socket echoed the close, so the relay is idle long before the grace period.
    assert!(took < Duration::from_secs(5), "exited after {took:?}");
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    let log = relay.log();
    assert!(
        log.contains("closing 5 WebSockets 1001 Relay shutting down"),
        "{log}"
    );
    assert!(
        log.contains("every WebSocket and request has ended: exiting"),
        "{log}"
    );
}

#[tokio::test]
async fn sigterm_with_an_unresponsive_socket_still_exits_within_the_grace_period() {
    // A peer that never answers the close: the relay waits close_grace_ms, then drops it.
    let (mut relay, addr) = start(
        "sigterm-stuck",
        "grace_period_seconds: 4\nrelay:\n  close_grace_ms: 60000\n",
    );
    let mut raw = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws?serverId={}&role=server&v=2 HTTP/1.1\r\nHost: r\r\n{}\r\n",
        sid("stuck"),
        relay_tests::UPGRADE_HEADERS
    );
    raw.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    raw.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");

    let started = Instant::now();
    relay.signal(libc::SIGTERM);
    let status = exited_within(&mut relay, Duration::from_secs(12))
        .await
        .expect("exit after the grace period");
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(10),
        "exited after {took:?} (grace 4 s + shutdown timeout)"
    );
    drop(raw);
}

#[tokio::test]
async fn sigint_stops_at_once_without_close_frames() {
    let (mut relay, addr) = start("sigint", "");
    let relay_end = Endpoint { addr };
    let (mut c, _) = relay_end.control_synced(&sid("sigint")).await;
    let started = Instant::now();
    relay.signal(libc::SIGINT);
    let status = exited_within(&mut relay, Duration::from_secs(3))
        .await
        .expect("fast stop");
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(3));
    match tokio::time::timeout(Duration::from_secs(3), c.next()).await {
        Ok(None) | Ok(Some(Err(_))) => {}
        other => panic!("expected the socket to be dropped, got {other:?}"),
    }
}

/// `GET /health` on a new connection; `Ok` only for the exact 200 answer.
async fn probe(addr: SocketAddr) -> Result<(), String> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut resp = Vec::new();
    tcp.read_to_end(&mut resp)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let resp = String::from_utf8_lossy(&resp);
    if resp.starts_with("HTTP/1.1 200 OK\r\n") && resp.ends_with("\r\n\r\n{\"status\":\"ok\"}") {
        Ok(())
    } else {
        Err(format!("answer: {resp:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_hands_over_without_refusing_and_sessions_re_pair() {
    let dir = temp_dir("upgrade");
    let conf = write_conf(&dir, "");
    let conf = conf.to_str().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut old = Relay::spawn(&dir, "old.log", &["-c", conf, "--listen", &addr]);
    wait_listening(local(port));
    let relay_end = Endpoint { addr: local(port) };
    let s = sid("upgrade");
    let (c, mut k, mut d) = relay_end.paired(&s, "x").await;
    assert_relays_both_ways(&mut k, &mut d).await;

    // A probe connects in a loop through the whole hand-over.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let probe_task = {
        let (stop, ok) = (stop.clone(), ok.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match probe(local(port)).await {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(e),
                }
            }
            failures
        })
    };

    let mut new = Relay::spawn(
        &dir,
        "new.log",
        &["-c", conf, "--listen", &addr, "--upgrade"],
    );
    let upgrade_sock = dir.join("upgrade.sock");
    wait_until(
        Duration::from_secs(10),
        "the new process's upgrade socket",
        || upgrade_sock.exists(),
    );
    let before = ok.load(Ordering::Relaxed);
    old.signal(libc::SIGQUIT);

    // Once the new process holds the listeners, the old one closes its sockets 1012.
    let within = Duration::from_secs(15);
    for (ws, which) in [(c, "control"), (k, "client"), (d, "data")] {
        expect_close(ws, within, 1012, "Service restart", which).await;
    }
    let closed_at = Instant::now();
    // The daemon and the app reconnect at once and pair up on the new process.
    let (c2, mut k2, mut d2) = relay_end.paired(&s, "x").await;
    assert_relays_both_ways(&mut k2, &mut d2).await;
    assert!(closed_at.elapsed() < Duration::from_secs(3));

    let status = exited_within(&mut old, Duration::from_secs(10))
        .await
        .expect("old process exits");
    assert_eq!(status.code(), Some(0));
    // Still served, by the new process alone.
    assert_relays_both_ways(&mut k2, &mut d2).await;
    assert!(new.child.try_wait().unwrap().is_none(), "new process died");

    stop.store(true, Ordering::Relaxed);
    let failures = probe_task.await.unwrap();
    assert_eq!(failures, Vec::<String>::new(), "refused or failed probes");
    assert!(
        ok.load(Ordering::Relaxed) > before + 20,
        "the probe ran through the hand-over"
    );
    let old_log = old.log();
    assert!(old_log.contains("listener sockets sent"), "{old_log}");
    assert!(
        old_log.contains("closing 3 WebSockets 1012 Service restart"),
        "{old_log}"
    );
    drop((c2, k2, d2));
    new.signal(libc::SIGTERM);
    assert!(exited_within(&mut new, Duration::from_secs(10))
        .await
        .is_some());
}

#[tokio::test]
async fn daemon_mode_still_runs_the_nudge_timers() {
    let dir = temp_dir("daemon");
    let error_log = dir.join("error.log");
    let conf = write_conf(
        &dir,
        &format!(
            "error_log: {}\nrelay:\n  nudge_after_ms: 500\n  reset_after_ms: 1500\n",
            error_log.display()
        ),
    );
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut parent = Relay::spawn(
        &dir,
        "parent.log",
        &["-d", "-c", conf.to_str().unwrap(), "--listen", &addr],
    );
    let status = exited_within(&mut parent, Duration::from_secs(10))
        .await
        .expect("the parent returns once daemonised");
    assert_eq!(status.code(), Some(0));
    let pid_file = dir.join("relay.pid");
    wait_until(Duration::from_secs(10), "the daemon's pid file", || {
        std::fs::read_to_string(&pid_file).is_ok_and(|p| p.trim().parse::<i32>().is_ok())
    });
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(pid, parent.pid());
    wait_listening(local(port));

    let relay_end = Endpoint { addr: local(port) };
    let s = sid("daemon");
    let (mut c, sync) = relay_end.control_synced(&s).await;
    assert_eq!(sync, r#"{"type":"sync","connectionIds":[]}"#);
    let k = relay_end.client(&s, "x").await;
    assert_eq!(
        recv_text(&mut c).await,
        r#"{"type":"connected","connectionId":"x"}"#
    );
    // Nudge at 0.5 s, reset at 1.5 s: the timer service runs in the forked daemon.
    assert_eq!(
        recv_text(&mut c).await,
        r#"{"type":"sync","connectionIds":["x"]}"#
    );
    expect_close(
        c,
        Duration::from_secs(3),
        1011,
        "Control unresponsive",
        "control",
    )
    .await;

    drop(k);
    common::signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "daemon did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = std::fs::read_to_string(&error_log).unwrap_or_default();
    // The daemon logs to `error_log`; its drain ran.
    assert!(log.contains("WebSockets 1001 Relay shutting down"), "{log}");
}

#[tokio::test]
async fn raises_its_soft_open_file_limit_to_the_hard_limit() {
    use std::os::unix::process::CommandExt;
    let mut hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed by reference.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) },
        0
    );
    let soft: libc::rlim_t = 256.min(hard.rlim_max);
    let dir = temp_dir("nofile");
    let conf = write_conf(&dir, "");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = common::command();
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(move || {
            let lowered = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let relay = Relay::spawn_with(
        cmd,
        &dir,
        "relay.log",
        &["-c", conf.to_str().unwrap(), "--listen", &addr],
    );
    wait_listening(local(port));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", relay.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let max = hard.rlim_max.to_string();
    assert_eq!(line, format!("Max open files {max} {max} files"));
    let log = relay.log();
    if soft < hard.rlim_max {
        assert!(
            log.contains(&format!(
                "open-file limit raised from {soft} to {max} (the hard limit)"
            )),
            "{log}"
        );
    } else {
        assert!(log.contains(&format!("open-file limit: {max}")), "{log}");
    }
}
