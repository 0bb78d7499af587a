//! RFC 6455 §4.2.1 validation of a `/ws` upgrade request, after its query was accepted
//! (relay-protocol.md §0 "HTTP surface"). Pure: works on `http::request::Parts`.

use base64::Engine;
use http::header::{CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};
use http::{HeaderMap, Method, Version};
use std::fmt;

/// Why an upgrade request was refused. [`HandshakeError::status`] and [`HandshakeError::body`]
/// give the exact response; a wrong version also gets `Sec-WebSocket-Version: 13`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// No `Upgrade: websocket` token: 426 (spec §1.3 step 5).
    NotUpgrade,
    /// Method other than GET: 400.
    NotGet,
    /// Not HTTP/1.1: 400.
    NotHttp11,
    /// `Connection` lacks the `upgrade` token: 400.
    NoConnectionUpgrade,
    /// `Sec-WebSocket-Version` is not 13: 400 plus `Sec-WebSocket-Version: 13`.
    BadVersion,
    /// `Sec-WebSocket-Key` missing or not 16 bytes of base64: 400.
    BadKey,
    /// The upgrade request carries a body: 400.
    HasBody,
}

impl HandshakeError {
    /// HTTP status of the rejection.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::NotUpgrade => 426,
            _ => 400,
        }
    }

    /// Exact response body (no trailing newline).
    pub fn body(&self) -> &'static str {
        match self {
            HandshakeError::NotUpgrade => "Expected WebSocket upgrade",
            HandshakeError::NotGet => "WebSocket upgrade requires the GET method",
            HandshakeError::NotHttp11 => "WebSocket upgrade requires HTTP/1.1",
            HandshakeError::NoConnectionUpgrade => "Missing Connection: upgrade header",
            HandshakeError::BadVersion => "Unsupported Sec-WebSocket-Version (expected 13)",
            HandshakeError::BadKey => "Missing or invalid Sec-WebSocket-Key header",
            HandshakeError::HasBody => "WebSocket upgrade request must not have a body",
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.body())
    }
}

impl std::error::Error for HandshakeError {}

fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Validates the upgrade and returns the `Sec-WebSocket-Accept` value for the 101.
///
/// `has_body` is true when the request declares a body (`Content-Length` > 0 or any
/// `Transfer-Encoding`). Checks run in the order of the variants of [`HandshakeError`].
pub fn validate(req: &http::request::Parts, has_body: bool) -> Result<String, HandshakeError> {
    let headers = &req.headers;
    if !has_token(headers, UPGRADE, "websocket") {
        return Err(HandshakeError::NotUpgrade);
    }
    if req.method != Method::GET {
        return Err(HandshakeError::NotGet);
    }
    if req.version != Version::HTTP_11 {
        return Err(HandshakeError::NotHttp11);
    }
    if !has_token(headers, CONNECTION, "upgrade") {
        return Err(HandshakeError::NoConnectionUpgrade);
    }
    let version_ok = headers
        .get(SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"13");
    if !version_ok {
        return Err(HandshakeError::BadVersion);
    }
    let key = headers
        .get(SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().trim_ascii())
        .ok_or(HandshakeError::BadKey)?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(HandshakeError::BadKey),
    }
    if has_body {
        return Err(HandshakeError::HasBody);
    }
    Ok(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key))
}

/// Whether the request head declares a body: `Content-Length` other than 0, or any
/// `Transfer-Encoding`.
pub fn declares_body(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes().trim_ascii() != b"0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(
        method: Method,
        version: Version,
        set: &[(&'static str, &'static str)],
    ) -> http::request::Parts {
        let mut b = http::Request::builder()
            .method(method)
            .uri("/ws?serverId=S&role=server&v=2")
            .version(version);
        let headers = b.headers_mut().unwrap();
        for (name, value) in [
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]
        .iter()
        .chain(set)
        {
            headers.insert(*name, value.parse().unwrap());
        }
        b.body(()).unwrap().into_parts().0
    }

    fn good(set: &[(&'static str, &'static str)]) -> http::request::Parts {
        req(Method::GET, Version::HTTP_11, set)
    }

    #[test]
    fn accepts_rfc_example_key() {
        // RFC 6455 section 1.3 example.
        assert_eq!(
            validate(&good(&[]), false),
            Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_string())
        );
        assert!(validate(&good(&[("upgrade", "WebSocket")]), false).is_ok());
    }

    #[test]
    fn rejections_in_order() {
        use HandshakeError::*;
        let cases = [
            (good(&[("upgrade", "h2c")]), NotUpgrade),
            (
                req(Method::POST, Version::HTTP_11, &[("upgrade", "x")]),
                NotUpgrade,
            ),
            (req(Method::POST, Version::HTTP_11, &[]), NotGet),
            (req(Method::GET, Version::HTTP_10, &[]), NotHttp11),
            (good(&[("connection", "close")]), NoConnectionUpgrade),
            (good(&[("sec-websocket-version", "8")]), BadVersion),
            (good(&[("sec-websocket-key", "abc")]), BadKey),
            (
                good(&[("sec-websocket-key", "AAAAAAAAAAAAAAAAAAAAAAAA")]),
                BadKey,
            ),
        ];
        for (r, want) in cases {
            assert_eq!(validate(&r, false), Err(want));
        }
        assert_eq!(validate(&good(&[]), true), Err(HasBody));
        assert_eq!(
            (NotUpgrade.status(), NotUpgrade.body()),
            (426, "Expected WebSocket upgrade")
        );
        assert_eq!(BadKey.status(), 400);
    }

    #[test]
    fn body_detection() {
        let mut h = HeaderMap::new();
        assert!(!declares_body(&h));
        h.insert("content-length", "0".parse().unwrap());
        assert!(!declares_body(&h));
        h.insert("content-length", "5".parse().unwrap());
        assert!(declares_body(&h));
    }
}
