//! `RelayProxy`: the Pingora `ProxyHttp` module that answers the relay's HTTP surface
//! (relay-protocol.md §0 "HTTP surface", §1) on `<relay.path_prefix>/ws` and `/health`,
//! hands accepted sockets to [`crate::socket::conn::run`], and lets Pingora proxy every other path
//! that a route matches ([`crate::http::routes`]); the rest is 404.
//!
//! Flow of a `/ws` request in `request_filter`: query parameters ([`crate::http::params`]) →
//! RFC 6455 handshake ([`crate::http::handshake`]) → attach to the session (on-connect frames are
//! queued) → 101 written by Pingora → pipelined bytes collected → the raw stream is swapped
//! out of Pingora's session and given to a spawned socket task → `Ok(true)`, which ends
//! Pingora's handling of the request.
//!
//! [`add_relay`] puts the whole relay into a Pingora `Server`: this HTTP service on every
//! [`Listener`] (plain or TLS, behind the HTTP deadlines of [`crate::http::front`]) plus the
//! background services for timers, the shutdown drain and the SIGHUP certificate reload.

use crate::cluster::{tunnel, Cluster, Tunnel};
use crate::config::HttpConf;
use crate::http::admin::admin_service;
use crate::http::front::{Deadlines, Front};
use crate::http::handshake::{self, HandshakeError};
use crate::http::params;
use crate::http::routes::{Route, Router};
use crate::ops::lifecycle::{DrainService, Lifecycle};
use crate::ops::metrics::{Handler, Rejection};
use crate::ops::tls::{CertStore, ReloadService};
use crate::ops::TimerService;
use crate::protocol::{assign_connection_id, SocketKind};
use crate::session::admission::{DRAINING, RETRY_AFTER_SECONDS, TOO_MANY_REPLACEMENTS};
use crate::session::hub::{AttachError, InFlight, SessionHub};
use crate::socket::conn;
use crate::socket::outbox::Outbox;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::FutureExt;
use log::{debug, warn};
use pingora::http::ResponseHeader;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::ServerSession;
use pingora::proxy::{http_proxy, FailToProxy, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use pingora::upstreams::peer::Peer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// Body of `GET /health` (spec §1.1): 15 bytes, `application/json`.
pub const HEALTH_BODY: &str = r#"{"status":"ok"}"#;
/// Body of every unknown path (spec §1.1).
pub const NOT_FOUND_BODY: &str = "Not found";
/// Body of the 431 for a request head over `max_request_head_bytes`.
pub const HEAD_TOO_LARGE_BODY: &str = "Request header fields too large";
pub(crate) const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
pub(crate) const JSON: &str = "application/json";

/// Size of a request head as the relay counts it: request target plus every header name and
/// value, each header with its `": "` and CRLF.
fn head_bytes(req: &pingora::http::RequestHeader) -> usize {
    let target = req.uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    req.headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + target
}

/// The relay as a Pingora `ProxyHttp` application. Cheap to clone the hub into it.
pub struct RelayProxy {
    hub: Arc<SessionHub>,
    router: Arc<Router>,
    /// `<path_prefix>/ws`.
    ws_path: String,
    /// `<path_prefix>/health`.
    health_path: String,
    /// `<path_prefix>/ready`.
    ready_path: String,
    /// The cluster this node belongs to (`None`: a single node).
    cluster: Option<Arc<Cluster>>,
}

impl RelayProxy {
    /// A relay serving the sessions of `hub`, mounted on `relay.path_prefix`, with `router`
    /// for every other path.
    pub fn new(hub: Arc<SessionHub>, router: Arc<Router>) -> Self {
        let mount = hub.conf().mount().to_string();
        RelayProxy {
            hub,
            router,
            ws_path: format!("{mount}/ws"),
            health_path: format!("{mount}/health"),
            ready_path: format!("{mount}/ready"),
            cluster: None,
        }
    }

    /// This relay as a node of `cluster`: a `/ws` whose serverId another node owns is
    /// tunnelled there (see [`crate::cluster`]).
    pub fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }

    /// The client's address as logs should show it (see [`Router::client_addr`]).
    fn client_addr(&self, session: &Session) -> Option<IpAddr> {
        let peer = session.client_addr()?.as_inet()?.ip();
        let xff = session
            .req_header()
            .headers
            .get("X-Forwarded-For")
            .and_then(|v| v.to_str().ok());
        if let Some(cluster) = &self.cluster {
            // A node tunnelled it: that node is a trusted proxy.
            if cluster.is_hop(session.req_header(), Some(peer)) {
                return Some(Cluster::tunnelled_client(&self.router, peer, xff));
            }
        }
        Some(self.router.client_addr(peer, xff))
    }
}

/// Per-request state: the in-flight count and, for a proxied request, its route.
pub struct RequestCtx {
    _in_flight: InFlight,
    route: Option<Arc<Route>>,
    /// Peers whose connect failed for this request (not tried again).
    failed_peers: Vec<pingora::protocols::l4::socket::SocketAddr>,
}

/// Body of the 502 for an unreachable upstream (or a route without a healthy peer).
pub const BAD_GATEWAY_BODY: &str = "Bad gateway";

/// One listening address of the relay.
#[derive(Debug, Clone)]
pub struct Listener {
    /// `host:port` to bind, e.g. `0.0.0.0:8080` or `[::]:443`.
    pub addr: String,
    /// The certificate store when this listener speaks TLS; `None` for plain TCP.
    pub tls: Option<Arc<CertStore>>,
}

impl Listener {
    /// A plain TCP listener on `addr`.
    pub fn plain(addr: impl Into<String>) -> Listener {
        Listener {
            addr: addr.into(),
            tls: None,
        }
    }
}

/// Builds the Pingora HTTP services that serve the relay on `listeners`, behind the
/// deadlines of `http` ([`Front`]): one service for the plain listeners and one per
/// certificate store for the TLS ones (a Pingora service has one app for all its
/// listeners). All share `hub`, so a daemon on a plain LAN listener and an app on a TLS one
/// pair up. Alone they run no timers, drain or reload: use [`add_relay`], which adds those.
pub fn relay_service(
    server_conf: &Arc<ServerConf>,
    hub: Arc<SessionHub>,
    router: Arc<Router>,
    listeners: &[Listener],
    http: &HttpConf,
    cluster: Option<&Arc<Cluster>>,
) -> Vec<Service<Front<RelayProxy>>> {
    let deadlines = Deadlines::new(http, hub.metrics().request_timeouts.clone());
    // Listeners grouped by certificate store (`None`: plain), in order of appearance.
    let mut groups: Vec<(Option<Arc<CertStore>>, Vec<&Listener>)> = Vec::new();
    for listener in listeners {
        let same = |store: &Option<Arc<CertStore>>| match (store, &listener.tls) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (a, b) => a.is_none() && b.is_none(),
        };
        match groups.iter_mut().find(|(store, _)| same(store)) {
            Some((_, group)) => group.push(listener),
            None => groups.push((listener.tls.clone(), vec![listener])),
        }
    }
    let mut tls_services = 0;
    let mut services = Vec::new();
    for (store, group) in groups {
        let name = match &store {
            None => "paseo-relay".to_string(),
            Some(_) => {
                tls_services += 1;
                match tls_services {
                    1 => "paseo-relay tls".to_string(),
                    n => format!("paseo-relay tls {n}"),
                }
            }
        };
        let relay = RelayProxy::new(hub.clone(), router.clone()).with_cluster(cluster.cloned());
        let proxy = http_proxy(server_conf, relay);
        let tls = store.as_ref().map(|store| store.tls_settings());
        let mut service = Service::new(name, Front::new(proxy, tls, deadlines.clone()));
        for listener in group {
            service.add_listener(tcp_listener(&listener.addr));
        }
        services.push(service);
    }
    services
}

/// A plain TCP listener on `addr` (TLS, if any, is [`Front`]'s).
pub(crate) fn tcp_listener(addr: &str) -> ListenerConfig {
    // No L4 buffers: Pingora's defaults (64 KiB read, 1460 B write, allocated per connection)
    // would be most of an idle socket's memory; HTTP and tungstenite buffer on their own.
    ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings::unbuffered())
}

/// Adds the relay to `server`: the HTTP service on `listeners` (relay paths, and `router`
/// for every other path), the admin service on `admin` if given (see [`crate::http::admin`])
/// and the background services that run the nudge timers, the drain
/// on graceful shutdown (see [`crate::ops::lifecycle`]), the SIGHUP reload of the TLS
/// certificate, the routes' health checks and, with `cluster`, the cluster's health checks
/// and ownership moves (see [`crate::cluster`]). Every listener, the admin's too, applies the
/// deadlines of `http`. Call before `run`; nothing starts before it (so `-d` daemon mode
/// works). Pass `RelaySignals(life)` to `Server::run` so the drain knows an upgrade from a
/// terminate.
#[allow(clippy::too_many_arguments)] // the pieces the binary resolved, each used once
pub fn add_relay(
    server: &mut Server,
    hub: &Arc<SessionHub>,
    router: Router,
    listeners: &[Listener],
    admin: Option<&str>,
    http: &HttpConf,
    life: &Arc<Lifecycle>,
    cluster: Option<&Arc<Cluster>>,
) {
    if let Some(addr) = admin {
        let admin = admin_service(&server.configuration, hub.clone(), addr, http);
        server.add_service(admin);
    }
    for health_check in router.health_services() {
        server.add_service(health_check);
    }
    for service in relay_service(
        &server.configuration,
        hub.clone(),
        Arc::new(router),
        listeners,
        http,
        cluster,
    ) {
        server.add_service(service);
    }
    if let Some(cluster) = cluster {
        cluster.add_services(server, hub);
    }
    server.add_service(background_service(
        "relay timers",
        TimerService(hub.clone()),
    ));
    server.add_service(background_service(
        "relay drain",
        DrainService {
            hub: hub.clone(),
            life: life.clone(),
        },
    ));
    let store = listeners.iter().find_map(|l| l.tls.clone());
    server.add_service(background_service("TLS reload", ReloadService(store)));
}

/// Writes a complete response with an exact body, `Content-Type` and extra headers.
pub(crate) async fn respond(
    session: &mut Session,
    status: u16,
    content_type: &str,
    body: impl Into<Bytes>,
    extra: &[(&'static str, &str)],
) -> Result<()> {
    let body = body.into();
    let mut resp = ResponseHeader::build(status, Some(3 + extra.len()))?;
    resp.insert_header("Content-Type", content_type)?;
    resp.insert_header("Content-Length", body.len().to_string())?;
    for (name, value) in extra {
        resp.insert_header(*name, *value)?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// A Pingora session over an empty in-memory stream, left in place of the real one after
/// its stream is taken, so that Pingora's end-of-request handling finds a valid request.
async fn placeholder_session() -> ServerSession {
    let io = std::io::Cursor::new(b"GET /ws HTTP/1.1\r\nHost: relay\r\n\r\n".to_vec());
    let mut placeholder = ServerSession::new_http1(Box::new(io));
    // Reading from an in-memory buffer cannot fail; a failure would only leave it empty.
    let _ = placeholder.read_request().await;
    placeholder.set_keepalive(None);
    placeholder
}

impl RelayProxy {
    /// 503 for a `/ws` while the relay drains: `Relay draining` with `Retry-After: 5` after
    /// `POST /drain`, or the stop's reason (`Relay shutting down`, `Service restart`) on a
    /// connection that races a shutdown.
    async fn refuse_draining(&self, session: &mut Session) -> Result<()> {
        self.hub.metrics().rejected(Rejection::Draining).inc();
        if let Some(closing) = self.hub.closing() {
            debug!("/ws refused: the relay is stopping");
            session.set_keepalive(None);
            return respond(session, 503, TEXT_PLAIN, closing.reason, &[]).await;
        }
        debug!("/ws refused: the relay is draining");
        let retry = RETRY_AFTER_SECONDS.to_string();
        respond(
            session,
            503,
            TEXT_PLAIN,
            DRAINING,
            &[("Retry-After", &retry)],
        )
        .await
    }

    /// Tunnels a validated `/ws` to the owner of its serverId (see [`crate::cluster::tunnel`]):
    /// the owner's answer goes to the client, and after a 101 the two connections are
    /// spliced by a spawned task. `Ok(false)`: no other node takes it, serve it here.
    async fn tunnel(
        &self,
        session: &mut Session,
        cluster: &Cluster,
        mut t: Tunnel,
    ) -> Result<bool> {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let mut req = session.req_header().clone();
        self.router.forwarded_headers(&mut req, peer, tls)?;
        Cluster::mark_hop(&mut req)?;
        let head = tunnel::request_head(&req);
        let Some((owner_addr, owner, answer)) = tunnel::open(cluster, &mut t, &head).await else {
            return Ok(false);
        };
        if answer.status != 101 {
            debug!("cluster: {owner_addr} answered {} to {t}", answer.status);
            tunnel::count_answer(cluster, &answer);
            let content_type = answer.header("Content-Type").unwrap_or(TEXT_PLAIN);
            let extra: Vec<(&'static str, &str)> = ["Retry-After", "Sec-WebSocket-Version"]
                .into_iter()
                .filter_map(|name| answer.header(name).map(|value| (name, value)))
                .collect();
            let body = Bytes::copy_from_slice(&answer.body);
            respond(session, answer.status, content_type, body, &extra).await?;
            return Ok(true);
        }
        let mut resp = ResponseHeader::build(101, Some(answer.headers.len()))?;
        for (name, value) in &answer.headers {
            resp.append_header(name.clone(), value.as_str())?;
        }
        let downstream = &mut session.downstream_session;
        if let Err(e) = downstream.write_response_header(Box::new(resp)).await {
            debug!("cluster: writing the 101 of {t} failed: {e}");
            return Ok(true);
        }
        let preread = match downstream.read_request_body().now_or_never() {
            Some(Ok(Some(bytes))) => bytes.to_vec(),
            _ => Vec::new(),
        };
        let taken = std::mem::replace(&mut **downstream, placeholder_session().await);
        let ServerSession::H1(h1) = taken else {
            warn!("/ws: upgrade on a non-HTTP/1 session");
            return Ok(true);
        };
        debug!("cluster: {t} tunnelled to {owner_addr}");
        let open = cluster.open_tunnel();
        let grace = self.hub.conf().close_grace();
        tokio::spawn(tunnel::splice(
            h1.into_inner(),
            preread,
            owner,
            answer.body,
            grace,
            open,
        ));
        Ok(true)
    }

    /// Validates a `/ws` and serves it here, or on a cluster node tunnels it to the owner of
    /// its serverId.
    async fn upgrade(&self, session: &mut Session) -> Result<()> {
        let conf = self.hub.conf();
        let req = session.req_header();
        let query = req.uri.query().unwrap_or("");
        let params = match params::parse(query, conf.max_id_bytes) {
            Ok(p) => p,
            Err(e) => {
                debug!("/ws rejected: {e}");
                self.hub.metrics().rejected(Rejection::BadRequest).inc();
                return respond(session, 400, TEXT_PLAIN, e.body(), &[]).await;
            }
        };
        let has_body = handshake::declares_body(&req.headers);
        let accept = match handshake::validate(req.as_ref(), has_body) {
            Ok(accept) => accept,
            Err(e) => {
                debug!("/ws rejected: {e}");
                self.hub.metrics().rejected(Rejection::BadRequest).inc();
                let extra: &[_] = match e {
                    HandshakeError::BadVersion => &[("Sec-WebSocket-Version", "13")],
                    _ => &[],
                };
                return respond(session, e.status(), TEXT_PLAIN, e.body(), extra).await;
            }
        };
        let mut hop = false;
        if let Some(cluster) = &self.cluster {
            let peer = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            hop = cluster.is_hop(session.req_header(), peer);
            if !hop {
                if let Some(t) = cluster.route(&params.server_id, self.hub.is_draining()) {
                    if self.tunnel(session, cluster, t).await? {
                        return Ok(());
                    }
                }
            }
        }
        // A draining node serves what other nodes tunnel to it until they can have seen
        // it down.
        let tunnelled_in = hop && self.cluster.as_ref().is_some_and(|c| c.accepts_tunnelled());
        if self.hub.is_draining() && !tunnelled_in {
            return self.refuse_draining(session).await;
        }

        let client = self.client_addr(session);
        let ticket = match self.hub.admission().admit(client, Instant::now()) {
            Ok(ticket) => ticket,
            Err(refusal) => {
                debug!("/ws refused {}: {}", refusal.status, refusal.body);
                self.hub.metrics().rejected(refusal.reason).inc();
                let retry = refusal.retry_after.to_string();
                return respond(
                    session,
                    refusal.status,
                    TEXT_PLAIN,
                    refusal.body,
                    &[("Retry-After", &retry)],
                )
                .await;
            }
        };
        let kind = params.socket_kind(assign_connection_id);
        let (outbox, rx) = Outbox::new(conf.outbound_queue_bytes);
        let key = (params.version, params.server_id);
        let (att, nudge) = match self.hub.attach(key, kind, Arc::new(outbox), Some(ticket)) {
            Ok(attached) => attached,
            Err(AttachError::Stopping(_)) => return self.refuse_draining(session).await,
            Err(AttachError::ControlReplacements) => {
                self.hub.metrics().rejected(Rejection::Replacement).inc();
                return respond(session, 429, TEXT_PLAIN, TOO_MANY_REPLACEMENTS, &[]).await;
            }
        };

        let mut resp = ResponseHeader::build(101, Some(3))?;
        resp.insert_header("Upgrade", "websocket")?;
        resp.insert_header("Connection", "Upgrade")?;
        resp.insert_header("Sec-WebSocket-Accept", accept)?;
        let downstream = &mut session.downstream_session;
        if let Err(e) = downstream.write_response_header(Box::new(resp)).await {
            debug!("/ws: writing the 101 failed: {e}");
            return Ok(()); // dropping `att` detaches the socket
        }
        // Bytes the peer pipelined behind its request head (already-read frames).
        let preread = match downstream.read_request_body().now_or_never() {
            Some(Ok(Some(bytes))) => bytes.to_vec(),
            _ => Vec::new(),
        };
        let taken = std::mem::replace(&mut **downstream, placeholder_session().await);
        let ServerSession::H1(h1) = taken else {
            warn!("/ws: upgrade on a non-HTTP/1 session");
            return Ok(()); // dropping `att` detaches the socket
        };
        let stream = h1.into_inner();

        self.hub.metrics().websockets_accepted.get(&att.kind).inc();
        match client {
            Some(ip) => debug!("{}: attached from {ip}", att.describe()),
            None => debug!("{}: attached", att.describe()),
        }
        if nudge {
            if let SocketKind::Client(x) = &att.kind {
                self.hub.timers().schedule(
                    att.session(),
                    x.clone(),
                    conf.nudge_after(),
                    conf.reset_after(),
                );
            }
        }
        tokio::spawn(conn::run(stream, preread, att, rx));
        Ok(())
    }
}

#[async_trait]
impl ProxyHttp for RelayProxy {
    type CTX = RequestCtx;

    /// Counts the request as in flight, so that a draining relay waits for it.
    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            _in_flight: self.hub.request_started(),
            route: None,
            failed_peers: Vec::new(),
        }
    }

    /// The relay's own paths are answered here; a routed path returns `false` so that
    /// Pingora proxies it; anything else is 404.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let head = head_bytes(session.req_header());
        let path = session.req_header().uri.path();
        let metrics = self.hub.metrics();
        let result = if head > self.hub.conf().max_request_head_bytes {
            debug!("request head of {head} bytes refused");
            metrics.request(Handler::Other).inc();
            session.set_keepalive(None);
            respond(session, 431, TEXT_PLAIN, HEAD_TOO_LARGE_BODY, &[]).await
        } else if path == self.health_path {
            metrics.request(Handler::Health).inc();
            respond(session, 200, JSON, HEALTH_BODY, &[]).await
        } else if path == self.ready_path {
            metrics.request(Handler::Ready).inc();
            let (status, body) = self.hub.readiness().answer();
            respond(session, status, JSON, body, &[]).await
        } else if path == self.ws_path {
            metrics.request(Handler::Ws).inc();
            self.upgrade(session).await
        } else if let Some(route) = self.router.route(path) {
            metrics.request(Handler::Route).inc();
            ctx.route = Some(route.clone());
            if session.is_upgrade_req() {
                // A proxied WebSocket may be silent for long: no read timeout downstream.
                session.downstream_session.set_read_timeout(None);
            }
            return Ok(false);
        } else {
            metrics.request(Handler::NotFound).inc();
            respond(session, 404, TEXT_PLAIN, NOT_FOUND_BODY, &[]).await
        };
        // A peer that hangs up before its answer is written is not the relay's error.
        if let Err(e) = result {
            debug!("writing a response failed: {e}");
        }
        Ok(true)
    }

    /// The next healthy peer of the request's route that has not failed it yet.
    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let Some(route) = &ctx.route else {
            return Error::e_explain(ErrorType::HTTPStatus(404), "no route");
        };
        route
            .peer(&ctx.failed_peers, session.is_upgrade_req())
            .ok_or_else(|| {
                Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("route {}: no healthy upstream peer left", route.prefix),
                )
                .into_up()
            })
    }

    /// A peer that refuses or does not accept in time is not tried again for this request;
    /// the request is retried on another healthy peer of the route while one is left, then
    /// gets 502 (a dead peer's health check may not have noticed yet).
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.failed_peers.push(peer.address().clone());
        if ctx
            .route
            .as_ref()
            .is_some_and(|r| ctx.failed_peers.len() < r.peer_count())
        {
            e.set_retry(true);
        }
        e
    }

    /// Adds `X-Forwarded-*`, then applies the route's `strip_prefix` and `host_header`.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        self.router.forwarded_headers(upstream_request, peer, tls)?;
        if let Some(route) = &ctx.route {
            route.rewrite(upstream_request)?;
        }
        Ok(())
    }

    /// Counts a proxied request by route and status class once it is over.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        if let Some(route) = &ctx.route {
            let status = session.response_written().map_or(0, |r| r.status.as_u16());
            self.hub.metrics().proxied(&route.prefix, status);
        }
    }

    /// Pingora's error answer, except that an unreachable upstream gets 502 with a body.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut Self::CTX,
    ) -> FailToProxy
    where
        Self::CTX: Send + Sync,
    {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code == 502 && session.response_written().is_none() {
            session.set_keepalive(None);
            if let Err(e) = respond(session, 502, TEXT_PLAIN, BAD_GATEWAY_BODY, &[]).await {
                debug!("writing a 502 failed: {e}");
            }
        } else if code > 0 {
            if let Err(e) = session.respond_error(code).await {
                debug!("writing an error response failed: {e}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}
