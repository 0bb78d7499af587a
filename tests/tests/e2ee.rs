//! End to end through the relay: a Paseo daemon (control socket, one data socket per
//! connectionId learnt from `sync` / `connected`, relay-protocol.md §4.1-§4.2) and a Paseo app
//! (client socket without connectionId, §4.3) run Paseo's E2EE handshake (`e2ee_hello` resent
//! every 1 s until `e2ee_ready`, §4.4) and then exchange NaCl box bundles
//! `[24-byte nonce][ciphertext + MAC]` as base64 text frames and raw binary frames in both
//! directions, 16 MiB plaintexts included. Each side decrypts what the other sent and checks
//! the bytes and the frame kind. Run once with the daemon first and once with the app first
//! (hellos buffered by the relay until the data socket attaches, §3.7).

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use crypto_box::aead::rand_core::RngCore;
use crypto_box::aead::{Aead, AeadCore, OsRng};
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use relay_tests::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

/// The daemon's answer to a hello (§4.4), 21 bytes.
const READY: &str = r#"{"type":"e2ee_ready"}"#;
/// The app's hello resend interval (encrypted-channel.ts:131-138).
const HELLO_EVERY: Duration = Duration::from_secs(1);
/// Size of the large plaintexts.
const BIG: usize = 16 << 20;
/// Deadline for any one frame to arrive, or to be written, once the exchange runs: a 16 MiB
/// frame through a debug-build relay on a loaded 2-core machine. (Sealing happens before the
/// sockets open and decrypting between waits, so crypto time is not counted.)
const FRAME_WITHIN: Duration = Duration::from_secs(20);
/// Deadline for the handshake (hello until ready).
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(15);
/// Deadline for a whole scenario and for control-socket silences while data flows.
const SCENARIO_WITHIN: Duration = Duration::from_secs(240);
/// Client-side limits: above the relay's 32 MiB so that the relay's limit is what applies.
const CLIENT_MAX_MESSAGE: usize = 64 << 20;

type Sink = SplitSink<Ws, Message>;
type Stream = SplitStream<Ws>;
type Out = mpsc::UnboundedSender<Message>;

/// One application message: its plaintext and whether it travels as a binary frame (raw
/// bundle) or a text frame (base64 bundle).
struct Payload {
    binary: bool,
    plain: Vec<u8>,
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    OsRng.fill_bytes(&mut v);
    v
}

/// Size of the medium plaintexts.
const MEDIUM: usize = 1 << 20;

/// What one side sends after the handshake: small and empty messages of both kinds, a 1 MiB
/// and a 16 MiB random plaintext, then a small text to check the order after the big one.
/// The daemon sends its 16 MiB as text (a base64 frame of 22,369,676 bytes, like a mirror
/// daemon's file read) and 1 MiB as binary; the app sends 16 MiB as binary (16 MiB + 40
/// bytes, like an upload) and 1 MiB as text. (XSalsa20-Poly1305 costs about 3 s per 16 MiB
/// in a debug build, so one 16 MiB message each way.)
fn payloads(side: &str, big_binary: bool) -> Arc<Vec<Payload>> {
    let text = |s: String| Payload {
        binary: false,
        plain: s.into_bytes(),
    };
    Arc::new(vec![
        text(format!(
            r#"{{"type":"session","message":{{"type":"hello_from","side":"{side}"}}}}"#
        )),
        Payload {
            binary: true,
            plain: random_bytes(1000),
        },
        Payload {
            binary: true,
            plain: Vec::new(),
        },
        Payload {
            binary: false,
            plain: Vec::new(),
        },
        Payload {
            binary: !big_binary,
            plain: random_bytes(MEDIUM),
        },
        Payload {
            binary: big_binary,
            plain: random_bytes(BIG),
        },
        text(format!("{side} done")),
    ])
}

/// Encrypts `plain` into a bundle `[nonce][ciphertext]`, as a binary frame or base64 text.
fn seal(cipher: &SalsaBox, payload: &Payload) -> Message {
    let nonce = SalsaBox::generate_nonce(&mut OsRng);
    let ct = cipher
        .encrypt(&nonce, payload.plain.as_slice())
        .expect("encrypt");
    let mut bundle = Vec::with_capacity(nonce.len() + ct.len());
    bundle.extend_from_slice(&nonce);
    bundle.extend_from_slice(&ct);
    assert_eq!(bundle.len(), payload.plain.len() + 40);
    if payload.binary {
        Message::binary(bundle)
    } else {
        Message::text(B64.encode(&bundle))
    }
}

/// Decrypts a bundle `[nonce][ciphertext]`.
fn open(cipher: &SalsaBox, bundle: &[u8], what: &str) -> Vec<u8> {
    assert!(
        bundle.len() >= 40,
        "{what}: bundle of {} bytes is too short",
        bundle.len()
    );
    let (nonce, ct) = bundle.split_at(24);
    cipher
        .decrypt(crypto_box::Nonce::from_slice(nonce), ct)
        .unwrap_or_else(|_| panic!("{what}: decryption failed ({} byte bundle)", bundle.len()))
}

/// The app's hello for `key` (mirror format, §4.4), 74 bytes.
fn hello_for(key: &PublicKey) -> String {
    format!(
        r#"{{"type":"e2ee_hello","key":"{}"}}"#,
        B64.encode(key.as_bytes())
    )
}

fn is_assigned_id(id: &str) -> bool {
    id.len() == 21
        && id.starts_with("conn_")
        && id[5..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Opens a WebSocket with limits that let 16 MiB ciphertexts (base64 ~22.4 MB) through.
async fn connect(base: &str, query: &str) -> Ws {
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(CLIENT_MAX_MESSAGE))
        .max_frame_size(Some(CLIENT_MAX_MESSAGE));
    let url = format!("{base}{query}");
    let (ws, resp) = tokio::time::timeout(
        WITHIN,
        tokio_tungstenite::connect_async_with_config(url, Some(cfg), false),
    )
    .await
    .unwrap_or_else(|_| panic!("connect {query}: no 101 within {WITHIN:?}"))
    .unwrap_or_else(|e| panic!("connect {query}: {e}"));
    assert_eq!(resp.status(), 101, "{query}");
    ws
}

/// Splits `ws` and gives its sink to a writer task fed by the returned channel, so that one
/// side can answer handshake frames while it streams its own messages.
fn split(ws: Ws, who: &'static str) -> (Out, Stream, JoinHandle<()>) {
    let (mut sink, stream): (Sink, Stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let desc = describe(&m);
            tokio::time::timeout(FRAME_WITHIN, sink.send(m))
                .await
                .unwrap_or_else(|_| panic!("{who}: sending {desc} took over {FRAME_WITHIN:?}"))
                .unwrap_or_else(|e| panic!("{who}: sending {desc}: {e}"));
        }
    });
    (tx, stream, writer)
}

fn describe(m: &Message) -> String {
    match m {
        Message::Text(t) if t.len() <= 80 => format!("text {:?}", t.as_str()),
        Message::Text(t) => format!("text of {} bytes", t.len()),
        Message::Binary(b) => format!("binary of {} bytes", b.len()),
        other => format!("{other:?}"),
    }
}

/// The next data or close message on a split stream, skipping pings and pongs.
async fn next_frame(rx: &mut Stream, within: Duration, who: &str, waiting_for: &str) -> Message {
    tokio::time::timeout(within, async {
        loop {
            match rx.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return m,
                Some(Err(e)) => panic!("{who}: socket error while waiting for {waiting_for}: {e}"),
                None => panic!("{who}: socket ended while waiting for {waiting_for}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{who}: no {waiting_for} within {within:?}"))
}

/// [`check_payload`], then logs how long the message took to arrive (since `waiting`) and to
/// check.
fn check_and_log(cipher: &SalsaBox, m: Message, want: &Payload, what: &str, waiting: Instant) {
    let t = Instant::now();
    let desc = describe(&m);
    check_payload(cipher, m, want, what);
    log::info!(
        "{what}: {desc} arrived after {:.1?}, checked in {:.1?}",
        t - waiting,
        t.elapsed()
    );
}

/// Checks that `m` is the ciphertext of `want` (frame kind and plaintext bytes).
fn check_payload(cipher: &SalsaBox, m: Message, want: &Payload, what: &str) {
    let plain = match (m, want.binary) {
        (Message::Binary(b), true) => open(cipher, &b, what),
        (Message::Text(t), false) => {
            let bundle = B64
                .decode(t.as_str())
                .unwrap_or_else(|e| panic!("{what}: text frame is not base64: {e}"));
            open(cipher, &bundle, what)
        }
        (other, binary) => panic!(
            "{what}: expected a {} frame, got {}",
            if binary { "binary" } else { "text" },
            describe(&other)
        ),
    };
    assert_eq!(plain.len(), want.plain.len(), "{what}: plaintext length");
    assert!(plain == want.plain, "{what}: plaintext bytes differ");
}

/// What the app knows: where the relay is, its key pair, the daemon's public key (from
/// pairing), its sealed messages and the plaintexts it expects from the daemon.
struct App {
    base: String,
    server_id: String,
    secret: SecretKey,
    daemon_public: PublicKey,
    mine: Arc<Vec<Message>>,
    theirs: Arc<Vec<Payload>>,
}

/// What the app observed.
struct AppReport {
    hellos_sent: usize,
    readies: usize,
}

/// The app: client socket without connectionId, hello every 1 s until ready, then sends the
/// sealed `mine` while receiving and decrypting `theirs`; closes 1000 `Client closed` once
/// `close_now` fires.
async fn run_app(
    app: App,
    hellos: watch::Sender<usize>,
    close_now: oneshot::Receiver<()>,
) -> AppReport {
    const WHO: &str = "app";
    let App {
        base,
        server_id,
        secret: app_secret,
        daemon_public,
        mine,
        theirs,
    } = app;
    let ws = connect(&base, &format!("serverId={server_id}&role=client&v=2")).await;
    let (tx, mut rx, writer) = split(ws, WHO);
    let hello = hello_for(&app_secret.public_key());

    // Handshake: hello now and every second until the daemon's ready.
    let started = Instant::now();
    let mut hellos_sent = 0;
    let mut tick = tokio::time::interval(HELLO_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                assert!(started.elapsed() < HANDSHAKE_WITHIN, "app: no e2ee_ready within {HANDSHAKE_WITHIN:?}");
                tx.send(Message::text(hello.clone())).expect("app writer");
                hellos_sent += 1;
                hellos.send_replace(hellos_sent);
            }
            m = next_frame(&mut rx, HANDSHAKE_WITHIN, WHO, "e2ee_ready") => match m {
                Message::Text(t) if t.as_str() == READY => break,
                other => panic!("app: expected {READY} during the handshake, got {}", describe(&other)),
            }
        }
    }
    let mut readies = 1;
    let cipher = SalsaBox::new(&daemon_public, &app_secret);

    // Stream our messages while receiving the daemon's; more ready frames may come (one per
    // hello the daemon saw).
    for m in mine.iter() {
        tx.send(m.clone()).expect("app writer");
    }
    for (i, want) in theirs.iter().enumerate() {
        let what = format!("app: daemon message {i}");
        let waiting = Instant::now();
        loop {
            match next_frame(&mut rx, FRAME_WITHIN, WHO, &what).await {
                Message::Text(t) if t.as_str() == READY => readies += 1,
                m => {
                    check_and_log(&cipher, m, want, &what, waiting);
                    break;
                }
            }
        }
    }

    // Everything received both ways: close like the app does, and see the close echoed.
    tokio::time::timeout(SCENARIO_WITHIN, close_now)
        .await
        .expect("app: close signal in time")
        .expect("app: close signal");
    tx.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "Client closed".into(),
    })))
    .expect("app writer");
    loop {
        match next_frame(&mut rx, WITHIN, WHO, "the close echo").await {
            Message::Text(t) if t.as_str() == READY => readies += 1,
            Message::Close(f) => {
                let code = f.map(|f| u16::from(f.code));
                assert_eq!(code, Some(1000), "app: close echo code");
                break;
            }
            other => panic!("app: unexpected {} after all messages", describe(&other)),
        }
    }
    drop(tx);
    tokio::time::timeout(WITHIN, writer)
        .await
        .expect("app writer ends")
        .expect("app writer");
    AppReport {
        hellos_sent,
        readies,
    }
}

/// What the daemon's data socket for one connectionId observed.
struct DataReport {
    id: String,
    hellos: usize,
}

/// The daemon's data socket for `id`: answers every hello with ready (the first derives the
/// box from the app's key), then sends the sealed `mine` (made for the key of
/// `expected_hello`) while receiving and decrypting `theirs`, reports on `all_received`, and
/// expects the relay's 1001 `Client disconnected` once the app leaves.
async fn run_data(d: Arc<Daemon>, id: String) -> DataReport {
    const WHO: &str = "daemon data";
    let Daemon {
        base,
        server_id,
        secret: daemon_secret,
        expected_hello,
        mine,
        theirs,
        all_received,
    } = &*d;
    let ws = connect(
        base,
        &format!("serverId={server_id}&role=server&v=2&connectionId={id}"),
    )
    .await;
    let (tx, mut rx, writer) = split(ws, WHO);

    // Answers a hello with ready; returns the app's public key from it.
    let answer_hello = |t: &str| -> PublicKey {
        assert_eq!(t, expected_hello, "daemon: hello bytes");
        let v: serde_json::Value = serde_json::from_str(t).expect("hello is JSON");
        assert_eq!(v["type"], "e2ee_hello");
        let key = B64
            .decode(v["key"].as_str().expect("hello key"))
            .expect("hello key is base64");
        tx.send(Message::text(READY)).expect("daemon writer");
        PublicKey::from_slice(&key).expect("32-byte key")
    };

    let app_public = match next_frame(&mut rx, HANDSHAKE_WITHIN, WHO, "e2ee_hello").await {
        Message::Text(t) => answer_hello(t.as_str()),
        other => panic!(
            "daemon: expected a text e2ee_hello, got {}",
            describe(&other)
        ),
    };
    let mut hellos = 1;
    let cipher = SalsaBox::new(&app_public, daemon_secret);

    for m in mine.iter() {
        tx.send(m.clone()).expect("daemon writer");
    }
    for (i, want) in theirs.iter().enumerate() {
        let what = format!("daemon: app message {i}");
        let waiting = Instant::now();
        loop {
            match next_frame(&mut rx, FRAME_WITHIN, WHO, &what).await {
                // A resent hello (same key): answered with ready again, as the real daemon does.
                Message::Text(t) if t.as_str().starts_with('{') => {
                    assert_eq!(
                        answer_hello(t.as_str()),
                        app_public,
                        "daemon: hello key changed"
                    );
                    hellos += 1;
                }
                m => {
                    check_and_log(&cipher, m, want, &what, waiting);
                    break;
                }
            }
        }
    }
    all_received.send(id.clone()).expect("report all received");

    // The app closes; the relay closes this data socket 1001 `Client disconnected`.
    match next_frame(&mut rx, SCENARIO_WITHIN, WHO, "the relay's close").await {
        Message::Close(Some(f)) => assert_eq!(
            (u16::from(f.code), f.reason.as_str()),
            (1001, "Client disconnected"),
            "daemon: data socket close"
        ),
        other => panic!(
            "daemon: expected the relay's close, got {}",
            describe(&other)
        ),
    }
    // Drain until the close handshake completes (the reply goes out on this poll).
    let _ = tokio::time::timeout(WITHIN, async { while rx.next().await.is_some() {} }).await;
    drop(tx);
    tokio::time::timeout(WITHIN, writer)
        .await
        .expect("daemon writer ends")
        .expect("daemon writer");
    DataReport { id, hellos }
}

/// What the daemon's control socket observed.
struct DaemonReport {
    control_frames: Vec<String>,
    data: Vec<DataReport>,
}

/// Everything the daemon needs to open data sockets.
struct Daemon {
    base: String,
    server_id: String,
    secret: SecretKey,
    expected_hello: String,
    mine: Arc<Vec<Message>>,
    theirs: Arc<Vec<Payload>>,
    all_received: mpsc::UnboundedSender<String>,
}

/// The daemon's control loop (relay-transport.ts:273-311): `sync` and `connected` open a data
/// socket per id not yet open; `disconnected` forgets it. Returns once every data socket it
/// opened has ended after its `disconnected`; `seen` holds frames already read (the sync).
async fn run_daemon(d: Arc<Daemon>, mut control: Ws, mut seen: Vec<String>) -> DaemonReport {
    let mut open: HashMap<String, JoinHandle<DataReport>> = HashMap::new();
    let mut data = Vec::new();
    let mut pending: Vec<String> = seen.clone();
    loop {
        for text in pending.drain(..) {
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("control {text}: {e}"));
            let ids: Vec<String> = match v["type"].as_str() {
                Some("sync") => v["connectionIds"]
                    .as_array()
                    .unwrap_or_else(|| panic!("sync without an array: {text}"))
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_string))
                    .collect(),
                Some("connected") => vec![v["connectionId"].as_str().unwrap().to_string()],
                Some("disconnected") => {
                    let id = v["connectionId"].as_str().unwrap();
                    if let Some(task) = open.remove(id) {
                        let report = tokio::time::timeout(SCENARIO_WITHIN, task)
                            .await
                            .expect("data socket task ends")
                            .expect("data socket task");
                        data.push(report);
                    }
                    vec![]
                }
                _ => vec![],
            };
            for id in ids {
                if open.contains_key(&id) {
                    continue;
                }
                let task = tokio::spawn(run_data(d.clone(), id.clone()));
                open.insert(id, task);
            }
        }
        if open.is_empty() && !data.is_empty() {
            break;
        }
        match recv_within(&mut control, SCENARIO_WITHIN).await {
            Message::Text(t) => {
                seen.push(t.to_string());
                pending.push(t.to_string());
            }
            other => panic!("control: unexpected {}", describe(&other)),
        }
    }
    // Daemon stop: close() without a code (§4.1).
    control
        .send(Message::Close(None))
        .await
        .expect("control close");
    let _ = tokio::time::timeout(WITHIN, async { while control.next().await.is_some() {} }).await;
    DaemonReport {
        control_frames: seen,
        data,
    }
}

/// Seals every payload (on a blocking thread: seconds of CPU in a debug build).
async fn seal_all(cipher: SalsaBox, payloads: Arc<Vec<Payload>>) -> Arc<Vec<Message>> {
    let sealed = tokio::task::spawn_blocking(move || {
        payloads
            .iter()
            .map(|p| seal(&cipher, p))
            .collect::<Vec<_>>()
    });
    Arc::new(sealed.await.expect("sealing"))
}

async fn scenario(daemon_first: bool) {
    let relay = TestRelay::start().await;
    let server_id = sid(if daemon_first {
        "e2ee_daemon_first"
    } else {
        "e2ee_app_first"
    });
    let base = relay.url("");
    let app_secret = SecretKey::generate(&mut OsRng);
    let daemon_secret = SecretKey::generate(&mut OsRng);
    let daemon_public = daemon_secret.public_key();
    let hello = hello_for(&app_secret.public_key());
    assert_eq!(hello.len(), 74);
    let from_app = payloads("app", true);
    let from_daemon = payloads("daemon", false);
    // Both sides' ciphertexts are made before any socket opens, so that the deadlines below
    // time the relay and not XSalsa20-Poly1305 in a debug build (seconds per 16 MiB, tens of
    // seconds when the machine is busy). The app knows the daemon's key from pairing; the
    // daemon's are sealed for the key the app's hello will carry, and the daemon sends them
    // only after receiving exactly that hello; each side decrypts with the box it derives
    // from the handshake.
    let sealing = Instant::now();
    let (app_sealed, daemon_sealed) = tokio::join!(
        seal_all(SalsaBox::new(&daemon_public, &app_secret), from_app.clone()),
        seal_all(
            SalsaBox::new(&app_secret.public_key(), &daemon_secret),
            from_daemon.clone()
        ),
    );
    log::info!("sealed both sides in {:.1?}", sealing.elapsed());
    let started = Instant::now();
    let (all_tx, mut all_rx) = mpsc::unbounded_channel();
    let daemon = Arc::new(Daemon {
        base: base.clone(),
        server_id: server_id.clone(),
        secret: daemon_secret,
        expected_hello: hello.clone(),
        mine: daemon_sealed,
        theirs: from_app.clone(),
        all_received: all_tx,
    });
    let (hellos_tx, mut hellos_rx) = watch::channel(0usize);
    let (close_tx, close_rx) = oneshot::channel();
    let start_app = || {
        let app = App {
            base: base.clone(),
            server_id: server_id.clone(),
            secret: app_secret.clone(),
            daemon_public: daemon_public.clone(),
            mine: app_sealed,
            theirs: from_daemon.clone(),
        };
        tokio::spawn(run_app(app, hellos_tx, close_rx))
    };

    let (daemon_task, app_task, buffered_hellos) = if daemon_first {
        // Control first: the initial sync is empty; the app's id comes with `connected`.
        let mut control = connect(&base, &format!("serverId={server_id}&role=server&v=2")).await;
        let sync = recv_text(&mut control).await;
        assert_eq!(sync, r#"{"type":"sync","connectionIds":[]}"#);
        let daemon_task = tokio::spawn(run_daemon(daemon, control, vec![sync]));
        (daemon_task, start_app(), 0)
    } else {
        // App first: wait until at least two hellos sit in the relay's buffer, then start
        // the daemon, which learns the id from the initial sync.
        let app_task = start_app();
        tokio::time::timeout(Duration::from_secs(10), hellos_rx.wait_for(|n| *n >= 2))
            .await
            .expect("app sent two hellos")
            .expect("app alive");
        let deadline = Instant::now() + Duration::from_secs(5);
        let buffered = loop {
            let bytes = relay.hub.buffered_bytes();
            if bytes >= 2 * hello.len() {
                break bytes;
            }
            assert!(
                Instant::now() < deadline,
                "relay buffered {bytes} bytes, expected two hellos of {}",
                hello.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(buffered % hello.len(), 0, "only hellos are buffered");
        let control = connect(&base, &format!("serverId={server_id}&role=server&v=2")).await;
        let daemon_task = tokio::spawn(run_daemon(daemon, control, vec![]));
        (daemon_task, app_task, buffered / hello.len())
    };

    // Once the daemon has everything the app sent (and the app everything the daemon sent,
    // checked inside run_app before it closes), the app leaves.
    let id = tokio::time::timeout(SCENARIO_WITHIN, all_rx.recv())
        .await
        .expect("daemon received all app messages in time")
        .expect("daemon alive");
    close_tx.send(()).expect("app alive");
    let app = tokio::time::timeout(SCENARIO_WITHIN, app_task)
        .await
        .expect("app finishes")
        .expect("app task");
    let daemon = tokio::time::timeout(SCENARIO_WITHIN, daemon_task)
        .await
        .expect("daemon finishes")
        .expect("daemon task");

    // The daemon learnt exactly one relay-assigned id, through sync or connected, and saw
    // it disconnect.
    assert!(is_assigned_id(&id), "assigned connectionId {id:?}");
    let expected_control = if daemon_first {
        vec![
            r#"{"type":"sync","connectionIds":[]}"#.to_string(),
            format!(r#"{{"type":"connected","connectionId":"{id}"}}"#),
            format!(r#"{{"type":"disconnected","connectionId":"{id}"}}"#),
        ]
    } else {
        vec![
            format!(r#"{{"type":"sync","connectionIds":["{id}"]}}"#),
            format!(r#"{{"type":"disconnected","connectionId":"{id}"}}"#),
        ]
    };
    assert_eq!(daemon.control_frames, expected_control);
    assert_eq!(daemon.data.len(), 1);
    assert_eq!(daemon.data[0].id, id);

    // Every hello reached the daemon exactly once, in order before the ciphertexts; the
    // ones buffered while no data socket existed included.
    assert_eq!(daemon.data[0].hellos, app.hellos_sent, "hellos delivered");
    assert!(app.hellos_sent >= buffered_hellos.max(1));
    if !daemon_first {
        assert!(buffered_hellos >= 2);
    }
    assert!(
        (1..=app.hellos_sent).contains(&app.readies),
        "app saw {} readies for {} hellos",
        app.readies,
        app.hellos_sent
    );
    assert_eq!(relay.hub.buffered_bytes(), 0, "buffer released");
    eprintln!(
        "e2ee {}: {} hellos ({} buffered before the daemon), {} readies seen, {:.1?}",
        if daemon_first {
            "daemon first"
        } else {
            "app first"
        },
        app.hellos_sent,
        buffered_hellos,
        app.readies,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2ee_daemon_first() {
    tokio::time::timeout(SCENARIO_WITHIN, scenario(true))
        .await
        .expect("scenario within its deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2ee_app_first() {
    tokio::time::timeout(SCENARIO_WITHIN, scenario(false))
        .await
        .expect("scenario within its deadline");
}
