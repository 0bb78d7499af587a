//! Configuration through the real binary: which layer wins (flags > environment > file >
//! defaults) observed on real starts and with `-t`, Go-relay files, every bad configuration
//! (exit 1 before serving, one line on stderr), the shipped files, and two listeners sharing
//! one session table.

mod common;

use common::{command, free_port, temp_dir, wait_until, write_conf, Relay};
use relay_tests::{assert_relays_both_ways, recv_text, sid, Endpoint};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The reason given for the log level `loud`.
const LOUD: &str = "unknown log level `loud` (expected error, warn, info, debug, trace or off)";

fn local(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

fn s(path: &Path) -> String {
    path.display().to_string()
}

/// A `command()` with these environment variables set.
fn command_with(env: &[(&str, &str)]) -> Command {
    let mut cmd = command();
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

/// Runs the binary until it exits (20 s at most); returns its exit code and its stderr.
fn run_to_exit(env: &[(&str, &str)], dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!("run-{}.log", N.fetch_add(1, Ordering::Relaxed));
    let mut relay = Relay::spawn_with(command_with(env), dir, &name, args);
    let Some(status) = relay.wait_exit(Duration::from_secs(20)) else {
        panic!(
            "paseo-relay {args:?} with {env:?} still running after 20 s; log:\n{}",
            relay.log()
        );
    };
    (status.code(), relay.log())
}

/// Asserts that `-t` and a real start both exit 1 with exactly the one line
/// `paseo-relay: {want}`.
fn assert_rejected(env: &[(&str, &str)], dir: &Path, args: &[&str], want: &str) {
    let expected = (Some(1), format!("paseo-relay: {want}\n"));
    let mut tested = vec!["-t"];
    tested.extend_from_slice(args);
    assert_eq!(
        run_to_exit(env, dir, &tested),
        expected,
        "-t {args:?} with {env:?}"
    );
    assert_eq!(
        run_to_exit(env, dir, args),
        expected,
        "start {args:?} with {env:?}"
    );
}

/// Asserts that `-t` with `args` and `env` exits 0 with exactly the one line
/// `paseo-relay: configuration is valid ({shown})`.
fn assert_valid(env: &[(&str, &str)], dir: &Path, args: &[&str], shown: &str) {
    let mut tested = vec!["-t"];
    tested.extend_from_slice(args);
    assert_eq!(
        run_to_exit(env, dir, &tested),
        (
            Some(0),
            format!("paseo-relay: configuration is valid ({shown})\n")
        ),
        "-t {args:?} with {env:?}"
    );
}

/// Starts the binary and waits until `addr` accepts connections; panics with the log if the
/// process exits first.
fn start(
    env: &[(&str, &str)],
    dir: &Path,
    log_name: &str,
    args: &[&str],
    addr: SocketAddr,
) -> Relay {
    let mut relay = Relay::spawn_with(command_with(env), dir, log_name, args);
    wait_until(Duration::from_secs(20), "the relay to listen", || {
        if let Ok(Some(status)) = relay.child.try_wait() {
            panic!(
                "paseo-relay {args:?} exited with {status} before serving; log:\n{}",
                relay.log()
            );
        }
        TcpStream::connect(addr).is_ok()
    });
    relay
}

/// `GET /health` on `addr` answers exactly 200 `{"status":"ok"}` (application/json).
async fn assert_health(addr: SocketAddr) {
    let resp = Endpoint { addr }.get("/health", "").await;
    assert_eq!(
        (resp.status, resp.header("content-type"), resp.body.as_str()),
        (200, Some("application/json"), r#"{"status":"ok"}"#),
        "/health on {addr}"
    );
}

/// Nothing listens on `addr`: a connection is refused.
fn assert_refused(addr: SocketAddr) {
    match TcpStream::connect(addr) {
        Ok(_) => panic!("{addr} accepted a connection"),
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{addr}: {e}"
        ),
    }
}

/// Lines of `log` that announce the start (`paseo-relay starting on ...`), with what follows.
fn start_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            l.split_once("paseo-relay starting on ")
                .map(|(_, on)| on.to_string())
        })
        .collect()
}

/// A self-signed certificate for `localhost` written as `{name}.cert.pem` and
/// `{name}.key.pem` in `dir`; returns (cert path, key path).
fn write_pair(dir: &Path, name: &str) -> (String, String) {
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    let cert = dir.join(format!("{name}.cert.pem"));
    let key = dir.join(format!("{name}.key.pem"));
    std::fs::write(&cert, pair.cert.pem()).expect("write cert");
    std::fs::write(&key, pair.key_pair.serialize_pem()).expect("write key");
    (s(&cert), s(&key))
}

/// `--listen` beats `PASEO_LISTEN`, which beats the file's `listen`; the same for the log
/// level (seen as the INFO start line being there or not). Three real starts.
#[tokio::test]
async fn listen_and_log_level_precedence_on_real_starts() {
    let dir = temp_dir("config-precedence");
    let (a, b, c) = (free_port(), free_port(), free_port());
    let conf = write_conf(&dir, &format!("listen: 127.0.0.1:{a}\nlog_level: info\n"));
    let conf = s(&conf);
    let env_b = format!("127.0.0.1:{b}");
    let env = [
        ("PASEO_LISTEN", env_b.as_str()),
        ("PASEO_LOG_LEVEL", "error"),
    ];
    let flag_c = format!("127.0.0.1:{c}");

    // All three layers: the flags win.
    let relay = start(
        &env,
        &dir,
        "flags.log",
        &["-c", &conf, "--listen", &flag_c, "--log-level", "info"],
        local(c),
    );
    assert_health(local(c)).await;
    assert_refused(local(a));
    assert_refused(local(b));
    assert_eq!(start_lines(&relay.log()), [flag_c]);
    drop(relay);

    // No flags: the environment wins over the file (log level error: no INFO line).
    let relay = start(&env, &dir, "env.log", &["-c", &conf], local(b));
    assert_health(local(b)).await;
    assert_refused(local(a));
    assert_refused(local(c));
    assert_eq!(start_lines(&relay.log()), Vec::<String>::new());
    drop(relay);

    // Neither: the file.
    let relay = start(&[], &dir, "file.log", &["-c", &conf], local(a));
    assert_health(local(a)).await;
    assert_refused(local(b));
    assert_refused(local(c));
    assert_eq!(start_lines(&relay.log()), [format!("127.0.0.1:{a}")]);
}

/// `PASEO_CONFIG` names the file when no `-c/--conf/--config` is given; a flag replaces it
/// (the environment's file is then not read at all).
#[tokio::test]
async fn config_path_from_flag_or_environment() {
    let dir = temp_dir("config-path");
    let (dir_a, dir_b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let (a, b) = (free_port(), free_port());
    let conf_a = s(&write_conf(&dir_a, &format!("listen: 127.0.0.1:{a}\n")));
    let conf_b = s(&write_conf(&dir_b, &format!("listen: 127.0.0.1:{b}\n")));
    let bad = s(&dir.join("bad.yaml"));
    std::fs::write(&bad, "bogus: 1\n").unwrap();

    assert_valid(&[], &dir, &[], "no file");
    assert_valid(&[("PASEO_CONFIG", &conf_a)], &dir, &[], &conf_a);
    assert_rejected(
        &[("PASEO_CONFIG", &bad)],
        &dir,
        &[],
        &format!("{bad}: unknown key `bogus`"),
    );
    for flag in ["-c", "--conf", "--config"] {
        assert_valid(&[("PASEO_CONFIG", &bad)], &dir, &[flag, &conf_b], &conf_b);
    }

    let relay = start(&[("PASEO_CONFIG", &conf_a)], &dir, "env.log", &[], local(a));
    assert_health(local(a)).await;
    assert_refused(local(b));
    drop(relay);

    let _relay = start(
        &[("PASEO_CONFIG", &conf_a)],
        &dir,
        "flag.log",
        &["--config", &conf_b],
        local(b),
    );
    assert_health(local(b)).await;
    assert_refused(local(a));
}

/// A bad log level is reported from the layer that supplies it, and ignored when a higher
/// layer overrides it.
#[test]
fn log_level_precedence_and_errors_name_the_layer() {
    let dir = temp_dir("config-log-level");
    let loud = s(&write_conf(&dir, "log_level: loud\n"));
    let quiet_dir = dir.join("quiet");
    std::fs::create_dir_all(&quiet_dir).unwrap();
    let quiet = s(&write_conf(&quiet_dir, "log_level: warn\n"));

    // Flag over a bad environment and a bad file.
    assert_valid(
        &[("PASEO_LOG_LEVEL", "loud")],
        &dir,
        &["-c", &loud, "--log-level", "info"],
        &loud,
    );
    // Environment over a bad file; a bad environment over a good file.
    assert_valid(&[("PASEO_LOG_LEVEL", "debug")], &dir, &["-c", &loud], &loud);
    assert_rejected(
        &[("PASEO_LOG_LEVEL", "loud")],
        &dir,
        &["-c", &quiet],
        &format!("PASEO_LOG_LEVEL: {LOUD}"),
    );
    // A bad flag over a good environment.
    assert_rejected(
        &[("PASEO_LOG_LEVEL", "info")],
        &dir,
        &["--log-level", "loud"],
        &format!("--log-level: {LOUD}"),
    );
    // The file alone.
    assert_rejected(
        &[],
        &dir,
        &["-c", &loud],
        &format!("{loud}: log_level: {LOUD}"),
    );
    // Case does not matter; `off` is a level.
    assert_valid(
        &[("PASEO_LOG_LEVEL", "WARN")],
        &dir,
        &["-c", &quiet],
        &quiet,
    );
    assert_valid(&[], &dir, &["--log-level", "off"], "no file");
}

/// A Go relay's config file works unchanged: the relay starts on its `listen` and answers.
#[tokio::test]
async fn go_relay_config_file_works_unchanged() {
    let dir = temp_dir("config-go");
    let port = free_port();
    let path = s(&dir.join("config.yaml"));
    std::fs::write(
        &path,
        format!(
            "listen: \"0.0.0.0:{port}\"\nlog_level: \"info\"\ntls:\n  enabled: false\n  cert: \"\"\n  key: \"\"\n"
        ),
    )
    .unwrap();
    assert_valid(&[], &dir, &["-c", &path], &path);
    let relay = start(&[], &dir, "go.log", &["-c", &path], local(port));
    assert_health(local(port)).await;
    assert_eq!(start_lines(&relay.log()), [format!("0.0.0.0:{port}")]);
}

/// Bad files: unknown key, wrong type for a Pingora key, unreadable file.
#[test]
fn bad_config_files_exit_1_with_one_line() {
    let dir = temp_dir("config-bad-files");
    let listen = format!("127.0.0.1:{}", free_port());
    let unknown = s(&write_conf(&dir, "bogus: 1\n"));
    assert_rejected(
        &[],
        &dir,
        &["-c", &unknown, "--listen", &listen],
        &format!("{unknown}: unknown key `bogus`"),
    );

    let many = s(&dir.join("many.yaml"));
    std::fs::write(&many, "threads: many\n").unwrap();
    assert_rejected(
        &[],
        &dir,
        &["-c", &many, "--listen", &listen],
        &format!("{many}: threads: invalid type: string \"many\", expected usize"),
    );

    let missing = s(&dir.join("missing.yaml"));
    assert_rejected(
        &[],
        &dir,
        &["-c", &missing, "--listen", &listen],
        &format!("{missing}: cannot read: No such file or directory (os error 2)"),
    );
    assert_rejected(
        &[("PASEO_CONFIG", &missing)],
        &dir,
        &["--listen", &listen],
        &format!("{missing}: cannot read: No such file or directory (os error 2)"),
    );
    let a_dir = s(&dir);
    assert_rejected(
        &[],
        &dir,
        &["-c", &a_dir, "--listen", &listen],
        &format!("{a_dir}: cannot read: Is a directory (os error 21)"),
    );
}

/// Bad listen addresses from each layer, and an address given twice.
#[test]
fn bad_listen_addresses_exit_1_with_one_line() {
    let dir = temp_dir("config-bad-listen");
    let syntax = "not an IP:port address (invalid socket address syntax)";
    assert_rejected(
        &[],
        &dir,
        &["--listen", "localhost"],
        &format!("--listen localhost: {syntax}"),
    );
    assert_rejected(
        &[("PASEO_LISTEN", "127.0.0.1:99999")],
        &dir,
        &[],
        &format!("PASEO_LISTEN 127.0.0.1:99999: {syntax}"),
    );
    let conf = s(&write_conf(&dir, "listen: relay.example:80\n"));
    assert_rejected(
        &[],
        &dir,
        &["-c", &conf],
        &format!("{conf}: listen relay.example:80: {syntax}"),
    );

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    assert_rejected(
        &[],
        &dir,
        &["--listen", &addr, "--listen", &addr],
        &format!("--listen {addr}: address given twice"),
    );
    // `:PORT` is 0.0.0.0:PORT, and `tcp://` names the same address.
    let (short, long) = (format!(":{port}"), format!("tcp://0.0.0.0:{port}"));
    assert_rejected(
        &[],
        &dir,
        &["--listen", &short, "--listen", &long],
        &format!("--listen {long}: address given twice"),
    );
    let twice = format!("{addr},{addr}");
    assert_rejected(
        &[("PASEO_LISTEN", &twice)],
        &dir,
        &[],
        &format!("PASEO_LISTEN {addr}: address given twice"),
    );
    let tls = format!("tls://{addr}");
    assert_rejected(
        &[],
        &dir,
        &["--listen", &tls],
        &format!("--listen {tls}: TLS asked for, but no certificate and key are set"),
    );
}

/// A certificate without a key and a key without a certificate, from each layer, and
/// `tls.enabled: true` without files.
#[test]
fn incomplete_tls_settings_exit_1_with_one_line() {
    let dir = temp_dir("config-bad-tls-pairing");
    let (cert, key) = write_pair(&dir, "good");
    let listen = format!("127.0.0.1:{}", free_port());
    let needs_key = "a TLS certificate needs a key (--tls-key, PASEO_TLS_KEY or tls.key)";
    let needs_cert = "a TLS key needs a certificate (--tls-cert, PASEO_TLS_CERT or tls.cert)";

    assert_rejected(
        &[],
        &dir,
        &["--tls-cert", &cert, "--listen", &listen],
        &format!("--tls-cert: {needs_key}"),
    );
    assert_rejected(
        &[("PASEO_TLS_CERT", &cert)],
        &dir,
        &["--listen", &listen],
        &format!("PASEO_TLS_CERT: {needs_key}"),
    );
    let conf = s(&write_conf(&dir, &format!("tls:\n  cert: {cert}\n")));
    assert_rejected(
        &[],
        &dir,
        &["-c", &conf, "--listen", &listen],
        &format!("{conf}: tls.cert: {needs_key}"),
    );

    assert_rejected(
        &[],
        &dir,
        &["--tls-key", &key, "--listen", &listen],
        &format!("--tls-key: {needs_cert}"),
    );
    assert_rejected(
        &[("PASEO_TLS_KEY", &key)],
        &dir,
        &["--listen", &listen],
        &format!("PASEO_TLS_KEY: {needs_cert}"),
    );
    let conf = s(&write_conf(&dir, &format!("tls:\n  key: {key}\n")));
    assert_rejected(
        &[],
        &dir,
        &["-c", &conf, "--listen", &listen],
        &format!("{conf}: tls.key: {needs_cert}"),
    );

    let enabled = "tls.enabled: TLS is enabled but no certificate and key are set";
    let conf = s(&write_conf(&dir, "tls:\n  enabled: true\n"));
    assert_rejected(
        &[],
        &dir,
        &["-c", &conf, "--listen", &listen],
        &format!("{conf}: {enabled}"),
    );
    // As a Go relay writes it: empty strings are unset.
    let conf = s(&write_conf(
        &dir,
        "tls:\n  enabled: true\n  cert: \"\"\n  key: \"\"\n",
    ));
    assert_rejected(
        &[],
        &dir,
        &["-c", &conf, "--listen", &listen],
        &format!("{conf}: {enabled}"),
    );
}

/// Unreadable, mismatched and non-PEM certificate and key files.
#[test]
fn bad_tls_files_exit_1_with_one_line() {
    let dir = temp_dir("config-bad-tls-files");
    let (cert, key) = write_pair(&dir, "one");
    let (_, other_key) = write_pair(&dir, "two");
    let listen = format!("127.0.0.1:{}", free_port());
    let missing = s(&dir.join("missing.pem"));
    let garbage = s(&dir.join("garbage.pem"));
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let tls = |c: &str, k: &str| -> Vec<String> {
        ["--tls-cert", c, "--tls-key", k, "--listen", &listen]
            .map(str::to_string)
            .to_vec()
    };
    let cases = [
        (
            tls(&missing, &key),
            format!("{missing}: cannot read: No such file or directory (os error 2)"),
        ),
        (
            tls(&cert, &missing),
            format!("{missing}: cannot read: No such file or directory (os error 2)"),
        ),
        (
            tls(&cert, &other_key),
            format!("{other_key}: the private key does not match the certificate in {cert}"),
        ),
        (
            tls(&garbage, &key),
            format!("{garbage}: no PEM certificate in the file"),
        ),
        (
            tls(&cert, &garbage),
            format!("{garbage}: no PEM private key in the file"),
        ),
        // The two files swapped.
        (
            tls(&key, &cert),
            format!("{key}: no PEM certificate in the file"),
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_rejected(&[], &dir, &args, &want);
    }
    // The same files through the environment and the file name the files too.
    assert_rejected(
        &[("PASEO_TLS_CERT", &cert), ("PASEO_TLS_KEY", &other_key)],
        &dir,
        &["--listen", &listen],
        &format!("{other_key}: the private key does not match the certificate in {cert}"),
    );
    let conf = s(&write_conf(
        &dir,
        &format!("tls:\n  enabled: true\n  cert: {garbage}\n  key: {key}\n"),
    ));
    assert_rejected(
        &[],
        &dir,
        &["-c", &conf, "--listen", &listen],
        &format!("{garbage}: no PEM certificate in the file"),
    );
}

/// `-t` on a good configuration with TLS files: one line naming the file, exit 0.
#[test]
fn test_flag_accepts_a_good_tls_config() {
    let dir = temp_dir("config-good-tls");
    let (cert, key) = write_pair(&dir, "good");
    let conf = s(&write_conf(
        &dir,
        &format!(
            "listen:\n  - 127.0.0.1:{}\n  - tcp://127.0.0.1:{}\nlog_level: debug\ntls:\n  enabled: true\n  cert: {cert}\n  key: {key}\n",
            free_port(),
            free_port()
        ),
    ));
    assert_valid(&[], &dir, &["-c", &conf], &conf);
    assert_valid(
        &[("PASEO_TLS_CERT", &cert), ("PASEO_TLS_KEY", &key)],
        &dir,
        &[],
        "no file",
    );
    assert_valid(
        &[],
        &dir,
        &["--tls-cert", &cert, "--tls-key", &key],
        "no file",
    );
}

/// Every shipped file in `conf/` passes `-t`.
#[test]
fn shipped_config_files_pass_the_test_flag() {
    let dir = temp_dir("config-shipped");
    let conf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
    let mut files: Vec<String> = std::fs::read_dir(&conf_dir)
        .expect("conf/")
        .map(|e| s(&e.expect("conf/ entry").path()))
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "conf/*.yaml: {files:?}");
    for file in &files {
        assert_valid(&[], &dir, &["-c", file], file);
    }
}

/// Two listeners share one session table: a daemon on A and an app on B pair up.
#[tokio::test]
async fn two_listeners_share_one_session_table() {
    let dir = temp_dir("config-two-listeners");
    let conf = s(&write_conf(&dir, ""));
    let (a, b) = (local(free_port()), local(free_port()));
    let (la, lb) = (a.to_string(), b.to_string());
    let relay = start(
        &[],
        &dir,
        "relay.log",
        &[
            "-c",
            &conf,
            "--listen",
            &la,
            "--listen",
            &lb,
            "--log-level",
            "info",
        ],
        a,
    );
    common::wait_listening(b);
    assert_eq!(start_lines(&relay.log()), [format!("{la}, {lb}")]);
    assert_health(a).await;
    assert_health(b).await;

    let (on_a, on_b) = (Endpoint { addr: a }, Endpoint { addr: b });
    let server = sid("two_listeners");
    let (mut control, sync) = on_a.control_synced(&server).await;
    assert_eq!(sync, r#"{"type":"sync","connectionIds":[]}"#);
    let mut client = on_b.client(&server, "x1").await;
    let mut data = on_a.data(&server, "x1").await;
    assert_eq!(
        recv_text(&mut control).await,
        r#"{"type":"connected","connectionId":"x1"}"#
    );
    assert_relays_both_ways(&mut client, &mut data).await;

    // And the other way round: a daemon on B, its app on A.
    let other = sid("two_listeners_rev");
    let (mut control, sync) = on_b.control_synced(&other).await;
    assert_eq!(sync, r#"{"type":"sync","connectionIds":[]}"#);
    let mut client = on_a.client(&other, "y1").await;
    let mut data = on_b.data(&other, "y1").await;
    assert_eq!(
        recv_text(&mut control).await,
        r#"{"type":"connected","connectionId":"y1"}"#
    );
    assert_relays_both_ways(&mut client, &mut data).await;
}
