//! `SessionHub`: the table of sessions, keyed by protocol version and serverId
//! (relay-protocol.md §1.4, §0 "Sessions and routing").
//!
//! Lock order is hub, then session. Attach and detach hold both, so a session that becomes
//! empty is removed atomically and a socket can never land in a dropped session. Frame
//! routing locks only its own session. No lock is ever held across an `.await`.

use crate::buffer::BufferBudget;
use crate::config::RelayConf;
use crate::outbox::Outbox;
use crate::protocol::{SocketKind, Version};
use crate::session::{Forward, Peer, Session};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio_tungstenite::tungstenite::Message;

/// Session key: v1 and v2 of one serverId never see each other (spec §1.4).
pub type SessionKey = (Version, String);

/// A session behind its own lock.
pub type SessionCell = Mutex<Session>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// All sessions of one relay, with the shared limits and buffer budget.
#[derive(Debug)]
pub struct SessionHub {
    sessions: Mutex<HashMap<SessionKey, Arc<SessionCell>>>,
    conf: RelayConf,
    budget: BufferBudget,
    next_socket_id: AtomicU64,
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
}

impl SessionHub {
    /// An empty hub with the given tuning, which must pass [`RelayConf::validate`].
    pub fn new(conf: RelayConf) -> Arc<Self> {
        debug_assert_eq!(conf.validate(), Ok(()));
        Arc::new(SessionHub {
            budget: BufferBudget::new(conf.pending_budget_bytes),
            conf,
            sessions: Mutex::new(HashMap::new()),
            next_socket_id: AtomicU64::new(1),
        })
    }

    /// The relay's tuning.
    pub fn conf(&self) -> &RelayConf {
        &self.conf
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Bytes held in late-daemon buffers across all sessions.
    pub fn buffered_bytes(&self) -> usize {
        self.budget.used()
    }

    /// Registers a socket in the session `key` (created if needed) and queues its on-connect
    /// frames. Returns the attachment and whether a nudge timer must start (new client).
    pub fn attach(
        self: &Arc<Self>,
        key: SessionKey,
        kind: SocketKind,
        outbox: Arc<Outbox>,
    ) -> (Attachment, bool) {
        let id = self.next_socket_id.fetch_add(1, Ordering::Relaxed);
        let peer = Peer {
            id,
            outbox: outbox.clone(),
        };
        let mut sessions = lock(&self.sessions);
        let session = sessions.entry(key.clone()).or_default().clone();
        let nudge = lock(&session).attach(&kind, peer, &self.budget);
        drop(sessions);
        let attachment = Attachment {
            hub: self.clone(),
            key,
            session,
            kind,
            id,
            outbox,
        };
        (attachment, nudge)
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
        lock(&self.session).forward(&self.kind, self.id, msg, &self.hub.conf, &self.hub.budget)
    }

    /// Removes this socket from its session (cascades of spec §3.9) and drops the session
    /// if it is now empty. Idempotent.
    pub fn detach(&self) {
        let mut sessions = lock(&self.hub.sessions);
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
        }
    }

    /// The relay's tuning.
    pub fn conf(&self) -> &RelayConf {
        &self.hub.conf
    }

    /// `session <serverId> (<version>) <kind> #<id>`, for logs.
    ///
    /// Only the first 8 characters of the serverId are shown (knowing it is enough to pose as
    /// the daemon), and control characters are escaped so that ids cannot forge log lines.
    pub fn describe(&self) -> String {
        let (version, server_id) = &self.key;
        let shown: String = server_id.chars().take(8).collect();
        let more = if shown.len() < server_id.len() {
            "…"
        } else {
            ""
        };
        format!(
            "session {}{more} ({version:?}) {} #{}",
            shown.escape_debug(),
            self.kind,
            self.id
        )
    }
}

impl Drop for Attachment {
    /// However the socket's task ends (or if it never starts), the socket leaves its session.
    fn drop(&mut self) {
        self.outbox.shut();
        self.detach();
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
        let (k, _) = hub.attach(key, SocketKind::Client("a\r\n[x]".into()), out);
        assert_eq!(
            k.describe(),
            format!("session srv_abcd… (V2) client a\\r\\n[x] #{}", k.id)
        );
    }

    #[test]
    fn empty_sessions_are_dropped_and_versions_are_separate() {
        let hub = SessionHub::new(RelayConf::default());
        let out = || Arc::new(Outbox::new(1024).0);
        let (c, _) = hub.attach((Version::V2, "S".into()), SocketKind::Control, out());
        let (v1, _) = hub.attach(
            (Version::V1, "S".into()),
            SocketKind::V1(crate::protocol::Role::Server),
            out(),
        );
        assert_eq!(hub.session_count(), 2);
        assert!(!c.outbox.is_closing());
        c.detach();
        assert_eq!(hub.session_count(), 1);
        c.detach();
        drop(v1);
        assert_eq!(hub.session_count(), 0);
        // A socket attached after the drop lands in a fresh session.
        let (k, nudge) = hub.attach(
            (Version::V2, "S".into()),
            SocketKind::Client("a".into()),
            out(),
        );
        assert!(nudge);
        assert_eq!(hub.session_count(), 1);
        k.detach();
        assert_eq!(hub.session_count(), 0);
    }
}
