//! HTTP surface: relay-protocol.md §9 cases 1-13 and the RFC 6455 handshake checks of §0.

use relay_tests::*;

const TEXT: &str = "text/plain; charset=utf-8";

#[tokio::test]
async fn case01_health() {
    let relay = TestRelay::start().await;
    let r = relay.get("/health", "").await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"status":"ok"}"#));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = relay
        .raw_http(b"POST /health?x=1 HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\n\r\n")
        .await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"status":"ok"}"#));
    assert_eq!(r.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn case02_unknown_paths_are_404() {
    let relay = TestRelay::start().await;
    // `/ready` is the relay's since issue 9 (which wins over case 2's list); `/metrics` is
    // only on the admin listener.
    for path in ["/", "/ws/", "/health/", "/ready/", "/foo", "/metrics"] {
        let r = relay.get(path, "").await;
        assert_eq!((r.status, r.body.as_str()), (404, "Not found"), "{path}");
        assert_eq!(r.header("content-type"), Some(TEXT));
    }
}

#[tokio::test]
async fn case03_bare_ws_is_400_missing_server_id() {
    let relay = TestRelay::start().await;
    let r = relay.get("/ws", "").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (400, "Missing serverId parameter")
    );
    assert_eq!(r.header("content-type"), Some(TEXT));
}

async fn upgrade(relay: &TestRelay, query: &str) -> HttpResponse {
    relay.get(&format!("/ws?{query}"), UPGRADE_HEADERS).await
}

#[tokio::test]
async fn cases04_to_08_parameter_rejections_with_upgrade() {
    let relay = TestRelay::start().await;
    let cases = [
        ("serverId=&role=server&v=2", "Missing serverId parameter"),
        ("serverId=S&v=2", "Missing or invalid role parameter"),
        (
            "serverId=S&role=Server&v=2",
            "Missing or invalid role parameter",
        ),
        (
            "serverId=S&role=%20server&v=2",
            "Missing or invalid role parameter",
        ),
        (
            "serverId=S&role=admin&v=2",
            "Missing or invalid role parameter",
        ),
        (
            "serverId=S&role=server&v=3",
            "Invalid v parameter (expected 1 or 2)",
        ),
        (
            "serverId=S&role=server&v=2.0",
            "Invalid v parameter (expected 1 or 2)",
        ),
        (
            "serverId=S&role=server&v=02",
            "Invalid v parameter (expected 1 or 2)",
        ),
        (
            "serverId=S&role=server&v=nope",
            "Invalid v parameter (expected 1 or 2)",
        ),
        ("serverId=S&v=3", "Invalid v parameter (expected 1 or 2)"),
    ];
    for (query, body) in cases {
        let r = upgrade(&relay, query).await;
        assert_eq!((r.status, r.body.as_str()), (400, body), "{query}");
        assert_eq!(r.header("content-type"), Some(TEXT));
    }
    assert_eq!(
        relay.hub.session_count(),
        0,
        "a rejected request creates no state"
    );
}

#[tokio::test]
async fn ids_over_256_bytes_are_400() {
    let relay = TestRelay::start().await;
    let long = "x".repeat(257);
    let r = upgrade(&relay, &format!("serverId={long}&role=server&v=2")).await;
    assert_eq!((r.status, r.body.as_str()), (400, "serverId is too long"));
    let r = upgrade(
        &relay,
        &format!("serverId=S&role=client&v=2&connectionId={long}"),
    )
    .await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (400, "connectionId is too long")
    );
    // Exactly 256 bytes is accepted.
    let ok = "y".repeat(256);
    let r = upgrade(&relay, &format!("serverId={ok}&role=server&v=2")).await;
    assert_eq!(r.status, 101);
}

#[tokio::test]
async fn case09_and_10_non_upgrade_order() {
    let relay = TestRelay::start().await;
    let r = relay.get("/ws?serverId=S&role=server&v=2", "").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (426, "Expected WebSocket upgrade")
    );
    assert_eq!(r.header("content-type"), Some(TEXT));
    let r = relay.get("/ws?serverId=S&role=x&v=2", "").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (400, "Missing or invalid role parameter")
    );
}

#[tokio::test]
async fn handshake_checks_after_parameters() {
    let relay = TestRelay::start().await;
    let q = "/ws?serverId=S&role=server&v=2";
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!("POST {q} HTTP/1.1\r\nHost: r\r\nContent-Length: 0\r\n{UPGRADE_HEADERS}\r\n"),
            400,
            "WebSocket upgrade requires the GET method",
        ),
        (
            format!("GET {q} HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n{key}\r\n"),
            400,
            "Missing Connection: upgrade header",
        ),
        (
            format!("GET {q} HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}\r\n"),
            400,
            "Unsupported Sec-WebSocket-Version (expected 13)",
        ),
        (
            format!("GET {q} HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n"),
            400,
            "Missing or invalid Sec-WebSocket-Key header",
        ),
        (
            format!("GET {q} HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"),
            400,
            "Missing or invalid Sec-WebSocket-Key header",
        ),
        (
            format!("GET {q} HTTP/1.1\r\nHost: r\r\nContent-Length: 3\r\n{UPGRADE_HEADERS}\r\nabc"),
            400,
            "WebSocket upgrade request must not have a body",
        ),
        (
            format!("GET {q} HTTP/1.0\r\nHost: r\r\n{UPGRADE_HEADERS}\r\n"),
            400,
            "WebSocket upgrade requires HTTP/1.1",
        ),
    ];
    for (raw, status, body) in cases {
        let r = relay.raw_http(raw.as_bytes()).await;
        assert_eq!((r.status, r.body.as_str()), (status, body), "{raw}");
        assert_eq!(r.header("content-type"), Some(TEXT));
    }
    let raw = format!("GET {q} HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n{key}\r\n");
    let r = relay.raw_http(raw.as_bytes()).await;
    assert_eq!(r.header("sec-websocket-version"), Some("13"));
    assert_eq!(
        relay.hub.session_count(),
        0,
        "a rejected request creates no state"
    );
}

#[tokio::test]
async fn upgrade_response_negotiates_nothing() {
    let relay = TestRelay::start().await;
    let raw = format!(
        "GET /ws?serverId={}&role=server&v=2 HTTP/1.1\r\nHost: r\r\n{UPGRADE_HEADERS}Sec-WebSocket-Extensions: permessage-deflate\r\nSec-WebSocket-Protocol: chat\r\n\r\n",
        sid("neg")
    );
    let r = relay.raw_http(raw.as_bytes()).await;
    assert_eq!(r.status, 101);
    assert_eq!(
        r.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    assert_eq!(r.header("upgrade"), Some("websocket"));
    assert_eq!(r.header("sec-websocket-extensions"), None);
    assert_eq!(r.header("sec-websocket-protocol"), None);
}

#[tokio::test]
async fn case11_empty_v_means_v1() {
    let relay = TestRelay::start().await;
    let s = sid("c11");
    let mut server = relay.ws(&format!("serverId={s}&role=server&v=")).await;
    let mut client = relay.ws(&format!("serverId={s}&role=client&v=%20")).await;
    send_text(&mut client, "a").await;
    assert_eq!(recv_text(&mut server).await, "a");
    assert_silent(&mut server, std::time::Duration::from_secs(1)).await;
}

#[tokio::test]
async fn case12_and_13_v_trimming_and_unknown_params() {
    let relay = TestRelay::start().await;
    let mut c = relay
        .ws(&format!("serverId={}&role=server&v=%202%20", sid("c12")))
        .await;
    assert_eq!(
        recv_text(&mut c).await,
        r#"{"type":"sync","connectionIds":[]}"#
    );
    let mut c = relay
        .ws(&format!(
            "serverId={}&role=server&v=2&clientId=foo&x=1",
            sid("c13")
        ))
        .await;
    assert_eq!(
        recv_text(&mut c).await,
        r#"{"type":"sync","connectionIds":[]}"#
    );
}
