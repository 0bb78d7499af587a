//! The tool against the real relay, started in-process: a short `echo` (2 pairs, 1 s, per
//! pair and shared serverId), `baseline`, and the smallest `idle` and `large`, checking the
//! structural facts of their records.

use relay_bench::{
    run_baseline, run_echo, run_idle, run_large, BaselineParams, EchoParams, Field, IdleParams,
    LargeParams, LoadShape, Record,
};
use relay_tests::TestRelay;

const LOAD_KEYS: [&str; 22] = [
    "kind",
    "label",
    "url",
    "pid",
    "pairs",
    "size_bytes",
    "window",
    "warmup_s",
    "seconds",
    "round_trips",
    "relayed_msgs",
    "relayed_msgs_per_s",
    "relayed_bytes_per_s",
    "latency_mean_us",
    "latency_p50_us",
    "latency_p90_us",
    "latency_p99_us",
    "latency_p999_us",
    "latency_max_us",
    "relay_cpu_s",
    "relay_cpu_us_per_msg",
    "bench_cpu_s",
];

fn count(r: &Record, key: &str) -> u64 {
    match r.get(key) {
        Some(Field::Count(v)) => *v,
        other => panic!("{key}: {other:?}"),
    }
}

fn real(r: &Record, key: &str) -> f64 {
    match r.get(key) {
        Some(Field::Real(v)) => *v,
        other => panic!("{key}: {other:?}"),
    }
}

/// Checks what every load record must hold, and returns its JSON object.
fn check_load(r: &Record, kind: &str, extra: &[&str]) -> serde_json::Value {
    let rt = count(r, "round_trips");
    assert!(rt > 0, "{kind}: no round trip");
    assert_eq!(count(r, "relayed_msgs"), 2 * rt, "{kind}");
    assert_eq!(
        real(r, "relayed_msgs_per_s"),
        (2 * rt) as f64,
        "{kind}: 1 s window"
    );
    assert_eq!(
        real(r, "relayed_bytes_per_s"),
        (2 * rt * 100) as f64,
        "{kind}"
    );
    let p: Vec<f64> = ["p50", "p90", "p99", "p999", "max"]
        .iter()
        .map(|k| real(r, &format!("latency_{k}_us")))
        .collect();
    assert!(
        p[0] > 0.0 && p.windows(2).all(|w| w[0] <= w[1]),
        "{kind}: {p:?}"
    );
    let cpu = real(r, "relay_cpu_s");
    let per_msg = real(r, "relay_cpu_us_per_msg");
    assert!((per_msg - cpu * 1e6 / (2 * rt) as f64).abs() < 1e-6 * per_msg.max(1.0));

    let json: serde_json::Value = serde_json::from_str(&r.to_json_line()).unwrap();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for k in LOAD_KEYS.iter().chain(extra) {
        assert!(keys.contains(k), "{kind}: no {k} in {json}");
    }
    assert_eq!(
        keys.len(),
        LOAD_KEYS.len() + extra.len(),
        "{kind}: {keys:?}"
    );
    assert_eq!(json["kind"], kind);
    assert_eq!(json["relayed_msgs"], 2 * rt);
    json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_report_exact_structure_against_the_real_relay() {
    let relay = TestRelay::start().await;
    let pid = std::process::id(); // the relay runs in this process
    let shape = LoadShape {
        pairs: 2,
        size: 100,
        window: 4,
        warmup: 0,
        seconds: 1,
    };
    let url = format!("ws://{}", relay.addr);
    for shared in [false, true] {
        let p = EchoParams {
            url: url.clone(),
            shape: shape.clone(),
            shared_server_id: shared,
            pid: Some(pid),
            label: None,
        };
        let r = run_echo(&p).await.expect("echo");
        let json = check_load(&r, "echo", &["shared_server_id", "sockets", "relay_rss_kb"]);
        assert_eq!(json["label"], format!("{url}/ws"));
        assert_eq!(json["shared_server_id"], shared);
        assert_eq!(json["sockets"], if shared { 5 } else { 6 });
        assert_eq!(json["pid"], pid);
    }

    let b = BaselineParams {
        shape: shape.clone(),
        forwarder_threads: Some(1),
    };
    let r = run_baseline(&b).await.expect("baseline");
    let json = check_load(&r, "baseline", &["forwarder_threads", "sockets"]);
    assert_eq!(json["label"], "tcp-forwarder");
    assert!(json["pid"].is_null());

    let idle = IdleParams {
        url: url.clone(),
        sockets: 20,
        pid,
        pairs_per_server: 4,
        concurrency: 5,
        settle: 0,
        scrape_url: Some(format!("http://{}/metrics", relay.admin.addr)),
        after_ms: 50,
    };
    let r = run_idle(&idle).await.expect("idle");
    assert!(real(&r, "scrape_ms_max") >= real(&r, "scrape_ms_p50"));
    assert!(count(&r, "scrape_bytes") > 1000, "a whole scrape was read");
    assert_eq!(count(&r, "pairs"), 10);
    assert_eq!(count(&r, "controls"), 3);
    assert_eq!(count(&r, "sockets_total"), 23);
    assert_eq!(count(&r, "pairs_closed_early"), 0);
    assert_eq!(count(&r, "after_close_ms"), 50);
    assert!(real(&r, "after_close_ratio") > 0.0);

    let large = LargeParams {
        settle_ms: 0,
        after_ms: 10,
        ..LargeParams::new(url.clone(), Some(pid), vec![1, 2])
    };
    let rs = run_large(&large).await.expect("large");
    assert_eq!(rs.len(), 2);
    for (r, mib) in rs.iter().zip([1u64, 2]) {
        assert_eq!(count(r, "size_bytes"), mib << 20);
        assert_eq!(r.get("verified"), Some(&Field::Flag(true)));
        assert_eq!(r.get("message"), Some(&Field::Text("binary".into())));
        assert!(real(r, "app_to_daemon_mb_per_s") > 0.0);
        assert!(count(r, "rss_peak_kb") >= count(r, "rss_before_kb") / 2);
        assert!(matches!(r.get("kept_kb"), Some(Field::Signed(_))));
        assert!(matches!(r.get("after_close_kb"), Some(Field::Signed(_))));
    }

    // Two pairs at once, text messages: each pair gets its own bytes back, as text.
    let text = LargeParams {
        text: true,
        pairs: 2,
        settle_ms: 0,
        after_ms: 0,
        ..LargeParams::new(url, Some(pid), vec![1])
    };
    let rs = run_large(&text).await.expect("large --text --pairs 2");
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].get("message"), Some(&Field::Text("text".into())));
    assert_eq!(count(&rs[0], "pairs"), 2);
    assert_eq!(count(&rs[0], "bytes_per_direction"), 2 << 20);
    assert_eq!(
        rs[0].get("rss_after_close_kb"),
        Some(&Field::Missing),
        "--after-ms 0: no close reading"
    );
}
