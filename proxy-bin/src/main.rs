//! `paseo-relay`: the Paseo relay served by Pingora.
//!
//! Run: `paseo-relay --listen 0.0.0.0:8080`, then point a daemon at it
//! (`PASEO_RELAY_ENDPOINT=host:8080`) and check `curl http://127.0.0.1:8080/health`.

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

/// Pingora settings: the file given with `-c` if any, else defaults, with our own defaults
/// for what Pingora leaves long (grace 10 s, shutdown 5 s, one thread per CPU).
fn server_conf(opt: &Opt) -> Result<ServerConf, String> {
    let mut conf = match &opt.conf {
        Some(path) => ServerConf::load_from_yaml(path).map_err(|e| format!("{path}: {e}"))?,
        None => ServerConf {
            grace_period_seconds: Some(10),
            graceful_shutdown_timeout_seconds: Some(5),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ..ServerConf::default()
        },
    };
    conf.merge_with_opt(opt);
    Ok(conf)
}

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&cli.log_level))
        .init();
    let conf = match server_conf(&cli.pingora) {
        Ok(conf) => conf,
        Err(e) => {
            eprintln!("paseo-relay: {e}");
            std::process::exit(1);
        }
    };
    let relay = RelayConf::default();
    let opt = Opt {
        conf: None,
        ..cli.pingora
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    let hub = SessionHub::new(relay);
    let service = relay_service(&server.configuration, hub, &cli.listen);
    server.add_service(service);
    log::info!("paseo-relay listening on {}", cli.listen.join(", "));
    server.run_forever();
}
