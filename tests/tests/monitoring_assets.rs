//! Issue 9, "Dashboard and alerts": every metric that `conf/grafana/paseo-relay.json` and
//! `conf/prometheus/paseo-relay.rules.yml` name exists in a scrape of a running relay, and
//! the rules are valid (`promtool check rules` where promtool is installed; the YAML shape
//! of Prometheus rule files otherwise).

use relay_tests::*;
use std::collections::BTreeSet;
use std::path::PathBuf;

fn conf_file(rel: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../conf")
        .join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    (path, text)
}

/// Names of relay and process metrics in PromQL text: `paseo_relay_*` and `process_*`
/// identifiers (a histogram's `_bucket` series keeps its suffix, as scrapes show it).
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = promql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word
            && (promql[i..].starts_with("paseo_relay_") || promql[i..].starts_with("process_"))
        {
            let end = promql[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(promql.len(), |n| i + n);
            names.insert(promql[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

/// Every `expr` of the dashboard's panel targets.
fn dashboard_exprs(dashboard: &serde_json::Value, out: &mut Vec<String>) {
    match dashboard {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(expr)) = map.get("expr") {
                out.push(expr.clone());
            }
            map.values().for_each(|v| dashboard_exprs(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// Whether `scrape` has a series of `name` (with or without labels).
fn exposed(scrape: &str, name: &str) -> bool {
    scrape.lines().any(|line| {
        line.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    })
}

#[tokio::test]
async fn dashboard_and_rules_name_only_exposed_metrics() {
    let relay = TestRelay::start().await;
    let scrape = relay.admin.scrape().await;

    let (_, json) = conf_file("grafana/paseo-relay.json");
    let dashboard: serde_json::Value = serde_json::from_str(&json).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(
        exprs.len() >= 15,
        "the dashboard has its panels: {}",
        exprs.len()
    );
    let mut used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();

    let (_, rules_text) = conf_file("prometheus/paseo-relay.rules.yml");
    let rules: serde_yaml::Value = serde_yaml::from_str(&rules_text).expect("rules are YAML");
    let mut alerts = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups: a list") {
        for rule in group["rules"].as_sequence().expect("rules: a list") {
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            used.extend(metric_names(expr));
            alerts.push(rule["alert"].as_str().expect("alerting rules").to_string());
            assert!(
                rule["labels"]["severity"].is_string(),
                "{alerts:?}: severity"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{alerts:?}: summary"
            );
        }
    }
    alerts.sort();
    assert_eq!(
        alerts,
        [
            "PaseoRelayDown",
            "PaseoRelayFileDescriptorsHigh",
            "PaseoRelayNearCapacity",
            "PaseoRelayNotReady",
            "PaseoRelayRejectionsRising",
            "PaseoRelaySlowConsumerSpike"
        ]
    );

    for required in [
        "paseo_relay_active_websockets",
        "paseo_relay_connection_rejections_total",
        "paseo_relay_closes_total",
        "paseo_relay_send_wait_seconds_bucket",
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
    ] {
        assert!(used.contains(required), "the assets use {required}");
    }
    let missing: Vec<&String> = used.iter().filter(|n| !exposed(&scrape, n)).collect();
    assert!(missing.is_empty(), "not in the scrape: {missing:?}");
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(paseo_relay_send_wait_seconds_bucket{instance=~"$instance"}[5m]))) / process_max_fds"#,
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(
        names,
        ["paseo_relay_send_wait_seconds_bucket", "process_max_fds"]
    );
    assert!(metric_names("rate(my_paseo_relay_x[1m])").is_empty());
}

#[test]
fn rules_pass_promtool_where_installed() {
    let (path, _) = conf_file("prometheus/paseo-relay.rules.yml");
    match std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        // Not installed: the YAML shape is checked by the test above.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("promtool not installed: rules checked as YAML only")
        }
        Err(e) => panic!("running promtool: {e}"),
    }
}
