//! Admission of new WebSockets (issue 9 "Admission limits"): the process-wide ceiling
//! `max_websockets`, the per-address ceiling `max_websockets_per_ip` and the per-address
//! upgrade token bucket (`upgrades_per_ip_per_second`, `upgrade_burst_per_ip`).
//!
//! [`Admission::admit`] runs after a `/ws` request is validated and before anything is
//! attached; it returns a [`Ticket`] that holds the socket's place in both ceilings until
//! the socket ends (dropped with its attachment). Refusals carry the exact answer (status,
//! body, `Retry-After`). Plain Rust: no Pingora or socket types.
//!
//! An address is counted as [`address_key`] gives it: IPv6 by its /64, IPv4-mapped IPv6 as
//! IPv4. The per-address table is bounded: an entry with no socket left is removed once its
//! bucket is full again (`upgrade_burst_per_ip / upgrades_per_ip_per_second` seconds), in a
//! sweep that runs whenever the table has doubled since the last one. It holds at most one
//! entry per live socket plus one per address seen within that refill time.

use crate::ops::metrics::Rejection;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Body of the 503 at `max_websockets`.
pub const AT_CAPACITY: &str = "Relay at capacity";
/// Body of the 429 at `max_websockets_per_ip`.
pub const TOO_MANY_CONNECTIONS: &str = "Too many connections from this address";
/// Body of the 429 when an address's upgrade bucket is empty.
pub const TOO_MANY_REQUESTS: &str = "Too many requests";
/// Body of the 429 for a control that replaces too often (see `Session::attach`).
pub const TOO_MANY_REPLACEMENTS: &str = "Too many control replacements";
/// Body of the 503 while the relay drains (`POST /drain`).
pub const DRAINING: &str = "Relay draining";
/// `Retry-After` of the capacity, per-address and draining refusals, in seconds.
pub const RETRY_AFTER_SECONDS: u64 = 5;

/// A refused `/ws` request: what to answer and how to count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status: 429 or 503.
    pub status: u16,
    /// Exact `text/plain` body.
    pub body: &'static str,
    /// `Retry-After` in whole seconds.
    pub retry_after: u64,
    /// The `reason` label of `paseo_relay_connection_rejections_total`.
    pub reason: Rejection,
}

/// The limits, from `relay:` (see [`crate::RelayConf`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Most WebSockets in the process.
    pub max_websockets: usize,
    /// Most WebSockets from one address.
    pub max_per_ip: usize,
    /// Upgrade tokens an address earns per second.
    pub per_second: f64,
    /// Most tokens an address holds (its burst).
    pub burst: f64,
}

#[derive(Debug)]
struct Entry {
    sockets: usize,
    tokens: f64,
    refilled: Instant,
}

#[derive(Debug, Default)]
struct Table {
    by_ip: HashMap<IpAddr, Entry>,
    sweep_at: usize,
}

/// Ceilings and buckets shared by every listener; see the module docs.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    sockets: AtomicUsize,
    table: Mutex<Table>,
}

/// A socket's place in the ceilings; given back when dropped.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

const FIRST_SWEEP_AT: usize = 1024;

/// The address a limit counts: an IPv4-mapped IPv6 address as its IPv4 address, any other
/// IPv6 address by its /64 (one host usually holds a whole /64).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

impl Admission {
    /// Admission with `limits`.
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            sockets: AtomicUsize::new(0),
            table: Mutex::new(Table {
                by_ip: HashMap::new(),
                sweep_at: FIRST_SWEEP_AT,
            }),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// WebSockets holding a ticket now.
    pub fn sockets(&self) -> usize {
        self.sockets.load(Ordering::Acquire)
    }

    /// Whether the process-wide ceiling is reached.
    pub fn is_full(&self) -> bool {
        self.sockets() >= self.limits.max_websockets
    }

    /// Addresses tracked now (for tests and the bound).
    pub fn tracked_addresses(&self) -> usize {
        self.lock().by_ip.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for a new WebSocket from `ip` (`None`: address unknown, only the
    /// process ceiling applies) at `now`.
    ///
    /// # Errors
    /// 503 `Relay at capacity` at `max_websockets`; 429 `Too many connections from this
    /// address` at `max_websockets_per_ip`; 429 `Too many requests` with `Retry-After` the
    /// whole seconds until the address earns a token. Nothing is taken on a refusal.
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>, now: Instant) -> Result<Ticket, Refusal> {
        let at_capacity = Refusal {
            status: 503,
            body: AT_CAPACITY,
            retry_after: RETRY_AFTER_SECONDS,
            reason: Rejection::Capacity,
        };
        if self.is_full() {
            return Err(at_capacity);
        }
        let Some(ip) = ip.map(address_key) else {
            return match self.take_place() {
                true => Ok(self.ticket(None)),
                false => Err(at_capacity),
            };
        };
        let limits = self.limits;
        let mut table = self.lock();
        let entry = table.by_ip.entry(ip).or_insert(Entry {
            sockets: 0,
            tokens: limits.burst,
            refilled: now,
        });
        if entry.sockets >= limits.max_per_ip {
            return Err(Refusal {
                status: 429,
                body: TOO_MANY_CONNECTIONS,
                retry_after: RETRY_AFTER_SECONDS,
                reason: Rejection::PerIp,
            });
        }
        let earned =
            now.saturating_duration_since(entry.refilled).as_secs_f64() * limits.per_second;
        entry.tokens = (entry.tokens + earned).min(limits.burst);
        entry.refilled = now;
        if entry.tokens < 1.0 {
            let wait = ((1.0 - entry.tokens) / limits.per_second).ceil().max(1.0);
            return Err(Refusal {
                status: 429,
                body: TOO_MANY_REQUESTS,
                retry_after: wait as u64,
                reason: Rejection::Rate,
            });
        }
        // The process-wide place is taken last, so refusals for an address never hold one
        // (a refused flood cannot make other upgrades see the relay full).
        if !self.take_place() {
            return Err(at_capacity);
        }
        entry.tokens -= 1.0;
        entry.sockets += 1;
        if table.by_ip.len() >= table.sweep_at {
            self.sweep(&mut table, now);
        }
        drop(table);
        Ok(self.ticket(Some(ip)))
    }

    /// Takes one process-wide place unless the ceiling is reached.
    fn take_place(&self) -> bool {
        let max = self.limits.max_websockets;
        self.sockets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// The ticket of a place just taken (and of `ip`'s socket count, if given).
    fn ticket(self: &Arc<Self>, ip: Option<IpAddr>) -> Ticket {
        Ticket {
            admission: self.clone(),
            ip,
        }
    }

    /// Removes entries with no socket whose bucket is full again.
    fn sweep(&self, table: &mut Table, now: Instant) {
        let refill = Duration::from_secs_f64(self.limits.burst / self.limits.per_second);
        table
            .by_ip
            .retain(|_, e| e.sockets > 0 || now.saturating_duration_since(e.refilled) < refill);
        table.sweep_at = (table.by_ip.len() * 2).max(FIRST_SWEEP_AT);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let admission = &self.admission;
        if let Some(ip) = self.ip {
            let mut table = admission.lock();
            if let Some(entry) = table.by_ip.get_mut(&ip) {
                entry.sockets = entry.sockets.saturating_sub(1);
            }
        }
        admission.sockets.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_websockets: 4,
            max_per_ip: 2,
            per_second: 2.0,
            burst: 3.0,
        }
    }

    fn ip(n: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn process_ceiling_is_exact_and_given_back() {
        let a = Admission::new(limits());
        let now = Instant::now();
        let held: Vec<Ticket> = (1..=4).map(|n| a.admit(ip(n), now).unwrap()).collect();
        assert!(a.is_full());
        let refused = a.admit(ip(9), now).unwrap_err();
        assert_eq!(
            (
                refused.status,
                refused.body,
                refused.retry_after,
                refused.reason
            ),
            (503, "Relay at capacity", 5, Rejection::Capacity)
        );
        assert_eq!(a.sockets(), 4, "a refusal takes nothing");
        drop(held);
        assert_eq!(a.sockets(), 0);
        assert!(a.admit(None, now).is_ok());
    }

    #[test]
    fn per_address_ceiling_then_bucket_with_retry_after() {
        let a = Admission::new(limits());
        let t0 = Instant::now();
        let first = a.admit(ip(1), t0).unwrap();
        let second = a.admit(ip(1), t0).unwrap();
        let refused = a.admit(ip(1), t0).unwrap_err();
        assert_eq!(
            (refused.status, refused.body, refused.reason),
            (
                429,
                "Too many connections from this address",
                Rejection::PerIp
            )
        );
        assert!(
            a.admit(ip(2), t0).is_ok(),
            "another address is not affected"
        );
        drop((first, second));
        // Burst 3: two tokens spent, one left, then empty.
        drop(a.admit(ip(1), t0).unwrap());
        let refused = a.admit(ip(1), t0).unwrap_err();
        assert_eq!(
            (
                refused.status,
                refused.body,
                refused.retry_after,
                refused.reason
            ),
            (429, "Too many requests", 1, Rejection::Rate)
        );
        // 2 tokens per second: one more after 0.5 s.
        assert!(a.admit(ip(1), t0 + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        let a = Admission::new(Limits {
            max_websockets: 10,
            ..limits()
        });
        let t0 = Instant::now();
        let v6 = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let mut held = vec![
            a.admit(v6("2001:db8:1:2::1"), t0).unwrap(),
            a.admit(v6("2001:db8:1:2:ffff::9"), t0).unwrap(),
        ];
        assert_eq!(
            a.admit(v6("2001:db8:1:2::3"), t0).unwrap_err().reason,
            Rejection::PerIp,
            "the same /64"
        );
        held.push(a.admit(v6("2001:db8:1:3::1"), t0).expect("another /64"));
        held.push(a.admit(ip(7), t0).unwrap());
        held.push(
            a.admit(v6("::ffff:10.0.0.7"), t0)
                .expect("10.0.0.7's second"),
        );
        assert_eq!(
            a.admit(ip(7), t0).unwrap_err().reason,
            Rejection::PerIp,
            "the mapped address counted as 10.0.0.7"
        );
        assert_eq!(a.sockets(), held.len());
    }

    #[test]
    fn refusals_for_an_address_hold_no_process_place() {
        let a = Admission::new(Limits {
            max_websockets: 2,
            ..limits()
        });
        let t0 = Instant::now();
        let _held = (a.admit(ip(1), t0).unwrap(), a.admit(ip(1), t0).unwrap());
        drop(_held);
        let _x = a.admit(ip(1), t0).unwrap();
        for _ in 0..5 {
            assert_eq!(a.admit(ip(1), t0).unwrap_err().reason, Rejection::Rate);
        }
        assert_eq!(a.sockets(), 1, "refused upgrades took no place");
        let _y = a.admit(ip(2), t0).unwrap();
        assert!(a.is_full());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let a = Admission::new(Limits {
            per_second: 0.25,
            burst: 1.0,
            ..limits()
        });
        let t0 = Instant::now();
        drop(a.admit(ip(1), t0).unwrap());
        assert_eq!(a.admit(ip(1), t0).unwrap_err().retry_after, 4);
        assert_eq!(
            a.admit(ip(1), t0 + Duration::from_millis(1500))
                .unwrap_err()
                .retry_after,
            3
        );
    }

    #[test]
    fn a_spray_of_addresses_does_not_grow_the_table_without_bound() {
        let a = Admission::new(Limits {
            max_websockets: usize::MAX,
            ..limits()
        });
        let t0 = Instant::now();
        // Each second 1 000 new addresses; entries refill in 1.5 s and are swept.
        for second in 0..20u32 {
            let now = t0 + Duration::from_secs(second.into());
            for n in 0..1000u32 {
                let addr = IpAddr::from((second << 16 | n).to_be_bytes());
                drop(a.admit(Some(addr), now).unwrap());
            }
        }
        assert!(
            a.tracked_addresses() <= 4096,
            "{} addresses tracked",
            a.tracked_addresses()
        );
    }
}
