//! How the relay stops (relay-protocol.md §0 "Shutdown and upgrade"): which signal asked for
//! it, and the drain that closes every WebSocket and ends the process once nothing is left.
//!
//! | signal | Pingora | sockets get | process |
//! |---|---|---|---|
//! | SIGTERM | graceful terminate | 1001 `Relay shutting down` | exits once idle; at most `grace_period_seconds`, then Pingora gives its runtimes `graceful_shutdown_timeout_seconds` |
//! | SIGQUIT | listeners sent to the `--upgrade` process, then graceful | 1012 `Service restart` | same |
//! | SIGINT | fast shutdown | nothing (dropped) | exits at once |
//!
//! [`RelaySignals`] is the `ShutdownSignalWatch` given to `Server::run`; it records the cause
//! in [`Lifecycle`]. [`DrainService`] is a Pingora background service that waits for the
//! server's shutdown watch (sent after the listeners were handed over, for an upgrade) and
//! then closes every socket.

use crate::protocol::close;
use crate::session::hub::{Closing, SessionHub};
use async_trait::async_trait;
use log::info;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

/// How long the relay must stay idle before a graceful stop ends the process.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Close for SIGTERM: 1001 `Relay shutting down` (spec §0).
pub const SHUTTING_DOWN: Closing = Closing {
    code: close::GOING_AWAY,
    reason: "Relay shutting down",
};

/// Close for a graceful upgrade (SIGQUIT): 1012 `Service restart` (spec §0).
pub const RESTARTING: Closing = Closing {
    code: close::RESTART,
    reason: "Service restart",
};

/// Shared between the signal watch and the drain: why the relay stops, and whether the
/// process ends as soon as it is idle.
#[derive(Debug)]
pub struct Lifecycle {
    upgrading: AtomicBool,
    exit_when_idle: bool,
}

impl Lifecycle {
    /// `exit_when_idle`: end the process (exit code 0) once every socket and request is done
    /// after a graceful stop, instead of waiting out Pingora's whole grace period. The binary
    /// sets it; in-process test servers do not.
    pub fn new(exit_when_idle: bool) -> Arc<Self> {
        Arc::new(Lifecycle {
            upgrading: AtomicBool::new(false),
            exit_when_idle,
        })
    }

    /// The close the sockets get: [`RESTARTING`] after SIGQUIT, else [`SHUTTING_DOWN`].
    pub fn closing(&self) -> Closing {
        if self.upgrading.load(Ordering::Acquire) {
            RESTARTING
        } else {
            SHUTTING_DOWN
        }
    }
}

/// Pingora's Unix signals (SIGQUIT upgrade, SIGTERM graceful, SIGINT fast), recording which
/// one arrived in the [`Lifecycle`]. Pass it to `Server::run` as `RunArgs::shutdown_signal`.
pub struct RelaySignals(pub Arc<Lifecycle>);

#[async_trait]
impl ShutdownSignalWatch for RelaySignals {
    async fn recv(&self) -> ShutdownSignal {
        let streams = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = streams else {
            // Without signal handlers the relay can still serve; it then never stops itself.
            log::error!("cannot install the SIGQUIT/SIGTERM/SIGINT handlers");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = quit.recv() => {
                self.0.upgrading.store(true, Ordering::Release);
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::FastShutdown,
        }
    }
}

/// Background service: when the server starts a graceful shutdown, closes every WebSocket
/// (1001 or 1012, after the frames already queued to it), refuses new upgrades with 503, and
/// once nothing is left ends the process (if [`Lifecycle::new`] asked for it). If sockets are
/// still open when the grace period ends, Pingora stops the runtimes and they are dropped.
pub struct DrainService {
    /// The relay's sessions.
    pub hub: Arc<SessionHub>,
    /// Why the relay stops.
    pub life: Arc<Lifecycle>,
}

#[async_trait]
impl BackgroundService for DrainService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.wait_for(|stop| *stop).await.is_err() {
            return;
        }
        let closing = self.life.closing();
        let open = self.hub.close_all(closing);
        info!(
            "closing {open} WebSockets {} {}; waiting for them to end",
            closing.code, closing.reason
        );
        // Idle twice, a moment apart: a connection accepted just before the listeners
        // stopped may still be sending its request head (not yet counted as in flight).
        loop {
            self.hub.idle().await;
            tokio::time::sleep(SETTLE).await;
            if self.hub.socket_count() == 0 && self.hub.requests_in_flight() == 0 {
                break;
            }
        }
        if self.life.exit_when_idle {
            info!("every WebSocket and request has ended: exiting");
            std::process::exit(0);
        }
    }
}
