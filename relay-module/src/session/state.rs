//! One session (serverId and protocol version): which sockets it holds and where each frame
//! goes (relay-protocol.md §2, §3). Routing decisions only: a `Session` is always used under
//! its mutex and never awaits; it queues control messages and close requests into the
//! sockets' [`Outbox`]es, which never block.

use crate::config::RelayConf;
use crate::ops::metrics::Metrics;
use crate::protocol::{close, ControlMessage, Role, SocketKind};
use crate::session::buffer::{BufferBudget, PendingFrames};
use crate::socket::outbox::Outbox;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// A socket as a session knows it: a process-unique id and its outbound queue.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Process-unique socket id (tells a replaced socket from its successor).
    pub id: u64,
    /// The socket's outbound queue.
    pub outbox: Arc<Outbox>,
}

/// The client sockets of one connectionId and the frames they sent before a data socket.
#[derive(Debug, Default)]
struct ClientGroup {
    sockets: Vec<Peer>,
    pending: PendingFrames,
}

/// Where a data frame from a socket goes.
#[derive(Debug)]
pub enum Forward {
    /// Nowhere: no peer (v1), no client (data socket), control frame, stale socket.
    Drop,
    /// To one socket.
    One(Arc<Outbox>, Message),
    /// To each of these sockets, in order (fan-out from a data socket).
    Many(Vec<Arc<Outbox>>, Message),
    /// Kept in the late-daemon buffer.
    Buffered,
    /// The process-wide buffer budget is spent: close the sender 1013.
    OverBudget,
}

/// State of one session; see the module docs.
#[derive(Debug, Default)]
pub struct Session {
    v1_server: Option<Peer>,
    v1_client: Option<Peer>,
    control: Option<Peer>,
    data: HashMap<String, Peer>,
    clients: HashMap<String, ClientGroup>,
    /// When the control was replaced within the last minute, oldest first (at most the
    /// per-minute limit).
    control_replacements: VecDeque<Instant>,
    /// When a refused replacement was last logged.
    replacement_warned: Option<Instant>,
}

/// The answer of [`Session::admit_control`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlAdmit {
    /// The newcomer may attach (and replace the current control, if any).
    Allowed,
    /// The newcomer is refused 429; `warn`: this is the first refusal logged this minute.
    Refused {
        /// Log a warning for this refusal.
        warn: bool,
    },
}

fn text(msg: ControlMessage) -> Message {
    Message::text(msg.to_json())
}

impl Session {
    /// Whether no socket is attached (the hub then drops the session).
    pub fn is_empty(&self) -> bool {
        self.v1_server.is_none()
            && self.v1_client.is_none()
            && self.control.is_none()
            && self.data.is_empty()
            && self.clients.is_empty()
    }

    /// The `sync` message: every connectionId with at least one client socket (spec §3.4).
    pub fn sync_message(&self) -> ControlMessage {
        ControlMessage::Sync {
            connection_ids: self.clients.keys().cloned().collect(),
        }
    }

    fn notify_control(&self, msg: ControlMessage) {
        if let Some(control) = &self.control {
            control.outbox.push_control(text(msg));
        }
    }

    /// Whether a new control socket may replace the current one at `now`, with at most
    /// `per_minute` replacements per minute (issue 9 `control_replacements_per_minute`).
    /// A control that replaces nothing is always allowed; an allowed replacement is
    /// counted. A refused newcomer leaves the current control in place.
    pub fn admit_control(&mut self, now: Instant, per_minute: u32) -> ControlAdmit {
        if self.control.is_none() {
            return ControlAdmit::Allowed;
        }
        let minute = Duration::from_secs(60);
        while self
            .control_replacements
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= minute)
        {
            self.control_replacements.pop_front();
        }
        if self.control_replacements.len() < per_minute as usize {
            self.control_replacements.push_back(now);
            return ControlAdmit::Allowed;
        }
        let warn = self
            .replacement_warned
            .is_none_or(|t| now.saturating_duration_since(t) >= minute);
        if warn {
            self.replacement_warned = Some(now);
        }
        ControlAdmit::Refused { warn }
    }

    /// Registers a socket and queues its on-connect frames (spec §2, §3.3, §3.5). A socket of
    /// the same slot is closed 1008 `Replaced by new connection` first. Returns true when a
    /// nudge timer must start for a client's connectionId (spec §3.8).
    pub fn attach(&mut self, kind: &SocketKind, peer: Peer, budget: &BufferBudget) -> bool {
        let replaced = match kind {
            SocketKind::V1(Role::Server) => self.v1_server.replace(peer),
            SocketKind::V1(Role::Client) => self.v1_client.replace(peer),
            SocketKind::Control => {
                peer.outbox.push_control(text(self.sync_message()));
                self.control.replace(peer)
            }
            SocketKind::Data(id) => {
                if let Some(group) = self.clients.get_mut(id) {
                    let (frames, bytes) = group.pending.take();
                    budget.give_back(bytes);
                    for frame in frames {
                        peer.outbox.push_data_now(frame);
                    }
                }
                self.data.insert(id.clone(), peer)
            }
            SocketKind::Client(id) => {
                self.clients
                    .entry(id.clone())
                    .or_default()
                    .sockets
                    .push(peer);
                self.notify_control(ControlMessage::Connected {
                    connection_id: id.clone(),
                });
                return true;
            }
        };
        if let Some(old) = replaced {
            old.outbox.close_in_order(close::POLICY, close::REPLACED);
        }
        false
    }

    /// Removes a socket that ended or that the relay closed, and runs the cascades of
    /// spec §3.9. A socket that is no longer registered (replaced, cascaded) is ignored.
    pub fn detach(&mut self, kind: &SocketKind, id: u64, budget: &BufferBudget) {
        fn take_if(slot: &mut Option<Peer>, id: u64) {
            if slot.as_ref().is_some_and(|p| p.id == id) {
                *slot = None;
            }
        }
        match kind {
            SocketKind::V1(Role::Server) => take_if(&mut self.v1_server, id),
            SocketKind::V1(Role::Client) => take_if(&mut self.v1_client, id),
            SocketKind::Control => take_if(&mut self.control, id),
            SocketKind::Data(x) => {
                if self.data.get(x).is_some_and(|p| p.id == id) {
                    self.data.remove(x);
                    self.data_gone(x, budget);
                }
            }
            SocketKind::Client(x) => {
                let Some(group) = self.clients.get_mut(x) else {
                    return;
                };
                group.sockets.retain(|p| p.id != id);
                if group.sockets.is_empty() {
                    self.last_client_gone(x, budget);
                }
            }
        }
    }

    /// The current data socket of `x` is gone: its clients are closed 1012 and, as they are
    /// all gone, `disconnected` follows (spec §3.9).
    fn data_gone(&mut self, x: &str, budget: &BufferBudget) {
        if let Some(group) = self.clients.get_mut(x) {
            for client in group.sockets.drain(..) {
                client
                    .outbox
                    .close_in_order(close::RESTART, close::SERVER_DISCONNECTED);
            }
            self.last_client_gone(x, budget);
        }
    }

    /// The last client of `x` left: drop its buffer, close `D(x)` 1001, tell the control.
    fn last_client_gone(&mut self, x: &str, budget: &BufferBudget) {
        if let Some(group) = self.clients.remove(x) {
            budget.give_back(group.pending.bytes());
        }
        if let Some(data) = self.data.remove(x) {
            data.outbox
                .close_in_order(close::GOING_AWAY, close::CLIENT_DISCONNECTED);
        }
        self.notify_control(ControlMessage::Disconnected {
            connection_id: x.to_string(),
        });
    }

    /// Decides where a data frame from socket `id` of `kind` goes (spec §2, §3.6, §3.7).
    /// Frames of a client without a data socket are buffered here.
    pub fn forward(
        &mut self,
        kind: &SocketKind,
        id: u64,
        msg: Message,
        conf: &RelayConf,
        budget: &BufferBudget,
        metrics: &Metrics,
    ) -> Forward {
        // A v1 socket forwards only while it holds its slot (a replaced one is closing).
        let v1 = |me: &Option<Peer>, other: &Option<Peer>, msg| match (me, other) {
            (Some(me), Some(other)) if me.id == id => Forward::One(other.outbox.clone(), msg),
            _ => Forward::Drop,
        };
        match kind {
            SocketKind::V1(Role::Server) => v1(&self.v1_server, &self.v1_client, msg),
            SocketKind::V1(Role::Client) => v1(&self.v1_client, &self.v1_server, msg),
            SocketKind::Control => Forward::Drop,
            SocketKind::Data(x) => {
                if self.data.get(x).is_none_or(|p| p.id != id) {
                    return Forward::Drop;
                }
                match self.clients.get(x).map(|g| g.sockets.as_slice()) {
                    None | Some([]) => Forward::Drop,
                    Some([only]) => Forward::One(only.outbox.clone(), msg),
                    Some(all) => Forward::Many(all.iter().map(|p| p.outbox.clone()).collect(), msg),
                }
            }
            SocketKind::Client(x) => {
                let Some(group) = self.clients.get_mut(x) else {
                    return Forward::Drop;
                };
                if !group.sockets.iter().any(|p| p.id == id) {
                    return Forward::Drop;
                }
                if let Some(data) = self.data.get(x) {
                    return Forward::One(data.outbox.clone(), msg);
                }
                if !budget.try_take(msg.len()) {
                    return Forward::OverBudget;
                }
                let dropped =
                    group
                        .pending
                        .push(msg, conf.pending_max_frames, conf.pending_max_bytes);
                budget.give_back(dropped.bytes);
                if dropped.frames > 0 {
                    metrics.pending_dropped_frames.inc_by(dropped.frames as u64);
                }
                Forward::Buffered
            }
        }
    }

    /// Closes every socket of the session with `code`/`reason` after the frames already
    /// queued to it (graceful shutdown and upgrade, spec §0 "Shutdown and upgrade"). The
    /// sockets detach as they end; their cascades find them closing and add nothing.
    /// Returns how many sockets were not closing yet (those already closing keep their
    /// close).
    pub fn close_all(&self, code: u16, reason: &'static str) -> usize {
        let clients = self.clients.values().flat_map(|g| g.sockets.iter());
        self.v1_server
            .iter()
            .chain(&self.v1_client)
            .chain(&self.control)
            .chain(self.data.values())
            .chain(clients)
            .filter(|peer| !peer.outbox.is_closing())
            .map(|peer| peer.outbox.close_in_order(code, reason))
            .count()
    }

    /// Whether `x` has a client and no data socket: the condition of both nudge steps.
    pub fn waiting_for_data(&self, x: &str) -> bool {
        self.clients.contains_key(x) && !self.data.contains_key(x)
    }

    /// Nudge (spec §3.8, T0+10 s): sends `sync` to the control if `x` still waits.
    /// Returns whether a `sync` was queued.
    pub fn nudge(&self, x: &str) -> bool {
        if self.waiting_for_data(x) && self.control.is_some() {
            self.notify_control(self.sync_message());
            return true;
        }
        false
    }

    /// Reset (spec §3.8, T0+15 s): closes the control 1011 `Control unresponsive` if `x`
    /// still waits. The control is removed at once.
    /// Returns whether a control was closed.
    pub fn reset(&mut self, x: &str) -> bool {
        if self.waiting_for_data(x) {
            if let Some(control) = self.control.take() {
                control
                    .outbox
                    .close(close::INTERNAL, close::CONTROL_UNRESPONSIVE);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::outbox::{Command, OutboxReceiver};

    struct Sock {
        peer: Peer,
        rx: OutboxReceiver,
    }

    fn sock(id: u64) -> Sock {
        let (outbox, rx) = Outbox::new(1 << 20);
        Sock {
            peer: Peer {
                id,
                outbox: Arc::new(outbox),
            },
            rx,
        }
    }

    fn render(cmd: Command) -> String {
        match cmd {
            Command::Send(m) => m.into_text().unwrap().to_string(),
            Command::Close(f) => format!("close {} {}", u16::from(f.code), f.reason),
            Command::Finish => "finish".to_string(),
        }
    }

    /// Everything queued on the priority lane, then the closes queued on the data lane, as
    /// text or `close CODE REASON`.
    fn drain(s: &mut Sock) -> Vec<String> {
        let mut out = vec![];
        while let Ok((cmd, _)) = s.rx.priority.try_recv() {
            out.push(render(cmd));
        }
        while let Ok((cmd, _)) = s.rx.data.try_recv() {
            out.push(render(cmd));
        }
        out
    }

    /// Data messages queued on the data lane.
    fn data(s: &mut Sock) -> Vec<Message> {
        let mut out = vec![];
        while let Ok((cmd, _)) = s.rx.data.try_recv() {
            match cmd {
                Command::Send(m) => out.push(m),
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    fn fwd_text(f: Forward) -> Option<(usize, String)> {
        match f {
            Forward::One(_, m) => Some((1, m.into_text().unwrap().to_string())),
            Forward::Many(v, m) => Some((v.len(), m.into_text().unwrap().to_string())),
            _ => None,
        }
    }

    fn client(x: &str) -> SocketKind {
        SocketKind::Client(x.into())
    }
    fn data_kind(x: &str) -> SocketKind {
        SocketKind::Data(x.into())
    }

    #[test]
    fn control_gets_sync_with_current_clients_and_replacement_closes_old() {
        let (b, mut s) = (BufferBudget::new(1 << 30), Session::default());
        let (k1, k2, k3) = (sock(1), sock(2), sock(3));
        assert!(s.attach(&client("a"), k1.peer.clone(), &b));
        s.attach(&client("b"), k2.peer.clone(), &b);
        s.attach(&client("a"), k3.peer.clone(), &b);
        let mut c1 = sock(4);
        s.attach(&SocketKind::Control, c1.peer.clone(), &b);
        let sync = drain(&mut c1).pop().unwrap();
        let v: serde_json::Value = serde_json::from_str(&sync).unwrap();
        let mut ids: Vec<_> = v["connectionIds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_str().unwrap())
            .collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        let mut c2 = sock(5);
        s.attach(&SocketKind::Control, c2.peer.clone(), &b);
        assert_eq!(drain(&mut c1), ["close 1008 Replaced by new connection"]);
        drain(&mut c2);
        s.attach(&client("c"), sock(6).peer, &b);
        assert_eq!(
            drain(&mut c2),
            [r#"{"type":"connected","connectionId":"c"}"#]
        );
        assert!(drain(&mut c1).is_empty());
    }

    #[test]
    fn buffered_frames_flush_in_order_to_late_data_socket() {
        let (conf, b, mut s) = (
            RelayConf::default(),
            BufferBudget::new(1 << 30),
            Session::default(),
        );
        let k = sock(1);
        s.attach(&client("a"), k.peer.clone(), &b);
        for m in [
            Message::text("f1"),
            Message::binary(vec![2u8]),
            Message::text("f3"),
        ] {
            assert!(matches!(
                s.forward(&client("a"), 1, m, &conf, &b, &Metrics::default()),
                Forward::Buffered
            ));
        }
        assert_eq!(b.used(), 5);
        let mut d = sock(2);
        s.attach(&data_kind("a"), d.peer.clone(), &b);
        assert_eq!(b.used(), 0);
        assert_eq!(
            data(&mut d),
            [
                Message::text("f1"),
                Message::binary(vec![2u8]),
                Message::text("f3")
            ]
        );
        assert_eq!(
            fwd_text(s.forward(
                &client("a"),
                1,
                Message::text("f4"),
                &conf,
                &b,
                &Metrics::default()
            )),
            Some((1, "f4".into()))
        );
    }

    #[test]
    fn last_client_leaving_closes_data_and_notifies_control() {
        let (conf, b, mut s) = (
            RelayConf::default(),
            BufferBudget::new(1 << 30),
            Session::default(),
        );
        let mut c = sock(1);
        s.attach(&SocketKind::Control, c.peer.clone(), &b);
        let (k1, k2, mut d) = (sock(2), sock(3), sock(4));
        s.attach(&client("a"), k1.peer.clone(), &b);
        s.attach(&client("a"), k2.peer.clone(), &b);
        s.attach(&data_kind("a"), d.peer.clone(), &b);
        assert_eq!(
            fwd_text(s.forward(
                &data_kind("a"),
                4,
                Message::text("m"),
                &conf,
                &b,
                &Metrics::default()
            )),
            Some((2, "m".into()))
        );
        drain(&mut c);
        s.detach(&client("a"), 2, &b);
        assert!(drain(&mut c).is_empty());
        assert!(drain(&mut d).is_empty());
        s.detach(&client("a"), 3, &b);
        assert_eq!(
            drain(&mut c),
            [r#"{"type":"disconnected","connectionId":"a"}"#]
        );
        assert_eq!(drain(&mut d), ["close 1001 Client disconnected"]);
        s.detach(&data_kind("a"), 4, &b); // the data socket's own end: no second notice
        assert!(drain(&mut c).is_empty());
        s.detach(&SocketKind::Control, 1, &b);
        assert!(s.is_empty());
    }

    #[test]
    fn data_close_cascades_1012_but_replacement_does_not() {
        let (b, mut s) = (BufferBudget::new(1 << 30), Session::default());
        let mut c = sock(1);
        s.attach(&SocketKind::Control, c.peer.clone(), &b);
        let (mut k, mut d1, mut d2) = (sock(2), sock(3), sock(4));
        s.attach(&client("a"), k.peer.clone(), &b);
        s.attach(&data_kind("a"), d1.peer.clone(), &b);
        s.attach(&data_kind("a"), d2.peer.clone(), &b);
        assert_eq!(drain(&mut d1), ["close 1008 Replaced by new connection"]);
        s.detach(&data_kind("a"), 3, &b);
        assert!(drain(&mut k).is_empty());
        drain(&mut c);
        s.detach(&data_kind("a"), 4, &b);
        assert_eq!(drain(&mut k), ["close 1012 Server disconnected"]);
        assert!(drain(&mut d2).is_empty());
        assert_eq!(
            drain(&mut c),
            [r#"{"type":"disconnected","connectionId":"a"}"#]
        );
    }

    #[test]
    fn control_replacements_are_limited_per_minute_and_warned_once() {
        let (b, mut s) = (BufferBudget::new(1 << 30), Session::default());
        let t0 = Instant::now();
        assert_eq!(
            s.admit_control(t0, 2),
            ControlAdmit::Allowed,
            "no control yet"
        );
        s.attach(&SocketKind::Control, sock(1).peer, &b);
        assert_eq!(s.admit_control(t0, 2), ControlAdmit::Allowed);
        assert_eq!(s.admit_control(t0, 2), ControlAdmit::Allowed);
        assert_eq!(s.admit_control(t0, 2), ControlAdmit::Refused { warn: true });
        assert_eq!(
            s.admit_control(t0 + Duration::from_secs(30), 2),
            ControlAdmit::Refused { warn: false }
        );
        // A minute after the first two replacements, two more are allowed.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(s.admit_control(t1, 2), ControlAdmit::Allowed);
        assert_eq!(s.admit_control(t1, 2), ControlAdmit::Allowed);
        assert_eq!(s.admit_control(t1, 2), ControlAdmit::Refused { warn: true });
    }

    #[test]
    fn nudge_and_reset_only_while_waiting() {
        let (b, mut s) = (BufferBudget::new(1 << 30), Session::default());
        let mut c = sock(1);
        s.attach(&SocketKind::Control, c.peer.clone(), &b);
        s.attach(&client("a"), sock(2).peer, &b);
        drain(&mut c);
        assert!(s.nudge("a"), "counted as a nudge");
        assert_eq!(drain(&mut c), [r#"{"type":"sync","connectionIds":["a"]}"#]);
        s.attach(&data_kind("a"), sock(3).peer, &b);
        assert!(!s.nudge("a"));
        assert!(!s.reset("a"));
        assert!(drain(&mut c).is_empty());
        s.detach(&data_kind("a"), 3, &b);
        s.attach(&client("z"), sock(4).peer, &b);
        drain(&mut c);
        assert!(s.reset("z"), "counted as a reset");
        assert_eq!(drain(&mut c), ["close 1011 Control unresponsive"]);
        assert!(!s.nudge("z"), "no control left to nudge");
    }

    #[test]
    fn v1_forwards_to_the_other_role_without_buffering() {
        let (conf, b, mut s) = (
            RelayConf::default(),
            BufferBudget::new(1 << 30),
            Session::default(),
        );
        let server = SocketKind::V1(Role::Server);
        let client = SocketKind::V1(Role::Client);
        s.attach(&client, sock(1).peer, &b);
        assert!(matches!(
            s.forward(
                &client,
                1,
                Message::text("early"),
                &conf,
                &b,
                &Metrics::default()
            ),
            Forward::Drop
        ));
        s.attach(&server, sock(2).peer, &b);
        assert_eq!(
            fwd_text(s.forward(
                &client,
                1,
                Message::text("x"),
                &conf,
                &b,
                &Metrics::default()
            )),
            Some((1, "x".into()))
        );
        assert_eq!(
            fwd_text(s.forward(
                &server,
                2,
                Message::text("y"),
                &conf,
                &b,
                &Metrics::default()
            )),
            Some((1, "y".into()))
        );
    }

    #[test]
    fn budget_exhaustion_is_reported() {
        let (conf, b, mut s) = (
            RelayConf::default(),
            BufferBudget::new(4),
            Session::default(),
        );
        s.attach(&client("a"), sock(1).peer, &b);
        assert!(matches!(
            s.forward(
                &client("a"),
                1,
                Message::text("abc"),
                &conf,
                &b,
                &Metrics::default()
            ),
            Forward::Buffered
        ));
        assert!(matches!(
            s.forward(
                &client("a"),
                1,
                Message::text("de"),
                &conf,
                &b,
                &Metrics::default()
            ),
            Forward::OverBudget
        ));
        s.detach(&client("a"), 1, &b);
        assert_eq!(b.used(), 0);
    }
}
