//! The outbound side of one socket: a priority lane for control traffic and a data lane
//! bounded in bytes (relay-protocol.md §0 "Outbound").
//!
//! Producers never touch the socket: they push into the [`Outbox`]; the socket's single
//! writer task drains [`OutboxReceiver`] (priority lane first), writes a batch and flushes
//! once, then returns the batch's bytes with [`Outbox::release`]. A producer that finds the
//! data lane full waits for room, at most the slow-consumer deadline.
//!
//! Each lane is a `VecDeque` behind its own short lock, and one `Notify` wakes the one
//! reader for either lane ([`OutboxReceiver::recv`]): an idle socket's lanes allocate
//! nothing beyond their one shared block (tokio's channels preallocate blocks of 32 slots,
//! about 5 KB per socket for two lanes).
//!
//! Metrics (bound once, at attach, by [`Outbox::bind_metrics`]): the payload bytes in the
//! data lane and in the writer's unflushed batch (`outbound_queued_bytes`: added on push,
//! subtracted on release, and whatever is left when the socket ends), the seconds a sender
//! waited for room (`send_wait`), and slow-consumer disconnects, at most one per socket.

use crate::ops::metrics::Metrics;
use prometheus::{Histogram, IntCounter, IntGauge};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Bytes charged per queued message on top of its payload, so that a flood of empty frames
/// is bounded too.
const PER_MESSAGE_OVERHEAD: usize = 64;

/// Most bytes of priority-lane messages (control JSON, pongs) waiting for one socket; past
/// it the socket is not reading and is closed 1013 `Slow consumer`.
pub const MAX_PRIORITY_BACKLOG_BYTES: usize = 1 << 20;

/// An item on either lane.
#[derive(Debug)]
pub enum Command {
    /// A message to write.
    Send(Message),
    /// Send this close frame, flush, and stop writing.
    Close(CloseFrame),
    /// Flush what was written and stop writing (the socket is ending).
    Finish,
}

/// Why a data message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The socket is closing or gone.
    Closed,
    /// The queue stayed full for the whole slow-consumer deadline.
    TimedOut,
}

/// Lane capacity kept when a lane empties; a larger one (after a burst) is given back.
const LANE_KEEP_SLOTS: usize = 16;

/// Which lane of [`Lanes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Priority,
    Data,
}

/// Both lanes, items with the bytes they hold, and one wake-up for their single reader: the
/// writer waits on one signal for either lane (one waiter-list entry per wait, not two;
/// issue 11), and a socket holds one allocation for both.
#[derive(Debug, Default)]
struct Lanes {
    priority: Mutex<VecDeque<(Command, u32)>>,
    data: Mutex<VecDeque<(Command, u32)>>,
    ready: Notify,
}

impl Lanes {
    fn queue(&self, which: Which) -> std::sync::MutexGuard<'_, VecDeque<(Command, u32)>> {
        let lane = match which {
            Which::Priority => &self.priority,
            Which::Data => &self.data,
        };
        lane.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, which: Which, item: (Command, u32)) {
        self.queue(which).push_back(item);
        // Stores a wake-up if the reader is not waiting yet (single reader).
        self.ready.notify_one();
    }
}

/// The lane was empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Empty;

/// The reading end of one lane (owned by the socket's writer task).
#[derive(Debug)]
pub struct LaneReceiver {
    lanes: Arc<Lanes>,
    which: Which,
}

impl LaneReceiver {
    /// Takes the oldest item without waiting.
    pub fn try_recv(&mut self) -> Result<(Command, u32), Empty> {
        let mut queue = self.lanes.queue(self.which);
        let item = queue.pop_front().ok_or(Empty)?;
        if queue.is_empty() && queue.capacity() > LANE_KEEP_SLOTS {
            queue.shrink_to(LANE_KEEP_SLOTS);
        }
        Ok(item)
    }

    /// Waits for the oldest item of this lane (tests only). Cancel-safe: an item is taken
    /// only when returned. Never `None`. Both lanes share one wake-up that wakes one waiter,
    /// so this must never wait alongside the other lane's `recv` (a push could wake the
    /// wrong one): the writer waits with [`OutboxReceiver::recv`].
    #[cfg(test)]
    pub async fn recv(&mut self) -> Option<(Command, u32)> {
        loop {
            if let Ok(item) = self.try_recv() {
                return Some(item);
            }
            self.lanes.ready.notified().await;
        }
    }
}

/// The metric handles an outbox updates (see the module docs).
#[derive(Debug)]
struct Meters {
    queued: IntGauge,
    send_wait: Histogram,
    slow_consumers: IntCounter,
}

/// Producer handle of one socket's outbound queue; shared as `Arc<Outbox>`.
#[derive(Debug)]
pub struct Outbox {
    lanes: Arc<Lanes>,
    room: Semaphore,
    capacity: usize,
    priority_backlog: AtomicUsize,
    closing: AtomicBool,
    /// The socket was counted as a slow-consumer disconnect.
    slow_counted: AtomicBool,
    closed_signal: Notify,
    /// Data payload bytes pushed and not yet released: this socket's share of
    /// `outbound_queued_bytes`, given back whole when the socket ends. Signed: a release
    /// racing the end only moves it below zero until the final settle.
    queued: AtomicI64,
    meters: OnceLock<Meters>,
}

/// Consumer side, owned by the socket's writer task. Each item carries the bytes it holds:
/// give data-lane bytes back with [`Outbox::release`] and priority-lane bytes with
/// [`Outbox::priority_taken`].
#[derive(Debug)]
pub struct OutboxReceiver {
    /// Control JSON and error closes.
    pub priority: LaneReceiver,
    /// Data messages, and closes that must follow them.
    pub data: LaneReceiver,
}

/// An item taken by [`OutboxReceiver::recv`]: from the priority lane or the data lane.
#[derive(Debug)]
pub enum Taken {
    /// A priority-lane item and its cost (give it back with [`Outbox::priority_taken`]).
    Priority(Command, u32),
    /// A data-lane item and its cost (give it back with [`Outbox::release`]).
    Data(Command, u32),
}

impl OutboxReceiver {
    /// Waits for the next item of either lane, priority lane first. Cancel-safe: an item is
    /// taken only when returned.
    pub async fn recv(&mut self) -> Taken {
        loop {
            if let Ok((cmd, cost)) = self.priority.try_recv() {
                return Taken::Priority(cmd, cost);
            }
            if let Ok((cmd, cost)) = self.data.try_recv() {
                return Taken::Data(cmd, cost);
            }
            self.data.lanes.ready.notified().await;
        }
    }
}

fn close_frame(code: u16, reason: &'static str) -> Command {
    Command::Close(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    })
}

impl Outbox {
    /// A new queue holding at most `capacity_bytes` of data (at most `u32::MAX`).
    pub fn new(capacity_bytes: usize) -> (Outbox, OutboxReceiver) {
        let lanes = Arc::new(Lanes::default());
        let capacity = capacity_bytes.clamp(1, u32::MAX as usize);
        let outbox = Outbox {
            lanes: lanes.clone(),
            room: Semaphore::new(capacity),
            capacity,
            priority_backlog: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            slow_counted: AtomicBool::new(false),
            closed_signal: Notify::new(),
            queued: AtomicI64::new(0),
            meters: OnceLock::new(),
        };
        (
            outbox,
            OutboxReceiver {
                priority: LaneReceiver {
                    lanes: lanes.clone(),
                    which: Which::Priority,
                },
                data: LaneReceiver {
                    lanes,
                    which: Which::Data,
                },
            },
        )
    }

    /// Counts this queue in `metrics` from now on. Call it before the queue is shared (the
    /// hub does, at attach); later calls change nothing.
    pub fn bind_metrics(&self, metrics: &Metrics) {
        let _ = self.meters.set(Meters {
            queued: metrics.outbound_queued_bytes.clone(),
            send_wait: metrics.send_wait.clone(),
            slow_consumers: metrics.slow_consumer_disconnects.clone(),
        });
    }

    /// `payload` data bytes entered the queue.
    fn queued_add(&self, payload: usize) {
        if let Some(m) = self.meters.get() {
            self.queued.fetch_add(payload as i64, Ordering::Relaxed);
            m.queued.add(payload as i64);
        }
    }

    /// Gives back, from `outbound_queued_bytes`, what this queue still holds: call it once
    /// the socket's writer is gone. Runs again when the queue is dropped, for any message
    /// that raced in after.
    pub fn settle(&self) {
        if let Some(m) = self.meters.get() {
            let left = self.queued.swap(0, Ordering::AcqRel);
            if left != 0 {
                m.queued.sub(left);
            }
        }
    }

    /// Counts this socket once as a slow-consumer disconnect (closed 1013 `Slow consumer`,
    /// or dropped because its peer stopped reading). Returns whether it was counted now.
    pub fn count_slow_consumer(&self) -> bool {
        let first = !self.slow_counted.swap(true, Ordering::AcqRel);
        if first {
            if let Some(m) = self.meters.get() {
                m.slow_consumers.inc();
            }
        }
        first
    }

    /// Closes the socket 1013 `Slow consumer` (its queue stayed full), counting it.
    pub fn close_slow_consumer(&self) {
        if self.close(
            crate::protocol::close::TRY_AGAIN,
            crate::protocol::close::SLOW_CONSUMER,
        ) {
            self.count_slow_consumer();
        }
    }

    /// Queues a control message ahead of all data. Never waits. Returns false when the socket
    /// is closing; a socket whose priority backlog would pass [`MAX_PRIORITY_BACKLOG_BYTES`]
    /// (a single message on an empty backlog always fits) is closed 1013 `Slow consumer`.
    pub fn push_control(&self, msg: Message) -> bool {
        if self.is_closing() {
            return false;
        }
        let cost = msg.len() + PER_MESSAGE_OVERHEAD;
        let waiting = self.priority_backlog.fetch_add(cost, Ordering::AcqRel);
        // One message of any size is fine when nothing waits (a large `sync`); a backlog
        // means the socket is not reading.
        if waiting > 0 && waiting + cost > MAX_PRIORITY_BACKLOG_BYTES {
            self.close_slow_consumer();
            return false;
        }
        self.lanes
            .push(Which::Priority, (Command::Send(msg), cost as u32));
        true
    }

    /// Called by the writer for each priority-lane item it takes, with the bytes it held.
    pub fn priority_taken(&self, cost: u32) {
        self.priority_backlog
            .fetch_sub(cost as usize, Ordering::AcqRel);
    }

    /// Queues a data message without waiting (the late-daemon buffer flushed at attach, which
    /// has its own limits). It takes whatever room is free, so later senders wait for it.
    pub fn push_data_now(&self, msg: Message) {
        let cost = (msg.len() + PER_MESSAGE_OVERHEAD).min(self.capacity);
        let taken = self.room.forget_permits(cost) as u32;
        self.queued_add(msg.len());
        self.lanes.push(Which::Data, (Command::Send(msg), taken));
    }

    /// Queues a data message if there is room now; gives it back otherwise (queue full, or
    /// the socket closing), for [`Outbox::send_data`] to wait or report.
    pub fn try_send_data(&self, msg: Message) -> Result<(), Message> {
        let cost = (msg.len() + PER_MESSAGE_OVERHEAD).min(self.capacity) as u32;
        match self.room.try_acquire_many(cost) {
            Ok(permit) => {
                permit.forget();
                self.queued_add(msg.len());
                self.lanes.push(Which::Data, (Command::Send(msg), cost));
                Ok(())
            }
            Err(_) => Err(msg),
        }
    }

    /// Queues a data message, waiting up to `deadline` for room. A message larger than the
    /// whole queue waits for an empty queue. A wait is observed in `send_wait` (whatever
    /// its outcome); a message that finds room at once is not.
    pub async fn send_data(&self, msg: Message, deadline: Duration) -> Result<(), SendError> {
        let cost = (msg.len() + PER_MESSAGE_OVERHEAD).min(self.capacity) as u32;
        let permit = match self.room.try_acquire_many(cost) {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(SendError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                let started = tokio::time::Instant::now();
                let waited = tokio::time::timeout(deadline, self.room.acquire_many(cost)).await;
                if let Some(m) = self.meters.get() {
                    m.send_wait.observe(started.elapsed().as_secs_f64());
                }
                match waited {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(SendError::Closed),
                    Err(_) => return Err(SendError::TimedOut),
                }
            }
        };
        permit.forget();
        self.queued_add(msg.len());
        self.lanes.push(Which::Data, (Command::Send(msg), cost));
        Ok(())
    }

    /// Gives back queue bytes (`cost`, as the items carried them) and their data payload
    /// bytes once the writer has flushed the messages that held them.
    pub fn release(&self, cost: usize, payload: usize) {
        if cost > 0 && !self.room.is_closed() {
            self.room.add_permits(cost);
        }
        if payload > 0 {
            if let Some(m) = self.meters.get() {
                self.queued.fetch_sub(payload as i64, Ordering::Relaxed);
                m.queued.sub(payload as i64);
            }
        }
    }

    /// Marks the socket closing: later sends fail, senders waiting for room fail at once, and
    /// the socket's reader is woken through [`Outbox::closed`]. False if it already was.
    fn begin_close(&self) -> bool {
        if self.closing.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.room.close();
        self.closed_signal.notify_one();
        true
    }

    /// Closes at once: the close frame goes ahead of queued data (errors: 1009, 1013, ping
    /// timeout). Only the first close of a socket counts: returns whether this was it.
    pub fn close(&self, code: u16, reason: &'static str) -> bool {
        let first = self.begin_close();
        if first {
            self.lanes
                .push(Which::Priority, (close_frame(code, reason), 0));
        }
        first
    }

    /// Closes after the data already queued has been written (replacement 1008 and the
    /// cascades 1001 / 1012, so a peer's last frames are not lost; spec §3.9).
    pub fn close_in_order(&self, code: u16, reason: &'static str) {
        if self.begin_close() {
            self.lanes.push(Which::Data, (close_frame(code, reason), 0));
        }
    }

    /// Marks a socket that has ended as gone, without a close frame: producers stop waiting.
    pub fn shut(&self) {
        self.begin_close();
    }

    /// Asks the writer to flush and stop, handing the write half back (the socket is ending).
    pub fn finish(&self) {
        self.lanes.push(Which::Priority, (Command::Finish, 0));
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Completes once the socket is closing (single waiter: the socket's reader).
    pub async fn closed(&self) {
        if self.is_closing() {
            return;
        }
        self.closed_signal.notified().await;
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_wait_takes_either_lane_priority_first() {
        let (outbox, mut rx) = Outbox::new(1 << 20);
        assert!(outbox.try_send_data(Message::binary(vec![1u8; 10])).is_ok());
        assert!(outbox.push_control(Message::text("{\"type\":\"pong\"}")));
        match rx.recv().await {
            Taken::Priority(Command::Send(m), cost) => {
                assert_eq!(m, Message::text("{\"type\":\"pong\"}"));
                assert_eq!(cost, 15 + PER_MESSAGE_OVERHEAD as u32);
            }
            other => panic!("{other:?}"),
        }
        match rx.recv().await {
            Taken::Data(Command::Send(m), cost) => {
                assert_eq!(m, Message::binary(vec![1u8; 10]));
                assert_eq!(cost, 10 + PER_MESSAGE_OVERHEAD as u32);
            }
            other => panic!("{other:?}"),
        }
        // Empty: the wait ends when either lane gets an item (data, then priority).
        let waiting = tokio::spawn(async move { (rx.recv().await, rx) });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert!(outbox.try_send_data(Message::binary(vec![2u8; 3])).is_ok());
        let mut rx = match waiting.await.unwrap() {
            (Taken::Data(Command::Send(m), cost), rx) => {
                assert_eq!(m, Message::binary(vec![2u8; 3]));
                assert_eq!(cost, 3 + PER_MESSAGE_OVERHEAD as u32);
                rx
            }
            (other, _) => panic!("{other:?}"),
        };
        let waiting = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        outbox.close(1001, "bye");
        match waiting.await.unwrap() {
            Taken::Priority(Command::Close(f), 0) => {
                assert_eq!(u16::from(f.code), 1001);
                assert_eq!(f.reason.as_str(), "bye");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn priority_and_data_lanes() {
        let (out, mut rx) = Outbox::new(1000);
        out.send_data(Message::text("d1"), Duration::from_secs(1))
            .await
            .unwrap();
        assert!(out.push_control(Message::text("c1")));
        match rx.priority.try_recv() {
            Ok((Command::Send(m), 66)) => assert_eq!(m, Message::text("c1")),
            other => panic!("{other:?}"),
        }
        match rx.data.try_recv() {
            Ok((Command::Send(m), 66)) => assert_eq!(m, Message::text("d1")),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_times_out_then_frees() {
        let (out, mut rx) = Outbox::new(200);
        out.send_data(Message::binary(vec![0u8; 100]), Duration::from_secs(1))
            .await
            .unwrap();
        let r = out
            .send_data(Message::binary(vec![0u8; 100]), Duration::from_secs(30))
            .await;
        assert_eq!(r, Err(SendError::TimedOut));
        let (_, cost) = rx.data.recv().await.unwrap();
        out.release(cost as usize, 100);
        assert_eq!(cost, 164);
        // A message larger than the whole queue still goes through an empty queue.
        out.send_data(Message::binary(vec![0u8; 1000]), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(rx.data.recv().await.unwrap().1, 200);
    }

    #[tokio::test]
    async fn ordered_close_follows_queued_data_and_flush_takes_room() {
        let (out, mut rx) = Outbox::new(100);
        out.push_data_now(Message::binary(vec![0u8; 200]));
        assert_eq!(
            out.send_data(Message::text("x"), Duration::from_millis(10))
                .await,
            Err(SendError::TimedOut),
            "the flushed frame holds the whole queue"
        );
        out.close_in_order(1012, "Server disconnected");
        assert!(rx.priority.try_recv().is_err());
        assert!(matches!(rx.data.try_recv(), Ok((Command::Send(_), 100))));
        match rx.data.try_recv() {
            Ok((Command::Close(f), 0)) => assert_eq!(u16::from(f.code), 1012),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn priority_backlog_is_bounded_in_bytes() {
        let (out, _rx) = Outbox::new(100);
        let huge = Message::text("x".repeat(MAX_PRIORITY_BACKLOG_BYTES + 1));
        assert!(
            out.push_control(huge),
            "one message on an empty backlog always fits"
        );
        assert!(!out.push_control(Message::text("more")));
        assert!(out.is_closing());
    }

    #[tokio::test]
    async fn close_fails_waiters_and_is_sent_once() {
        let (out, mut rx) = Outbox::new(100);
        out.close(1008, "Replaced by new connection");
        out.close(1000, "again");
        out.closed().await;
        assert_eq!(
            out.send_data(Message::text("x"), Duration::from_secs(1))
                .await,
            Err(SendError::Closed)
        );
        assert!(!out.push_control(Message::text("c")));
        match rx.priority.try_recv() {
            Ok((Command::Close(f), 0)) => {
                assert_eq!(
                    (u16::from(f.code), f.reason.as_str()),
                    (1008, "Replaced by new connection")
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(rx.priority.try_recv().is_err());
    }
}
