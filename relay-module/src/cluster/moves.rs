//! The ownership-move rule as a Pingora background service: every half health interval,
//! [`Cluster::sweep`] closes 1012 `Session owner moved` the local sessions that belong to
//! another node now (once the view has been stable for two intervals), or every local
//! session of a node that has been draining for longer than its peers need to see it down.
//! Both sides of a moved session reconnect on their own and meet at the owner.

use crate::cluster::Cluster;
use crate::session::hub::SessionHub;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Instant;
use tokio::time::MissedTickBehavior;

/// Runs [`Cluster::sweep`] until the server stops.
pub struct MoveService {
    /// The sessions of this node.
    pub hub: Arc<SessionHub>,
    /// This node's view.
    pub cluster: Arc<Cluster>,
}

#[async_trait]
impl BackgroundService for MoveService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.cluster.sweep_every());
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    self.cluster.sweep(&self.hub, Instant::now());
                }
            }
        }
    }
}
