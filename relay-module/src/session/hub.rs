//! `SessionHub`: the table of sessions, keyed by protocol version and serverId
//! (relay-protocol.md §1.4, §0 "Sessions and routing").
//!
//! Lock order is hub, then session. Attach and detach hold both, so a session that becomes
//! empty is removed atomically and a socket can never land in a dropped session. Frame
//! routing locks only its own session. No lock is ever held across an `.await`.
//!
//! The hub also owns what the whole relay shares: the buffer budget, the timer queue, the
//! metrics, the admission ceilings, the drain state (`POST /drain`), and the shutdown state
//! (once [`SessionHub::close_all`] ran, no socket attaches any more), with the counts of
//! live sockets and in-flight HTTP requests that tell when a draining relay is idle.
//! Readiness, the drain state and every gauge are atomics: a scrape or a `/ready` never
//! waits on the table or a session lock.

use crate::config::RelayConf;
use crate::ops::metrics::Metrics;
use crate::protocol::{SocketKind, Version};
use crate::session::admission::{Admission, Limits, Ticket};
use crate::session::buffer::BufferBudget;
use crate::session::state::ControlAdmit;
use crate::session::timers::Timers;
use crate::session::{Forward, Peer, Session};
use crate::socket::ingress::IngressBudget;
use crate::socket::outbox::Outbox;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

/// Session key: v1 and v2 of one serverId never see each other (spec §1.4).
pub type SessionKey = (Version, String);

/// A session behind its own lock.
pub type SessionCell = Mutex<Session>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The close every socket gets when the relay stops (spec §0 "Shutdown and upgrade"); new
/// upgrades are then refused with 503 and the reason as body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    /// Close code: 1001 (SIGTERM) or 1012 (graceful upgrade).
    pub code: u16,
    /// Close reason: `Relay shutting down` or `Service restart`.
    pub reason: &'static str,
}

/// Why [`SessionHub::attach`] registered nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachError {
    /// The relay is stopping: answer 503 with the reason as body.
    Stopping(Closing),
    /// The session's control was replaced too often this minute: answer 429
    /// `Too many control replacements`; the current control stays.
    ControlReplacements,
}

/// What `/ready` answers (issue 9 "Readiness and drain").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// 200 `{"status":"ready"}`: new WebSockets are accepted.
    Ready,
    /// 503 `{"status":"draining"}`: after `POST /drain`, or while the relay stops.
    Draining,
    /// 503 `{"status":"full"}`: at `max_websockets`.
    Full,
}

impl Readiness {
    /// HTTP status and exact JSON body.
    pub fn answer(self) -> (u16, &'static str) {
        match self {
            Readiness::Ready => (200, r#"{"status":"ready"}"#),
            Readiness::Draining => (503, r#"{"status":"draining"}"#),
            Readiness::Full => (503, r#"{"status":"full"}"#),
        }
    }
}

/// The session table and, once the relay stops, how it stops.
#[derive(Debug, Default)]
struct Table {
    sessions: HashMap<SessionKey, Arc<SessionCell>>,
    closing: Option<Closing>,
}

/// All sessions of one relay, with the shared limits, buffer budget, timers and shutdown
/// state.
#[derive(Debug)]
pub struct SessionHub {
    table: Mutex<Table>,
    conf: RelayConf,
    budget: BufferBudget,
    /// Bytes of partly received messages across all sockets (`relay.ingress_budget_bytes`).
    ingress: Arc<IngressBudget>,
    timers: Timers,
    metrics: Metrics,
    admission: Arc<Admission>,
    /// `POST /drain` until `POST /resume`.
    draining: AtomicBool,
    /// Set with `closing` (readable without the table lock).
    stopping: AtomicBool,
    next_socket_id: AtomicU64,
    /// Attachments alive (sockets between attach and the end of their task).
    sockets: AtomicUsize,
    /// HTTP requests being handled ([`InFlight`] guards).
    requests: AtomicUsize,
    /// Woken whenever `sockets` or `requests` drops to zero.
    idle: Notify,
}

/// Counts one HTTP request as in flight until dropped (see [`SessionHub::idle`]).
#[derive(Debug)]
pub struct InFlight(Arc<SessionHub>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.requests.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A socket registered in a session; routes its frames and detaches it when it ends.
#[derive(Debug)]
pub struct Attachment {
    hub: Arc<SessionHub>,
    key: SessionKey,
    session: Arc<SessionCell>,
    /// What the socket is in its session.
    pub kind: SocketKind,
    /// Process-unique socket id.
    pub id: u64,
    /// The socket's outbound queue.
    pub outbox: Arc<Outbox>,
    /// Its place in the admission ceilings, given back with the attachment.
    _ticket: Option<Ticket>,
}

impl SessionHub {
    /// An empty hub with the given tuning, which must pass [`RelayConf::validate`].
    /// `max_websockets`, when not set, comes from the process's soft open-file limit now
    /// (see [`RelayConf::max_websockets_for`]): raise the limit first.
    pub fn new(conf: RelayConf) -> Arc<Self> {
        debug_assert_eq!(conf.validate(), Ok(()));
        let metrics = Metrics::new();
        let fd_limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let limits = Limits {
            max_websockets: conf.max_websockets_for(fd_limit),
            max_per_ip: conf.max_websockets_per_ip,
            per_second: conf.upgrades_per_ip_per_second.into(),
            burst: conf.upgrade_burst_per_ip.into(),
        };
        metrics
            .max_websockets
            .set(i64::try_from(limits.max_websockets).unwrap_or(i64::MAX));
        Arc::new(SessionHub {
            budget: BufferBudget::new(conf.pending_budget_bytes),
            ingress: IngressBudget::new(conf.ingress_budget_bytes, conf.slow_consumer_timeout()),
            conf,
            table: Mutex::new(Table::default()),
            timers: Timers::new(metrics.nudges.clone(), metrics.resets.clone()),
            metrics,
            admission: Admission::new(limits),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            next_socket_id: AtomicU64::new(1),
            sockets: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    /// The relay's nudge/reset timer queue (run by [`crate::ops::TimerService`]).
    pub fn timers(&self) -> &Timers {
        &self.timers
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The ingress budget every socket's reader reserves from.
    pub fn ingress(&self) -> &Arc<IngressBudget> {
        &self.ingress
    }

    /// The WebSocket ceilings and upgrade buckets.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// What `/ready` answers now. Lock-free.
    pub fn readiness(&self) -> Readiness {
        if self.is_draining() {
            Readiness::Draining
        } else if self.admission.is_full() {
            Readiness::Full
        } else {
            Readiness::Ready
        }
    }

    /// Whether new WebSockets are refused for draining: after `POST /drain`, or once the
    /// relay stops.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.stopping.load(Ordering::Acquire)
    }

    /// `POST /drain` (`true`) and `POST /resume` (`false`): while draining, new `/ws`
    /// upgrades get 503 `Relay draining`; open WebSockets are not touched. A stopping relay
    /// stays draining whatever this says.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    /// The Prometheus text of every metric, with the mirrored gauges (late-daemon bytes,
    /// ready, draining) read now. Takes no session lock.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        m.pending_bytes
            .set(i64::try_from(self.budget.used()).unwrap_or(i64::MAX));
        m.ingress_reserved_bytes
            .set(i64::try_from(self.ingress.reserved()).unwrap_or(i64::MAX));
        let readiness = self.readiness();
        m.ready.set(i64::from(readiness == Readiness::Ready));
        m.draining.set(i64::from(readiness == Readiness::Draining));
        m.render()
    }

    /// Marks one HTTP request as in flight until the guard is dropped.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Number of sockets attached and not yet ended.
    pub fn socket_count(&self) -> usize {
        self.sockets.load(Ordering::Acquire)
    }

    /// Number of HTTP requests being handled.
    pub fn requests_in_flight(&self) -> usize {
        self.requests.load(Ordering::Acquire)
    }

    /// How the relay is stopping, once [`SessionHub::close_all`] ran.
    pub fn closing(&self) -> Option<Closing> {
        lock(&self.table).closing
    }

    /// Starts the relay's shutdown: from now on no socket attaches, and every attached
    /// socket is closed with `closing` after the frames already queued to it. Only the first
    /// call counts. Returns the number of sockets asked to close.
    pub fn close_all(&self, closing: Closing) -> usize {
        let sessions: Vec<Arc<SessionCell>> = {
            let mut table = lock(&self.table);
            if table.closing.is_some() {
                return 0;
            }
            table.closing = Some(closing);
            self.stopping.store(true, Ordering::Release);
            table.sessions.values().cloned().collect()
        };
        for session in &sessions {
            lock(session).close_all(closing.code, closing.reason);
        }
        self.socket_count()
    }

    /// Closes every socket of each session that `select` picks with `closing`, after the
    /// frames already queued to it (see [`Session::close_all`]), without stopping the relay:
    /// cluster ownership moves (1012 `Session owner moved`). `select` runs under the table
    /// lock, so it must be quick and must not touch the hub. Returns the keys of the
    /// sessions that had a socket not yet closing.
    pub fn close_sessions(
        &self,
        mut select: impl FnMut(&SessionKey) -> bool,
        closing: Closing,
    ) -> Vec<SessionKey> {
        let picked: Vec<(SessionKey, Arc<SessionCell>)> = lock(&self.table)
            .sessions
            .iter()
            .filter(|(key, _)| select(key))
            .map(|(key, session)| (key.clone(), session.clone()))
            .collect();
        picked
            .into_iter()
            .filter(|(_, session)| lock(session).close_all(closing.code, closing.reason) > 0)
            .map(|(key, _)| key)
            .collect()
    }

    /// Completes once no socket is attached and no HTTP request is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.socket_count() == 0 && self.requests.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// The relay's tuning.
    pub fn conf(&self) -> &RelayConf {
        &self.conf
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.table).sessions.len()
    }

    /// Bytes held in late-daemon buffers across all sessions.
    pub fn buffered_bytes(&self) -> usize {
        self.budget.used()
    }

    /// Registers a socket in the session `key` (created if needed) and queues its on-connect
    /// frames. Returns the attachment and whether a nudge timer must start (new client).
    /// `ticket` (its place in the admission ceilings) is held until the attachment drops.
    ///
    /// # Errors
    /// Registers nothing and returns why: the relay is stopping ([`SessionHub::close_all`]),
    /// or a control replaced its session's control too often this minute (a warning is
    /// logged at most once a minute per session).
    pub fn attach(
        self: &Arc<Self>,
        key: SessionKey,
        kind: SocketKind,
        outbox: Arc<Outbox>,
        ticket: Option<Ticket>,
    ) -> Result<(Attachment, bool), AttachError> {
        let id = self.next_socket_id.fetch_add(1, Ordering::Relaxed);
        // Before anyone can queue to it (the late-daemon flush at attach included).
        outbox.bind_metrics(&self.metrics);
        let peer = Peer {
            id,
            outbox: outbox.clone(),
        };
        let mut table = lock(&self.table);
        if let Some(closing) = table.closing {
            return Err(AttachError::Stopping(closing));
        }
        let mut created = false;
        let session = table
            .sessions
            .entry(key.clone())
            .or_insert_with(|| {
                created = true;
                Arc::default()
            })
            .clone();
        let nudge = {
            let mut state = lock(&session);
            if kind == SocketKind::Control {
                let per_minute = self.conf.control_replacements_per_minute;
                if let ControlAdmit::Refused { warn } =
                    state.admit_control(std::time::Instant::now(), per_minute)
                {
                    if warn {
                        log::warn!(
                            "{}: more than {per_minute} control replacements within a minute; \
                             refusing new controls 429 for now",
                            describe_key(&key)
                        );
                    }
                    return Err(AttachError::ControlReplacements);
                }
            }
            state.attach(&kind, peer, &self.budget)
        };
        self.sockets.fetch_add(1, Ordering::AcqRel);
        if created {
            self.metrics.active_sessions.inc();
        }
        drop(table);
        self.metrics.active_websockets.get(&kind).inc();
        let attachment = Attachment {
            hub: self.clone(),
            key,
            session,
            kind,
            id,
            outbox,
            _ticket: ticket,
        };
        Ok((attachment, nudge))
    }
}

impl Attachment {
    /// The session key (version, serverId).
    pub fn key(&self) -> &SessionKey {
        &self.key
    }

    /// The session this socket belongs to (for timers).
    pub fn session(&self) -> &Arc<SessionCell> {
        &self.session
    }

    /// Decides where a data frame from this socket goes; buffers it if its client has no
    /// data socket yet.
    pub fn forward(&self, msg: Message) -> Forward {
        let hub = &self.hub;
        lock(&self.session).forward(
            &self.kind,
            self.id,
            msg,
            &hub.conf,
            &hub.budget,
            &hub.metrics,
        )
    }

    /// Removes this socket from its session (cascades of spec §3.9) and drops the session
    /// if it is now empty. Idempotent.
    pub fn detach(&self) {
        let mut table = lock(&self.hub.table);
        let sessions = &mut table.sessions;
        let empty = {
            let mut session = lock(&self.session);
            session.detach(&self.kind, self.id, &self.hub.budget);
            session.is_empty()
        };
        if empty
            && sessions
                .get(&self.key)
                .is_some_and(|s| Arc::ptr_eq(s, &self.session))
        {
            sessions.remove(&self.key);
            self.hub.metrics.active_sessions.dec();
        }
    }

    /// The relay's tuning.
    pub fn conf(&self) -> &RelayConf {
        &self.hub.conf
    }

    /// The hub the socket is attached to (metrics, ingress budget).
    pub fn hub(&self) -> &Arc<SessionHub> {
        &self.hub
    }

    /// `session <serverId> (<version>) <kind> #<id>`, for logs.
    ///
    /// Only the first 8 characters of the serverId are shown (knowing it is enough to pose as
    /// the daemon), and control characters are escaped so that ids cannot forge log lines.
    pub fn describe(&self) -> String {
        format!("{} {} #{}", describe_key(&self.key), self.kind, self.id)
    }
}

/// `session <serverId> (<version>)` with only the first 8 characters of the serverId, and
/// control characters escaped (see [`Attachment::describe`]).
pub fn describe_key((version, server_id): &SessionKey) -> String {
    format!("session {} ({version:?})", short_id(server_id))
}

/// The first 8 characters of an id, escaped, with `…` when cut: how logs show serverIds
/// and connectionIds (knowing a whole serverId is enough to pose as the daemon).
pub fn short_id(id: &str) -> String {
    let shown: String = id.chars().take(8).collect();
    let more = if shown.len() < id.len() { "…" } else { "" };
    format!("{}{more}", shown.escape_debug())
}

impl Drop for Attachment {
    /// However the socket's task ends (or if it never starts), the socket leaves its session.
    fn drop(&mut self) {
        self.outbox.shut();
        self.detach();
        self.hub.metrics.active_websockets.get(&self.kind).dec();
        if self.hub.sockets.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.hub.idle.notify_waiters();
        }
    }
}

/// Runs `f` on a session under its lock (timers use this).
pub fn with_session<R>(cell: &SessionCell, f: impl FnOnce(&mut Session) -> R) -> R {
    f(&mut lock(cell))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_show_a_short_escaped_server_id() {
        let hub = SessionHub::new(RelayConf::default());
        let out = Arc::new(Outbox::new(1024).0);
        let key = (Version::V2, "srv_abcdefgh_secret".to_string());
        let (k, _) = hub
            .attach(key, SocketKind::Client("a\r\n[x]".into()), out, None)
            .unwrap();
        assert_eq!(
            k.describe(),
            format!("session srv_abcd… (V2) client a\\r\\n[x] #{}", k.id)
        );
    }

    #[test]
    fn empty_sessions_are_dropped_and_versions_are_separate() {
        let hub = SessionHub::new(RelayConf::default());
        let out = || Arc::new(Outbox::new(1024).0);
        let (c, _) = hub
            .attach((Version::V2, "S".into()), SocketKind::Control, out(), None)
            .unwrap();
        let (v1, _) = hub
            .attach(
                (Version::V1, "S".into()),
                SocketKind::V1(crate::protocol::Role::Server),
                out(),
                None,
            )
            .unwrap();
        assert_eq!(hub.session_count(), 2);
        assert!(!c.outbox.is_closing());
        c.detach();
        assert_eq!(hub.session_count(), 1);
        c.detach();
        drop(v1);
        assert_eq!(hub.session_count(), 0);
        // A socket attached after the drop lands in a fresh session.
        let (k, nudge) = hub
            .attach(
                (Version::V2, "S".into()),
                SocketKind::Client("a".into()),
                out(),
                None,
            )
            .unwrap();
        assert!(nudge);
        assert_eq!(hub.session_count(), 1);
        k.detach();
        assert_eq!(hub.session_count(), 0);
    }

    #[tokio::test]
    async fn close_all_closes_every_socket_and_refuses_new_ones_until_idle() {
        let hub = SessionHub::new(RelayConf::default());
        let out = || Arc::new(Outbox::new(1024).0);
        let key = || (Version::V2, "S".to_string());
        let (c, _) = hub.attach(key(), SocketKind::Control, out(), None).unwrap();
        let (k, _) = hub
            .attach(key(), SocketKind::Client("a".into()), out(), None)
            .unwrap();
        let request = hub.request_started();
        assert_eq!(hub.socket_count(), 2);
        assert_eq!(hub.close_all(crate::ops::lifecycle::SHUTTING_DOWN), 2);
        assert!(c.outbox.is_closing() && k.outbox.is_closing());
        assert_eq!(
            hub.attach(key(), SocketKind::Control, out(), None).err(),
            Some(AttachError::Stopping(crate::ops::lifecycle::SHUTTING_DOWN))
        );
        // A second close_all (an upgrade after a terminate) changes nothing.
        assert_eq!(hub.close_all(crate::ops::lifecycle::RESTARTING), 0);
        assert_eq!(hub.closing(), Some(crate::ops::lifecycle::SHUTTING_DOWN));
        let idle = tokio::spawn({
            let hub = hub.clone();
            async move { hub.idle().await }
        });
        drop((c, k));
        assert_eq!(hub.socket_count(), 0);
        tokio::task::yield_now().await;
        assert!(!idle.is_finished(), "a request is still in flight");
        drop(request);
        idle.await.unwrap();
        assert_eq!(hub.session_count(), 0);
    }
}
