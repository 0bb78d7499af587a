//! Operations: what runs beside the sessions as Pingora background services. The shutdown
//! drain ([`lifecycle`]), the TLS certificate store and its SIGHUP reload ([`tls`]), and the
//! nudge/reset timer service ([`TimerService`]), and handing freed memory back to the OS
//! ([`memory`]).

pub mod lifecycle;
pub mod memory;
pub mod metrics;
pub mod tls;

use crate::session::hub::SessionHub;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;

/// The Pingora background service that runs the hub's [`crate::session::timers::Timers`].
pub struct TimerService(pub Arc<SessionHub>);

#[async_trait]
impl BackgroundService for TimerService {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.timers().run(Some(shutdown)).await;
    }
}
