//! The outbound side of one socket: a priority lane for control traffic and a data lane
//! bounded in bytes (relay-protocol.md §0 "Outbound").
//!
//! Producers never touch the socket: they push into the [`Outbox`]; the socket's single
//! writer task drains [`OutboxReceiver`] (priority lane first), writes a batch and flushes
//! once, then returns the batch's bytes with [`Outbox::release`]. A producer that finds the
//! data lane full waits for room, at most the slow-consumer deadline.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Bytes charged per queued data message on top of its payload, so that a flood of empty
/// frames is bounded too.
const PER_MESSAGE_OVERHEAD: usize = 64;

/// Most priority-lane messages (control JSON, pongs) waiting for one socket; past it the
/// socket is not reading and is closed 1013 `Slow consumer`.
pub const MAX_PRIORITY_BACKLOG: usize = 4096;

/// An item on the priority lane.
#[derive(Debug)]
pub enum Command {
    /// A message that must not wait behind data (control JSON).
    Send(Message),
    /// Send this close frame, flush, and stop writing.
    Close(CloseFrame),
}

/// Why a data message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The socket is closing or gone.
    Closed,
    /// The queue stayed full for the whole slow-consumer deadline.
    TimedOut,
}

/// Producer handle of one socket's outbound queue; shared as `Arc<Outbox>`.
#[derive(Debug)]
pub struct Outbox {
    priority: mpsc::UnboundedSender<Command>,
    data: mpsc::UnboundedSender<(Message, u32)>,
    room: Semaphore,
    capacity: usize,
    priority_backlog: AtomicUsize,
    closing: AtomicBool,
    closed_signal: Notify,
}

/// Consumer side, owned by the socket's writer task.
#[derive(Debug)]
pub struct OutboxReceiver {
    /// Control JSON and the close command.
    pub priority: mpsc::UnboundedReceiver<Command>,
    /// Data messages with the queue bytes they hold (give them back with [`Outbox::release`]).
    pub data: mpsc::UnboundedReceiver<(Message, u32)>,
}

impl Outbox {
    /// A new queue holding at most `capacity_bytes` of data (at most `u32::MAX`).
    pub fn new(capacity_bytes: usize) -> (Outbox, OutboxReceiver) {
        let (ptx, prx) = mpsc::unbounded_channel();
        let (dtx, drx) = mpsc::unbounded_channel();
        let capacity = capacity_bytes.clamp(1, u32::MAX as usize);
        let outbox = Outbox {
            priority: ptx,
            data: dtx,
            room: Semaphore::new(capacity),
            capacity,
            priority_backlog: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            closed_signal: Notify::new(),
        };
        (
            outbox,
            OutboxReceiver {
                priority: prx,
                data: drx,
            },
        )
    }

    /// Queues a control message ahead of all data. Never waits. Returns false when the socket
    /// is closing; a socket whose priority backlog overflows is closed 1013 `Slow consumer`.
    pub fn push_control(&self, msg: Message) -> bool {
        if self.is_closing() {
            return false;
        }
        if self.priority_backlog.fetch_add(1, Ordering::AcqRel) >= MAX_PRIORITY_BACKLOG {
            self.close(
                crate::protocol::close::TRY_AGAIN,
                crate::protocol::close::SLOW_CONSUMER,
            );
            return false;
        }
        self.priority.send(Command::Send(msg)).is_ok()
    }

    /// Called by the writer for each priority message it takes.
    pub fn priority_taken(&self) {
        self.priority_backlog.fetch_sub(1, Ordering::AcqRel);
    }

    /// Queues a data message without waiting and without charging the queue (used once, for
    /// the late-daemon buffer flushed at attach, which has its own limits).
    pub fn push_data_unbounded(&self, msg: Message) {
        let _ = self.data.send((msg, 0));
    }

    /// Queues a data message, waiting up to `deadline` for room. A message larger than the
    /// whole queue waits for an empty queue.
    pub async fn send_data(&self, msg: Message, deadline: Duration) -> Result<(), SendError> {
        let cost = (msg.len() + PER_MESSAGE_OVERHEAD).min(self.capacity) as u32;
        let permit = match self.room.try_acquire_many(cost) {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(SendError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                match tokio::time::timeout(deadline, self.room.acquire_many(cost)).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(SendError::Closed),
                    Err(_) => return Err(SendError::TimedOut),
                }
            }
        };
        permit.forget();
        if self.data.send((msg, cost)).is_err() {
            self.room.add_permits(cost as usize);
            return Err(SendError::Closed);
        }
        Ok(())
    }

    /// Gives back queue bytes once the writer has flushed the messages that held them.
    pub fn release(&self, bytes: usize) {
        if bytes > 0 && !self.room.is_closed() {
            self.room.add_permits(bytes);
        }
    }

    /// Asks the writer to send a close frame (once; later calls do nothing) and fails every
    /// producer waiting for room. The socket's reader is woken through [`Outbox::closed`].
    pub fn close(&self, code: u16, reason: &'static str) {
        if self.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.room.close();
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let _ = self.priority.send(Command::Close(frame));
        self.closed_signal.notify_one();
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Completes once [`Outbox::close`] has been called (single waiter: the socket's reader).
    pub async fn closed(&self) {
        if self.is_closing() {
            return;
        }
        self.closed_signal.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn priority_and_data_lanes() {
        let (out, mut rx) = Outbox::new(1000);
        out.send_data(Message::text("d1"), Duration::from_secs(1))
            .await
            .unwrap();
        assert!(out.push_control(Message::text("c1")));
        match rx.priority.try_recv() {
            Ok(Command::Send(m)) => assert_eq!(m, Message::text("c1")),
            other => panic!("{other:?}"),
        }
        let (m, cost) = rx.data.try_recv().unwrap();
        assert_eq!((m, cost), (Message::text("d1"), 66));
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
        out.release(cost as usize);
        // A message larger than the whole queue still goes through an empty queue.
        out.send_data(Message::binary(vec![0u8; 1000]), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(rx.data.recv().await.unwrap().1, 200);
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
            Ok(Command::Close(f)) => {
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
