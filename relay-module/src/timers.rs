//! The nudge/reset timer of a client socket (relay-protocol.md §3.8): at T0+10 s a `sync`
//! to the control, at T0+15 s a 1011 `Control unresponsive`, each only if the client's
//! connectionId still has a client and no data socket. Never cancelled; conditions are
//! re-checked instead.

use crate::hub::{with_session, SessionCell};
use std::sync::Arc;
use std::time::Duration;

/// Starts the timer for connectionId `x` of `session` (T0 is now). Runs on the current
/// tokio runtime (a Pingora service runtime, so it works after daemonising).
pub fn spawn_nudge(session: Arc<SessionCell>, x: String, nudge: Duration, reset: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(nudge).await;
        with_session(&session, |s| s.nudge(&x));
        tokio::time::sleep(reset.saturating_sub(nudge)).await;
        with_session(&session, |s| s.reset(&x));
    });
}
