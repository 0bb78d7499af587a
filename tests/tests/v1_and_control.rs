//! v1 (relay-protocol.md §2) and the v2 control socket (§3.4): §9 cases 14-27 and 30
//! (case 28, the protocol ping, is in timers_and_limits.rs).

use relay_tests::*;
use std::time::Duration;

const QUIET: Duration = Duration::from_secs(1);

#[tokio::test]
async fn case14_v1_text_and_binary_preserved_both_ways() {
    let relay = TestRelay::start().await;
    let s = sid("c14");
    let mut server = relay.v1(&s, "server").await;
    let mut client = relay.v1(&s, "client").await;
    send_text(&mut client, "one").await;
    send_binary(&mut client, &[0x00, 0xff, 0x01]).await;
    send_text(&mut server, "two").await;
    send_binary(&mut server, &[0x02]).await;
    assert_eq!(recv(&mut server).await, Message::text("one"));
    assert_eq!(
        recv(&mut server).await,
        Message::binary(vec![0x00, 0xff, 0x01])
    );
    assert_eq!(recv(&mut client).await, Message::text("two"));
    assert_eq!(recv(&mut client).await, Message::binary(vec![0x02]));
}

#[tokio::test]
async fn case15_v1_no_buffering() {
    let relay = TestRelay::start().await;
    let s = sid("c15");
    let mut client = relay.v1(&s, "client").await;
    send_text(&mut client, "early").await;
    // A v1 JSON ping is forwarded, not answered: the client gets nothing back either.
    send_text(&mut client, r#"{"type":"ping"}"#).await;
    barrier(&mut client).await;
    let mut server = relay.v1(&s, "server").await;
    assert_silent(&mut server, QUIET).await;
    assert_silent(&mut client, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn case16_v1_server_replacement() {
    let relay = TestRelay::start().await;
    let s = sid("c16");
    let mut s1 = relay.v1(&s, "server").await;
    let mut k = relay.v1(&s, "client").await;
    let mut s2 = relay.v1(&s, "server").await;
    // The replaced socket's frames go nowhere, even those it sends before reading its close.
    send_text(&mut s1, "stale").await;
    assert_eq!(
        recv_close(&mut s1).await,
        (1008, "Replaced by new connection".into())
    );
    assert_silent(&mut k, QUIET).await;
    send_text(&mut k, "next").await;
    assert_eq!(recv_text(&mut s2).await, "next");
}

#[tokio::test]
async fn case17_v1_client_replacement() {
    let relay = TestRelay::start().await;
    let s = sid("c17");
    let mut k1 = relay.v1(&s, "client").await;
    let mut server = relay.v1(&s, "server").await;
    let mut k2 = relay.v1(&s, "client").await;
    assert_eq!(
        recv_close(&mut k1).await,
        (1008, "Replaced by new connection".into())
    );
    send_text(&mut server, "next").await;
    assert_eq!(recv_text(&mut k2).await, "next");
}

#[tokio::test]
async fn case18_v1_close_isolation() {
    let relay = TestRelay::start().await;
    let s = sid("c18");
    let mut server = relay.v1(&s, "server").await;
    let mut k = relay.v1(&s, "client").await;
    send_close(&mut k, 1000, "").await;
    assert_eq!(recv_close(&mut k).await.0, 1000);
    assert_silent(&mut server, QUIET).await;
    // Still open: a new client reaches it.
    let mut k2 = relay.v1(&s, "client").await;
    send_text(&mut k2, "again").await;
    assert_eq!(recv_text(&mut server).await, "again");
}

#[tokio::test]
async fn case19_versions_isolated() {
    let relay = TestRelay::start().await;
    let s = sid("c19");
    let (mut c, _) = relay.control_synced(&s).await;
    let mut v1s = relay.v1(&s, "server").await;
    let mut k = relay.client(&s, "a").await;
    assert_eq!(
        recv_text(&mut c).await,
        r#"{"type":"connected","connectionId":"a"}"#
    );
    send_text(&mut k, "x").await;
    assert_silent(&mut v1s, QUIET).await;
    let mut v1k = relay.v1(&s, "client").await;
    send_text(&mut v1k, "y").await;
    assert_eq!(recv_text(&mut v1s).await, "y");
    assert_silent(&mut c, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn case20_connection_id_ignored_on_v1() {
    let relay = TestRelay::start().await;
    let s = sid("c20");
    let mut first = relay.v1(&s, "server").await;
    let _second = relay
        .ws(&format!("serverId={s}&role=server&connectionId=abc"))
        .await;
    assert_eq!(
        recv_close(&mut first).await,
        (1008, "Replaced by new connection".into())
    );
}

#[tokio::test]
async fn case21_initial_sync() {
    let relay = TestRelay::start().await;
    let mut c = relay.control(&sid("c21")).await;
    assert_eq!(
        recv_text(&mut c).await,
        r#"{"type":"sync","connectionIds":[]}"#
    );
}

#[tokio::test]
async fn case22_client_before_control() {
    let relay = TestRelay::start().await;
    let s = sid("c22");
    let _ka = relay.client(&s, "a").await;
    let _kb = relay.client(&s, "b").await;
    let _ka2 = relay.client(&s, "a").await;
    let (_c, sync) = relay.control_synced(&s).await;
    assert_eq!(
        control_json(&sync),
        ("sync".into(), vec!["a".into(), "b".into()])
    );
}

#[tokio::test]
async fn case23_duplicate_control() {
    let relay = TestRelay::start().await;
    let s = sid("c23");
    let (mut c1, _) = relay.control_synced(&s).await;
    let (mut c2, sync) = relay.control_synced(&s).await;
    assert_eq!(sync, r#"{"type":"sync","connectionIds":[]}"#);
    assert_eq!(
        recv_close(&mut c1).await,
        (1008, "Replaced by new connection".into())
    );
    let _k = relay.client(&s, "a").await;
    assert_eq!(
        recv_text(&mut c2).await,
        r#"{"type":"connected","connectionId":"a"}"#
    );
}

fn assert_pong(text: &str) {
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    let obj = v.as_object().expect("pong is an object");
    let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["ts", "type"]);
    assert_eq!(obj["type"], "pong");
    let ts = obj["ts"].as_u64().expect("ts is an integer");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(ts.abs_diff(now) < 5_000, "ts {ts} vs now {now}");
}

#[tokio::test]
async fn case24_and_25_json_ping_variants() {
    let relay = TestRelay::start().await;
    let (mut c, _) = relay.control_synced(&sid("c24")).await;
    send_text(&mut c, r#"{"type":"ping"}"#).await;
    assert_pong(&recv_text(&mut c).await);
    send_text(&mut c, r#" {"type":"ping","ts":"abc","extra":[1]} "#).await;
    assert_pong(&recv_text(&mut c).await);
}

#[tokio::test]
async fn case26_and_27_other_control_input_is_ignored() {
    let relay = TestRelay::start().await;
    let (mut c, _) = relay.control_synced(&sid("c26")).await;
    for text in [
        "hello",
        r#"{"type":"PING"}"#,
        "[]",
        "null",
        r#""ping""#,
        r#"{"type":"sync","connectionIds":["z"]}"#,
    ] {
        send_text(&mut c, text).await;
    }
    send_binary(&mut c, br#"{"type":"ping"}"#).await;
    assert_silent(&mut c, QUIET).await;
    send_text(&mut c, r#"{"type":"ping"}"#).await;
    assert_pong(&recv_text(&mut c).await);
}

#[tokio::test]
async fn case30_control_frames_are_not_forwarded() {
    let relay = TestRelay::start().await;
    let s = sid("c30");
    let (mut c, _) = relay.control_synced(&s).await;
    let mut k = relay.client(&s, "a").await;
    let mut d = relay.data(&s, "a").await;
    recv_text(&mut c).await; // connected
    send_text(&mut c, r#"{"type":"hello","key":"x"}"#).await;
    send_binary(&mut c, &[0x01]).await;
    assert_silent(&mut k, QUIET).await;
    assert_silent(&mut d, Duration::from_millis(100)).await;
}

/// A masked client text frame (FIN set, payload under 126 bytes).
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Splits unmasked server frames (payloads under 126 bytes) into (first byte, payload).
fn server_frames(mut bytes: &[u8]) -> Vec<(u8, String)> {
    let mut frames = vec![];
    while bytes.len() >= 2 && bytes.len() >= 2 + (bytes[1] & 0x7f) as usize {
        let len = (bytes[1] & 0x7f) as usize;
        frames.push((
            bytes[0],
            String::from_utf8_lossy(&bytes[2..2 + len]).to_string(),
        ));
        bytes = &bytes[2 + len..];
    }
    frames
}

#[tokio::test]
async fn frames_pipelined_behind_the_request_head_are_not_lost() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = TestRelay::start().await;
    let s = sid("pipe");
    let mut request = format!(
        "GET /ws?serverId={s}&role=server&v=2 HTTP/1.1\r\nHost: r\r\n{UPGRADE_HEADERS}\r\n"
    )
    .into_bytes();
    request.extend(masked_text(br#"{"type":"ping"}"#));
    let mut tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(&request).await.unwrap(); // head and frame in one write
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let frames = tokio::time::timeout(WITHIN, async {
        loop {
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                assert!(
                    got.starts_with(b"HTTP/1.1 101"),
                    "{:?}",
                    String::from_utf8_lossy(&got)
                );
                let frames = server_frames(&got[i + 4..]);
                if frames.len() >= 2 {
                    return frames;
                }
            }
        }
    })
    .await
    .expect("101, sync and pong in time");
    assert_eq!(
        frames[0],
        (0x81, r#"{"type":"sync","connectionIds":[]}"#.to_string())
    );
    assert_eq!(frames[1].0, 0x81);
    assert!(
        frames[1].1.starts_with(r#"{"type":"pong","ts":"#),
        "{}",
        frames[1].1
    );
}
