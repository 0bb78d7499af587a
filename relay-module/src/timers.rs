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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::BufferBudget;
    use crate::outbox::{Command, Outbox, OutboxReceiver};
    use crate::protocol::SocketKind;
    use crate::session::{Peer, Session};
    use std::sync::Mutex;

    fn next(rx: &mut OutboxReceiver) -> Option<String> {
        match rx.priority.try_recv() {
            Ok((Command::Send(m), _)) => Some(m.into_text().unwrap().to_string()),
            Ok((Command::Close(f), _)) => Some(format!("close {} {}", u16::from(f.code), f.reason)),
            Ok((Command::Finish, _)) => Some("finish".into()),
            Err(_) => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nudge_at_10s_then_reset_at_15s_while_no_data_socket() {
        let budget = BufferBudget::new(1 << 20);
        let cell = Arc::new(Mutex::new(Session::default()));
        let (control, mut rx) = Outbox::new(1 << 10);
        let peer = |id, outbox| Peer { id, outbox };
        {
            let mut s = cell.lock().unwrap();
            s.attach(&SocketKind::Control, peer(1, Arc::new(control)), &budget);
            let client = Arc::new(Outbox::new(1 << 10).0);
            s.attach(&SocketKind::Client("a".into()), peer(2, client), &budget);
        }
        assert_eq!(
            next(&mut rx).as_deref(),
            Some(r#"{"type":"sync","connectionIds":[]}"#)
        );
        assert_eq!(
            next(&mut rx).as_deref(),
            Some(r#"{"type":"connected","connectionId":"a"}"#)
        );
        spawn_nudge(
            cell.clone(),
            "a".into(),
            Duration::from_secs(10),
            Duration::from_secs(15),
        );
        tokio::time::sleep(Duration::from_millis(9_990)).await;
        assert_eq!(next(&mut rx), None);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            next(&mut rx).as_deref(),
            Some(r#"{"type":"sync","connectionIds":["a"]}"#)
        );
        tokio::time::sleep(Duration::from_millis(4_980)).await;
        assert_eq!(next(&mut rx), None);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            next(&mut rx).as_deref(),
            Some("close 1011 Control unresponsive")
        );
    }
}
