//! What a run may be asked to do: the parameters of every workload (clap `Args`), their
//! bounds, and the loopback-only relay URL. Pure: nothing here opens a socket.

use crate::error::{BenchError, Result};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Longest measured window, s.
pub const MAX_SECONDS: u64 = 600;
/// Longest warm-up, s.
pub const MAX_WARMUP_SECONDS: u64 = 60;
/// Most sockets one run may open towards the relay.
pub const MAX_SOCKETS: usize = 30_000;
/// Largest echo frame, bytes.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// Most frames in flight per pair.
pub const MAX_WINDOW: usize = 1024;
/// Largest message of `large`, MiB.
pub const MAX_LARGE_MIB: usize = 64;
/// Most sizes one `large` run may try.
pub const MAX_LARGE_SIZES: usize = 8;
/// Most pairs of `large` sending at once.
pub const MAX_LARGE_PAIRS: usize = 16;
/// Most MiB one `large` direction may have in flight (pairs × size).
pub const MAX_LARGE_IN_FLIGHT_MIB: usize = 512;
/// Longest settle or wait after a run (`--settle-ms`, `--after-ms`), ms.
pub const MAX_WAIT_MS: u64 = 60_000;
/// Deadline of every TCP connect plus WebSocket handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of every wait for one frame or notification.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of one `large` transfer in one direction.
pub const LARGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The load shared by `echo` and `baseline`: pairs of app and daemon, each app keeping
/// `window` frames of `size` bytes in flight, a warm-up and then a measured window.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadShape {
    /// Daemon/app pairs.
    #[arg(long, default_value_t = 50)]
    pub pairs: usize,
    /// Frame size, bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Frames in flight per pair (1 = strict ping-pong).
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Warm-up before the measured window, s (not counted).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Measured window, s.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

impl LoadShape {
    /// Checks every bound; `sockets_per_pair` is what one pair opens towards the target.
    pub fn validate(&self, sockets_per_pair: usize) -> Result<()> {
        in_range("--pairs", self.pairs, 1, MAX_SOCKETS / sockets_per_pair)?;
        in_range("--size", self.size, 1, MAX_FRAME_BYTES)?;
        in_range("--window", self.window, 1, MAX_WINDOW)?;
        in_range(
            "--warmup",
            self.warmup as usize,
            0,
            MAX_WARMUP_SECONDS as usize,
        )?;
        in_range("--seconds", self.seconds as usize, 1, MAX_SECONDS as usize)
    }
}

/// `echo`: the load through a relay over the v2 protocol.
#[derive(Debug, Clone, clap::Args)]
pub struct EchoParams {
    /// Relay base URL, `ws://` on loopback; sockets go to `<url>/ws?...`.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub url: String,
    /// The load.
    #[command(flatten)]
    pub shape: LoadShape,
    /// One serverId (one control socket) for all pairs instead of one per pair.
    #[arg(long)]
    pub shared_server_id: bool,
    /// The relay's process id, for its CPU time over the measured window.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Name of the target in results and plots (default: the URL).
    #[arg(long)]
    pub label: Option<String>,
}

impl EchoParams {
    /// Checks every bound and the URL.
    pub fn validate(&self) -> Result<RelayUrl> {
        let per_pair = if self.shared_server_id { 2 } else { 3 };
        self.shape.validate(per_pair)?;
        RelayUrl::parse(&self.url)
    }
}

/// `baseline`: the load through the in-process raw TCP forwarder.
#[derive(Debug, Clone, clap::Args)]
pub struct BaselineParams {
    /// The load.
    #[command(flatten)]
    pub shape: LoadShape,
    /// Forwarder worker threads (default: the cores, as the relay's default).
    #[arg(long)]
    pub forwarder_threads: Option<usize>,
}

impl BaselineParams {
    /// Checks every bound.
    pub fn validate(&self) -> Result<()> {
        self.shape.validate(2)?;
        if let Some(t) = self.forwarder_threads {
            in_range("--forwarder-threads", t, 1, 64)?;
        }
        Ok(())
    }
}

/// `idle`: many paired idle sockets, for the relay's memory per socket.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleParams {
    /// Relay base URL, `ws://` on loopback.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub url: String,
    /// Idle sockets to open: half daemon data sockets, half app sockets (even).
    #[arg(long, default_value_t = 2000)]
    pub sockets: usize,
    /// The relay's process id (its RSS is the result).
    #[arg(long)]
    pub pid: u32,
    /// Pairs sharing one serverId, hence one control socket.
    #[arg(long, default_value_t = 100)]
    pub pairs_per_server: usize,
    /// Pairs being opened at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Pause before each RSS reading, s.
    #[arg(long, default_value_t = 2)]
    pub settle: u64,
    /// While every socket is open, time 10 `GET`s of this URL (the relay's admin
    /// `/metrics`, e.g. `http://127.0.0.1:9180/metrics`; loopback only).
    #[arg(long)]
    pub scrape_url: Option<String>,
    /// Burst mode: after every socket is closed, wait this long, ms, before the last RSS
    /// reading (`rss_after_close_kb`, `after_close_ratio` against `rss_start_kb`) instead
    /// of `--settle`; 0 = off (the reading comes `--settle` s after the close).
    #[arg(long, default_value_t = 0)]
    pub after_ms: u64,
}

impl IdleParams {
    /// Control sockets the run opens.
    pub fn controls(&self) -> usize {
        (self.sockets / 2).div_ceil(self.pairs_per_server.max(1))
    }

    /// Checks every bound and the URL.
    pub fn validate(&self) -> Result<RelayUrl> {
        in_range("--sockets", self.sockets, 2, MAX_SOCKETS)?;
        if !self.sockets.is_multiple_of(2) {
            return Err(BenchError::Invalid(format!(
                "--sockets must be even (pairs of data and app sockets), not {}",
                self.sockets
            )));
        }
        in_range("--pairs-per-server", self.pairs_per_server, 1, MAX_SOCKETS)?;
        in_range("--concurrency", self.concurrency, 1, 1000)?;
        in_range("--settle", self.settle as usize, 0, 60)?;
        in_range(
            "--after-ms",
            self.after_ms as usize,
            0,
            MAX_WAIT_MS as usize,
        )?;
        in_range(
            "total sockets",
            self.sockets + self.controls(),
            0,
            MAX_SOCKETS,
        )?;
        RelayUrl::parse(&self.url)
    }
}

/// `large`: messages of a few MiB from app to daemon and back.
#[derive(Debug, Clone, clap::Args)]
pub struct LargeParams {
    /// Relay base URL, `ws://` on loopback.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub url: String,
    /// The relay's process id, for its RSS during the transfers.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Message sizes, MiB (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub sizes: Vec<usize>,
    /// Send text messages (printable ASCII, valid UTF-8) instead of binary ones.
    #[arg(long)]
    pub text: bool,
    /// Pairs, all sending their message at the same time in the same direction.
    #[arg(long, default_value_t = 1)]
    pub pairs: usize,
    /// Pause after both directions of a size, with the pairs still open, before the RSS
    /// reading of `kept_kb`, ms.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// Wait after closing every socket of the run before the RSS reading of
    /// `after_close_kb` / `after_close_ratio`, ms (0 = no close reading).
    #[arg(long, default_value_t = 10_000)]
    pub after_ms: u64,
}

impl LargeParams {
    /// The parameters of one `large` run of `sizes` with every other value the default.
    pub fn new(url: impl Into<String>, pid: Option<u32>, sizes: Vec<usize>) -> LargeParams {
        LargeParams {
            url: url.into(),
            pid,
            sizes,
            text: false,
            pairs: 1,
            settle_ms: 1000,
            after_ms: 10_000,
        }
    }

    /// Checks every bound and the URL.
    pub fn validate(&self) -> Result<RelayUrl> {
        in_range("number of --sizes", self.sizes.len(), 1, MAX_LARGE_SIZES)?;
        for &s in &self.sizes {
            in_range("--sizes", s, 1, MAX_LARGE_MIB)?;
        }
        in_range("--pairs", self.pairs, 1, MAX_LARGE_PAIRS)?;
        let biggest = self.sizes.iter().copied().max().unwrap_or(0);
        in_range(
            "--pairs × the largest of --sizes (MiB in flight)",
            self.pairs * biggest,
            1,
            MAX_LARGE_IN_FLIGHT_MIB,
        )?;
        in_range(
            "--settle-ms",
            self.settle_ms as usize,
            0,
            MAX_WAIT_MS as usize,
        )?;
        in_range(
            "--after-ms",
            self.after_ms as usize,
            0,
            MAX_WAIT_MS as usize,
        )?;
        RelayUrl::parse(&self.url)
    }
}

/// What `plot` draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlotKind {
    /// Latency percentiles against load, from `echo`/`baseline` lines.
    Latency,
    /// One bar per figure of `compare` lines: the ratio a/b, with a line at 1.
    Ratios,
}

/// `plot`: latency percentiles against load, from `echo`/`baseline` JSON lines, or
/// (`--kind ratios`) the ratios of `compare` JSON lines as bars.
#[derive(Debug, Clone, clap::Args)]
pub struct PlotParams {
    /// JSON lines written by `echo --json` / `baseline --json` / `compare --json` (lines of
    /// other kinds are skipped).
    #[arg(long)]
    pub input: PathBuf,
    /// What to draw.
    #[arg(long, value_enum, default_value_t = PlotKind::Latency)]
    pub kind: PlotKind,
    /// PNG to write.
    #[arg(long, default_value = "latency.png")]
    pub output: PathBuf,
    /// Image width, px.
    #[arg(long, default_value_t = 1000)]
    pub width: u32,
    /// Image height, px.
    #[arg(long, default_value_t = 600)]
    pub height: u32,
}

impl PlotParams {
    /// Checks the image size.
    pub fn validate(&self) -> Result<()> {
        in_range("--width", self.width as usize, 200, 8000)?;
        in_range("--height", self.height as usize, 150, 8000)
    }
}

fn in_range(name: &str, v: usize, min: usize, max: usize) -> Result<()> {
    if v < min || v > max {
        return Err(BenchError::Invalid(format!(
            "{name} must be in {min}..={max}, not {v}"
        )));
    }
    Ok(())
}

/// A relay URL that points at this machine: `ws://` with a loopback host (127.0.0.0/8,
/// `[::1]` or `localhost`), no user info, no query. The path defaults to `/ws`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUrl {
    base: String,
}

/// An `http://` URL on this machine (the relay's admin listener): `(host:port, path)`.
pub fn parse_http_url(url: &str) -> Result<(String, String)> {
    let bad = |why: &str| BenchError::Invalid(format!("--scrape-url {url:?}: {why}"));
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// URLs are supported"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err(bad("no user info"));
    }
    let host = host_of(authority).ok_or_else(|| bad("malformed host or port"))?;
    if !is_loopback_host(host) || !authority.contains(':') {
        return Err(bad(
            "the host must be loopback (127.0.0.0/8, [::1] or localhost) with a port",
        ));
    }
    let path = if path.is_empty() { "/" } else { path };
    Ok((authority.to_string(), path.to_string()))
}

impl RelayUrl {
    /// Parses and checks `url`; anything that is not loopback is refused.
    pub fn parse(url: &str) -> Result<RelayUrl> {
        let bad = |why: &str| BenchError::Invalid(format!("--url {url:?}: {why}"));
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("ws") => rest,
            _ => return Err(bad("only ws:// URLs are supported")),
        };
        if rest.contains(['?', '#']) {
            return Err(bad("no query or fragment (the tool adds the query)"));
        }
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.contains('@') {
            return Err(bad("no user info"));
        }
        let host = host_of(authority).ok_or_else(|| bad("malformed host or port"))?;
        if !is_loopback_host(host) {
            return Err(bad(
                "the host must be loopback (127.0.0.0/8, [::1] or localhost)",
            ));
        }
        let path = match path.trim_end_matches('/') {
            "" => "/ws",
            p => p,
        };
        Ok(RelayUrl {
            base: format!("ws://{authority}{path}"),
        })
    }

    /// The URL of one socket: `<base>?<query>`.
    pub fn socket(&self, query: &str) -> String {
        format!("{}?{query}", self.base)
    }

    /// The URL as used (with its path).
    pub fn as_str(&self) -> &str {
        &self.base
    }
}

/// The host part of `host[:port]` or `[v6][:port]`, if the port (when present) is a number.
fn host_of(authority: &str) -> Option<&str> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if let Some(p) = port {
        p.parse::<u16>().ok()?;
    }
    (!host.is_empty()).then_some(host)
}

/// True for `localhost` and loopback addresses.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_accepted_and_get_the_ws_path() {
        for (url, base) in [
            ("ws://127.0.0.1:8080", "ws://127.0.0.1:8080/ws"),
            ("ws://127.3.2.1:80/", "ws://127.3.2.1:80/ws"),
            ("WS://localhost:1", "ws://localhost:1/ws"),
            ("ws://[::1]:9000/relay/ws", "ws://[::1]:9000/relay/ws"),
            ("ws://127.0.0.1", "ws://127.0.0.1/ws"),
        ] {
            assert_eq!(RelayUrl::parse(url).unwrap().as_str(), base, "{url}");
        }
        let u = RelayUrl::parse("ws://127.0.0.1:8080").unwrap();
        assert_eq!(
            u.socket("serverId=s&role=server&v=2"),
            "ws://127.0.0.1:8080/ws?serverId=s&role=server&v=2"
        );
    }

    #[test]
    fn scrape_urls_are_loopback_http_with_a_port() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:9180/metrics").unwrap(),
            ("127.0.0.1:9180".to_string(), "/metrics".to_string())
        );
        assert_eq!(
            parse_http_url("http://[::1]:9").unwrap(),
            ("[::1]:9".to_string(), "/".to_string())
        );
        for bad in [
            "http://10.0.0.1:9180/metrics",
            "https://127.0.0.1:9180/metrics",
            "http://127.0.0.1/metrics",
            "http://u@127.0.0.1:9/metrics",
        ] {
            assert!(parse_http_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn non_loopback_or_odd_urls_are_refused() {
        for url in [
            "ws://10.0.0.1:8080",
            "ws://192.168.1.2",
            "ws://example.com:8080",
            "ws://[::2]:80",
            "ws://[::ffff:10.0.0.1]:80",
            "ws://127.0.0.1@example.com",
            "ws://user@127.0.0.1",
            "wss://127.0.0.1:443",
            "http://127.0.0.1:8080",
            "127.0.0.1:8080",
            "ws://127.0.0.1:8080/ws?serverId=x",
            "ws://127.0.0.1:port",
            "ws://:8080",
            "ws://localhost.example.com",
        ] {
            assert!(
                matches!(RelayUrl::parse(url), Err(BenchError::Invalid(_))),
                "{url}"
            );
        }
    }

    fn shape() -> LoadShape {
        LoadShape {
            pairs: 50,
            size: 100,
            window: 8,
            warmup: 2,
            seconds: 10,
        }
    }

    #[test]
    fn load_bounds_are_enforced() {
        assert!(shape().validate(3).is_ok());
        let bad = [
            LoadShape {
                pairs: 0,
                ..shape()
            },
            LoadShape {
                pairs: 10_001,
                ..shape()
            },
            LoadShape { size: 0, ..shape() },
            LoadShape {
                size: MAX_FRAME_BYTES + 1,
                ..shape()
            },
            LoadShape {
                window: 0,
                ..shape()
            },
            LoadShape {
                seconds: 0,
                ..shape()
            },
            LoadShape {
                seconds: MAX_SECONDS + 1,
                ..shape()
            },
            LoadShape {
                warmup: MAX_WARMUP_SECONDS + 1,
                ..shape()
            },
        ];
        for s in bad {
            let e = s.validate(3).unwrap_err().to_string();
            assert!(e.starts_with("invalid argument: --"), "{e}");
        }
        // 10 000 pairs of 3 sockets is the 30 000 cap; with 2 sockets a pair, 15 000 fit.
        let big = LoadShape {
            pairs: 15_000,
            ..shape()
        };
        assert!(big.validate(3).is_err());
        assert!(big.validate(2).is_ok());
    }

    #[test]
    fn idle_counts_controls_and_wants_even_sockets() {
        let mut p = IdleParams {
            url: "ws://127.0.0.1:1".into(),
            sockets: 2000,
            pid: 1,
            pairs_per_server: 100,
            concurrency: 200,
            settle: 2,
            scrape_url: None,
            after_ms: 10_000,
        };
        assert_eq!(p.controls(), 10);
        assert!(p.validate().is_ok());
        p.after_ms = MAX_WAIT_MS + 1;
        assert!(p.validate().is_err());
        p.after_ms = 0;
        assert!(p.validate().is_ok());
        p.sockets = 2001;
        assert!(p.validate().is_err());
        p.sockets = 30_000; // 15 000 pairs need 150 controls: over the cap
        assert!(p.validate().is_err());
        p.sockets = 2002;
        assert_eq!(p.controls(), 11);
    }

    #[test]
    fn large_sizes_are_bounded() {
        let mut p = LargeParams::new("ws://127.0.0.1:1", None, vec![1, 8, 32]);
        assert_eq!(
            (p.pairs, p.text, p.settle_ms, p.after_ms),
            (1, false, 1000, 10_000)
        );
        assert!(p.validate().is_ok());
        p.sizes = vec![0];
        assert!(p.validate().is_err());
        p.sizes = vec![MAX_LARGE_MIB + 1];
        assert!(p.validate().is_err());
        p.sizes = vec![];
        assert!(p.validate().is_err());
    }

    #[test]
    fn large_pairs_and_waits_are_bounded() {
        let ok = LargeParams {
            pairs: 8,
            ..LargeParams::new("ws://127.0.0.1:1", Some(1), vec![30])
        };
        assert!(ok.validate().is_ok());
        let bad = [
            LargeParams {
                pairs: 0,
                ..ok.clone()
            },
            LargeParams {
                pairs: MAX_LARGE_PAIRS + 1,
                sizes: vec![1],
                ..ok.clone()
            },
            // 16 × 64 MiB = 1 GiB in flight: over the 512 MiB cap
            LargeParams {
                pairs: 16,
                sizes: vec![1, 64],
                ..ok.clone()
            },
            LargeParams {
                settle_ms: MAX_WAIT_MS + 1,
                ..ok.clone()
            },
            LargeParams {
                after_ms: MAX_WAIT_MS + 1,
                ..ok.clone()
            },
        ];
        for p in bad {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.starts_with("invalid argument: --"), "{e}");
        }
        let zero_waits = LargeParams {
            settle_ms: 0,
            after_ms: 0,
            pairs: 16,
            sizes: vec![32],
            ..ok
        };
        assert!(zero_waits.validate().is_ok());
    }
}
