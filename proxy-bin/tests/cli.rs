//! The `paseo-relay` binary itself: configuration validation, listen-address errors, and a
//! real start answering `/health`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_paseo-relay");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run paseo-relay")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim_end().to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port()
}

#[test]
fn shipped_example_config_is_valid() {
    let conf = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conf/paseo-relay.example.yaml"
    );
    let out = run(&["-t", "-c", conf, "--log-level", "warn"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn unknown_relay_key_is_rejected_with_its_name() {
    let path = std::env::temp_dir().join(format!("paseo-relay-bad-{}.yaml", free_port()));
    std::fs::write(&path, "relay:\n  bogus: 1\n").unwrap();
    let out = run(&["-t", "-c", path.to_str().unwrap()]);
    std::fs::remove_file(&path).ok();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "paseo-relay: {}: relay: unknown field `bogus`",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn invalid_relay_value_is_rejected_with_its_key() {
    let path = std::env::temp_dir().join(format!("paseo-relay-bad-{}.yaml", free_port()));
    std::fs::write(&path, "relay:\n  nudge_after_ms: 20000\n").unwrap();
    let out = run(&["-t", "-c", path.to_str().unwrap()]);
    std::fs::remove_file(&path).ok();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "paseo-relay: {}: relay.reset_after_ms: must be greater than relay.nudge_after_ms (20000 ms)",
            path.display()
        )
    );
}

#[test]
fn busy_listen_address_fails_at_once() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let started = Instant::now();
    let out = run(&["--listen", &addr]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!("paseo-relay: --listen {addr}: cannot bind: Address already in use (os error 98)")
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn malformed_listen_address_is_rejected() {
    let out = run(&["--listen", "localhost"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "paseo-relay: --listen localhost: not an IP:port address (invalid socket address syntax)"
    );
}

#[test]
fn starts_and_answers_health() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(BIN)
        .args(["--listen", &addr, "--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start paseo-relay");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tcp = loop {
        match TcpStream::connect(&addr) {
            Ok(tcp) => break tcp,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("relay did not start on {addr}: {e}"),
        }
    };
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).unwrap();
    child.kill().ok();
    child.wait().ok();
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(
        resp.contains("\r\nContent-Type: application/json\r\n"),
        "{resp}"
    );
    assert!(resp.ends_with("\r\n\r\n{\"status\":\"ok\"}"), "{resp}");
}
