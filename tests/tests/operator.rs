//! Issue 9, the operator kit: the admin listener, readiness and drain, and the admission
//! limits (process ceiling, per address with and without a trusted proxy, the upgrade
//! bucket, control replacements). Each refusal is checked by status, exact body,
//! `Retry-After` and its counter; each limit leaves an existing pair relaying.

use relay_module::{RelayConf, Router};
use relay_tests::*;

/// The counter of one rejection reason in `scrape`.
fn rejections(scrape: &str, reason: &str) -> f64 {
    let series = format!("paseo_relay_connection_rejections_total{{reason=\"{reason}\"}}");
    sample(scrape, &series).unwrap_or_else(|| panic!("no {series} in the scrape"))
}

fn control_query(server_id: &str) -> String {
    format!("serverId={server_id}&role=server&v=2")
}

#[tokio::test]
async fn admin_endpoints_answer_exactly() {
    let relay = TestRelay::start().await;
    let admin = relay.admin;

    let health = admin.get("/health", "").await;
    assert_eq!(
        (
            health.status,
            health.header("content-type"),
            health.body.as_str()
        ),
        (200, Some("application/json"), r#"{"status":"ok"}"#)
    );
    let ready = admin.get("/ready", "").await;
    assert_eq!(
        (
            ready.status,
            ready.header("content-type"),
            ready.body.as_str()
        ),
        (200, Some("application/json"), r#"{"status":"ready"}"#)
    );
    let metrics = admin.get("/metrics", "").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    assert_eq!(sample(&metrics.body, "paseo_relay_ready"), Some(1.0));
    assert_eq!(sample(&metrics.body, "paseo_relay_draining"), Some(0.0));
    assert!(sample(&metrics.body, "process_open_fds").is_some_and(|n| n > 0.0));

    for (path, method, allow) in [
        ("/metrics", "POST", "GET"),
        ("/ready", "DELETE", "GET"),
        ("/drain", "GET", "POST"),
        ("/resume", "PUT", "POST"),
    ] {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
        let resp = admin.raw_http(req.as_bytes()).await;
        assert_eq!(
            (resp.status, resp.header("allow"), resp.body.as_str()),
            (405, Some(allow), "Method not allowed"),
            "{method} {path}"
        );
    }
    let unknown = admin.get("/ws", "").await;
    assert_eq!((unknown.status, unknown.body.as_str()), (404, "Not found"));
    assert_eq!(
        relay.hub.readiness().answer().0,
        200,
        "405s changed nothing"
    );

    // `/metrics` is never served on the main listener; `/ready` is.
    let main_metrics = relay.get("/metrics", "").await;
    assert_eq!(
        (main_metrics.status, main_metrics.body.as_str()),
        (404, "Not found")
    );
    let main_ready = relay.get("/ready", "").await;
    assert_eq!(
        (main_ready.status, main_ready.body.as_str()),
        (200, r#"{"status":"ready"}"#)
    );
}

#[tokio::test]
async fn drain_refuses_new_websockets_keeps_open_ones_and_resume_ends_it() {
    let relay = TestRelay::start().await;
    let s = sid("drain");
    let (_c, mut k, mut d) = relay.paired(&s, "x").await;
    let before = relay.admin.scrape().await;

    let drained = relay.admin.post("/drain").await;
    assert_eq!(
        (
            drained.status,
            drained.header("content-type"),
            drained.body.as_str()
        ),
        (200, Some("application/json"), r#"{"status":"draining"}"#)
    );
    for endpoint in [relay.admin, *relay] {
        let ready = endpoint.get("/ready", "").await;
        assert_eq!(
            (
                ready.status,
                ready.header("content-type"),
                ready.body.as_str()
            ),
            (503, Some("application/json"), r#"{"status":"draining"}"#)
        );
    }
    let refused = relay.upgrade_raw(&control_query(&sid("new")), "").await;
    assert_eq!(
        (
            refused.status,
            refused.header("content-type"),
            refused.header("retry-after"),
            refused.body.as_str()
        ),
        (
            503,
            Some("text/plain; charset=utf-8"),
            Some("5"),
            "Relay draining"
        )
    );
    assert_relays_both_ways(&mut k, &mut d).await;
    let during = relay.admin.scrape().await;
    assert_eq!(
        rejections(&during, "draining") - rejections(&before, "draining"),
        1.0
    );
    assert_eq!(sample(&during, "paseo_relay_draining"), Some(1.0));
    assert_eq!(sample(&during, "paseo_relay_ready"), Some(0.0));

    let resumed = relay.admin.post("/resume").await;
    assert_eq!(
        (resumed.status, resumed.body.as_str()),
        (200, r#"{"status":"ready"}"#)
    );
    assert_eq!(relay.get("/ready", "").await.status, 200);
    let _c2 = relay.control(&sid("after")).await;
    assert_relays_both_ways(&mut k, &mut d).await;
}

#[tokio::test]
async fn process_ceiling_answers_503_and_ready_says_full() {
    let relay = TestRelay::start_with(RelayConf {
        max_websockets: Some(3),
        ..RelayConf::default()
    })
    .await;
    let s = sid("cap");
    let (c, mut k, mut d) = relay.paired(&s, "x").await;
    let scrape = relay.admin.scrape().await;
    assert_eq!(sample(&scrape, "paseo_relay_max_websockets"), Some(3.0));

    let refused = relay.upgrade_raw(&control_query(&sid("other")), "").await;
    assert_eq!(
        (
            refused.status,
            refused.header("content-type"),
            refused.header("retry-after"),
            refused.body.as_str()
        ),
        (
            503,
            Some("text/plain; charset=utf-8"),
            Some("5"),
            "Relay at capacity"
        )
    );
    let full = relay.admin.get("/ready", "").await;
    assert_eq!(
        (full.status, full.body.as_str()),
        (503, r#"{"status":"full"}"#)
    );
    let after = relay.admin.scrape().await;
    assert_eq!(
        rejections(&after, "capacity") - rejections(&scrape, "capacity"),
        1.0
    );
    assert_eq!(sample(&after, "paseo_relay_ready"), Some(0.0));
    assert_eq!(sample(&after, "paseo_relay_draining"), Some(0.0));
    assert_relays_both_ways(&mut k, &mut d).await;

    // A place freed by a closing socket is taken again.
    drop(c);
    wait_until(|| relay.hub.socket_count() == 2).await;
    assert_eq!(relay.admin.get("/ready", "").await.status, 200);
    let _again = relay.control(&s).await;
}

#[tokio::test]
async fn per_address_ceiling_counts_the_address_trusted_proxies_resolve() {
    // Without a trusted proxy every socket comes from 127.0.0.1, whatever X-Forwarded-For
    // says; behind a trusted proxy (127.0.0.1) each forwarded address has its own ceiling.
    let conf = || RelayConf {
        max_websockets_per_ip: 2,
        ..RelayConf::default()
    };
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");

    let plain = TestRelay::start_with(conf()).await;
    let mut held = Vec::new();
    for ip in ["203.0.113.1", "203.0.113.2"] {
        let (tcp, status) = open(&plain, &sid("p"), &xff(ip)).await;
        assert_eq!(status, 101);
        held.push(tcp); // the socket stays open and holds its place
    }
    let refused = plain
        .upgrade_raw(&control_query(&sid("p")), &xff("203.0.113.3"))
        .await;
    assert_eq!(
        (
            refused.status,
            refused.header("content-type"),
            refused.header("retry-after"),
            refused.body.as_str()
        ),
        (
            429,
            Some("text/plain; charset=utf-8"),
            Some("5"),
            "Too many connections from this address"
        )
    );
    let scrape = plain.admin.scrape().await;
    assert_eq!(rejections(&scrape, "per_ip"), 1.0);

    let router = Router::build(&[], &["127.0.0.1".to_string()]).expect("valid router");
    let proxied = TestRelay::start_routed(conf(), router).await;
    for ip in ["203.0.113.1", "203.0.113.1", "203.0.113.2", "203.0.113.2"] {
        let (tcp, status) = open(&proxied, &sid("p"), &xff(ip)).await;
        assert_eq!(status, 101, "{ip}");
        held.push(tcp);
    }
    let third = proxied
        .upgrade_raw(&control_query(&sid("p")), &xff("203.0.113.1"))
        .await;
    assert_eq!(
        (third.status, third.body.as_str()),
        (429, "Too many connections from this address")
    );
    let other = proxied
        .upgrade_raw(&control_query(&sid("p")), &xff("203.0.113.9"))
        .await;
    assert_eq!(
        other.status, 101,
        "another forwarded address has its own ceiling"
    );
}

#[tokio::test]
async fn upgrade_bucket_answers_429_with_retry_after_until_a_token() {
    let relay = TestRelay::start_with(RelayConf {
        upgrades_per_ip_per_second: 1,
        upgrade_burst_per_ip: 2,
        ..RelayConf::default()
    })
    .await;
    let (_a, _b) = (
        relay.control(&sid("r1")).await,
        relay.control(&sid("r2")).await,
    );
    let refused = relay.upgrade_raw(&control_query(&sid("r3")), "").await;
    assert_eq!(
        (
            refused.status,
            refused.header("content-type"),
            refused.header("retry-after"),
            refused.body.as_str()
        ),
        (
            429,
            Some("text/plain; charset=utf-8"),
            Some("1"),
            "Too many requests"
        )
    );
    let scrape = relay.admin.scrape().await;
    assert_eq!(rejections(&scrape, "rate"), 1.0);
    // One token a second: after Retry-After the next upgrade is accepted.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let _c = relay.control(&sid("r4")).await;
}

#[tokio::test]
async fn control_replacements_are_limited_and_the_current_control_keeps_working() {
    let relay = TestRelay::start_with(RelayConf {
        control_replacements_per_minute: 2,
        ..RelayConf::default()
    })
    .await;
    let s = sid("repl");
    let (mut c1, _) = relay.control_synced(&s).await;
    let (mut c2, _) = relay.control_synced(&s).await;
    assert_eq!(
        recv_close(&mut c1).await,
        (1008, "Replaced by new connection".to_string())
    );
    let (mut c3, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, r#"{"type":"sync","connectionIds":[]}"#);
    assert_eq!(
        recv_close(&mut c2).await,
        (1008, "Replaced by new connection".to_string())
    );

    let refused = relay.upgrade_raw(&control_query(&s), "").await;
    assert_eq!(
        (
            refused.status,
            refused.header("content-type"),
            refused.body.as_str()
        ),
        (
            429,
            Some("text/plain; charset=utf-8"),
            "Too many control replacements"
        )
    );
    let scrape = relay.admin.scrape().await;
    assert_eq!(rejections(&scrape, "replacement"), 1.0);

    // The current control keeps its place: a client attaching reaches it.
    let mut k = relay.client(&s, "x").await;
    assert_eq!(
        recv_text(&mut c3).await,
        r#"{"type":"connected","connectionId":"x"}"#
    );
    let mut d = relay.data(&s, "x").await;
    assert_relays_both_ways(&mut k, &mut d).await;
}

#[tokio::test]
async fn bad_requests_are_counted_and_create_nothing() {
    let relay = TestRelay::start().await;
    let resp = relay.upgrade_raw("role=server&v=2", "").await;
    assert_eq!(
        (resp.status, resp.body.as_str()),
        (400, "Missing serverId parameter")
    );
    let scrape = relay.admin.scrape().await;
    assert_eq!(rejections(&scrape, "bad_request"), 1.0);
    assert_eq!(
        sample(&scrape, "paseo_relay_http_requests_total{handler=\"ws\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&scrape, "paseo_relay_active_sessions"), Some(0.0));
    assert_eq!(relay.hub.admission().sockets(), 0);
}

/// Opens a control socket of `server_id` with extra header lines and keeps the connection:
/// returns it with the answer's status.
async fn open(relay: &Endpoint, server_id: &str, headers: &str) -> (tokio::net::TcpStream, u16) {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let req = format!(
        "GET /ws?{} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n",
        control_query(server_id)
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let status = read_response(&mut tcp).await.status;
    (tcp, status)
}

/// Polls `cond` until it holds (at most [`WITHIN`]).
async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
