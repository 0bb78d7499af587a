//! `paseo-relay`: the Paseo relay served by Pingora.
//!
//! Run: `paseo-relay --listen 0.0.0.0:8080 [-c conf/paseo-relay.example.yaml]`, then point a
//! daemon at it (`PASEO_RELAY_ENDPOINT=host:8080`) and check
//! `curl http://127.0.0.1:8080/health`. Configuration layers: see [`settings`].
//!
//! Signals: SIGTERM graceful stop (1001 to every WebSocket), SIGQUIT hand-over to a process
//! started with `--upgrade` (1012), SIGINT fast stop, SIGHUP TLS certificate reload.

mod logging;
mod memory;
mod settings;

use clap::Parser;
use pingora::server::configuration::Opt;
use pingora::server::{RunArgs, Server};
use relay_module::cluster::Cluster;
use relay_module::ops::memory::TrimService;
use relay_module::{add_relay, Lifecycle, Listener, RelaySignals, SessionHub};
use settings::{Flags, Settings};

/// Command line: Pingora's own flags (`-u/--upgrade`, `-d/--daemon`, `-t/--test`,
/// `-c/--conf`) keep their Pingora meaning; ours are added beside them.
#[derive(Parser, Debug)]
#[command(
    name = "paseo-relay",
    version,
    about = "Self-hosted Paseo relay on Pingora",
    after_help = "Priority: flags > environment (PASEO_LISTEN, PASEO_TLS_CERT, PASEO_TLS_KEY, \
                  PASEO_LOG_LEVEL, PASEO_LOG_FORMAT, PASEO_ADMIN_LISTEN, PASEO_CLUSTER_SELF, \
                  PASEO_CONFIG) > config \
                  file > defaults.\n\
                  Signals: SIGTERM graceful stop, SIGQUIT hand-over to an --upgrade process, \
                  SIGINT fast stop, SIGHUP TLS certificate reload."
)]
#[command(mut_arg("upgrade", |a| a.help("Take over the listeners of a running paseo-relay (graceful upgrade; then send the old one SIGQUIT)")))]
#[command(mut_arg("daemon", |a| a.help("Run in the background (daemonise)")))]
#[command(mut_arg("test", |a| a.help("Validate the configuration (TLS files included) and exit: 0 if valid, 1 if not")))]
#[command(mut_arg("conf", |a| a.visible_alias("config").value_name("PATH").help("YAML configuration file [env: PASEO_CONFIG]: our keys, Pingora's at the top level, relay tuning under `relay:`")))]
struct Cli {
    #[command(flatten)]
    pingora: Opt,
    /// Address to listen on: HOST:PORT, :PORT, tls://HOST:PORT or tcp://HOST:PORT. Repeat
    /// for several listeners [env: PASEO_LISTEN, comma-separated] [default: 0.0.0.0:8080]
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<String>,
    /// TLS certificate chain, PEM [env: PASEO_TLS_CERT]
    #[arg(long = "tls-cert", value_name = "PATH")]
    tls_cert: Option<String>,
    /// TLS private key, PEM [env: PASEO_TLS_KEY]
    #[arg(long = "tls-key", value_name = "PATH")]
    tls_key: Option<String>,
    /// Log level: error, warn, info, debug or trace; RUST_LOG overrides it
    /// [env: PASEO_LOG_LEVEL] [default: info]
    #[arg(long = "log-level", value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log format: text (env_logger's) or json (one object per line, for Loki or journald);
    /// lines are cut at 1 KiB [env: PASEO_LOG_FORMAT] [default: text]
    #[arg(long = "log-format", value_name = "FORMAT")]
    log_format: Option<String>,
    /// Admin listener (plain HTTP: /metrics, /health, /ready, POST /drain, POST /resume):
    /// HOST:PORT or :PORT; keep it off the Internet [env: PASEO_ADMIN_LISTEN] [default: none]
    #[arg(long = "admin-listen", value_name = "ADDR")]
    admin_listen: Option<String>,
}

/// Fails early, with the address and the reason, when a listen address is taken; Pingora
/// would otherwise retry for 30 s and then panic. Skipped when taking over a running relay's
/// sockets (`--upgrade`), which holds them by design.
fn check_listen(listeners: &[Listener], from: &str) -> Result<(), String> {
    for listener in listeners {
        let addr = &listener.addr;
        let parsed: std::net::SocketAddr = addr
            .parse()
            .map_err(|e| format!("{from} {addr}: not an IP:port address ({e})"))?;
        let socket = match parsed {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .map_err(|e| format!("{from} {addr}: {e}"))?;
        socket
            .set_reuseaddr(true)
            .and_then(|()| socket.bind(parsed))
            .map_err(|e| format!("{from} {addr}: cannot bind: {e}"))?;
    }
    Ok(())
}

/// Makes SIGHUP harmless until the reload service installs its handler (its default action
/// would end the process). Runs before any thread exists.
fn ignore_sighup_until_handled() {
    // SAFETY: setting a signal disposition to SIG_IGN has no handler code to be unsafe in;
    // it is done while the process is single-threaded.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// Raises the soft open-file limit to the hard limit (every WebSocket is a file descriptor)
/// and returns `(old, new)` soft limits.
fn raise_open_file_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by reference.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let old = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((old, limit.rlim_cur))
}

fn fail(e: String) -> ! {
    eprintln!("paseo-relay: {e}");
    std::process::exit(1);
}

fn main() {
    let cli = Cli::parse();
    let flags = Flags {
        listen: cli.listen,
        tls_cert: cli.tls_cert,
        tls_key: cli.tls_key,
        log_level: cli.log_level,
        log_format: cli.log_format,
        admin_listen: cli.admin_listen,
        config: cli.pingora.conf.clone(),
    };
    let listen_given = !flags.listen.is_empty();
    let Settings {
        listeners,
        log_level,
        log_format,
        admin_listen,
        mut server,
        relay,
        http,
        router,
        cluster,
        config_path,
    } = settings::resolve(flags, &|var| std::env::var(var).ok()).unwrap_or_else(|e| fail(e));
    logging::init(log_format, &log_level);
    if cli.pingora.test {
        eprintln!(
            "paseo-relay: configuration is valid ({})",
            config_path.as_deref().unwrap_or("no file")
        );
        return;
    }
    if !cli.pingora.upgrade {
        let from = if listen_given { "--listen" } else { "listen" };
        check_listen(&listeners, from).unwrap_or_else(|e| fail(e));
        if let Some(addr) = &admin_listen {
            check_listen(&[Listener::plain(addr.clone())], "admin_listen")
                .unwrap_or_else(|e| fail(e));
        }
    }
    ignore_sighup_until_handled();
    // Before the relay allocates its buffers (issue 11).
    if !memory::tune_allocator() {
        log::debug!("allocator: no fixed mmap threshold (not glibc)");
    }
    match raise_open_file_limit() {
        Ok((old, new)) if old != new => {
            log::info!("open-file limit raised from {old} to {new} (the hard limit)")
        }
        Ok((_, new)) => log::info!("open-file limit: {new}"),
        Err(e) => log::warn!("cannot raise the open-file limit: {e}"),
    }

    // The file was read above; Pingora must not read it again.
    let opt = Opt {
        conf: None,
        ..cli.pingora
    };
    server.merge_with_opt(&opt);
    let mut server = Server::new_with_opt_and_conf(opt, server);
    server.bootstrap();
    // After the open-file limit was raised: the default `max_websockets` derives from it.
    let hub = SessionHub::new(relay);
    log::info!(
        "max_websockets: {}",
        hub.admission().limits().max_websockets
    );
    // Resolves node names (blocking) before the server starts.
    let cluster = cluster.map(|spec| Cluster::new(spec, hub.conf().mount(), hub.metrics()));
    let life = Lifecycle::new(true);
    add_relay(
        &mut server,
        &hub,
        router,
        &listeners,
        admin_listen.as_deref(),
        &http,
        &life,
        cluster.as_ref(),
    );
    server.add_service(pingora::services::background::background_service(
        "relay memory trim",
        TrimService::new(hub.clone(), memory::trim),
    ));
    let shown: Vec<String> = listeners
        .iter()
        .map(|l| match l.tls {
            Some(_) => format!("tls://{}", l.addr),
            None => l.addr.clone(),
        })
        .collect();
    if let Some(cluster) = &cluster {
        let nodes: Vec<String> = cluster.nodes().iter().map(|(a, _)| a.to_string()).collect();
        log::info!(
            "cluster: this node is {}; nodes {}",
            cluster.self_addr(),
            nodes.join(", ")
        );
    }
    log::info!("paseo-relay starting on {}", shown.join(", "));
    if let Some(addr) = &admin_listen {
        log::info!("admin listener on {addr} (/metrics, /health, /ready, /drain, /resume)");
    }
    server.run(RunArgs {
        shutdown_signal: Box::new(RelaySignals(life)),
    });
}
