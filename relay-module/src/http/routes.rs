//! Routes: every request that is not the relay's own (`<path_prefix>/ws`,
//! `<path_prefix>/health`) goes to the upstream of the longest matching route prefix, so
//! that one process replaces "nginx + relay". Pingora proxies it (streaming bodies both ways,
//! WebSocket upgrades included); this module owns the route table, the round-robin load
//! balancer and TCP health check of each route (Pingora's load-balancing crate), the
//! `X-Forwarded-*` headers, and which client address to believe (`trusted_proxies`).
//!
//! Matching is by path segment: `/app` matches `/app`, `/app/` and `/app/x`, not `/apple`;
//! `/` matches everything. The relay's own paths win over routes; no match is 404.

use ipnet::IpNet;
use pingora::http::RequestHeader;
use pingora::lb::health_check::TcpHealthCheck;
use pingora::lb::selection::RoundRobin;
use pingora::lb::LoadBalancer;
use pingora::prelude::HttpPeer;
use pingora::services::background::GenBackgroundService;
use serde::Deserialize;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Connect timeout to an upstream peer: an unreachable one gives 502, never a hang.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the next bytes of an upstream's response (not for proxied WebSockets,
/// which may be silent for hours), as nginx's `proxy_read_timeout` default.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Default interval of the TCP health check of a route with several peers (ms).
pub const DEFAULT_HEALTH_CHECK_MS: u64 = 1000;

/// `upstream:` of a route: one `host:port` or a list of them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Peers {
    /// A single peer.
    One(String),
    /// Several peers, balanced round robin.
    Many(Vec<String>),
}

impl Peers {
    fn list(&self) -> Vec<String> {
        match self {
            Peers::One(p) => vec![p.clone()],
            Peers::Many(ps) => ps.clone(),
        }
    }
}

/// One entry of `routes:` in the YAML file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConf {
    /// Path prefix, starting with `/` (a trailing `/` is ignored).
    pub path_prefix: String,
    /// Peers, `host:port` (a host name is resolved at start).
    pub upstream: Peers,
    /// Connect to the peers with TLS.
    #[serde(default)]
    pub tls: bool,
    /// TLS server name for the peers (default: the host of the first peer).
    #[serde(default)]
    pub sni: Option<String>,
    /// `Host` header sent upstream instead of the client's.
    #[serde(default)]
    pub host_header: Option<String>,
    /// Remove `path_prefix` from the path sent upstream (`/app/x` → `/x`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// TCP health check interval (ms) when the route has several peers.
    #[serde(default = "default_health_check_ms")]
    pub health_check_interval_ms: u64,
}

fn default_health_check_ms() -> u64 {
    DEFAULT_HEALTH_CHECK_MS
}

/// A route ready to serve.
pub struct Route {
    /// Normalised prefix (`/` or `/a/b`, no trailing `/`).
    pub prefix: String,
    peer_count: usize,
    lb: Arc<LoadBalancer<RoundRobin>>,
    tls: bool,
    sni: String,
    host_header: Option<String>,
    strip_prefix: bool,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Normalises a path prefix: must start with `/`; a trailing `/` is dropped (`/` stays).
///
/// # Errors
/// `must start with /` for anything else.
pub fn normalize_prefix(prefix: &str) -> Result<String, String> {
    if !prefix.starts_with('/') {
        return Err(format!("`{prefix}` must start with /"));
    }
    // A prefix that no request path can match (requests arrive percent-encoded, without
    // a query) is a mistake, not a route.
    let trimmed = prefix.trim_end_matches('/');
    let bad_char = trimmed
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '?' | '#'));
    if let Some(c) = bad_char {
        return Err(format!(
            "`{prefix}` has {c:?}: write a path as requests send it (percent-encoded, no query)"
        ));
    }
    if trimmed
        .split('/')
        .skip(1)
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(format!("`{prefix}` has an empty, `.` or `..` segment"));
    }
    let trimmed = prefix.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

/// Whether `path` is under `prefix` (normalised), by path segment.
pub fn under(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

impl Route {
    /// The next healthy peer (round robin) not in `tried`, or `None` if there is none.
    /// `websocket`: the request is an upgrade, so the response may stay silent for hours
    /// (no read timeout); otherwise [`READ_TIMEOUT`].
    pub fn peer(
        &self,
        tried: &[pingora::protocols::l4::socket::SocketAddr],
        websocket: bool,
    ) -> Option<Box<HttpPeer>> {
        let backend = self
            .lb
            .select_with(b"", 256, |b, healthy| healthy && !tried.contains(&b.addr))?;
        let mut peer = HttpPeer::new(backend.addr, self.tls, self.sni.clone());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        peer.options.total_connection_timeout = Some(CONNECT_TIMEOUT * 2);
        peer.options.read_timeout = (!websocket).then_some(READ_TIMEOUT);
        peer.options.idle_timeout = None;
        Some(Box::new(peer))
    }

    /// Number of peer addresses (a host name may resolve to several).
    pub fn peer_count(&self) -> usize {
        self.peer_count
    }

    /// Rewrites the request for the upstream: strips the prefix if asked and sets `Host`.
    pub fn rewrite(&self, req: &mut RequestHeader) -> pingora::Result<()> {
        if self.strip_prefix && self.prefix != "/" {
            let pq = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let rest = pq.strip_prefix(self.prefix.as_str()).unwrap_or(pq);
            let rest = if rest.starts_with('/') {
                rest.to_string()
            } else {
                format!("/{rest}")
            };
            let uri = rest.parse::<http::Uri>().map_err(|e| {
                pingora::Error::because(pingora::ErrorType::InvalidHTTPHeader, "strip_prefix", e)
            })?;
            req.set_uri(uri);
        }
        if let Some(host) = &self.host_header {
            req.insert_header("Host", host.as_str())?;
        }
        Ok(())
    }
}

/// The route table and the trusted proxies.
#[derive(Default)]
pub struct Router {
    /// Longest prefix first.
    routes: Vec<Arc<Route>>,
    trusted: Vec<IpNet>,
    health: Vec<(String, Arc<LoadBalancer<RoundRobin>>)>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("routes", &self.routes)
            .field("trusted", &self.trusted)
            .finish()
    }
}

impl Router {
    /// Builds the routes (resolving peers) and parses `trusted_proxies` (CIDRs or addresses).
    ///
    /// # Errors
    /// One line naming the entry: `routes[1].path_prefix: ...`, `trusted_proxies[0]: ...`.
    pub fn build(routes: &[RouteConf], trusted_proxies: &[String]) -> Result<Router, String> {
        let mut router = Router::default();
        for (i, conf) in routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            let prefix = normalize_prefix(&conf.path_prefix)
                .map_err(|e| format!("{at}.path_prefix: {e}"))?;
            if router.routes.iter().any(|r| r.prefix == prefix) {
                return Err(format!("{at}.path_prefix: `{prefix}` is given twice"));
            }
            let peers = conf.upstream.list();
            if peers.is_empty() {
                return Err(format!("{at}.upstream: no peer given"));
            }
            for peer in &peers {
                let port_ok = peer.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty()
                        && !host.contains('/')
                        && port.parse::<u16>().is_ok_and(|p| p > 0)
                });
                if !port_ok {
                    return Err(format!("{at}.upstream: `{peer}` is not host:port"));
                }
            }
            if let Some(host) = &conf.host_header {
                if http::HeaderValue::from_str(host).is_err() || host.is_empty() {
                    return Err(format!(
                        "{at}.host_header: `{}` is not a valid header value",
                        host.escape_debug()
                    ));
                }
            }
            if let Some(sni) = &conf.sni {
                if !conf.tls {
                    return Err(format!("{at}.sni: only used with tls: true"));
                }
                if sni.is_empty()
                    || !sni
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
                {
                    return Err(format!(
                        "{at}.sni: `{}` is not a host name",
                        sni.escape_debug()
                    ));
                }
            }
            if conf.health_check_interval_ms == 0 {
                return Err(format!(
                    "{at}.health_check_interval_ms: must be greater than 0"
                ));
            }
            let mut lb =
                LoadBalancer::<RoundRobin>::try_from_iter(peers.iter().map(String::as_str))
                    .map_err(|e| format!("{at}.upstream: cannot resolve: {e}"))?;
            // Each resolved address is a backend (`localhost` may be two).
            let addresses = lb.backends().get_backend().len();
            if addresses == 0 {
                return Err(format!("{at}.upstream: resolves to no address"));
            }
            if addresses > 1 {
                lb.set_health_check(TcpHealthCheck::new());
                lb.health_check_frequency =
                    Some(Duration::from_millis(conf.health_check_interval_ms));
            }
            let lb = Arc::new(lb);
            if addresses > 1 {
                router.health.push((prefix.clone(), lb.clone()));
            }
            let sni = conf.sni.clone().unwrap_or_else(|| {
                let host = peers[0].rsplit_once(':').map_or("", |(h, _)| h);
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            });
            router.routes.push(Arc::new(Route {
                prefix,
                peer_count: addresses,
                lb,
                tls: conf.tls,
                sni,
                host_header: conf.host_header.clone(),
                strip_prefix: conf.strip_prefix,
            }));
        }
        router
            .routes
            .sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        for (i, entry) in trusted_proxies.iter().enumerate() {
            let net = entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    format!("trusted_proxies[{i}]: `{entry}` is not an address or CIDR")
                })?;
            router.trusted.push(net);
        }
        Ok(router)
    }

    /// The route for `path`: the longest matching prefix.
    pub fn route(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| under(&r.prefix, path))
    }

    /// Whether any route is configured.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Pingora background services running the health checks (routes with several peers).
    pub fn health_services(&self) -> Vec<GenBackgroundService<LoadBalancer<RoundRobin>>> {
        self.health
            .iter()
            .map(|(prefix, lb)| {
                GenBackgroundService::new(format!("health check {prefix}"), lb.clone())
            })
            .collect()
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client address to believe: the peer, unless it is a trusted proxy; then the
    /// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
    pub fn client_addr(&self, peer: IpAddr, xff: Option<&str>) -> IpAddr {
        if !self.trusted(peer) {
            return peer;
        }
        let mut client = peer;
        for hop in xff.unwrap_or("").rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !self.trusted(ip) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        client
    }

    /// Sets `X-Forwarded-For`, `-Proto` and `-Host` on a request going upstream. From a
    /// trusted proxy, the incoming values are kept (the peer appended to `-For`); from
    /// anyone else they are replaced.
    pub fn forwarded_headers(
        &self,
        req: &mut RequestHeader,
        peer: Option<IpAddr>,
        tls: bool,
    ) -> pingora::Result<()> {
        let trusted = peer.is_some_and(|ip| self.trusted(ip));
        let header = |req: &RequestHeader, name: &str| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let peer_text = peer.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
        let xff = match header(req, "X-Forwarded-For") {
            Some(prev) if trusted => format!("{prev}, {peer_text}"),
            _ => peer_text,
        };
        let proto = match header(req, "X-Forwarded-Proto") {
            Some(p) if trusted => p,
            _ => if tls { "https" } else { "http" }.to_string(),
        };
        let host = match header(req, "X-Forwarded-Host") {
            Some(h) if trusted => Some(h),
            _ => header(req, "Host").or_else(|| req.uri.authority().map(|a| a.to_string())),
        };
        if !trusted {
            // Other client-address headers are believed only from trusted proxies, too.
            req.remove_header("X-Real-IP");
            req.remove_header("Forwarded");
        }
        req.insert_header("X-Forwarded-For", xff)?;
        req.insert_header("X-Forwarded-Proto", proto)?;
        match host {
            Some(host) => req.insert_header("X-Forwarded-Host", host)?,
            None => {
                req.remove_header("X-Forwarded-Host");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(prefix: &str, upstream: &str) -> RouteConf {
        RouteConf {
            path_prefix: prefix.into(),
            upstream: Peers::One(upstream.into()),
            tls: false,
            sni: None,
            host_header: None,
            strip_prefix: false,
            health_check_interval_ms: 1000,
        }
    }

    #[test]
    fn longest_prefix_by_segment() {
        let r = Router::build(
            &[
                conf("/", "127.0.0.1:1"),
                conf("/app/", "127.0.0.1:2"),
                conf("/app/api", "127.0.0.1:3"),
            ],
            &[],
        )
        .unwrap();
        let at = |p: &str| r.route(p).map(|r| r.prefix.clone());
        assert_eq!(at("/app/api/v1").as_deref(), Some("/app/api"));
        assert_eq!(at("/app/apix").as_deref(), Some("/app"));
        assert_eq!(at("/app").as_deref(), Some("/app"));
        assert_eq!(at("/apple").as_deref(), Some("/"));
        let none = Router::build(&[conf("/app", "127.0.0.1:2")], &[]).unwrap();
        assert!(none.route("/apple").is_none());
    }

    #[test]
    fn bad_routes_name_the_entry() {
        let err = |routes: &[RouteConf], trusted: &[&str]| {
            let trusted: Vec<String> = trusted.iter().map(|s| s.to_string()).collect();
            Router::build(routes, &trusted).unwrap_err()
        };
        assert_eq!(
            err(&[conf("app", "127.0.0.1:1")], &[]),
            "routes[0].path_prefix: `app` must start with /"
        );
        assert_eq!(
            err(&[conf("/a", "127.0.0.1")], &[]),
            "routes[0].upstream: `127.0.0.1` is not host:port"
        );
        assert_eq!(
            err(
                &[conf("/a", "127.0.0.1:1"), conf("/a/", "127.0.0.1:2")],
                &[]
            ),
            "routes[1].path_prefix: `/a` is given twice"
        );
        assert_eq!(
            err(&[], &["10.0.0.0/33"]),
            "trusted_proxies[0]: `10.0.0.0/33` is not an address or CIDR"
        );
        assert_eq!(
            err(&[conf("/a/../b", "127.0.0.1:1")], &[]),
            "routes[0].path_prefix: `/a/../b` has an empty, `.` or `..` segment"
        );
        assert_eq!(
            err(&[conf("/a b", "127.0.0.1:1")], &[]),
            "routes[0].path_prefix: `/a b` has ' ': write a path as requests send it (percent-encoded, no query)"
        );
        assert_eq!(
            err(&[conf("/a", "http://127.0.0.1:80")], &[]),
            "routes[0].upstream: `http://127.0.0.1:80` is not host:port"
        );
        let mut bad_host = conf("/a", "127.0.0.1:1");
        bad_host.host_header = Some("a\r\nX-Injected: y".into());
        assert_eq!(
            err(&[bad_host], &[]),
            "routes[0].host_header: `a\\r\\nX-Injected: y` is not a valid header value"
        );
        let mut sni_plain = conf("/a", "127.0.0.1:1");
        sni_plain.sni = Some("x.example".into());
        assert_eq!(
            err(&[sni_plain], &[]),
            "routes[0].sni: only used with tls: true"
        );
    }

    #[test]
    fn client_address_believes_only_trusted_proxies() {
        let r = Router::build(&[], &["10.0.0.0/8".into(), "::1".into()]).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(r.client_addr(ip("1.2.3.4"), Some("9.9.9.9")), ip("1.2.3.4"));
        assert_eq!(
            r.client_addr(ip("10.1.1.1"), Some("9.9.9.9, 5.5.5.5")),
            ip("5.5.5.5")
        );
        assert_eq!(
            r.client_addr(ip("10.1.1.1"), Some("5.5.5.5, 10.2.2.2")),
            ip("5.5.5.5")
        );
        assert_eq!(r.client_addr(ip("::1"), None), ip("::1"));
        assert_eq!(r.client_addr(ip("10.1.1.1"), Some("junk")), ip("10.1.1.1"));
    }

    #[test]
    fn forwarded_headers_and_rewrite() {
        let r = Router::build(&[], &["10.0.0.0/8".into()]).unwrap();
        let mut req = RequestHeader::build("GET", b"/app/x?q=1", None).unwrap();
        req.insert_header("Host", "site.example").unwrap();
        req.insert_header("X-Forwarded-For", "6.6.6.6").unwrap();
        req.insert_header("X-Real-IP", "6.6.6.6").unwrap();
        req.insert_header("Forwarded", "for=6.6.6.6").unwrap();
        r.forwarded_headers(&mut req, Some("1.2.3.4".parse().unwrap()), true)
            .unwrap();
        let h = |req: &RequestHeader, n: &str| {
            req.headers.get(n).unwrap().to_str().unwrap().to_string()
        };
        assert_eq!(h(&req, "X-Forwarded-For"), "1.2.3.4");
        assert_eq!(h(&req, "X-Forwarded-Proto"), "https");
        assert_eq!(h(&req, "X-Forwarded-Host"), "site.example");
        assert!(req.headers.get("X-Real-IP").is_none() && req.headers.get("Forwarded").is_none());
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("Host", "inner").unwrap();
        req.insert_header("X-Forwarded-For", "6.6.6.6").unwrap();
        req.insert_header("X-Forwarded-Host", "outer.example")
            .unwrap();
        r.forwarded_headers(&mut req, Some("10.0.0.2".parse().unwrap()), false)
            .unwrap();
        assert_eq!(h(&req, "X-Forwarded-For"), "6.6.6.6, 10.0.0.2");
        assert_eq!(h(&req, "X-Forwarded-Proto"), "http");
        assert_eq!(h(&req, "X-Forwarded-Host"), "outer.example");

        let mut c = conf("/app", "127.0.0.1:1");
        c.strip_prefix = true;
        c.host_header = Some("backend.internal".into());
        let router = Router::build(&[c], &[]).unwrap();
        let route = router.route("/app/x").unwrap();
        let mut req = RequestHeader::build("GET", b"/app/x?q=1", None).unwrap();
        route.rewrite(&mut req).unwrap();
        assert_eq!(req.uri.to_string(), "/x?q=1");
        assert_eq!(h(&req, "Host"), "backend.internal");
        let mut req = RequestHeader::build("GET", b"/app?q", None).unwrap();
        route.rewrite(&mut req).unwrap();
        assert_eq!(req.uri.to_string(), "/?q");
    }
}
