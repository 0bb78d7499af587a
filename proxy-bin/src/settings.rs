//! The binary's configuration, merged in one place with the priority
//! flags > environment > YAML file > defaults:
//!
//! | flag | env | file key | default |
//! |---|---|---|---|
//! | `--listen ADDR` (repeatable) | `PASEO_LISTEN` (comma-separated) | `listen` (string or list) | `0.0.0.0:8080` |
//! | `--tls-cert PATH` | `PASEO_TLS_CERT` | `tls.cert` | none |
//! | `--tls-key PATH` | `PASEO_TLS_KEY` | `tls.key` | none |
//! | `--log-level LEVEL` | `PASEO_LOG_LEVEL` | `log_level` | `info` |
//! | `--log-format FORMAT` | `PASEO_LOG_FORMAT` | `log_format` | `text` |
//! | `--admin-listen ADDR` | `PASEO_ADMIN_LISTEN` | `admin_listen` | none |
//! | `-c/--conf/--config PATH` | `PASEO_CONFIG` | - | none |
//! | - | `PASEO_CLUSTER_SELF` | `cluster.self` | none (needed with `cluster:`) |
//!
//! The YAML file also holds Pingora's `ServerConf` keys at the top level, the relay's
//! tuning under `relay:`, the HTTP deadlines under `http:` and the nodes under `cluster:`. A Go-relay file (`listen`, `log_level`, `tls.enabled`, `tls.cert`,
//! `tls.key`) works unchanged; empty strings count as unset, as in the Go relay. TLS is on
//! when a certificate and a key are both set.
//!
//! Every error is one line naming where the value came from (flag, variable or file and
//! key) and what is wrong; the binary prints it and exits 1 before serving.

use crate::logging::LogFormat;
use pingora::server::configuration::ServerConf;
use relay_module::cluster::conf::{ClusterConf, ClusterSpec};
use relay_module::config::HttpConf;
use relay_module::{CertStore, Listener, RelayConf, RouteConf, Router};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

/// Address listened on when no layer sets one.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Our default for Pingora's `grace_period_seconds` (spec §0: exit within 10 s of SIGTERM).
pub const DEFAULT_GRACE_SECONDS: u64 = 10;
/// Our default for Pingora's `graceful_shutdown_timeout_seconds`.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECONDS: u64 = 5;
/// Our default `pid_file` (Pingora's, `/tmp/pingora.pid`, would clash with other Pingora apps).
pub const DEFAULT_PID_FILE: &str = "/tmp/paseo-relay.pid";
/// Our default `upgrade_sock` (same reason).
pub const DEFAULT_UPGRADE_SOCK: &str = "/tmp/paseo-relay_upgrade.sock";
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The values given on the command line (`None`/empty: not given).
#[derive(Debug, Default)]
pub struct Flags {
    /// `--listen`, in order.
    pub listen: Vec<String>,
    /// `--tls-cert`.
    pub tls_cert: Option<String>,
    /// `--tls-key`.
    pub tls_key: Option<String>,
    /// `--log-level`.
    pub log_level: Option<String>,
    /// `--log-format`.
    pub log_format: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<String>,
    /// `-c/--conf/--config`.
    pub config: Option<String>,
}

/// The resolved configuration.
pub struct Settings {
    /// Where to listen, each plain or TLS; at least one, no duplicates.
    pub listeners: Vec<Listener>,
    /// Log level for env_logger (`RUST_LOG`, if set, still wins).
    pub log_level: String,
    /// How log records are written (`text` or `json`).
    pub log_format: LogFormat,
    /// The admin listener's `IP:port` (plain HTTP), if any.
    pub admin_listen: Option<String>,
    /// Pingora's settings, with our defaults where nothing set them.
    pub server: ServerConf,
    /// The relay's tuning (`relay:`), validated.
    pub relay: RelayConf,
    /// The HTTP deadlines (`http:`), validated.
    pub http: HttpConf,
    /// `routes:` and `trusted_proxies:`, built (peers resolved).
    pub router: Router,
    /// `cluster:` (with `PASEO_CLUSTER_SELF`), checked; `None`: a single node.
    pub cluster: Option<ClusterSpec>,
    /// The configuration file read, if any.
    pub config_path: Option<String>,
}

/// A value and where it came from (`--listen`, `PASEO_LISTEN`, `conf.yaml: listen`).
#[derive(Debug, Clone)]
struct Sourced<T> {
    value: T,
    from: String,
}

/// `tls:` of the file, as the Go relay writes it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    cert: Option<String>,
    #[serde(default)]
    key: Option<String>,
}

/// What the YAML file holds.
#[derive(Default)]
struct FileConf {
    listen: Option<Vec<String>>,
    log_level: Option<String>,
    log_format: Option<String>,
    admin_listen: Option<String>,
    tls: TlsFile,
    relay: RelayConf,
    http: HttpConf,
    routes: Vec<RouteConf>,
    trusted_proxies: Vec<String>,
    cluster: Option<ClusterConf>,
    server: ServerConf,
    /// Pingora keys the file sets (our defaults apply to the others).
    server_keys: HashSet<String>,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

/// The names of Pingora's `ServerConf` keys, as its YAML spells them.
fn server_conf_keys() -> HashSet<String> {
    match serde_yaml::to_value(ServerConf::default()) {
        Ok(Value::Mapping(m)) => m
            .keys()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect(),
        _ => HashSet::new(),
    }
}

/// A section that may be empty (`tls:` with nothing under it) or a mapping.
fn section<T: for<'de> Deserialize<'de> + Default>(value: Value) -> Result<T, String> {
    if value.is_null() {
        return Ok(T::default());
    }
    serde_yaml::from_value(value).map_err(|e| e.to_string())
}

/// Largest configuration file read (bytes); a larger one (or `/dev/zero`) is an error.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn read_capped(path: &str) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("{path}: cannot read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{path}: cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!("{path}: larger than {MAX_CONFIG_BYTES} bytes"));
    }
    String::from_utf8(bytes).map_err(|e| format!("{path}: cannot read: {e}"))
}

fn read_file(path: &str) -> Result<FileConf, String> {
    let text = read_capped(path)?;
    let top: Value = serde_yaml::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    let top = match top {
        Value::Null => Mapping::new(),
        Value::Mapping(m) => m,
        _ => {
            return Err(format!(
                "{path}: expected `key: value` lines at the top level"
            ))
        }
    };
    let known = server_conf_keys();
    let mut file = FileConf::default();
    let mut server = Mapping::new();
    for (key, value) in top {
        let Some(key) = key.as_str().map(str::to_string) else {
            return Err(format!("{path}: a key is not a string: {key:?}"));
        };
        match key.as_str() {
            "listen" => {
                let is_list = value.is_sequence();
                let list = match value {
                    Value::Null => vec![],
                    Value::String(s) => vec![s],
                    Value::Sequence(items) => items
                        .into_iter()
                        .map(|v| match v {
                            Value::String(s) => Ok(s),
                            _ => Err(()),
                        })
                        .collect::<Result<_, _>>()
                        .map_err(|()| format!("{path}: listen: expected addresses as strings"))?,
                    _ => {
                        return Err(format!(
                            "{path}: listen: expected an address or a list of addresses"
                        ))
                    }
                };
                let list: Vec<String> = list.into_iter().filter(|s| !s.trim().is_empty()).collect();
                if list.is_empty() && is_list {
                    // `listen: ""` is unset (as in the Go relay); an empty list is a mistake.
                    return Err(format!("{path}: listen: no address given"));
                }
                file.listen = (!list.is_empty()).then_some(list);
            }
            "log_level" => {
                file.log_level = match value {
                    Value::Null => None,
                    Value::String(s) => non_empty(Some(s)),
                    _ => return Err(format!("{path}: log_level: expected a string")),
                }
            }
            "log_format" => {
                file.log_format = match value {
                    Value::Null => None,
                    Value::String(s) => non_empty(Some(s)),
                    _ => return Err(format!("{path}: log_format: expected a string")),
                }
            }
            "admin_listen" => {
                file.admin_listen = match value {
                    Value::Null => None,
                    Value::String(s) => non_empty(Some(s)),
                    _ => return Err(format!("{path}: admin_listen: expected an address")),
                }
            }
            "tls" => file.tls = section(value).map_err(|e| format!("{path}: tls: {e}"))?,
            "relay" => file.relay = section(value).map_err(|e| format!("{path}: relay: {e}"))?,
            "http" => file.http = section(value).map_err(|e| format!("{path}: http: {e}"))?,
            "routes" => {
                let items = match value {
                    Value::Null => vec![],
                    Value::Sequence(items) => items,
                    _ => return Err(format!("{path}: routes: expected a list")),
                };
                for (i, item) in items.into_iter().enumerate() {
                    let route = serde_yaml::from_value(item)
                        .map_err(|e| format!("{path}: routes[{i}]: {e}"))?;
                    file.routes.push(route);
                }
            }
            "cluster" if value.is_null() => file.cluster = None,
            "cluster" => {
                // ClusterConf's errors name their key (`cluster.nodes: ...`).
                let conf = serde_yaml::from_value(value).map_err(|e| match e.to_string() {
                    e if e.starts_with("cluster") => format!("{path}: {e}"),
                    e => format!("{path}: cluster: {e}"),
                })?;
                file.cluster = Some(conf);
            }
            "trusted_proxies" => {
                file.trusted_proxies =
                    section(value).map_err(|e| format!("{path}: trusted_proxies: {e}"))?
            }
            // Pingora sends its readiness signal from `bootstrap`, which the binary runs
            // before daemonising (to take over listeners first): the parent would wait in vain.
            "daemon_wait_for_ready" if value.as_bool() == Some(true) => {
                return Err(format!(
                    "{path}: daemon_wait_for_ready: not supported by paseo-relay (it takes \
                     over listeners before it forks)"
                ))
            }
            _ if known.contains(&key) => {
                // Checked one by one so that a wrong type names its key.
                let mut one = Mapping::new();
                one.insert(Value::String(key.clone()), value.clone());
                serde_yaml::from_value::<ServerConf>(Value::Mapping(one))
                    .map_err(|e| format!("{path}: {key}: {e}"))?;
                server.insert(Value::String(key.clone()), value);
                file.server_keys.insert(key);
            }
            _ => return Err(format!("{path}: unknown key `{key}`")),
        }
    }
    file.server =
        serde_yaml::from_value(Value::Mapping(server)).map_err(|e| format!("{path}: {e}"))?;
    file.relay.validate().map_err(|e| format!("{path}: {e}"))?;
    file.http.validate().map_err(|e| format!("{path}: {e}"))?;
    Ok(file)
}

/// Picks the first layer that has a value: flag, then environment, then file.
fn pick(
    flag: Option<String>,
    flag_name: &str,
    env: &dyn Fn(&str) -> Option<String>,
    var: &str,
    file: Option<String>,
    file_key: String,
) -> Option<Sourced<String>> {
    let sourced = |value, from: &str| Sourced {
        value,
        from: from.to_string(),
    };
    non_empty(flag)
        .map(|v| sourced(v, flag_name))
        .or_else(|| non_empty(env(var)).map(|v| sourced(v, var)))
        .or_else(|| non_empty(file).map(|v| sourced(v, &file_key)))
}

/// One `listen` entry: `[tls://|tcp://]HOST:PORT` or `:PORT` (all IPv4 interfaces, as in
/// Go). Returns the address and `Some(true)` for `tls://`, `Some(false)` for `tcp://`.
fn parse_listen(entry: &str, from: &str) -> Result<(String, Option<bool>), String> {
    let trimmed = entry.trim();
    let (rest, tls) = if let Some(rest) = trimmed.strip_prefix("tls://") {
        (rest, Some(true))
    } else if let Some(rest) = trimmed.strip_prefix("tcp://") {
        (rest, Some(false))
    } else {
        (trimmed, None)
    };
    let full = if rest.starts_with(':') {
        format!("0.0.0.0{rest}")
    } else {
        rest.to_string()
    };
    let addr: SocketAddr = full
        .parse()
        .map_err(|e| format!("{from} {entry}: not an IP:port address ({e})"))?;
    Ok((addr.to_string(), tls))
}

/// Merges the layers and checks everything, TLS files included.
///
/// # Errors
/// One line naming the flag, variable, or file and key, and what is wrong.
pub fn resolve(flags: Flags, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, String> {
    let config_path = non_empty(flags.config).or_else(|| non_empty(env("PASEO_CONFIG")));
    let file = match &config_path {
        Some(path) => read_file(path)?,
        None => FileConf::default(),
    };
    let in_file = |key: &str| match &config_path {
        Some(path) => format!("{path}: {key}"),
        None => key.to_string(),
    };

    // listen
    let listen: Sourced<Vec<String>> = if !flags.listen.is_empty() {
        Sourced {
            value: flags.listen,
            from: "--listen".into(),
        }
    } else if let Some(v) = non_empty(env("PASEO_LISTEN")) {
        let list: Vec<String> = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if list.is_empty() {
            return Err(format!("PASEO_LISTEN: no address in `{v}`"));
        }
        Sourced {
            value: list,
            from: "PASEO_LISTEN".into(),
        }
    } else if let Some(list) = file.listen {
        Sourced {
            value: list,
            from: in_file("listen"),
        }
    } else {
        Sourced {
            value: vec![DEFAULT_LISTEN.to_string()],
            from: "default listen".into(),
        }
    };

    // TLS
    let cert = pick(
        flags.tls_cert,
        "--tls-cert",
        env,
        "PASEO_TLS_CERT",
        file.tls.cert,
        in_file("tls.cert"),
    );
    let key = pick(
        flags.tls_key,
        "--tls-key",
        env,
        "PASEO_TLS_KEY",
        file.tls.key,
        in_file("tls.key"),
    );
    let store: Option<Arc<CertStore>> = match (cert, key) {
        (Some(cert), Some(key)) => Some(CertStore::load(&cert.value, &key.value)?),
        (Some(cert), None) => {
            return Err(format!(
                "{}: a TLS certificate needs a key (--tls-key, PASEO_TLS_KEY or tls.key)",
                cert.from
            ))
        }
        (None, Some(key)) => {
            return Err(format!(
                "{}: a TLS key needs a certificate (--tls-cert, PASEO_TLS_CERT or tls.cert)",
                key.from
            ))
        }
        (None, None) if file.tls.enabled == Some(true) => {
            return Err(format!(
                "{}: TLS is enabled but no certificate and key are set",
                in_file("tls.enabled")
            ))
        }
        (None, None) => None,
    };

    let mut listeners = Vec::new();
    let mut seen = HashSet::new();
    for entry in &listen.value {
        let (addr, force) = parse_listen(entry, &listen.from)?;
        let tls = match (force, &store) {
            (Some(false), _) | (None, None) => None,
            (Some(true) | None, Some(store)) => Some(store.clone()),
            (Some(true), None) => {
                return Err(format!(
                    "{} {entry}: TLS asked for, but no certificate and key are set",
                    listen.from
                ))
            }
        };
        if !seen.insert(addr.clone()) {
            return Err(format!("{} {entry}: address given twice", listen.from));
        }
        listeners.push(Listener { addr, tls });
    }

    // admin listener: plain HTTP on an address of its own
    let admin = pick(
        flags.admin_listen,
        "--admin-listen",
        env,
        "PASEO_ADMIN_LISTEN",
        file.admin_listen,
        in_file("admin_listen"),
    );
    let admin_listen = match admin {
        None => None,
        Some(admin) => {
            let (addr, tls) = parse_listen(&admin.value, &admin.from)?;
            if tls == Some(true) {
                return Err(format!(
                    "{} {}: the admin listener is plain HTTP only",
                    admin.from, admin.value
                ));
            }
            if seen.contains(&addr) {
                return Err(format!(
                    "{} {}: also a relay listen address",
                    admin.from, admin.value
                ));
            }
            Some(addr)
        }
    };

    // log level
    let level = pick(
        flags.log_level,
        "--log-level",
        env,
        "PASEO_LOG_LEVEL",
        file.log_level,
        in_file("log_level"),
    );
    let log_level = match level {
        None => "info".to_string(),
        Some(l) if LOG_LEVELS.contains(&l.value.to_ascii_lowercase().as_str()) => {
            l.value.to_ascii_lowercase()
        }
        Some(l) => {
            return Err(format!(
                "{}: unknown log level `{}` (expected error, warn, info, debug, trace or off)",
                l.from, l.value
            ))
        }
    };

    // log format
    let format = pick(
        flags.log_format,
        "--log-format",
        env,
        "PASEO_LOG_FORMAT",
        file.log_format,
        in_file("log_format"),
    );
    let log_format = match format {
        None => LogFormat::Text,
        Some(f) => LogFormat::parse(&f.value).ok_or_else(|| {
            format!(
                "{}: unknown log format `{}` (expected text or json)",
                f.from, f.value
            )
        })?,
    };

    // Pingora's settings: ours where the file is silent.
    let mut server = file.server;
    let set = |k: &str| file.server_keys.contains(k);
    if !set("grace_period_seconds") {
        server.grace_period_seconds = Some(DEFAULT_GRACE_SECONDS);
    }
    if !set("graceful_shutdown_timeout_seconds") {
        server.graceful_shutdown_timeout_seconds = Some(DEFAULT_SHUTDOWN_TIMEOUT_SECONDS);
    }
    if !set("threads") {
        server.threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    }
    if !set("pid_file") {
        server.pid_file = DEFAULT_PID_FILE.to_string();
    }
    if !set("upgrade_sock") {
        server.upgrade_sock = DEFAULT_UPGRADE_SOCK.to_string();
    }

    if server.threads == 0 {
        return Err(format!("{}: must be greater than 0", in_file("threads")));
    }
    // Pingora's own checks (e.g. max_blocking_threads > 0), before anything starts.
    let server = server.validate().map_err(|e| {
        let what = e
            .context
            .as_ref()
            .map_or_else(|| e.to_string(), |c| c.to_string());
        match &config_path {
            Some(path) => format!("{path}: {what}"),
            None => what,
        }
    })?;

    let router =
        Router::build(&file.routes, &file.trusted_proxies).map_err(|e| match &config_path {
            Some(path) => format!("{path}: {e}"),
            None => e,
        })?;

    // cluster: this node's address must be one of its plain listeners.
    let self_env = non_empty(env("PASEO_CLUSTER_SELF"));
    let cluster = match (&file.cluster, self_env) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(
                "PASEO_CLUSTER_SELF: set, but the configuration has no cluster: section"
                    .to_string(),
            )
        }
        (Some(conf), self_env) => {
            let plain: Vec<SocketAddr> = listeners
                .iter()
                .filter(|l| l.tls.is_none())
                .filter_map(|l| l.addr.parse().ok())
                .collect();
            let over = self_env.as_deref().map(|v| ("PASEO_CLUSTER_SELF", v));
            let spec = conf.check(over, &plain).map_err(|e| {
                if e.starts_with("cluster") {
                    in_file(&e)
                } else {
                    e
                }
            })?;
            Some(spec)
        }
    };

    Ok(Settings {
        listeners,
        log_level,
        log_format,
        admin_listen,
        server,
        relay: file.relay,
        http: file.http,
        router,
        cluster,
        config_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn file(text: &str) -> String {
        let dir = std::env::temp_dir().join(format!("paseo-relay-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = dir.join(format!(
            "{}.yaml",
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    fn addrs(s: &Settings) -> Vec<String> {
        s.listeners.iter().map(|l| l.addr.clone()).collect()
    }

    fn err(flags: Flags, env: &[(&str, &str)]) -> String {
        match resolve(flags, &env_of(env)) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn defaults() {
        let s = resolve(Flags::default(), &env_of(&[])).unwrap();
        assert_eq!(addrs(&s), ["0.0.0.0:8080"]);
        assert!(s.listeners[0].tls.is_none());
        assert_eq!(s.log_level, "info");
        assert_eq!(s.server.grace_period_seconds, Some(10));
        assert_eq!(s.server.graceful_shutdown_timeout_seconds, Some(5));
        assert_eq!(s.server.pid_file, "/tmp/paseo-relay.pid");
        assert_eq!(s.server.upgrade_sock, "/tmp/paseo-relay_upgrade.sock");
        assert_eq!(
            s.server.threads,
            std::thread::available_parallelism().unwrap().get()
        );
    }

    #[test]
    fn each_layer_overrides_the_next() {
        let path = file("listen: 127.0.0.1:1003\nlog_level: warn\nthreads: 3\n");
        let flags = |listen: &[&str], level: Option<&str>| Flags {
            listen: listen.iter().map(|s| s.to_string()).collect(),
            log_level: level.map(str::to_string),
            config: Some(path.clone()),
            ..Flags::default()
        };
        let env = [
            ("PASEO_LISTEN", "127.0.0.1:1002"),
            ("PASEO_LOG_LEVEL", "debug"),
        ];
        let s = resolve(flags(&["127.0.0.1:1001"], Some("trace")), &env_of(&env)).unwrap();
        assert_eq!(
            (addrs(&s), s.log_level.as_str()),
            (vec!["127.0.0.1:1001".to_string()], "trace")
        );
        let s = resolve(flags(&[], None), &env_of(&env)).unwrap();
        assert_eq!(
            (addrs(&s), s.log_level.as_str()),
            (vec!["127.0.0.1:1002".to_string()], "debug")
        );
        let s = resolve(flags(&[], None), &env_of(&[])).unwrap();
        assert_eq!(
            (addrs(&s), s.log_level.as_str()),
            (vec!["127.0.0.1:1003".to_string()], "warn")
        );
        assert_eq!(s.server.threads, 3);
    }

    #[test]
    fn http_deadlines_from_the_file() {
        let s = resolve(Flags::default(), &env_of(&[])).unwrap();
        assert_eq!(s.http, HttpConf::default());
        let path = file("http:\n  request_head_timeout_ms: 1500\n  keepalive_timeout_ms: 2500\n");
        let flags = Flags {
            config: Some(path),
            ..Flags::default()
        };
        let s = resolve(flags, &env_of(&[])).unwrap();
        let want = HttpConf {
            request_head_timeout_ms: 1500,
            keepalive_timeout_ms: 2500,
            ..HttpConf::default()
        };
        assert_eq!(s.http, want);
    }

    #[test]
    fn admin_listen_layers_and_errors() {
        assert_eq!(
            resolve(Flags::default(), &env_of(&[]))
                .unwrap()
                .admin_listen,
            None
        );
        let path = file("admin_listen: \":9091\"\n");
        let with_file = |admin: Option<&str>| Flags {
            admin_listen: admin.map(str::to_string),
            config: Some(path.clone()),
            ..Flags::default()
        };
        let env = [("PASEO_ADMIN_LISTEN", "127.0.0.1:9092")];
        let pick = |flags, env: &[(&str, &str)]| resolve(flags, &env_of(env)).unwrap().admin_listen;
        assert_eq!(
            pick(with_file(Some("127.0.0.1:9093")), &env),
            Some("127.0.0.1:9093".into())
        );
        assert_eq!(pick(with_file(None), &env), Some("127.0.0.1:9092".into()));
        assert_eq!(pick(with_file(None), &[]), Some("0.0.0.0:9091".into()));
        let admin = |a: &str| Flags {
            admin_listen: Some(a.to_string()),
            ..Flags::default()
        };
        assert_eq!(
            err(admin("tls://127.0.0.1:9"), &[]),
            "--admin-listen tls://127.0.0.1:9: the admin listener is plain HTTP only"
        );
        assert_eq!(
            err(admin("0.0.0.0:8080"), &[]),
            "--admin-listen 0.0.0.0:8080: also a relay listen address"
        );
        assert_eq!(
            err(Flags::default(), &[("PASEO_ADMIN_LISTEN", "nowhere")]),
            "PASEO_ADMIN_LISTEN nowhere: not an IP:port address (invalid socket address syntax)"
        );
    }

    #[test]
    fn log_format_layers_and_errors() {
        let path = file("log_format: json\n");
        let flags = |format: Option<&str>| Flags {
            log_format: format.map(str::to_string),
            config: Some(path.clone()),
            ..Flags::default()
        };
        let format = |flags, env: &[(&str, &str)]| resolve(flags, &env_of(env)).unwrap().log_format;
        let env = [("PASEO_LOG_FORMAT", "text")];
        assert_eq!(format(flags(None), &[]), LogFormat::Json);
        assert_eq!(format(flags(None), &env), LogFormat::Text);
        assert_eq!(format(flags(Some("JSON")), &env), LogFormat::Json);
        assert_eq!(format(Flags::default(), &[]), LogFormat::Text);
        assert_eq!(
            err(Flags::default(), &[("PASEO_LOG_FORMAT", "xml")]),
            "PASEO_LOG_FORMAT: unknown log format `xml` (expected text or json)"
        );
        assert_eq!(
            err(flags(Some("logfmt")), &[]),
            "--log-format: unknown log format `logfmt` (expected text or json)"
        );
        let bad = file("log_format: 1\n");
        let flags = Flags {
            config: Some(bad.clone()),
            ..Flags::default()
        };
        assert_eq!(
            err(flags, &[]),
            format!("{bad}: log_format: expected a string")
        );
    }

    #[test]
    fn config_path_from_the_environment_and_go_relay_files() {
        let path = file(
            "listen: \":9000\"\nlog_level: \"info\"\ntls:\n  enabled: false\n  cert: \"\"\n  key: \"\"\n",
        );
        let s = resolve(Flags::default(), &env_of(&[("PASEO_CONFIG", &path)])).unwrap();
        assert_eq!(addrs(&s), ["0.0.0.0:9000"]);
        assert!(s.listeners[0].tls.is_none());
        assert_eq!(s.config_path.as_deref(), Some(path.as_str()));
    }

    #[test]
    fn listen_forms_and_lists() {
        let env = [("PASEO_LISTEN", "127.0.0.1:1, tcp://[::1]:2 ,:3")];
        let s = resolve(Flags::default(), &env_of(&env)).unwrap();
        assert_eq!(addrs(&s), ["127.0.0.1:1", "[::1]:2", "0.0.0.0:3"]);
        let path = file("listen:\n  - 127.0.0.1:4\n  - 127.0.0.1:5\n");
        let s = resolve(
            Flags {
                config: Some(path),
                ..Flags::default()
            },
            &env_of(&[]),
        )
        .unwrap();
        assert_eq!(addrs(&s), ["127.0.0.1:4", "127.0.0.1:5"]);
    }

    #[test]
    fn bad_values_name_their_source() {
        let listen = |l: &[&str]| Flags {
            listen: l.iter().map(|s| s.to_string()).collect(),
            ..Flags::default()
        };
        assert_eq!(
            err(listen(&["localhost"]), &[]),
            "--listen localhost: not an IP:port address (invalid socket address syntax)"
        );
        assert_eq!(
            err(listen(&["127.0.0.1:1", "127.0.0.1:1"]), &[]),
            "--listen 127.0.0.1:1: address given twice"
        );
        assert_eq!(
            err(listen(&["tls://127.0.0.1:1"]), &[]),
            "--listen tls://127.0.0.1:1: TLS asked for, but no certificate and key are set"
        );
        assert_eq!(
            err(Flags::default(), &[("PASEO_LOG_LEVEL", "loud")]),
            "PASEO_LOG_LEVEL: unknown log level `loud` (expected error, warn, info, debug, trace or off)"
        );
        assert_eq!(
            err(Flags::default(), &[("PASEO_LISTEN", " , ")]),
            "PASEO_LISTEN: no address in ` , `"
        );
        assert_eq!(
            err(Flags::default(), &[("PASEO_TLS_CERT", "/c.pem")]),
            "PASEO_TLS_CERT: a TLS certificate needs a key (--tls-key, PASEO_TLS_KEY or tls.key)"
        );
        let flags = Flags {
            tls_key: Some("/k.pem".into()),
            ..Flags::default()
        };
        assert_eq!(
            err(flags, &[]),
            "--tls-key: a TLS key needs a certificate (--tls-cert, PASEO_TLS_CERT or tls.cert)"
        );
    }

    #[test]
    fn bad_files_name_the_file_and_key() {
        let cases = [
            ("bogus: 1\n", "unknown key `bogus`"),
            (
                "threads: many\n",
                "threads: invalid type: string \"many\", expected usize",
            ),
            (
                "listen: 8080\n",
                "listen: expected an address or a list of addresses",
            ),
            (
                "tls:\n  enabled: true\n",
                "tls.enabled: TLS is enabled but no certificate and key are set",
            ),
            (
                "tls:\n  certificate: x\n",
                "tls: unknown field `certificate`, expected one of `enabled`, `cert`, `key`",
            ),
            (
                "relay:\n  ping_interval_ms: 0\n",
                "relay.ping_interval_ms: must be greater than 0",
            ),
            (
                "http:\n  request_head_timeout_ms: 0\n",
                "http.request_head_timeout_ms: must be greater than 0",
            ),
            (
                "http:\n  keepalive_timeout_ms: 2592000001\n",
                "http.keepalive_timeout_ms: must be at most 2592000000 ms (30 days)",
            ),
            (
                "http:\n  tls_handshake_timeout_ms: 0\n",
                "http.tls_handshake_timeout_ms: must be greater than 0",
            ),
            (
                "http:\n  request_timeout_ms: 1\n",
                "http: unknown field `request_timeout_ms`, expected one of \
                 `request_head_timeout_ms`, `keepalive_timeout_ms`, `tls_handshake_timeout_ms`",
            ),
            ("- a\n", "expected `key: value` lines at the top level"),
            ("threads: 0\n", "threads: must be greater than 0"),
            ("listen: []\n", "listen: no address given"),
            (
                "routes:\n  - path_prefix: /\n    upstream: 127.0.0.1:1\n    bogus: 1\n",
                "routes[0]: unknown field `bogus`, expected one of `path_prefix`, `upstream`, `tls`, `sni`, `host_header`, `strip_prefix`, `health_check_interval_ms`",
            ),
            (
                "max_blocking_threads: 0\n",
                "max_blocking_threads must be greater than zero",
            ),
            (
                "daemon_wait_for_ready: true\n",
                "daemon_wait_for_ready: not supported by paseo-relay (it takes over listeners \
                 before it forks)",
            ),
        ];
        for (text, want) in cases {
            let path = file(text);
            let flags = Flags {
                config: Some(path.clone()),
                ..Flags::default()
            };
            assert_eq!(err(flags, &[]), format!("{path}: {want}"), "{text}");
        }
        let flags = Flags {
            config: Some("/nonexistent/paseo.yaml".into()),
            ..Flags::default()
        };
        assert_eq!(
            err(flags, &[]),
            "/nonexistent/paseo.yaml: cannot read: No such file or directory (os error 2)"
        );
    }
}
