//! `cluster:` of the configuration file: which nodes form the cluster, which one this is,
//! and how their health is checked. Plain data with a [`ClusterConf::check`] that turns it
//! into a [`ClusterSpec`] (no I/O: names are resolved by the running node, see
//! [`crate::cluster::discovery`]).

use crate::config::MAX_DURATION_MS;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Default `health_check_interval_ms`.
pub const DEFAULT_HEALTH_CHECK_MS: u64 = 500;
/// Default `down_after_failures` and `up_after_successes`.
pub const DEFAULT_CHECKS: u32 = 3;
/// Longest `health_check_interval_ms`: one minute.
pub const MAX_HEALTH_CHECK_MS: u64 = 60_000;
const _: () = assert!(MAX_HEALTH_CHECK_MS <= MAX_DURATION_MS);
/// Most consecutive checks `down_after_failures` or `up_after_successes` may ask for.
pub const MAX_CHECKS: u32 = 100;
/// How often node names are resolved again (a Kubernetes headless service).
pub const RESOLVE_EVERY: Duration = Duration::from_secs(10);

/// `cluster:` as the file writes it. Every error of its parse names the key
/// (`cluster.nodes: ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConf {
    /// This node's `IP:port` as the other nodes reach it (a plain listener of this node);
    /// `PASEO_CLUSTER_SELF` overrides it, so every node can share one file.
    pub self_addr: Option<String>,
    /// `host:port` of a plain listener of every node, this one included: a list, or one
    /// DNS name that resolves to all of them.
    pub nodes: Vec<String>,
    /// How often each node's `GET /ready` is checked. Default 500 ms.
    pub health_check_interval_ms: u64,
    /// Consecutive failed checks before a node leaves the ring. Default 3.
    pub down_after_failures: u32,
    /// Consecutive good checks before a node joins the ring again. Default 3.
    pub up_after_successes: u32,
}

const KEYS: &[&str] = &[
    "self",
    "nodes",
    "health_check_interval_ms",
    "down_after_failures",
    "up_after_successes",
];

/// `nodes:` is a `host:port` string or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum NodeList {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for ClusterConf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Conf;
        impl<'de> Visitor<'de> for Conf {
            type Value = ClusterConf;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`key: value` lines (cluster.self, cluster.nodes, ...)")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ClusterConf, A::Error> {
                fn named<T, E: fmt::Display, F: de::Error>(
                    key: &str,
                    what: &str,
                    value: Result<T, E>,
                ) -> Result<T, F> {
                    value.map_err(|_| F::custom(format!("cluster.{key}: expected {what}")))
                }
                let mut conf = ClusterConf {
                    self_addr: None,
                    nodes: Vec::new(),
                    health_check_interval_ms: DEFAULT_HEALTH_CHECK_MS,
                    down_after_failures: DEFAULT_CHECKS,
                    up_after_successes: DEFAULT_CHECKS,
                };
                let mut has_nodes = false;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "self" => {
                            let v = map.next_value::<Option<String>>();
                            conf.self_addr = named(&key, "an IP:port address", v)?;
                        }
                        "nodes" => {
                            let v = map.next_value::<NodeList>();
                            conf.nodes = match named(&key, "host:port or a list of host:port", v)? {
                                NodeList::One(node) => vec![node],
                                NodeList::Many(nodes) => nodes,
                            };
                            has_nodes = true;
                        }
                        "health_check_interval_ms" => {
                            let v = map.next_value::<u64>();
                            conf.health_check_interval_ms = named(&key, "milliseconds", v)?;
                        }
                        "down_after_failures" => {
                            let v = map.next_value::<u32>();
                            conf.down_after_failures = named(&key, "a count", v)?;
                        }
                        "up_after_successes" => {
                            let v = map.next_value::<u32>();
                            conf.up_after_successes = named(&key, "a count", v)?;
                        }
                        _ => {
                            return Err(de::Error::custom(format!(
                                "cluster: unknown key `{}` (expected {})",
                                key.escape_debug(),
                                KEYS.join(", ")
                            )))
                        }
                    }
                }
                if !has_nodes {
                    return Err(de::Error::custom(
                        "cluster.nodes: missing (host:port of every node)",
                    ));
                }
                Ok(conf)
            }
        }
        deserializer.deserialize_map(Conf)
    }
}

/// One entry of `nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEntry {
    /// A literal `IP:port`.
    Addr(SocketAddr),
    /// A `host:port` whose host is resolved every [`RESOLVE_EVERY`] (each address is a node).
    Name {
        /// The host name.
        host: String,
        /// The port of every address it resolves to.
        port: u16,
    },
}

impl NodeEntry {
    /// Parses `host:port`, `IP:port` or `[IPv6]:port`.
    ///
    /// # Errors
    /// `` `x` is not host:port `` for anything else.
    pub fn parse(entry: &str) -> Result<NodeEntry, String> {
        let bad = || format!("`{}` is not host:port", entry.escape_debug());
        if let Ok(addr) = entry.parse::<SocketAddr>() {
            return Ok(NodeEntry::Addr(addr));
        }
        let (host, port) = entry.rsplit_once(':').ok_or_else(bad)?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(bad)?;
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !host_ok {
            return Err(bad());
        }
        Ok(NodeEntry::Name {
            host: host.to_string(),
            port,
        })
    }
}

/// A checked `cluster:`: what [`crate::cluster::Cluster::new`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// This node.
    pub self_addr: SocketAddr,
    /// The node list, literal addresses and names.
    pub nodes: Vec<NodeEntry>,
    /// Interval of the health checks.
    pub interval: Duration,
    /// Failed checks before a node is down.
    pub down_after_failures: u32,
    /// Good checks before a node is up again.
    pub up_after_successes: u32,
}

impl ClusterSpec {
    /// Whether some entry is a name (then the nodes are resolved again every 10 s).
    pub fn has_names(&self) -> bool {
        self.nodes
            .iter()
            .any(|n| matches!(n, NodeEntry::Name { .. }))
    }
}

impl ClusterConf {
    /// Checks the values and returns the spec. `self_override` is `PASEO_CLUSTER_SELF`
    /// (with its name, for errors) when set; `plain` are this node's plain (`tcp://`) listen
    /// addresses, one of which `self` must be served by.
    ///
    /// # Errors
    /// One line naming the key: `cluster.nodes[1]: ...`, `cluster.self: ...`.
    pub fn check(
        &self,
        self_override: Option<(&str, &str)>,
        plain: &[SocketAddr],
    ) -> Result<ClusterSpec, String> {
        if self.nodes.is_empty() {
            return Err("cluster.nodes: no node given".to_string());
        }
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for (i, entry) in self.nodes.iter().enumerate() {
            let at = if self.nodes.len() == 1 {
                "cluster.nodes".to_string()
            } else {
                format!("cluster.nodes[{i}]")
            };
            let node = NodeEntry::parse(entry.trim()).map_err(|e| format!("{at}: {e}"))?;
            if nodes.contains(&node) {
                return Err(format!("{at}: `{entry}` is given twice"));
            }
            nodes.push(node);
        }
        let positive = [
            (
                "health_check_interval_ms",
                self.health_check_interval_ms,
                MAX_HEALTH_CHECK_MS,
            ),
            (
                "down_after_failures",
                self.down_after_failures.into(),
                MAX_CHECKS.into(),
            ),
            (
                "up_after_successes",
                self.up_after_successes.into(),
                MAX_CHECKS.into(),
            ),
        ];
        for (key, value, most) in positive {
            if value == 0 {
                return Err(format!("cluster.{key}: must be greater than 0"));
            }
            if value > most {
                return Err(format!("cluster.{key}: must be at most {most}"));
            }
        }

        let (from, given) = match (self_override, &self.self_addr) {
            (Some((var, value)), _) => (var.to_string(), value.to_string()),
            (None, Some(value)) => ("cluster.self".to_string(), value.clone()),
            (None, None) => {
                return Err(
                    "cluster.self: not set (this node's IP:port as the other nodes \
                     reach it; or set PASEO_CLUSTER_SELF)"
                        .to_string(),
                )
            }
        };
        let self_addr: SocketAddr = given.trim().parse().map_err(|_| {
            format!(
                "{from}: `{}` is not an IP:port address",
                given.escape_debug()
            )
        })?;
        if !nodes.iter().any(|n| matches!(n, NodeEntry::Name { .. }))
            && !nodes.contains(&NodeEntry::Addr(self_addr))
        {
            return Err(format!("{from}: `{self_addr}` is not in cluster.nodes"));
        }
        let served = plain.iter().any(|l| {
            l.port() == self_addr.port() && (l.ip() == self_addr.ip() || l.ip().is_unspecified())
        });
        if !served {
            return Err(format!(
                "{from}: `{self_addr}` is not served by a plain (tcp://) listen address of \
                 this node"
            ));
        }
        Ok(ClusterSpec {
            self_addr,
            nodes,
            interval: Duration::from_millis(self.health_check_interval_ms),
            down_after_failures: self.down_after_failures,
            up_after_successes: self.up_after_successes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(nodes: &[&str], me: Option<&str>) -> ClusterConf {
        ClusterConf {
            self_addr: me.map(str::to_string),
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            health_check_interval_ms: DEFAULT_HEALTH_CHECK_MS,
            down_after_failures: DEFAULT_CHECKS,
            up_after_successes: DEFAULT_CHECKS,
        }
    }

    fn plain(addrs: &[&str]) -> Vec<SocketAddr> {
        addrs.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn cluster_conf_forms_and_defaults() {
        let c = conf(&["10.0.0.1:8080", "10.0.0.2:8080"], Some("10.0.0.1:8080"));
        let spec = c.check(None, &plain(&["0.0.0.0:8080"])).unwrap();
        assert_eq!(spec.self_addr, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(spec.interval, Duration::from_millis(500));
        assert_eq!((spec.down_after_failures, spec.up_after_successes), (3, 3));
        assert!(!spec.has_names());
        let dns = conf(&["relay-headless.default.svc:8080"], None);
        let spec = dns
            .check(
                Some(("PASEO_CLUSTER_SELF", "10.1.2.3:8080")),
                &plain(&["0.0.0.0:8080"]),
            )
            .unwrap();
        assert!(spec.has_names());
        assert_eq!(
            spec.nodes,
            [NodeEntry::Name {
                host: "relay-headless.default.svc".into(),
                port: 8080
            }]
        );
        assert_eq!(
            NodeEntry::parse("[::1]:9"),
            Ok(NodeEntry::Addr("[::1]:9".parse().unwrap()))
        );
    }

    #[test]
    fn cluster_conf_errors_name_the_key() {
        let err = |c: ClusterConf, env: Option<(&str, &str)>| {
            c.check(env, &plain(&["127.0.0.1:9001"])).unwrap_err()
        };
        let me = Some("127.0.0.1:9001");
        assert_eq!(err(conf(&[], me), None), "cluster.nodes: no node given");
        assert_eq!(
            err(conf(&["127.0.0.1:9001", "127.0.0.1"], me), None),
            "cluster.nodes[1]: `127.0.0.1` is not host:port"
        );
        assert_eq!(
            err(conf(&["http://a:1"], me), None),
            "cluster.nodes: `http://a:1` is not host:port"
        );
        assert_eq!(
            err(conf(&["127.0.0.1:9001", "127.0.0.1:9001"], me), None),
            "cluster.nodes[1]: `127.0.0.1:9001` is given twice"
        );
        assert_eq!(
            err(conf(&["127.0.0.1:9001"], None), None),
            "cluster.self: not set (this node's IP:port as the other nodes reach it; or set \
             PASEO_CLUSTER_SELF)"
        );
        assert_eq!(
            err(conf(&["127.0.0.1:9001"], Some("node-a:9001")), None),
            "cluster.self: `node-a:9001` is not an IP:port address"
        );
        assert_eq!(
            err(
                conf(&["127.0.0.1:9001"], me),
                Some(("PASEO_CLUSTER_SELF", "127.0.0.1:9002"))
            ),
            "PASEO_CLUSTER_SELF: `127.0.0.1:9002` is not in cluster.nodes"
        );
        assert_eq!(
            err(
                conf(
                    &["127.0.0.1:9001", "127.0.0.1:9002"],
                    Some("127.0.0.1:9002")
                ),
                None
            ),
            "cluster.self: `127.0.0.1:9002` is not served by a plain (tcp://) listen address \
             of this node"
        );
        let mut zero = conf(&["127.0.0.1:9001"], me);
        zero.health_check_interval_ms = 0;
        assert_eq!(
            err(zero, None),
            "cluster.health_check_interval_ms: must be greater than 0"
        );
        let mut many = conf(&["127.0.0.1:9001"], me);
        many.up_after_successes = 101;
        assert_eq!(
            err(many, None),
            "cluster.up_after_successes: must be at most 100"
        );
        let mut none = conf(&["127.0.0.1:9001"], me);
        none.down_after_failures = 0;
        assert_eq!(
            err(none, None),
            "cluster.down_after_failures: must be greater than 0"
        );
    }
}
