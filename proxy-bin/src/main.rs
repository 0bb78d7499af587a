//! `paseo-relay`: the Paseo relay served by Pingora.
//!
//! Run: `paseo-relay --listen 0.0.0.0:8080 [-c conf/paseo-relay.example.yaml]`, then point a
//! daemon at it (`PASEO_RELAY_ENDPOINT=host:8080`) and check
//! `curl http://127.0.0.1:8080/health`.

use clap::Parser;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use relay_module::{relay_service, RelayConf, SessionHub};

/// Command line: Pingora's own flags (`-u/--upgrade`, `-d/--daemon`, `-t/--test`,
/// `-c/--conf`) keep their Pingora meaning; ours are added beside them.
#[derive(Parser, Debug)]
#[command(
    name = "paseo-relay",
    version,
    about = "Self-hosted Paseo relay on Pingora"
)]
#[command(mut_arg("upgrade", |a| a.help("Take over the listeners of a running paseo-relay (graceful upgrade; then send the old one SIGQUIT)")))]
#[command(mut_arg("daemon", |a| a.help("Run in the background (daemonise)")))]
#[command(mut_arg("test", |a| a.help("Validate the configuration and exit: 0 if valid, 1 if not")))]
#[command(mut_arg("conf", |a| a.help("YAML configuration file: Pingora keys at the top level, relay tuning under `relay:`")))]
struct Cli {
    #[command(flatten)]
    pingora: Opt,
    /// Address to listen on (plain ws), e.g. 0.0.0.0:8080. Repeat for several listeners.
    #[arg(long = "listen", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    listen: Vec<String>,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides it).
    #[arg(long = "log-level", value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

/// Pingora's settings and the relay's, from the YAML file given with `-c` (Pingora's keys at
/// the top level, ours under `relay:`) or from defaults. Where the file is silent, Pingora's
/// long defaults are replaced by ours: grace period 10 s, shutdown timeout 5 s, one worker
/// thread per CPU.
fn load(opt: &Opt) -> Result<(ServerConf, RelayConf), String> {
    let (mut server, relay, threads_set) = match &opt.conf {
        None => (ServerConf::default(), RelayConf::default(), false),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            let server = ServerConf::from_yaml(&text).map_err(|e| format!("{path}: {e}"))?;
            let value: serde_yaml::Value =
                serde_yaml::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
            let relay = match value.get("relay") {
                Some(section) => serde_yaml::from_value(section.clone())
                    .map_err(|e| format!("{path}: relay: {e}"))?,
                None => RelayConf::default(),
            };
            (server, relay, value.get("threads").is_some())
        }
    };
    relay.validate()?;
    server.grace_period_seconds.get_or_insert(10);
    server.graceful_shutdown_timeout_seconds.get_or_insert(5);
    if !threads_set {
        server.threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    }
    server.merge_with_opt(opt);
    Ok((server, relay))
}

/// Fails early, with the address and the reason, when a listen address is invalid or taken;
/// Pingora would otherwise retry for 30 s and then panic. Skipped when taking over a running
/// relay's sockets (`--upgrade`), which holds them by design.
fn check_listen(addrs: &[String]) -> Result<(), String> {
    for addr in addrs {
        let parsed: std::net::SocketAddr = addr
            .parse()
            .map_err(|e| format!("--listen {addr}: not an IP:port address ({e})"))?;
        let socket = match parsed {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .map_err(|e| format!("--listen {addr}: {e}"))?;
        socket
            .set_reuseaddr(true)
            .and_then(|()| socket.bind(parsed))
            .map_err(|e| format!("--listen {addr}: cannot bind: {e}"))?;
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&cli.log_level))
        .init();
    let loaded = load(&cli.pingora).and_then(|confs| {
        if !cli.pingora.upgrade && !cli.pingora.test {
            check_listen(&cli.listen)?;
        }
        Ok(confs)
    });
    let (server_conf, relay_conf) = match loaded {
        Ok(confs) => confs,
        Err(e) => {
            eprintln!("paseo-relay: {e}");
            std::process::exit(1);
        }
    };
    // The file was read above; Pingora must not read it again.
    let opt = Opt {
        conf: None,
        ..cli.pingora
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf);
    server.bootstrap();
    let hub = SessionHub::new(relay_conf);
    let service = relay_service(&server.configuration, hub, &cli.listen);
    server.add_service(service);
    log::info!("paseo-relay starting on {}", cli.listen.join(", "));
    server.run_forever();
}
