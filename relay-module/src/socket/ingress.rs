//! The ingress budget (issue 9): bytes of partly received messages across the process,
//! reserved from each data frame's header before tungstenite reads its payload, so that many
//! sockets each holding an unfinished large message cannot take the relay's memory.
//!
//! ```text
//!  socket bytes ─▶ Activity::poll_read ─▶ Ingress::admit (headers only) ─▶ tungstenite
//!                                           │ data frame header: reserve its payload length
//!                                           │ no room: hand nothing more; wait, then 1013
//!                                           └ last byte of a FIN data frame: release the message
//! ```
//!
//! Only headers are looked at, never payload bytes. A FIN frame whose whole payload is in the
//! bytes being handed over needs no reservation (it is received in the same read), so small
//! messages cost no atomic operation. Waiters are woken together whenever room frees: each
//! tries again, so a small reservation never waits behind a large one.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;
use tokio::time::Sleep;

/// Largest payload of a control frame (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// Data frames at least this long, bytes, are handed to tungstenite with their header
/// ending the read (issue 11). tungstenite then sizes its read buffer to exactly the
/// payload, which it hands on as a slice of that buffer: with no room left after it, its
/// next read has to take a fresh small buffer while the payload is still referenced (the
/// reader holds it across that read, `conn::read_loop`), and the message-sized buffer is
/// freed with the payload instead of staying with the socket (64 MB per pair after one
/// 32 MiB message each way). This holds for a message sent as one frame (what Paseo sends);
/// of a fragmented message tungstenite reassembles a copy, and its read buffer stays as large
/// as the largest fragment.
pub const LARGE_FRAME_BYTES: u64 = 64 << 10;

/// The process-wide budget; one per hub, shared by every socket as `Arc<IngressBudget>`.
#[derive(Debug)]
pub struct IngressBudget {
    capacity: usize,
    /// How long a socket waits for room before it is closed 1013.
    timeout: Duration,
    reserved: AtomicUsize,
    /// Sockets waiting for room (release only wakes anyone when this is non-zero).
    waiting: AtomicUsize,
    room: Arc<Notify>,
}

impl IngressBudget {
    /// A budget of `capacity` bytes; a socket waits at most `timeout` for room.
    pub fn new(capacity: usize, timeout: Duration) -> Arc<IngressBudget> {
        Arc::new(IngressBudget {
            capacity,
            timeout,
            reserved: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            room: Arc::new(Notify::new()),
        })
    }

    /// Bytes reserved now.
    pub fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Acquire)
    }

    /// Reserves `n` bytes if they fit. On an empty budget any single reservation fits, so a
    /// message larger than the whole budget is still received (alone).
    pub fn try_reserve(&self, n: usize) -> bool {
        let mut cur = self.reserved.load(Ordering::SeqCst);
        loop {
            if cur != 0 && cur.saturating_add(n) > self.capacity {
                return false;
            }
            match self.reserved.compare_exchange_weak(
                cur,
                cur.saturating_add(n),
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Gives back `n` reserved bytes and wakes every waiting socket.
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.reserved.fetch_sub(n, Ordering::SeqCst);
        // SeqCst pairs with `Wait::new`: a waiter counted after this load registered before
        // its own failed attempt, which then saw the freed room.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }
}

/// Why the ingress side ended a socket; carried in the `io::Error` that tungstenite returns,
/// and mapped to a close code by the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The budget had no room for `slow_consumer_timeout_ms`: 1013 `Relay ingress capacity`.
    Capacity,
    /// The next fragment makes the message larger than the socket's limit: 1009, before
    /// its payload is read.
    TooBig,
    /// A control frame longer than 125 bytes: 1002, before its payload is read.
    BadControl,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Capacity => "no room in the ingress budget",
            Refusal::TooBig => "fragmented message over the size limit",
            Refusal::BadControl => "control frame over 125 bytes",
        })
    }
}

impl std::error::Error for Refusal {}

impl Refusal {
    /// The refusal an I/O error carries, if it is one.
    pub fn of(e: &std::io::Error) -> Option<Refusal> {
        e.get_ref()?.downcast_ref::<Refusal>().copied()
    }
}

impl From<Refusal> for std::io::Error {
    fn from(r: Refusal) -> Self {
        std::io::Error::other(r)
    }
}

/// A parsed RFC 6455 frame header (§5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// FIN bit.
    pub fin: bool,
    /// Opcode (low 4 bits of the first byte).
    pub opcode: u8,
    /// Payload length (7, 16 or 64 bits on the wire).
    pub len: u64,
}

impl Header {
    /// Parses the header at the front of `b`: the header and its size in bytes (masking key
    /// included), or `None` while it is incomplete.
    pub fn parse(b: &[u8]) -> Option<(Header, usize)> {
        let (&b0, &b1) = (b.first()?, b.get(1)?);
        let (len, at) = match b1 & 0x7f {
            126 => (u64::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?])), 4),
            127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?), 10),
            n => (u64::from(n), 2),
        };
        let size = at + if b1 & 0x80 != 0 { 4 } else { 0 };
        let header = Header {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            len,
        };
        (b.len() >= size).then_some((header, size))
    }

    /// Data-range opcode (0-7: continuation, text, binary and the reserved ones, which
    /// tungstenite reads before refusing): its payload is held while the message builds.
    fn is_data(&self) -> bool {
        self.opcode < 8
    }
}

/// Where a byte stream stands in RFC 6455 framing: inside a header (`have` bytes of it
/// seen) or inside a payload (`left` bytes to go). 24 bytes.
#[derive(Debug, Default)]
pub struct FrameCursor {
    /// The header bytes seen so far (the masking key is not kept: only counted).
    head: [u8; 10],
    /// Header bytes seen so far (up to 14).
    have: u8,
    /// First byte (FIN, opcode) of the frame whose payload is being passed.
    frame: u8,
    /// Payload bytes of the current frame still to come.
    left: u64,
}

/// The next thing a [`FrameCursor`] finds in its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `n` bytes of payload.
    Payload(usize),
    /// `n` bytes of a header that the input does not complete.
    Partial(usize),
    /// A header that the next `n` bytes of the input complete.
    Header(Header, usize),
}

impl FrameCursor {
    /// What the front of `input` (not empty) holds; consumes nothing.
    pub fn peek(&self, input: &[u8]) -> Step {
        if self.left > 0 {
            return Step::Payload(
                usize::try_from(self.left).map_or(input.len(), |l| l.min(input.len())),
            );
        }
        let have = usize::from(self.have);
        if have == 0 {
            if let Some((h, size)) = Header::parse(input) {
                return Step::Header(h, size);
            }
        }
        // A header split across reads: parse what is kept plus the new bytes.
        let mut joined = [0u8; 14];
        let kept = have.min(self.head.len());
        joined[..kept].copy_from_slice(&self.head[..kept]);
        let take = (14 - have).min(input.len());
        joined[have..have + take].copy_from_slice(&input[..take]);
        match Header::parse(&joined[..have + take]) {
            Some((h, size)) => Step::Header(h, size - have),
            None => Step::Partial(take),
        }
    }

    /// Consumes `bytes`, the front of a header that they do not complete.
    pub fn keep(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if let Some(slot) = self.head.get_mut(usize::from(self.have)) {
                *slot = b;
            }
            self.have += 1;
        }
    }

    /// Consumes the rest of header `h`; returns true if the frame ends with it (no payload).
    pub fn commit(&mut self, h: &Header) -> bool {
        self.frame = (u8::from(h.fin) << 7) | h.opcode;
        self.have = 0;
        self.left = h.len;
        h.len == 0
    }

    /// Consumes `n` payload bytes; returns true if the frame ends with them.
    pub fn pass(&mut self, n: usize) -> bool {
        self.left -= n as u64;
        self.left == 0
    }

    /// The FIN bit and opcode of the frame being passed (or just ended).
    pub fn frame(&self) -> (bool, u8) {
        (self.frame & 0x80 != 0, self.frame & 0x0f)
    }

    /// At a frame boundary (nothing of a header or payload pending).
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }
}

/// A socket waiting for room: the wake-up and the deadline, boxed while it waits.
struct Wait {
    budget: Arc<IngressBudget>,
    notified: Pin<Box<OwnedNotified>>,
    deadline: Pin<Box<Sleep>>,
}

impl Wait {
    fn new(budget: &Arc<IngressBudget>) -> Box<Wait> {
        budget.waiting.fetch_add(1, Ordering::SeqCst);
        let mut notified = Box::pin(budget.room.clone().notified_owned());
        notified.as_mut().enable();
        Box::new(Wait {
            budget: budget.clone(),
            notified,
            deadline: Box::pin(tokio::time::sleep(budget.timeout)),
        })
    }

    /// A fresh wake-up after the last one fired (registered before the next attempt).
    fn rearm(&mut self) {
        self.notified.set(self.budget.room.clone().notified_owned());
        self.notified.as_mut().enable();
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        self.budget.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl fmt::Debug for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Wait")
    }
}

/// What to do with a frame whose header is complete.
enum Decision {
    /// Hand it over (reserved, or nothing to reserve).
    Pass,
    /// No room: hand nothing of it yet (the waker is registered).
    Wait,
    /// End the socket.
    Refuse(Refusal),
}

/// One socket's ingress tracker: sees every byte handed to tungstenite, in order, and holds
/// the reservation of the message being received. 56 bytes; the wait state only exists,
/// boxed, while the socket waits.
#[derive(Debug)]
pub struct Ingress {
    frames: FrameCursor,
    /// Bytes reserved for the message being received (its fragments so far).
    held: u64,
    /// The socket's message limit (tungstenite answers 1009 over it).
    limit: u64,
    /// `None` once tracking is off (socket ending): bytes pass unexamined.
    budget: Option<Arc<IngressBudget>>,
    wait: Option<Box<Wait>>,
}

impl Ingress {
    /// A tracker reserving in `budget` for messages of at most `limit` bytes.
    pub fn new(budget: Arc<IngressBudget>, limit: usize) -> Ingress {
        Ingress {
            frames: FrameCursor::default(),
            held: 0,
            limit: limit as u64,
            budget: Some(budget),
            wait: None,
        }
    }

    /// Bytes this socket holds in the budget now.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Whether the socket is waiting for room.
    pub fn is_waiting(&self) -> bool {
        self.wait.is_some()
    }

    /// Stops tracking (the socket is ending: its reader no longer parses frames): gives the
    /// reservation back, and later bytes pass without being looked at or waiting.
    pub fn stop(&mut self) {
        self.wait = None;
        if let Some(budget) = self.budget.take() {
            budget.release(self.held as usize);
        }
        self.held = 0;
    }

    /// How many bytes of `input` (the next bytes for tungstenite, in order) may be handed
    /// over now: `Ready(Ok(n))` with `n > 0` unless `input` is empty; `Pending` when the
    /// first of them must wait for room (woken when room frees or the wait times out);
    /// `Ready(Err)` when the socket must end ([`Refusal`]). It stops right after the header
    /// of a data frame of [`LARGE_FRAME_BYTES`] or more. Bytes it did not take must be
    /// offered again, first, on the next call.
    pub fn admit(&mut self, input: &[u8], cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.budget.is_none() {
            return Poll::Ready(Ok(input.len()));
        }
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            match self.frames.peek(rest) {
                Step::Payload(n) => {
                    pos += n;
                    if self.frames.pass(n) {
                        self.frame_ended();
                    }
                }
                Step::Partial(n) => {
                    self.frames.keep(&rest[..n]);
                    pos += n;
                }
                Step::Header(h, k) => match self.decide(&h, rest.len() - k, cx) {
                    Decision::Pass => {
                        pos += k;
                        if self.frames.commit(&h) {
                            self.frame_ended();
                        }
                        if h.is_data() && h.len >= LARGE_FRAME_BYTES && pos < input.len() {
                            return Poll::Ready(Ok(pos)); // see LARGE_FRAME_BYTES
                        }
                    }
                    // Hand what comes before the header's last byte (tungstenite then has
                    // no complete header, so it reserves nothing either); decide again then.
                    _ if pos + k > 1 => {
                        self.frames.keep(&rest[..k - 1]);
                        return Poll::Ready(Ok(pos + k - 1));
                    }
                    Decision::Wait => return Poll::Pending,
                    Decision::Refuse(r) => {
                        self.stop();
                        return Poll::Ready(Err(r.into()));
                    }
                },
            }
        }
        Poll::Ready(Ok(pos))
    }

    /// The last payload byte of a frame was handed over: a FIN data frame completes its
    /// message, whose reservation goes back.
    fn frame_ended(&mut self) {
        let (fin, opcode) = self.frames.frame();
        if fin && opcode < 8 && self.held > 0 {
            if let Some(budget) = &self.budget {
                budget.release(self.held as usize);
            }
            self.held = 0;
        }
    }

    /// What to do with the frame of header `h`, of which `after` more bytes follow the
    /// header in the input at hand.
    fn decide(&mut self, h: &Header, after: usize, cx: &mut Context<'_>) -> Decision {
        if !h.is_data() {
            // Control frames hold nothing; one over 125 bytes is refused before tungstenite
            // would read (and hold) its payload only to refuse it.
            return if h.len > MAX_CONTROL_PAYLOAD {
                Decision::Refuse(Refusal::BadControl)
            } else {
                Decision::Pass
            };
        }
        if h.len > self.limit {
            return Decision::Pass; // tungstenite answers 1009 from the header alone
        }
        if self.held + h.len > self.limit {
            return Decision::Refuse(Refusal::TooBig);
        }
        if h.len == 0 || (h.fin && h.len <= after as u64) {
            return Decision::Pass; // received whole in this read: nothing stays partial
        }
        self.reserve(h.len as usize, cx)
    }

    /// Reserves `n` bytes for the current message, or starts or continues waiting for room.
    fn reserve(&mut self, n: usize, cx: &mut Context<'_>) -> Decision {
        let Some(budget) = &self.budget else {
            return Decision::Pass;
        };
        loop {
            if budget.try_reserve(n) {
                self.held += n as u64;
                self.wait = None;
                return Decision::Pass;
            }
            let Some(wait) = &mut self.wait else {
                // Registered before the next attempt, so a release in between is not missed.
                self.wait = Some(Wait::new(budget));
                continue;
            };
            if wait.deadline.as_mut().poll(cx).is_ready() {
                return Decision::Refuse(Refusal::Capacity);
            }
            match wait.notified.as_mut().poll(cx) {
                Poll::Ready(()) => wait.rearm(),
                Poll::Pending => return Decision::Wait,
            }
        }
    }
}

impl Drop for Ingress {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x5a, 0x13, 0xc7, 0x88];

    /// A frame header as a client writes it (masked unless `mask` is `None`).
    fn header(fin: bool, opcode: u8, len: u64, mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        if len < 126 {
            out.push(m | len as u8);
        } else if len <= 0xffff {
            out.push(m | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(m | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
        out.extend(mask.iter().flatten());
        out
    }

    fn frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut f = header(fin, opcode, len as u64, Some(MASK));
        f.resize(f.len() + len, 0xab);
        f
    }

    fn cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    /// Feeds `input` in reads of `chunk` bytes, as tungstenite would, and returns how many
    /// bytes were handed over before the first one that waited.
    fn feed(ing: &mut Ingress, input: &[u8], chunk: usize) -> usize {
        let mut pos = 0;
        while pos < input.len() {
            let end = (pos + chunk).min(input.len());
            match ing.admit(&input[pos..end], &mut cx()) {
                Poll::Ready(Ok(n)) => {
                    assert!(n > 0, "Ready with nothing handed");
                    pos += n;
                }
                Poll::Pending => return pos,
                Poll::Ready(Err(e)) => panic!("refused at {pos}: {e}"),
            }
        }
        pos
    }

    #[test]
    fn headers_parse_with_7_16_and_64_bit_lengths_and_masks() {
        for (len, size) in [
            (0u64, 2),
            (125, 2),
            (126, 4),
            (65_535, 4),
            (65_536, 10),
            (u64::MAX >> 1, 10),
        ] {
            for (mask, extra) in [(None, 0), (Some(MASK), 4)] {
                let h = header(false, 2, len, mask);
                assert_eq!(h.len(), size + extra);
                assert_eq!(
                    Header::parse(&h),
                    Some((
                        Header {
                            fin: false,
                            opcode: 2,
                            len
                        },
                        size + extra
                    ))
                );
                assert_eq!(Header::parse(&h[..h.len() - 1]), None, "incomplete");
            }
        }
        assert_eq!(Header::parse(&[0x81]), None);
    }

    #[test]
    fn a_large_data_frame_s_header_ends_the_read() {
        let budget = IngressBudget::new(1 << 20, Duration::from_secs(1));
        let mut ing = Ingress::new(budget.clone(), 1 << 20);
        let mut input = frame(true, 2, 100); // small: passes with what follows
        let small = input.len();
        input.extend(frame(true, 2, LARGE_FRAME_BYTES as usize)); // 14-byte header
        let first = ing.admit(&input[..small + 1024], &mut cx());
        assert!(
            matches!(first, Poll::Ready(Ok(n)) if n == small + 14),
            "{first:?}"
        );
        // The payload follows in later reads; a control frame never ends a read early.
        let rest = &input[small + 14..];
        assert!(matches!(ing.admit(rest, &mut cx()), Poll::Ready(Ok(n)) if n == rest.len()));
        assert!(ing.frames.at_boundary());
        let ping = frame(true, 9, 4);
        assert!(matches!(ing.admit(&ping, &mut cx()), Poll::Ready(Ok(n)) if n == ping.len()));
        // A header that is the whole input hands it all.
        let h = header(false, 1, LARGE_FRAME_BYTES, Some(MASK));
        assert!(matches!(ing.admit(&h, &mut cx()), Poll::Ready(Ok(n)) if n == h.len()));
    }

    #[test]
    fn split_headers_are_joined_across_reads() {
        let budget = IngressBudget::new(1 << 20, Duration::from_secs(1));
        let mut ing = Ingress::new(budget.clone(), 1 << 20);
        let mut input = frame(false, 1, 70_000); // 64-bit length, masked: 14-byte header
        input.extend(frame(true, 0, 300)); // 16-bit length
        input.extend(frame(true, 2, 5));
        for chunk in [1, 3, 7, 1024] {
            assert_eq!(feed(&mut ing, &input, chunk), input.len(), "chunk {chunk}");
            assert!(ing.frames.at_boundary());
            assert_eq!(
                (ing.held(), budget.reserved()),
                (0, 0),
                "released at the FIN"
            );
        }
    }

    #[test]
    fn fragments_are_reserved_until_the_fin_frame_ends() {
        let budget = IngressBudget::new(1 << 20, Duration::from_secs(1));
        let mut ing = Ingress::new(budget.clone(), 1 << 20);
        let first = frame(false, 2, 1000);
        assert_eq!(feed(&mut ing, &first, 1024), first.len());
        assert_eq!(budget.reserved(), 1000, "the unfinished message is held");
        // A ping and a pong between fragments reserve nothing and end nothing.
        let mut mid = frame(true, 9, 4);
        mid.extend(frame(true, 0xA, 0));
        mid.extend(frame(false, 0, 500));
        assert_eq!(feed(&mut ing, &mid, 1024), mid.len());
        assert_eq!(budget.reserved(), 1500);
        // The last fragment, whole in one read: nothing more is reserved, all is released
        // once its last byte is handed over (not before).
        let last = frame(true, 0, 200);
        assert_eq!(
            feed(&mut ing, &last[..last.len() - 1], 1024),
            last.len() - 1
        );
        assert_eq!(
            budget.reserved(),
            1700,
            "a FIN frame split across reads is reserved"
        );
        assert_eq!(feed(&mut ing, &last[last.len() - 1..], 1024), 1);
        assert_eq!(budget.reserved(), 0);
        // A small complete message in one read never touches the budget.
        let small = frame(true, 1, 100);
        assert_eq!(feed(&mut ing, &small, 1024), small.len());
        assert_eq!(budget.reserved(), 0);
        // Dropping a socket mid-message gives its reservation back.
        assert_eq!(feed(&mut ing, &first, 1024), first.len());
        assert_eq!(budget.reserved(), 1000);
        drop(ing);
        assert_eq!(budget.reserved(), 0);
    }

    #[test]
    fn oversized_frames_pass_unreserved_and_oversized_messages_are_refused_early() {
        let budget = IngressBudget::new(1 << 20, Duration::from_secs(1));
        let mut ing = Ingress::new(budget.clone(), 1000);
        // A frame over the limit: tungstenite refuses it from the header; nothing reserved.
        let h = header(true, 2, 1001, Some(MASK));
        assert_eq!(feed(&mut ing, &h, 1024), h.len());
        assert_eq!(budget.reserved(), 0);

        let mut ing = Ingress::new(budget.clone(), 1000);
        let mut input = frame(false, 2, 600);
        input.extend(header(true, 0, 401, Some(MASK)));
        // The bytes before the refused header go first; the refusal comes next, with nothing.
        let n = match ing.admit(&input, &mut cx()) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("{other:?}"),
        };
        assert_eq!(n, input.len() - 1, "all but the header's last byte");
        match ing.admit(&input[n..], &mut cx()) {
            Poll::Ready(Err(e)) => assert_eq!(Refusal::of(&e), Some(Refusal::TooBig)),
            other => panic!("{other:?}"),
        }
        assert_eq!(budget.reserved(), 0, "a refused socket holds nothing");
        // Tracking is off now: the rest passes unexamined (the reader drains the socket).
        assert!(matches!(
            ing.admit(&[0xff; 64], &mut cx()),
            Poll::Ready(Ok(64))
        ));

        // A control frame over 125 bytes: refused from its header (all but whose last byte
        // is handed over first, as for any refusal).
        let mut ing = Ingress::new(budget.clone(), 1000);
        let ping = header(true, 9, 126, Some(MASK));
        assert_eq!(
            feed(&mut ing, &ping[..ping.len() - 1], 1024),
            ping.len() - 1
        );
        match ing.admit(&ping[ping.len() - 1..], &mut cx()) {
            Poll::Ready(Err(e)) => assert_eq!(Refusal::of(&e), Some(Refusal::BadControl)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_stops_reading_until_room_frees_or_the_wait_times_out() {
        let budget = IngressBudget::new(1000, Duration::from_secs(1));
        let mut a = Ingress::new(budget.clone(), 1 << 20);
        let mut b = Ingress::new(budget.clone(), 1 << 20);
        let mut c = Ingress::new(budget.clone(), 1 << 20);
        let big = frame(false, 2, 800);
        assert_eq!(feed(&mut a, &big, 1024), big.len());
        // b's 800 bytes do not fit: the header's last byte is held back, then it waits.
        let at = feed(&mut b, &big, 1024);
        assert_eq!(at, header(false, 2, 800, Some(MASK)).len() - 1);
        assert!(b.is_waiting());
        assert_eq!(budget.waiting.load(Ordering::SeqCst), 1);
        // A small reservation still fits next to it: no queue behind the large one.
        let small = frame(false, 2, 150);
        assert_eq!(feed(&mut c, &small, 1024), small.len());
        assert_eq!(budget.reserved(), 950);
        // a's message completes: room frees and b goes on.
        let fin = frame(true, 0, 10);
        assert_eq!(feed(&mut a, &fin, 1024), fin.len());
        assert_eq!(feed(&mut b, &big[at..], 1024), big.len() - at);
        assert!(!b.is_waiting());
        assert_eq!(budget.reserved(), 950);
        assert_eq!(budget.waiting.load(Ordering::SeqCst), 0);
        // a waits now, for longer than the timeout: refused, holding nothing.
        let at = feed(&mut a, &big, 1024);
        assert!(a.is_waiting());
        tokio::time::advance(Duration::from_millis(1001)).await;
        match a.admit(&big[at..], &mut cx()) {
            Poll::Ready(Err(e)) => assert_eq!(Refusal::of(&e), Some(Refusal::Capacity)),
            other => panic!("{other:?}"),
        }
        assert_eq!(budget.waiting.load(Ordering::SeqCst), 0);
        assert_eq!(budget.reserved(), 950);
        drop((b, c));
        assert_eq!(budget.reserved(), 0);
    }

    #[tokio::test]
    async fn a_waiting_socket_is_woken_when_room_frees() {
        let budget = IngressBudget::new(1000, Duration::from_secs(30));
        let mut a = Ingress::new(budget.clone(), 1 << 20);
        let big = frame(false, 2, 800);
        assert_eq!(feed(&mut a, &big, 1024), big.len());
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move {
                let mut b = Ingress::new(budget, 1 << 20);
                let mut pos = 0;
                std::future::poll_fn(|cx| {
                    while pos < big.len() {
                        match b.admit(&big[pos..], cx) {
                            Poll::Ready(Ok(n)) => pos += n,
                            Poll::Ready(Err(e)) => panic!("{e}"),
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    Poll::Ready(())
                })
                .await;
                b.held()
            }
        });
        while budget.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        drop(a);
        let held = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(held, 800);
    }

    #[test]
    fn the_tracker_state_is_a_few_bytes() {
        // Every idle socket holds one (spec §0 idle memory); the wait state is boxed.
        assert_eq!(std::mem::size_of::<FrameCursor>(), 24);
        assert_eq!(std::mem::size_of::<Ingress>(), 56);
    }

    #[test]
    fn an_empty_budget_takes_one_reservation_of_any_size() {
        let budget = IngressBudget::new(100, Duration::from_secs(1));
        assert!(budget.try_reserve(1000));
        assert!(!budget.try_reserve(1));
        budget.release(1000);
        assert!(budget.try_reserve(60) && budget.try_reserve(40) && !budget.try_reserve(1));
    }
}
