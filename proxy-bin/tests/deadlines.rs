//! HTTP deadlines through the real binary (issue 9): under `ulimit -n 1024`, 900 trickling
//! heads and 900 idle keep-alive connections do not keep a new `/health` or a new
//! daemon/app pair from working once the deadlines pass; a stalled TLS handshake is dropped
//! after `http.tls_handshake_timeout_ms`. Neither writes an error line.

mod common;

use common::{free_port, temp_dir, write_conf, Relay};
use pingora::tls::{
    install_default_crypto_provider, CertificateDer, ClientConfig, RootCertStore, ServerName,
    TlsConnector,
};
use relay_tests::{assert_relays_both_ways, read_response, sid, Endpoint};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Open-file limit (soft and hard) of the relay in the exhaustion test.
const RELAY_FILES: libc::rlim_t = 1024;
const TRICKLERS: usize = 900;
const IDLERS: usize = 900;
/// How long the whole crowd may take to be closed by the relay.
const CROWD_DEADLINE: Duration = Duration::from_secs(60);
const HEALTH_REQUEST: &[u8] = b"GET /health HTTP/1.1\r\nHost: relay\r\n\r\n";

fn local(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// Raises this process's soft open-file limit to its hard limit (the test opens ~1 900
/// sockets) and returns it.
fn raise_own_file_limit() -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by reference.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// `paseo_relay_request_timeouts_total` from the admin listener at `admin`.
async fn timeouts(admin: SocketAddr) -> u64 {
    let metrics = Endpoint { addr: admin }.get("/metrics", "").await;
    assert_eq!(metrics.status, 200);
    metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix("paseo_relay_request_timeouts_total "))
        .expect("the request timeouts counter")
        .parse()
        .expect("a count")
}

/// Reads until end of stream or a reset; returns what was read.
async fn read_to_eof(rd: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A client that trickles a head it never finishes (a byte every 300 ms) until the relay
/// answers and closes; returns the answer's status line.
async fn trickler(addr: SocketAddr) -> String {
    let tcp = TcpStream::connect(addr).await.expect("connect a trickler");
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let head = b"GET /health HTTP/1.1\r\nHost: relay\r\nX-Slow: ";
        for byte in head.iter().chain(std::iter::repeat(&b'a')).take(400) {
            if wr.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let got = read_to_eof(&mut rd).await;
    writer.abort();
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A client that sends one `GET /health`, reads the answer, then waits idle until the
/// relay closes; returns the status and the bytes that came after the answer.
async fn idler(addr: SocketAddr) -> (u16, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect an idler");
    tcp.write_all(HEALTH_REQUEST).await.expect("send");
    let status = read_response(&mut tcp).await.status;
    (status, read_to_eof(&mut tcp).await)
}

/// The log's lines at level ERROR.
fn error_lines(relay: &Relay) -> Vec<String> {
    relay
        .log()
        .lines()
        .filter(|l| l.contains(" ERROR "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_and_idle_crowds_do_not_starve_new_connections() {
    assert!(
        raise_own_file_limit() >= 4096,
        "the test needs 4096 open files"
    );
    let dir = temp_dir("deadlines-crowd");
    let (port, admin) = (free_port(), free_port());
    let conf = write_conf(
        &dir,
        &format!(
            "admin_listen: 127.0.0.1:{admin}\nhttp:\n  request_head_timeout_ms: 1000\n  \
             keepalive_timeout_ms: 1000\n"
        ),
    );
    let mut cmd = common::command();
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: RELAY_FILES,
                rlim_max: RELAY_FILES,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let listen = local(port).to_string();
    let relay = Relay::spawn_with(
        cmd,
        &dir,
        "relay.log",
        &["-c", conf.to_str().unwrap(), "--listen", &listen],
    );
    common::wait_listening(local(port));
    common::wait_listening(local(admin));
    assert!(
        relay
            .log()
            .contains(&format!("open-file limit: {RELAY_FILES}")),
        "{}",
        relay.log()
    );
    let before = timeouts(local(admin)).await;

    let started = Instant::now();
    let mut tricklers = JoinSet::new();
    let mut idlers = JoinSet::new();
    for _ in 0..TRICKLERS.max(IDLERS) {
        if tricklers.len() < TRICKLERS {
            tricklers.spawn(trickler(local(port)));
        }
        if idlers.len() < IDLERS {
            idlers.spawn(idler(local(port)));
        }
    }
    let crowd = tokio::time::timeout(CROWD_DEADLINE, async {
        let mut trickled = Vec::new();
        while let Some(status) = tricklers.join_next().await {
            trickled.push(status.expect("trickler task"));
        }
        let mut idled = Vec::new();
        while let Some(result) = idlers.join_next().await {
            idled.push(result.expect("idler task"));
        }
        (trickled, idled)
    })
    .await;
    let (trickled, idled) = crowd.unwrap_or_else(|_| {
        panic!(
            "the relay did not close the crowd within {CROWD_DEADLINE:?}; log:\n{}",
            relay.log()
        )
    });
    assert_eq!(trickled.len(), TRICKLERS);
    for status in &trickled {
        assert_eq!(status, "HTTP/1.1 408 Request Timeout");
    }
    assert_eq!(idled.len(), IDLERS);
    for (status, after) in &idled {
        assert_eq!((*status, after.as_slice()), (200, &b""[..]));
    }
    eprintln!(
        "{} trickling and {} idle connections closed in {:?}",
        TRICKLERS,
        IDLERS,
        started.elapsed()
    );

    // Every descriptor is back: a new /health and a new daemon/app pair work.
    let endpoint = Endpoint { addr: local(port) };
    let health = endpoint.get("/health", "").await;
    assert_eq!(
        (health.status, health.body.as_str()),
        (200, r#"{"status":"ok"}"#)
    );
    let server = sid("crowd");
    let (_c, mut k, mut d) = endpoint.paired(&server, "conn_1").await;
    assert_relays_both_ways(&mut k, &mut d).await;
    assert_eq!(
        timeouts(local(admin)).await,
        before + (TRICKLERS + IDLERS) as u64
    );

    // The only error lines are Pingora's own for accept() while out of descriptors.
    for line in error_lines(&relay) {
        assert!(
            line.contains("Accept() failed") && line.contains("Too many open files"),
            "{line}"
        );
    }
    assert!(!relay.log().contains("Fail to proxy"), "{}", relay.log());
}

/// A self-signed certificate for `localhost` written to `dir`; returns its DER.
fn write_pair(dir: &Path) -> CertificateDer<'static> {
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    std::fs::write(dir.join("cert.pem"), pair.cert.pem()).expect("write cert");
    std::fs::write(dir.join("key.pem"), pair.key_pair.serialize_pem()).expect("write key");
    CertificateDer::from(pair.cert.der().to_vec())
}

/// A TLS handshake with `addr` that trusts exactly `cert` (then dropped).
async fn tls_handshake(addr: SocketAddr, cert: &CertificateDer<'static>) -> std::io::Result<()> {
    install_default_crypto_provider();
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone()).expect("trust anchor");
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map(drop)
}

/// A TCP connection to a TLS listener that sends nothing is closed after the handshake
/// deadline, counted, and logged at debug only.
#[tokio::test]
async fn stalled_tls_handshake_is_dropped_without_an_error_line() {
    let dir = temp_dir("deadlines-tls");
    let cert = write_pair(&dir);
    let (port, admin) = (free_port(), free_port());
    let conf = write_conf(
        &dir,
        &format!("admin_listen: 127.0.0.1:{admin}\nhttp:\n  tls_handshake_timeout_ms: 1000\n"),
    );
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    let listen = local(port).to_string();
    let relay = Relay::spawn(
        &dir,
        "relay.log",
        &[
            "-c",
            conf.to_str().unwrap(),
            "--log-level",
            "debug",
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
            "--listen",
            &listen,
        ],
    );
    // Up when a real handshake succeeds (a bare TCP probe would itself be a stalled one).
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = tls_handshake(local(port), &cert).await {
        assert!(Instant::now() < deadline, "no TLS on {port}: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    common::wait_listening(local(admin));
    let before = timeouts(local(admin)).await;

    let mut tcp = TcpStream::connect(local(port)).await.expect("connect");
    let me = tcp.local_addr().unwrap();
    let connected = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(5), read_to_eof(&mut tcp))
        .await
        .expect("closed by the relay");
    let after = connected.elapsed();
    assert!(got.is_empty(), "{got:?}");
    assert!(
        after >= Duration::from_millis(950) && after < Duration::from_secs(3),
        "{after:?}"
    );
    assert_eq!(timeouts(local(admin)).await, before + 1);
    common::wait_until(Duration::from_secs(5), "the debug line", || {
        relay.log().contains(&format!(
            "TLS handshake from {me} not finished in time: dropped"
        ))
    });
    assert_eq!(error_lines(&relay), Vec::<String>::new());
}
