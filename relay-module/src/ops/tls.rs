//! TLS for the relay's listeners (relay-protocol.md §0 "Shutdown and upgrade", SIGHUP):
//! the certificate store every TLS listener resolves from, its reload on SIGHUP, and the
//! answer to plain HTTP sent to a TLS port. Pingora's rustls acceptor does the handshakes.
//!
//! - [`CertStore`] holds the current certificate chain and key, loaded from two PEM files.
//!   A reload swaps them for new handshakes only; established sockets are untouched, and a
//!   bad new pair leaves the old one in place.
//! - [`ReloadService`] is a Pingora background service that reloads on SIGHUP (and logs and
//!   ignores SIGHUP when no listener uses TLS).
//! - `accept` runs the handshake of each TLS connection (for [`crate::http::front`]) under
//!   `http.tls_handshake_timeout_ms`: a connection that starts with an HTTP request instead
//!   of a TLS record gets a `400` telling it to use TLS, and the one log line for the failed
//!   handshake names the cause.

use async_trait::async_trait;
use log::{debug, error, info};
use pingora::listeners::tls::{Acceptor, TlsSettings};
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::TlsStream;
use pingora::protocols::{GetSocketDigest, Peek, ALPN};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};
use pingora::{Error, ErrorType, Result};
use prometheus::IntCounter;
use std::io::BufReader;
use std::sync::{Arc, RwLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

/// Body of the `400` sent to plain HTTP on a TLS listener.
pub const PLAIN_HTTP_BODY: &str =
    "This port speaks TLS only: connect with wss:// or https:// (Paseo: enable useTls)";

/// The certificate chain and private key of the TLS listeners, reloadable from their files.
#[derive(Debug)]
pub struct CertStore {
    cert_path: String,
    key_path: String,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads the PEM certificate chain at `cert_path` (leaf first) and the PEM private key
    /// (PKCS#8, PKCS#1 or SEC1) at `key_path`.
    ///
    /// # Errors
    /// One line naming the file and the problem: unreadable, no certificate or key in it,
    /// an unsupported key, or a key that does not match the certificate.
    pub fn load(cert_path: &str, key_path: &str) -> Result<Arc<CertStore>, String> {
        let pair = read_pair(cert_path, key_path)?;
        Ok(Arc::new(CertStore {
            cert_path: cert_path.to_string(),
            key_path: key_path.to_string(),
            current: RwLock::new(Arc::new(pair)),
        }))
    }

    /// Path of the certificate chain file.
    pub fn cert_path(&self) -> &str {
        &self.cert_path
    }

    /// Reads both files again; on success new handshakes use the new pair.
    ///
    /// # Errors
    /// As [`CertStore::load`]; the current pair is then kept.
    pub fn reload(&self) -> Result<(), String> {
        let pair = read_pair(&self.cert_path, &self.key_path)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(pair);
        Ok(())
    }

    /// Pingora TLS settings for a listener that serves from this store (HTTP/1.1 only:
    /// WebSocket upgrades are HTTP/1.1).
    pub fn tls_settings(self: &Arc<Self>) -> TlsSettings {
        // Paths are not used: the resolver set below provides the certificate.
        let mut settings = TlsSettings::intermediate(&self.cert_path, &self.key_path)
            .expect("TLS settings without files to load");
        settings.set_cert_resolver(self.clone());
        settings.set_alpn(ALPN::H1);
        settings
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn open(path: &str) -> Result<BufReader<std::fs::File>, String> {
    std::fs::File::open(path)
        .map(BufReader::new)
        .map_err(|e| format!("{path}: cannot read: {e}"))
}

/// Reads and checks a certificate chain and its private key.
fn read_pair(cert_path: &str, key_path: &str) -> Result<CertifiedKey, String> {
    let chain = rustls_pemfile::certs(&mut open(cert_path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert_path}: not a PEM certificate file: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{cert_path}: no PEM certificate in the file"));
    }
    let key = rustls_pemfile::private_key(&mut open(key_path)?)
        .map_err(|e| format!("{key_path}: not a PEM private key file: {e}"))?
        .ok_or_else(|| format!("{key_path}: no PEM private key in the file"))?;
    pingora::tls::install_default_crypto_provider();
    let provider = CryptoProvider::get_default()
        .ok_or_else(|| "no TLS crypto provider is installed".to_string())?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{key_path}: unsupported private key: {e}"))?;
    let pair = CertifiedKey::new(chain, signing_key);
    // `keys_match` can only fail on a mismatch or a key that hides its public half.
    pair.keys_match().map_err(|_| {
        format!("{key_path}: the private key does not match the certificate in {cert_path}")
    })?;
    Ok(pair)
}

/// Background service: SIGHUP reloads the [`CertStore`] (spec §0). Never ends the process.
pub struct ReloadService(pub Option<Arc<CertStore>>);

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                error!("cannot install the SIGHUP handler: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hangups.recv() => self.reload(),
                _ = shutdown.changed() => {
                    // The handler stays installed: a late SIGHUP must not end the process.
                    if *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }
}

impl ReloadService {
    fn reload(&self) {
        let Some(store) = &self.0 else {
            info!("SIGHUP: no TLS listener, nothing to reload");
            return;
        };
        match store.reload() {
            Ok(()) => info!(
                "SIGHUP: TLS certificate reloaded from {}",
                store.cert_path()
            ),
            Err(e) => error!("SIGHUP: TLS reload failed, keeping the current certificate: {e}"),
        }
    }
}

/// Reason logged for plain HTTP on a TLS listener.
const PLAIN_HTTP_REASON: &str =
    "plain HTTP on a TLS listener: the client must use TLS (Paseo daemon: useTls)";

/// The TLS handshake of a connection accepted on a TLS listener, finished by `deadline`
/// (`http.tls_handshake_timeout_ms` after the accept). Plain HTTP (`ws://` to a `wss://`
/// port) gets `400` and [`PLAIN_HTTP_BODY`] instead of a TLS alert the client cannot read.
/// `None` when the connection is done: answered, failed (one error line naming the peer,
/// as Pingora logs it) or out of time (counted in `expired`, logged at debug).
pub(crate) async fn accept(
    acceptor: &Acceptor,
    mut l4: L4Stream,
    deadline: Instant,
    expired: &IntCounter,
) -> Option<TlsStream<L4Stream>> {
    let peer = l4.get_socket_digest().and_then(|d| d.peer_addr().cloned());
    let out_of_time = || {
        expired.inc();
        match &peer {
            Some(addr) => debug!("TLS handshake from {addr} not finished in time: dropped"),
            None => debug!("TLS handshake not finished in time: dropped"),
        }
        None
    };
    let failure = match tokio::time::timeout_at(deadline, starts_with_http(&mut l4)).await {
        Err(_) => return out_of_time(),
        Ok(true) => {
            refuse_plain_http(&mut l4).await;
            Error::explain(ErrorType::TLSHandshakeFailure, PLAIN_HTTP_REASON)
        }
        Ok(false) => match tokio::time::timeout_at(deadline, acceptor.tls_handshake(l4)).await {
            Err(_) => return out_of_time(),
            Ok(Ok(tls)) => return Some(tls),
            Ok(Err(e)) => e,
        },
    };
    match &peer {
        Some(addr) => error!("Downstream handshake error from {addr}: {failure}"),
        None => error!("Downstream handshake error: {failure}"),
    }
    None
}

/// Whether the connection starts with an HTTP request rather than a TLS record (0x16);
/// waits for its first byte, which stays unread.
async fn starts_with_http(stream: &mut L4Stream) -> bool {
    let mut first = [0u8; 1];
    // An error here (peer gone) is left to the TLS handshake to report.
    matches!(stream.try_peek(&mut first).await, Ok(true)) && first[0].is_ascii_uppercase()
}

/// Answers plain HTTP with `400` and [`PLAIN_HTTP_BODY`] and closes the write side.
async fn refuse_plain_http(stream: &mut L4Stream) {
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{PLAIN_HTTP_BODY}",
        PLAIN_HTTP_BODY.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Read what the client sent (briefly, a little), so that closing the socket with
    // unread input does not turn into a reset that could destroy the answer.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let mut scratch = [0u8; 1024];
        for _ in 0..64 {
            if matches!(stream.read(&mut scratch).await, Ok(0) | Err(_)) {
                break;
            }
        }
    })
    .await;
}
