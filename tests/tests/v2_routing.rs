//! v2 clients, forwarding, buffering and cascades (relay-protocol.md §3.2-§3.9):
//! §9 cases 31-56.

use relay_tests::*;
use std::time::Duration;

const QUIET: Duration = Duration::from_secs(1);

fn connected(x: &str) -> String {
    format!(r#"{{"type":"connected","connectionId":"{x}"}}"#)
}

fn disconnected(x: &str) -> String {
    format!(r#"{{"type":"disconnected","connectionId":"{x}"}}"#)
}

fn assigned_id(text: &str) -> String {
    let (kind, ids) = control_json(text);
    assert_eq!(kind, "connected");
    let id = ids[0].clone();
    assert_eq!(text, connected(&id));
    assert!(id.len() == 21 && id.starts_with("conn_"), "{id}");
    assert!(
        id[5..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{id}"
    );
    id
}

#[tokio::test]
async fn case31_and_32_assigned_ids() {
    let relay = TestRelay::start().await;
    let s = sid("c31");
    let (mut c, _) = relay.control_synced(&s).await;
    let mut k1 = relay.ws(&format!("serverId={s}&role=client&v=2")).await;
    let id1 = assigned_id(&recv_text(&mut c).await);
    let _k2 = relay.ws(&format!("serverId={s}&role=client&v=2")).await;
    let id2 = assigned_id(&recv_text(&mut c).await);
    assert_ne!(id1, id2);
    assert_silent(&mut k1, QUIET).await;
}

#[tokio::test]
async fn case33_and_34_client_connection_id_trimming() {
    let relay = TestRelay::start().await;
    let s = sid("c33");
    let (mut c, _) = relay.control_synced(&s).await;
    let _k = relay
        .ws(&format!(
            "serverId={s}&role=client&v=2&connectionId=%20%20abc%20"
        ))
        .await;
    assert_eq!(recv_text(&mut c).await, connected("abc"));
    let _k = relay
        .ws(&format!("serverId={s}&role=client&v=2&connectionId=%20%20"))
        .await;
    assigned_id(&recv_text(&mut c).await);
}

#[tokio::test]
async fn case35_blank_connection_id_on_server_means_control() {
    let relay = TestRelay::start().await;
    let s = sid("c35");
    let (mut c1, _) = relay.control_synced(&s).await;
    let mut c2 = relay
        .ws(&format!("serverId={s}&role=server&v=2&connectionId=%20"))
        .await;
    assert_eq!(
        recv_text(&mut c2).await,
        r#"{"type":"sync","connectionIds":[]}"#
    );
    assert_eq!(
        recv_close(&mut c1).await,
        (1008, "Replaced by new connection".into())
    );
}

#[tokio::test]
async fn case36_kind_and_bytes_preserved() {
    let relay = TestRelay::start().await;
    let s = sid("c36");
    let (_c, _) = relay.control_synced(&s).await;
    let mut k = relay.client(&s, "a").await;
    let mut d = relay.data(&s, "a").await;
    assert_kind_and_bytes_preserved(&mut k, &mut d).await;
}

#[tokio::test]
async fn case37_and_38_fan_out_and_client_to_daemon_only() {
    let relay = TestRelay::start().await;
    let s = sid("c37");
    let mut k1 = relay.client(&s, "a").await;
    let mut k2 = relay.client(&s, "a").await;
    let mut d = relay.data(&s, "a").await;
    send_text(&mut d, "m1").await;
    send_text(&mut d, "m2").await;
    for k in [&mut k1, &mut k2] {
        assert_eq!(recv_text(k).await, "m1");
        assert_eq!(recv_text(k).await, "m2");
    }
    send_text(&mut k1, "up").await;
    assert_eq!(recv_text(&mut d).await, "up");
    assert_silent(&mut k2, QUIET).await;
}

#[tokio::test]
async fn case39_connected_per_socket() {
    let relay = TestRelay::start().await;
    let s = sid("c39");
    let (mut c, _) = relay.control_synced(&s).await;
    let _k1 = relay.client(&s, "a").await;
    assert_eq!(recv_text(&mut c).await, connected("a"));
    let _k2 = relay.client(&s, "a").await;
    assert_eq!(recv_text(&mut c).await, connected("a"));
}

#[tokio::test]
async fn case40_and_41_json_ping_on_data_path_is_forwarded() {
    let relay = TestRelay::start().await;
    let s = sid("c40");
    let mut k = relay.client(&s, "a").await;
    let mut d = relay.data(&s, "a").await;
    send_text(&mut d, r#"{"type":"ping"}"#).await;
    assert_eq!(recv_text(&mut k).await, r#"{"type":"ping"}"#);
    send_text(&mut k, r#"{"type":"ping"}"#).await;
    assert_eq!(recv_text(&mut d).await, r#"{"type":"ping"}"#);
    assert_silent(&mut d, QUIET).await;
    assert_silent(&mut k, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn case42_route_isolation() {
    let relay = TestRelay::start().await;
    let (s, s2) = (sid("c42"), sid("c42b"));
    let mut ka = relay.client(&s, "a").await;
    let mut kb = relay.client(&s, "b").await;
    let mut other = relay.client(&s2, "a").await;
    let mut da = relay.data(&s, "a").await;
    let _db = relay.data(&s, "b").await;
    let _d2 = relay.data(&s2, "a").await;
    send_text(&mut da, "x").await;
    assert_eq!(recv_text(&mut ka).await, "x");
    assert_silent(&mut kb, QUIET).await;
    assert_silent(&mut other, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn case43_data_socket_without_clients() {
    let relay = TestRelay::start().await;
    let s = sid("c43");
    let (mut c, _) = relay.control_synced(&s).await;
    let mut d = relay.data(&s, "z").await;
    send_text(&mut d, "dropped").await;
    barrier(&mut d).await;
    assert_silent(&mut d, Duration::from_secs(2)).await;
    let mut k = relay.client(&s, "z").await;
    assert_eq!(recv_text(&mut c).await, connected("z"));
    assert_silent(&mut k, Duration::from_millis(300)).await; // "dropped" was not buffered
    send_text(&mut k, "q").await;
    assert_eq!(recv_text(&mut d).await, "q");
}

#[tokio::test]
async fn case44_ordered_flush() {
    let relay = TestRelay::start().await;
    let s = sid("c44");
    let (_c, _) = relay.control_synced(&s).await;
    let mut k = relay.client(&s, "a").await;
    send_text(&mut k, "f1").await;
    send_binary(&mut k, &[0x02]).await;
    send_text(&mut k, "f3").await;
    // Whether the relay has read f1-f3 before D attaches or not, one reader handles them in
    // order, so D sees them first either way.
    let mut d = relay.data(&s, "a").await;
    send_text(&mut k, "f4").await;
    assert_eq!(recv(&mut d).await, Message::text("f1"));
    assert_eq!(recv(&mut d).await, Message::binary(vec![0x02]));
    assert_eq!(recv(&mut d).await, Message::text("f3"));
    assert_eq!(recv(&mut d).await, Message::text("f4"));
}

/// Polls `cond` every 10 ms for up to 3 s (for state only the hub can show).
async fn wait_for(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn case45_buffer_keeps_the_newest_200_frames() {
    let relay = TestRelay::start().await;
    let s = sid("c45");
    let mut k = relay.client(&s, "a").await;
    for i in 0..=200 {
        send_text(&mut k, &i.to_string()).await;
    }
    barrier(&mut k).await;
    let total: usize = (1..=200).map(|i: i32| i.to_string().len()).sum();
    assert_eq!(relay.hub.buffered_bytes(), total);
    let mut d = relay.data(&s, "a").await;
    for i in 1..=200 {
        assert_eq!(recv_text(&mut d).await, i.to_string());
    }
    assert_silent(&mut d, QUIET).await;
}

#[tokio::test]
async fn case46_buffer_cleared_by_the_last_leave() {
    let relay = TestRelay::start().await;
    let s = sid("c46");
    let (mut c, _) = relay.control_synced(&s).await;
    let mut k = relay.client(&s, "a").await;
    assert_eq!(recv_text(&mut c).await, connected("a"));
    send_text(&mut k, "old").await;
    send_close(&mut k, 1000, "").await;
    assert_eq!(recv_text(&mut c).await, disconnected("a"));
    let _k2 = relay.client(&s, "a").await;
    let mut d = relay.data(&s, "a").await;
    assert_silent(&mut d, QUIET).await;
}

#[tokio::test]
async fn case47_buffer_survives_while_a_client_remains() {
    let relay = TestRelay::start().await;
    let s = sid("c47");
    let (mut c, _) = relay.control_synced(&s).await;
    let mut k1 = relay.client(&s, "a").await;
    let _k2 = relay.client(&s, "a").await;
    send_text(&mut k1, "keep").await;
    send_close(&mut k1, 1000, "").await;
    // The close echo means the relay's reader of K1 is past "keep", which is buffered.
    assert_eq!(recv_close(&mut k1).await.0, 1000);
    let mut d = relay.data(&s, "a").await;
    assert_eq!(recv_text(&mut d).await, "keep");
    recv_text(&mut c).await; // connected a
    recv_text(&mut c).await; // connected a
    assert_silent(&mut c, Duration::from_millis(300)).await; // no disconnected
}

#[tokio::test]
async fn case48_last_client_leaves() {
    let relay = TestRelay::start().await;
    let s = sid("c48");
    let (mut c, _) = relay.control_synced(&s).await;
    let mut k = relay.client(&s, "a").await;
    let mut d = relay.data(&s, "a").await;
    assert_eq!(recv_text(&mut c).await, connected("a"));
    send_close(&mut k, 1000, "Client closed").await;
    assert_eq!(
        recv_close(&mut d).await,
        (1001, "Client disconnected".into())
    );
    assert_eq!(recv_text(&mut c).await, disconnected("a"));
}

#[tokio::test]
async fn case49_a_client_leaves_while_another_remains() {
    let relay = TestRelay::start().await;
    let s = sid("c49");
    let (mut c, _) = relay.control_synced(&s).await;
    let mut k1 = relay.client(&s, "a").await;
    let mut k2 = relay.client(&s, "a").await;
    let mut d = relay.data(&s, "a").await;
    recv_text(&mut c).await;
    recv_text(&mut c).await;
    send_close(&mut k1, 1000, "").await;
    assert_eq!(recv_close(&mut k1).await.0, 1000);
    assert_silent(&mut c, QUIET).await;
    send_text(&mut d, "still").await;
    assert_eq!(recv_text(&mut k2).await, "still");
}

#[tokio::test]
async fn case50_last_client_leaves_with_no_data_socket() {
    let relay = TestRelay::start().await;
    let s = sid("c50");
    let (mut c, _) = relay.control_synced(&s).await;
    let mut k = relay.client(&s, "a").await;
    assert_eq!(recv_text(&mut c).await, connected("a"));
    send_close(&mut k, 1000, "").await;
    assert_eq!(recv_text(&mut c).await, disconnected("a"));
}

async fn data_close_cascade(abrupt: bool) {
    let relay = TestRelay::start().await;
    let s = sid("c51");
    let (mut c, _) = relay.control_synced(&s).await;
    let mut k1 = relay.client(&s, "a").await;
    let mut k2 = relay.client(&s, "a").await;
    let mut kb = relay.client(&s, "b").await;
    let mut da = relay.data(&s, "a").await;
    let mut db = relay.data(&s, "b").await;
    for _ in 0..3 {
        recv_text(&mut c).await;
    }
    if abrupt {
        drop(da);
    } else {
        send_close(&mut da, 4002, "Invalid hello").await;
        assert_eq!(recv_close(&mut da).await, (4002, "Invalid hello".into()));
    }
    assert_eq!(
        recv_close(&mut k1).await,
        (1012, "Server disconnected".into())
    );
    assert_eq!(
        recv_close(&mut k2).await,
        (1012, "Server disconnected".into())
    );
    assert_eq!(recv_text(&mut c).await, disconnected("a"));
    send_text(&mut db, "b-alive").await;
    assert_eq!(recv_text(&mut kb).await, "b-alive");
    send_text(&mut kb, "b-up").await;
    assert_eq!(recv_text(&mut db).await, "b-up");
}

#[tokio::test]
async fn case51_data_socket_closes() {
    data_close_cascade(false).await;
}

#[tokio::test]
async fn case52_data_socket_drops_abruptly() {
    data_close_cascade(true).await;
}

#[tokio::test]
async fn case53_data_socket_replaced() {
    let relay = TestRelay::start().await;
    let s = sid("c53");
    let mut k = relay.client(&s, "a").await;
    let mut d1 = relay.data(&s, "a").await;
    let mut d2 = relay.data(&s, "a").await;
    assert_eq!(
        recv_close(&mut d1).await,
        (1008, "Replaced by new connection".into())
    );
    assert_silent(&mut k, Duration::from_secs(2)).await;
    send_text(&mut k, "to-d2").await;
    assert_eq!(recv_text(&mut d2).await, "to-d2");
    send_text(&mut d2, "from-d2").await;
    assert_eq!(recv_text(&mut k).await, "from-d2");
}

#[tokio::test]
async fn case54_control_close_isolation() {
    let relay = TestRelay::start().await;
    let s = sid("c54");
    let (mut c, _) = relay.control_synced(&s).await;
    let mut k = relay.client(&s, "a").await;
    let mut d = relay.data(&s, "a").await;
    assert_eq!(recv_text(&mut c).await, connected("a"));
    send_close(&mut c, 1000, "").await;
    assert_eq!(recv_close(&mut c).await.0, 1000);
    assert_relays_both_ways(&mut k, &mut d).await;
}

#[tokio::test]
async fn case55_close_is_echoed() {
    let relay = TestRelay::start().await;
    let s = sid("c55");
    let mut k = relay.client(&s, "a").await;
    send_close(&mut k, 1000, "bye").await;
    assert_eq!(recv_close(&mut k).await, (1000, "bye".into()));
}

#[tokio::test]
async fn case56_app_defined_close_codes_are_accepted() {
    let relay = TestRelay::start().await;
    let s = sid("c56");
    let (mut c, _) = relay.control_synced(&s).await;
    let mut k = relay.client(&s, "a").await;
    let mut d = relay.data(&s, "a").await;
    recv_text(&mut c).await;
    send_close(&mut k, 4001, "E2EE handshake failed").await;
    assert_eq!(
        recv_close(&mut k).await,
        (4001, "E2EE handshake failed".into())
    );
    assert_eq!(
        recv_close(&mut d).await,
        (1001, "Client disconnected".into())
    );
    assert_eq!(recv_text(&mut c).await, disconnected("a"));

    let mut k = relay.client(&s, "b").await;
    let mut d = relay.data(&s, "b").await;
    recv_text(&mut c).await;
    send_close(&mut d, 1011, "E2EE handshake failed").await;
    assert_eq!(
        recv_close(&mut d).await,
        (1011, "E2EE handshake failed".into())
    );
    assert_eq!(
        recv_close(&mut k).await,
        (1012, "Server disconnected".into())
    );
    assert_eq!(recv_text(&mut c).await, disconnected("b"));
}

#[tokio::test]
async fn sessions_are_dropped_when_their_last_socket_leaves() {
    let relay = TestRelay::start().await;
    let s = sid("drop");
    let (mut c, _) = relay.control_synced(&s).await;
    let mut k = relay.client(&s, "a").await;
    assert_eq!(recv_text(&mut c).await, connected("a"));
    assert_eq!(relay.hub.session_count(), 1);
    send_close(&mut k, 1000, "").await;
    assert_eq!(recv_text(&mut c).await, disconnected("a"));
    send_close(&mut c, 1000, "").await;
    assert_eq!(recv_close(&mut c).await.0, 1000);
    wait_for(|| relay.hub.session_count() == 0).await;
}

#[tokio::test]
async fn cascade_closes_follow_the_frames_already_relayed() {
    let relay = TestRelay::start().await;
    let s = sid("order");
    let mut k = relay.client(&s, "a").await;
    let mut d = relay.data(&s, "a").await;
    // The daemon's last frames reach the client before its 1012.
    send_text(&mut d, "last1").await;
    send_binary(&mut d, &[0xee]).await;
    send_close(&mut d, 1000, "").await;
    assert_eq!(recv(&mut k).await, Message::text("last1"));
    assert_eq!(recv(&mut k).await, Message::binary(vec![0xee]));
    assert_eq!(
        recv_close(&mut k).await,
        (1012, "Server disconnected".into())
    );

    // A client's last frame reaches the daemon before its 1001.
    let mut k = relay.client(&s, "b").await;
    let mut d = relay.data(&s, "b").await;
    send_text(&mut k, "cmd").await;
    send_close(&mut k, 1000, "Client closed").await;
    assert_eq!(recv_text(&mut d).await, "cmd");
    assert_eq!(
        recv_close(&mut d).await,
        (1001, "Client disconnected".into())
    );
}
