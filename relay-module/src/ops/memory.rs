//! When to hand freed memory back to the OS (issue 11). glibc's malloc keeps the small
//! allocations of thousands of sockets that closed (RSS 4.4x its start 10 s after 5 000
//! sockets came and went): [`TrimService`] calls the allocator's trim (glibc
//! `malloc_trim(0)`, given by the binary: this crate has no `unsafe`) once many sockets
//! closed, [`TRIM_AFTER_CLOSED`] fewer than the most open since the last trim, checked
//! every [`TRIM_CHECK`], once the count stopped falling and at most every
//! [`MIN_TRIM_INTERVAL`]. A relay whose socket count holds steady never trims.

use crate::session::hub::SessionHub;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

/// How often the trim service looks at the socket count.
pub const TRIM_CHECK: Duration = Duration::from_secs(2);
/// Sockets that must have closed (the most open since the last trim minus those open now)
/// before the service trims.
pub const TRIM_AFTER_CLOSED: usize = 256;

/// Shortest time between two trims: `malloc_trim` takes each arena's lock in turn, so the
/// worker threads allocating in an arena wait while it is trimmed.
pub const MIN_TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Whether to trim now, and the new high-water mark: `peak` is the most sockets open since
/// the last trim, `last` the count at the previous check, `open` the count now. A trim waits
/// until the count stopped falling for one check: a socket leaves the count when its
/// session detaches, before its task (and its buffers) ends.
pub fn should_trim(peak: usize, last: usize, open: usize) -> (bool, usize) {
    if peak.saturating_sub(open) >= TRIM_AFTER_CLOSED && open >= last {
        (true, open)
    } else {
        (false, peak.max(open))
    }
}

/// The Pingora background service that trims after sockets closed (see the module docs).
pub struct TrimService {
    hub: Arc<SessionHub>,
    trim: fn() -> bool,
}

impl TrimService {
    /// Watches `hub`'s socket count; `trim` hands free memory back and returns whether any
    /// was released. It runs on a blocking thread, but glibc's trim also makes the workers
    /// that allocate in the arena being trimmed wait (ms for tens of MB).
    pub fn new(hub: Arc<SessionHub>, trim: fn() -> bool) -> TrimService {
        TrimService { hub, trim }
    }
}

#[async_trait]
impl BackgroundService for TrimService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut peak = self.hub.socket_count();
        let mut last = peak;
        let mut trimmed: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(TRIM_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let open = self.hub.socket_count();
            let recent = trimmed.is_some_and(|t| t.elapsed() < MIN_TRIM_INTERVAL);
            let (now, next) = should_trim(peak, last, open);
            last = open;
            if now && !recent {
                peak = next;
                trimmed = Some(tokio::time::Instant::now());
                let released = tokio::task::spawn_blocking(self.trim)
                    .await
                    .unwrap_or(false);
                log::debug!("malloc_trim after sockets closed: released={released}");
            } else {
                peak = peak.max(open);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_enough_sockets_closed_and_the_count_stopped_falling() {
        assert_eq!(should_trim(0, 0, 100), (false, 100));
        assert_eq!(should_trim(5000, 5000, 4745), (false, 5000), "255 closed");
        assert_eq!(should_trim(5000, 5000, 10), (false, 5000), "still falling");
        assert_eq!(should_trim(5000, 10, 10), (true, 10));
        assert_eq!(should_trim(5000, 10, 12), (true, 12), "rising again");
        assert_eq!(
            should_trim(10, 10, 10),
            (false, 10),
            "a steady relay never trims"
        );
    }
}
