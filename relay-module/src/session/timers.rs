//! The nudge/reset timers of client sockets (relay-protocol.md §3.8): at T0+10 s a `sync`
//! to the control, at T0+15 s a 1011 `Control unresponsive`, each only if the client's
//! connectionId still has a client and no data socket. Never cancelled; conditions are
//! re-checked when a timer fires.
//!
//! All timers of a relay live in one [`Timers`] queue, run by
//! [`crate::ops::TimerService`], a Pingora background service: it starts after `run_forever`
//! (so after the `-d` fork) and stops with the server.

use crate::session::hub::{with_session, SessionCell};
use log::warn;
use prometheus::IntCounter;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What a timer does when it fires.
#[derive(Debug, Clone, Copy)]
enum Step {
    Nudge,
    Reset,
}

/// One pending timer: `step` for connectionId `x` of `session` at `at`.
#[derive(Debug)]
struct Due {
    at: Instant,
    seq: u64,
    step: Step,
    session: Weak<SessionCell>,
    x: String,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    /// Earliest first in a max-heap: reversed on (deadline, arrival).
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The relay's timer queue. [`Timers::schedule`] never blocks; [`Timers::run`] fires the
/// timers (one runner per queue).
#[derive(Debug)]
pub struct Timers {
    tx: mpsc::UnboundedSender<Due>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Due>>>,
    nudges: IntCounter,
    resets: IntCounter,
}

impl Default for Timers {
    /// A queue whose counts go nowhere (tests).
    fn default() -> Self {
        let detached = || IntCounter::new("detached", "not exposed").expect("valid metric");
        Timers::new(detached(), detached())
    }
}

impl Timers {
    /// A queue that counts the nudges it sends in `nudges` and the resets in `resets`.
    pub fn new(nudges: IntCounter, resets: IntCounter) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Timers {
            tx,
            rx: Mutex::new(Some(rx)),
            nudges,
            resets,
        }
    }

    /// Starts the timers for connectionId `x` of `session` (T0 is now): nudge at T0+`nudge`,
    /// reset at T0+`reset`. The timers hold the session weakly: a dropped session is skipped.
    pub fn schedule(
        &self,
        session: &Arc<SessionCell>,
        x: String,
        nudge: Duration,
        reset: Duration,
    ) {
        let now = Instant::now();
        for (after, step) in [(nudge, Step::Nudge), (reset, Step::Reset)] {
            let due = Due {
                at: now + after,
                seq: 0,
                step,
                session: Arc::downgrade(session),
                x: x.clone(),
            };
            // Fails only once the runner has stopped (server shutdown): nothing to time then.
            let _ = self.tx.send(due);
        }
    }

    /// Fires timers until `shutdown` turns true (or forever without one). Only the first call
    /// runs; a second one returns at once.
    pub async fn run(&self, mut shutdown: Option<watch::Receiver<bool>>) {
        let taken = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut rx) = taken else {
            warn!("relay timers are already running");
            return;
        };
        let mut heap: BinaryHeap<Due> = BinaryHeap::new();
        let mut seq = 0u64;
        loop {
            let next = heap.peek().map(|d| d.at);
            tokio::select! {
                received = rx.recv() => match received {
                    Some(mut due) => {
                        seq += 1;
                        due.seq = seq;
                        heap.push(due);
                    }
                    None => return,
                },
                () = sleep_until(next) => {
                    let now = Instant::now();
                    while heap.peek().is_some_and(|d| d.at <= now) {
                        if let Some(due) = heap.pop() {
                            self.fire(due);
                        }
                    }
                }
                () = stopped(&mut shutdown) => return,
            }
        }
    }
}

/// Sleeps until `at`, or forever without a deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Completes when the server starts shutting down (never without a watch).
async fn stopped(shutdown: &mut Option<watch::Receiver<bool>>) {
    match shutdown {
        Some(watch) => {
            if watch.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

impl Timers {
    fn fire(&self, due: Due) {
        let Some(session) = due.session.upgrade() else {
            return;
        };
        match due.step {
            Step::Nudge => {
                if with_session(&session, |s| s.nudge(&due.x)) {
                    self.nudges.inc();
                }
            }
            Step::Reset => {
                if with_session(&session, |s| s.reset(&due.x)) {
                    self.resets.inc();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::SocketKind;
    use crate::session::buffer::BufferBudget;
    use crate::session::{Peer, Session};
    use crate::socket::outbox::{Command, Outbox, OutboxReceiver};
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
        let timers = Arc::new(Timers::default());
        let runner = timers.clone();
        tokio::spawn(async move { runner.run(None).await });
        timers.schedule(
            &cell,
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
