//! The late-daemon buffer: frames a client sent before its data socket attached
//! (relay-protocol.md §0 "Frames and limits", §3.7). Pure data structures, no tokio.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio_tungstenite::tungstenite::Message;

/// Process-wide budget of payload bytes held in all late-daemon buffers (spec §0, default
/// 256 MiB). Shared by every session of one relay.
#[derive(Debug)]
pub struct BufferBudget {
    limit: usize,
    used: AtomicUsize,
}

impl BufferBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        BufferBudget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Takes `n` bytes if they fit; false (nothing taken) when they would exceed the limit.
    pub fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// Gives back `n` bytes taken earlier.
    pub fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes currently held.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// What [`PendingFrames::push`] dropped to keep the newest frames.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Frames dropped, oldest first.
    pub frames: usize,
    /// Their payload bytes (to give back to the budget).
    pub bytes: usize,
}

/// Frames waiting for one connectionId's data socket: the newest `max_frames` and at most
/// `max_bytes` of payload; the oldest are dropped until both hold (spec §0).
///
/// The bytes held are accounted in a [`BufferBudget`]; callers give back what
/// [`PendingFrames::push`] evicts and what [`PendingFrames::take`] returns.
#[derive(Debug, Default)]
pub struct PendingFrames {
    frames: VecDeque<Message>,
    bytes: usize,
}

impl PendingFrames {
    /// Appends a frame, then drops the oldest frames until at most `max_frames` frames and
    /// `max_bytes` bytes remain. Returns the payload bytes dropped.
    pub fn push(&mut self, frame: Message, max_frames: usize, max_bytes: usize) -> Dropped {
        self.bytes += frame.len();
        self.frames.push_back(frame);
        let mut dropped = Dropped::default();
        while self.frames.len() > max_frames || self.bytes > max_bytes {
            match self.frames.pop_front() {
                Some(old) => {
                    self.bytes -= old.len();
                    dropped.frames += 1;
                    dropped.bytes += old.len();
                }
                None => break,
            }
        }
        dropped
    }

    /// Removes every frame, in arrival order, with their total payload bytes.
    pub fn take(&mut self) -> (VecDeque<Message>, usize) {
        let bytes = std::mem::take(&mut self.bytes);
        (std::mem::take(&mut self.frames), bytes)
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of frames held.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether no frame is held.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_200_frames() {
        let mut p = PendingFrames::default();
        let mut dropped = 0;
        for i in 0..=200 {
            dropped += p.push(Message::text(i.to_string()), 200, 32 << 20).bytes;
        }
        assert_eq!(dropped, 1); // "0"
        let (frames, bytes) = p.take();
        assert_eq!(frames.len(), 200);
        assert_eq!(frames.front(), Some(&Message::text("1")));
        assert_eq!(frames.back(), Some(&Message::text("200")));
        assert_eq!(bytes, frames.iter().map(Message::len).sum::<usize>());
        assert!(p.is_empty());
        assert_eq!(p.bytes(), 0);
    }

    #[test]
    fn byte_limit_drops_oldest_and_keeps_kinds() {
        let mut p = PendingFrames::default();
        assert_eq!(p.push(Message::binary(vec![1u8; 6]), 200, 10).bytes, 0);
        assert_eq!(p.push(Message::text("abcd"), 200, 10).bytes, 0);
        assert_eq!(
            p.push(Message::binary(vec![2u8; 3]), 200, 10),
            Dropped {
                frames: 1,
                bytes: 6
            }
        );
        let (frames, bytes) = p.take();
        assert_eq!(bytes, 7);
        assert_eq!(
            Vec::from(frames),
            vec![Message::text("abcd"), Message::binary(vec![2u8; 3])]
        );
    }

    #[test]
    fn budget_is_all_or_nothing() {
        let b = BufferBudget::new(10);
        assert!(b.try_take(6));
        assert!(!b.try_take(5));
        assert_eq!(b.used(), 6);
        assert!(b.try_take(4));
        b.give_back(10);
        assert_eq!(b.used(), 0);
    }
}
