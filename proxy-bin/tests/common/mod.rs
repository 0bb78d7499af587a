//! Running the real `paseo-relay` binary in tests: a child process on ephemeral ports with
//! its own temporary directory (config, pid file, upgrade socket, log), signals, and its log.

#![allow(dead_code)] // each test file uses a different part

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_paseo-relay");

/// A free port on 127.0.0.1 (bound, then released for the relay to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port()
}

/// A fresh, empty directory under the system temp dir, unique to this test.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "paseo-relay-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A `Command` for the binary with a clean environment: no `PASEO_*`, `RUST_LOG` or
/// backtraces from the test runner's environment.
pub fn command() -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("PASEO_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_BACKTRACE", "0");
    cmd
}

/// Writes a config file in `dir` whose `pid_file` and `upgrade_sock` live in `dir`, with
/// `extra` YAML appended.
pub fn write_conf(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("relay.yaml");
    let text = format!(
        "pid_file: {}\nupgrade_sock: {}\nthreads: 1\n{extra}",
        dir.join("relay.pid").display(),
        dir.join("upgrade.sock").display()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// A running `paseo-relay`; killed (SIGKILL) on drop if still running.
pub struct Relay {
    pub child: Child,
    /// Its stderr (the log), as a file.
    pub log_path: PathBuf,
}

impl Relay {
    /// Starts the binary with `args`, logging to `dir/<log_name>`.
    pub fn spawn(dir: &Path, log_name: &str, args: &[&str]) -> Relay {
        Self::spawn_with(command(), dir, log_name, args)
    }

    /// As [`Relay::spawn`], from a prepared command (environment set by the caller).
    pub fn spawn_with(mut cmd: Command, dir: &Path, log_name: &str, args: &[&str]) -> Relay {
        let log_path = dir.join(log_name);
        let log = std::fs::File::create(&log_path).expect("create log");
        let child = cmd
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start paseo-relay");
        Relay { child, log_path }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: i32) {
        signal(self.pid(), sig);
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits up to `within` for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Number of open file descriptors of the process (Linux `/proc`).
    pub fn open_fds(&self) -> usize {
        open_fds(self.pid())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a plain pid and signal number has no memory-safety concerns.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// Whether process `pid` exists.
pub fn alive(pid: i32) -> bool {
    // SAFETY: as above; signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Number of open file descriptors of process `pid` (Linux `/proc`).
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits until `addr` accepts TCP connections (the relay is serving), up to 20 s.
pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "relay did not start on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `cond` holds, up to `within`; panics with `what` otherwise.
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
