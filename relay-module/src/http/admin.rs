//! The admin listener (issue 9 "Admin listener"): plain HTTP on `admin_listen`, never
//! routed and never the relay, served by its own Pingora service so that it is handed over
//! in a graceful upgrade like the other listeners.
//!
//! | path | method | answer |
//! |---|---|---|
//! | `/metrics` | GET | 200, Prometheus text (`text/plain; version=0.0.4`) |
//! | `/health` | GET | 200 `{"status":"ok"}` |
//! | `/ready` | GET | 200 `{"status":"ready"}`, 503 `{"status":"draining"}` or `{"status":"full"}` |
//! | `/drain` | POST | 200 `{"status":"draining"}`: new `/ws` get 503 `Relay draining` |
//! | `/resume` | POST | 200 `{"status":"ready"}`: the drain ends |
//!
//! Another method on these paths gets 405 with an `Allow` header; any other path 404
//! `Not found`. JSON answers are `application/json`.

use crate::config::HttpConf;
use crate::http::front::{Deadlines, Front};
use crate::http::service::{respond, tcp_listener, HEALTH_BODY, JSON, NOT_FOUND_BODY, TEXT_PLAIN};
use crate::ops::metrics::{Handler, CONTENT_TYPE};
use crate::session::hub::SessionHub;
use async_trait::async_trait;
use log::{debug, info};
use pingora::prelude::HttpPeer;
use pingora::proxy::{http_proxy, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::services::listening::Service;
use pingora::{Error, ErrorType, Result};
use std::sync::Arc;

/// Body of `POST /drain`.
pub const DRAINING_BODY: &str = r#"{"status":"draining"}"#;
/// Body of `POST /resume`.
pub const RESUMED_BODY: &str = r#"{"status":"ready"}"#;
/// Body of a 405.
pub const METHOD_NOT_ALLOWED_BODY: &str = "Method not allowed";

/// The admin endpoints as a Pingora `ProxyHttp` that answers every request itself.
pub struct AdminProxy {
    hub: Arc<SessionHub>,
}

/// What an admin request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Metrics,
    Health,
    Ready,
    Drain,
    Resume,
}

impl Endpoint {
    fn of(path: &str) -> Option<Endpoint> {
        Some(match path {
            "/metrics" => Endpoint::Metrics,
            "/health" => Endpoint::Health,
            "/ready" => Endpoint::Ready,
            "/drain" => Endpoint::Drain,
            "/resume" => Endpoint::Resume,
            _ => return None,
        })
    }

    /// The one method it takes.
    fn method(self) -> &'static str {
        match self {
            Endpoint::Drain | Endpoint::Resume => "POST",
            _ => "GET",
        }
    }
}

impl AdminProxy {
    async fn answer(&self, session: &mut Session) -> Result<()> {
        let hub = &self.hub;
        let req = session.req_header();
        let Some(endpoint) = Endpoint::of(req.uri.path()) else {
            hub.metrics().request(Handler::NotFound).inc();
            return respond(session, 404, TEXT_PLAIN, NOT_FOUND_BODY, &[]).await;
        };
        let handler = match endpoint {
            Endpoint::Health => Handler::Health,
            Endpoint::Ready => Handler::Ready,
            _ => Handler::Other,
        };
        hub.metrics().request(handler).inc();
        if req.method.as_str() != endpoint.method() {
            let allow = endpoint.method();
            return respond(
                session,
                405,
                TEXT_PLAIN,
                METHOD_NOT_ALLOWED_BODY,
                &[("Allow", allow)],
            )
            .await;
        }
        match endpoint {
            Endpoint::Metrics => {
                let text = hub.render_metrics();
                respond(session, 200, CONTENT_TYPE, text, &[]).await
            }
            Endpoint::Health => respond(session, 200, JSON, HEALTH_BODY, &[]).await,
            Endpoint::Ready => {
                let (status, body) = hub.readiness().answer();
                respond(session, status, JSON, body, &[]).await
            }
            Endpoint::Drain => {
                if !hub.is_draining() {
                    info!("admin: draining, new WebSockets get 503 until POST /resume");
                }
                hub.set_draining(true);
                respond(session, 200, JSON, DRAINING_BODY, &[]).await
            }
            Endpoint::Resume => {
                if hub.is_draining() {
                    info!("admin: resumed, new WebSockets are accepted");
                }
                hub.set_draining(false);
                respond(session, 200, JSON, RESUMED_BODY, &[]).await
            }
        }
    }
}

#[async_trait]
impl ProxyHttp for AdminProxy {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    /// Every admin request is answered here; nothing is proxied.
    async fn request_filter(&self, session: &mut Session, _ctx: &mut Self::CTX) -> Result<bool> {
        if let Err(e) = self.answer(session).await {
            debug!("admin: writing a response failed: {e}");
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        Error::e_explain(
            ErrorType::HTTPStatus(404),
            "the admin listener proxies nothing",
        )
    }
}

/// The Pingora service of the admin listener on `addr` (plain HTTP), behind the deadlines
/// of `http` like the relay's listeners.
pub fn admin_service(
    server_conf: &Arc<ServerConf>,
    hub: Arc<SessionHub>,
    addr: &str,
    http: &HttpConf,
) -> Service<Front<AdminProxy>> {
    let deadlines = Deadlines::new(http, hub.metrics().request_timeouts.clone());
    let proxy = http_proxy(server_conf, AdminProxy { hub });
    let front = Front::new(proxy, None, deadlines);
    let mut service = Service::new("paseo-relay admin".to_string(), front);
    service.add_listener(tcp_listener(addr));
    // Scrapes and probes are rare and short: one worker thread, not one per CPU.
    service.threads = Some(1);
    service
}
