//! What the tool reads about processes from `/proc` (CPU time, RSS) and the one limit it
//! changes on itself (open files). All `unsafe` of the crate lives here, in two libc calls.

use crate::error::{BenchError, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often [`RssSampler`] reads VmRSS.
pub const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);

/// Clock ticks per second of `/proc/*/stat` times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// CPU time (user + system) of process `pid` so far, s.
pub fn process_cpu_seconds(pid: u32) -> Result<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU time (user + system) of thread `tid` of this process so far, s.
pub fn thread_cpu_seconds(tid: i32) -> Result<f64> {
    stat_cpu_seconds(&format!("/proc/self/task/{tid}/stat"))
}

/// The kernel id of the calling thread.
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

fn stat_cpu_seconds(path: &str) -> Result<f64> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::Io(format!("{path}: {e}")))?;
    let ticks = parse_stat_ticks(&text)
        .ok_or_else(|| BenchError::Io(format!("{path}: no utime/stime fields")))?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

/// utime + stime (fields 14 and 15) of a `/proc/*/stat` line, in clock ticks. The command
/// name in parentheses may hold spaces, so fields are counted after the last `)`.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after = stat.rsplit_once(')')?.1;
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Memory figures of a process from `/proc/PID/status`, kB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemStatus {
    /// Resident set size now (VmRSS), kB.
    pub rss_kb: u64,
    /// Peak resident set size over the process's life (VmHWM), kB.
    pub hwm_kb: u64,
}

/// Reads VmRSS and VmHWM of process `pid`.
pub fn mem_status(pid: u32) -> Result<MemStatus> {
    let path = format!("/proc/{pid}/status");
    let text =
        std::fs::read_to_string(&path).map_err(|e| BenchError::Io(format!("{path}: {e}")))?;
    parse_status(&text).ok_or_else(|| BenchError::Io(format!("{path}: no VmRSS/VmHWM")))
}

fn parse_status(text: &str) -> Option<MemStatus> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some(MemStatus {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
    })
}

/// Fails unless `/proc/PID/stat` and `/proc/PID/status` can be read.
pub fn check_pid(pid: u32) -> Result<()> {
    process_cpu_seconds(pid)?;
    mem_status(pid).map(|_| ())
}

/// Samples a process's VmRSS every [`RSS_SAMPLE_INTERVAL`] on its own thread and keeps the
/// peak, because VmHWM is the peak of the whole process life.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl RssSampler {
    /// Starts sampling `pid`; the first sample is taken at once.
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            loop {
                if let Ok(m) = mem_status(pid) {
                    peak = peak.max(m.rss_kb);
                }
                if flag.load(Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(RSS_SAMPLE_INTERVAL);
            }
        });
        RssSampler { stop, thread }
    }

    /// Stops sampling (after one last sample) and returns the peak VmRSS seen, kB.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// Raises this process's soft open-file limit to its hard limit; returns (old, new).
pub fn raise_nofile_limit() -> Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for getrlimit to fill, and a valid one for
    // setrlimit to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(BenchError::Io(format!(
                "getrlimit: {}",
                std::io::Error::last_os_error()
            )));
        }
        let old = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if old != lim.rlim_max && libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(BenchError::Io(format!(
                "setrlimit: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok((old, lim.rlim_cur))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_are_fields_14_and_15_after_the_name() {
        let stat = "4242 (paseo relay) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 3 0 100 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn status_gives_rss_and_hwm() {
        let status = "Name:\tpaseo-relay\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t3\n";
        assert_eq!(
            parse_status(status),
            Some(MemStatus {
                rss_kb: 10240,
                hwm_kb: 20480
            })
        );
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[test]
    fn own_process_and_thread_can_be_read() {
        let pid = std::process::id();
        check_pid(pid).unwrap();
        assert!(mem_status(pid).unwrap().rss_kb > 0);
        assert!(thread_cpu_seconds(current_tid()).unwrap() >= 0.0);
        let sampler = RssSampler::start(pid);
        assert!(sampler.finish() > 0);
        assert!(check_pid(u32::MAX).is_err());
    }
}
