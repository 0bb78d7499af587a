//! The binary's log (issue 9): `--log-format json` writes one JSON object per line, no line
//! is longer than 1 KiB whatever a client sends, trace never shows WebSocket payloads, and
//! a bad `log_format` is refused before serving.

mod common;

use common::{command, free_port, temp_dir, wait_listening, write_conf, Relay};
use relay_tests::{recv_text, send_text, Endpoint};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

/// The longest line the relay may write, newline included.
const MAX_LINE_BYTES: usize = 1024;
const MARKER: &str = "PAYLOAD-MARKER-7f3a";

/// Starts the binary with `args` (after `-c` and `--listen`) and waits until it listens.
fn start(name: &str, cmd: Command, args: &[&str]) -> (Relay, SocketAddr) {
    let dir = temp_dir(name);
    let conf = write_conf(&dir, "");
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = addr.to_string();
    let mut all = vec!["-c", conf.to_str().unwrap(), "--listen", &listen];
    all.extend_from_slice(args);
    let relay = Relay::spawn_with(cmd, &dir, "relay.log", &all);
    wait_listening(addr);
    (relay, addr)
}

/// Stops the relay at once (SIGINT) and returns its whole log.
fn stop(mut relay: Relay) -> String {
    relay.signal(libc::SIGINT);
    assert!(
        relay.wait_exit(Duration::from_secs(15)).is_some(),
        "relay did not stop"
    );
    relay.log()
}

/// Sends a request whose target is 60 KiB of bytes HTTP refuses, and reads what comes back.
fn send_huge_invalid_target(addr: SocketAddr) {
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let target = "\u{1}a".repeat(30 * 1024);
    let request = format!("GET /{target} HTTP/1.1\r\nHost: relay\r\n\r\n");
    // The relay may answer and close before reading it all: a reset is fine.
    let _ = tcp.write_all(request.as_bytes());
    let _ = tcp.read(&mut [0; 256]);
}

fn assert_no_long_line(log: &str) {
    for line in log.lines() {
        assert!(
            line.len() < MAX_LINE_BYTES,
            "a {}-byte line: {}…",
            line.len(),
            line.chars().take(200).collect::<String>()
        );
    }
}

#[test]
fn json_lines_at_debug_all_parse_and_stay_under_1_kib() {
    let (relay, addr) = start(
        "logs-json",
        command(),
        &["--log-format", "json", "--log-level", "debug"],
    );
    send_huge_invalid_target(addr);
    let log = stop(relay);
    assert!(log.lines().count() > 5, "{log}");
    for line in log.lines() {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["ts", "level", "target", "msg"] {
            assert!(json[key].is_string(), "no {key}: {line}");
        }
    }
    assert!(log.contains("…[cut "), "nothing was cut: {log}");
    assert_no_long_line(&log);
}

#[test]
fn text_lines_at_debug_stay_under_1_kib() {
    let (relay, addr) = start("logs-text", command(), &["--log-level", "debug"]);
    send_huge_invalid_target(addr);
    let log = stop(relay);
    assert!(log.contains("…[cut "), "nothing was cut: {log}");
    assert_no_long_line(&log);
}

/// Pairs a v1 daemon and app and sends the marker both ways; returns the relay's log.
fn exchange_marker(cmd: Command) -> String {
    let (relay, addr) = start("logs-trace", cmd, &["--log-level", "trace"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let relay = Endpoint { addr };
        let mut daemon = relay.v1("logs-trace", "server").await;
        let mut app = relay.v1("logs-trace", "client").await;
        send_text(&mut app, MARKER).await;
        assert_eq!(recv_text(&mut daemon).await, MARKER);
        send_text(&mut daemon, MARKER).await;
        assert_eq!(recv_text(&mut app).await, MARKER);
    });
    stop(relay)
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn trace_never_shows_payloads_unless_tungstenite_is_named() {
    let log = exchange_marker(command());
    assert!(log.contains(" TRACE "), "no trace output: {log}");
    assert!(!log.contains(MARKER), "payload in the log");
    assert!(!log.contains(&hex(MARKER)), "payload (hex) in the log");

    // The operator asks for tungstenite's trace by name: it is theirs (and holds payloads).
    let mut cmd = command();
    cmd.env("RUST_LOG", "trace,tungstenite=trace");
    let log = exchange_marker(cmd);
    assert!(
        log.contains(MARKER) || log.contains(&hex(MARKER)),
        "tungstenite=trace should show its frames"
    );
}

#[test]
fn unknown_log_format_exits_1_naming_the_variable() {
    let out = command()
        .env("PASEO_LOG_FORMAT", "xml")
        .output()
        .expect("run paseo-relay");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "paseo-relay: PASEO_LOG_FORMAT: unknown log format `xml` (expected text or json)\n"
    );
}

#[test]
fn test_mode_accepts_log_format_json_in_the_file() {
    let dir = temp_dir("logs-t");
    let conf = write_conf(&dir, "log_format: json\n");
    let out = command()
        .args(["-t", "-c", conf.to_str().unwrap()])
        .output()
        .expect("run paseo-relay");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("configuration is valid"), "{err}");
}

#[test]
fn the_close_line_carries_its_fields_as_json_keys() {
    let (relay, addr) = start("logs-close", command(), &["--log-format", "json"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let endpoint = Endpoint { addr };
        let mut daemon = endpoint.v1("logs-close-srv", "server").await;
        let mut app = endpoint.v1("logs-close-srv", "client").await;
        send_text(&mut app, "hello").await;
        assert_eq!(recv_text(&mut daemon).await, "hello");
        send_text(&mut daemon, "hi").await;
        assert_eq!(recv_text(&mut app).await, "hi");
        relay_tests::send_close(&mut app, 1000, "bye").await;
        // The echo of the close reaches the app; then the relay ends the socket.
        let _ = relay_tests::recv_close(&mut app).await;
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !relay.log().contains(r#""kind":"v1 client""#) {
        assert!(
            std::time::Instant::now() < deadline,
            "no close line: {}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = stop(relay);
    let line = log
        .lines()
        .find(|l| l.contains(r#""kind":"v1 client""#))
        .expect("the app socket's close line");
    let json: serde_json::Value = serde_json::from_str(line).expect("JSON");
    assert_eq!(json["level"], "INFO");
    assert_eq!(json["kind"], "v1 client");
    assert_eq!(json["version"], "v1");
    assert_eq!(json["server_id"], "logs-clo…", "the first 8 characters");
    assert_eq!(json["close_received_code"], 1000);
    assert_eq!(json["close_received_reason"], "bye");
    assert_eq!(json["close_sent_code"], 1000, "the echo");
    assert_eq!(
        (json["in_msgs"].clone(), json["in_bytes"].clone()),
        (1.into(), 5.into())
    );
    assert_eq!(
        (json["out_msgs"].clone(), json["out_bytes"].clone()),
        (1.into(), 2.into())
    );
    assert!(json["duration_ms"].is_u64(), "{line}");
    assert!(
        !line.contains("hello") && !line.contains(r#""hi""#),
        "no payload: {line}"
    );
}
