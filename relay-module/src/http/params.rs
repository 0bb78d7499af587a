//! `/ws` query parameters: parsing and validation in the order of relay-protocol.md §1.3 and §0.
//!
//! Parsing follows WHATWG `URLSearchParams`: percent-decoding, `+` as a space, and the first
//! occurrence of a repeated parameter wins.

use crate::protocol::{Role, SocketKind, Version};
use std::fmt;

/// A validated `/ws` request: which session it joins and as what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// Session key, exactly as sent (not trimmed, spec §1.2).
    pub server_id: String,
    /// Normalised protocol version.
    pub version: Version,
    /// Which side the socket is.
    pub role: Role,
    /// Trimmed connectionId; `None` when absent or blank.
    pub connection_id: Option<String>,
}

impl ConnectParams {
    /// The socket's kind in its session; a v2 client without a connectionId gets a fresh
    /// `conn_…` id from `assign` (spec §3.1, §3.2).
    pub fn socket_kind(&self, assign: impl FnOnce() -> String) -> SocketKind {
        match (self.version, self.role, &self.connection_id) {
            (Version::V1, role, _) => SocketKind::V1(role),
            (Version::V2, Role::Server, None) => SocketKind::Control,
            (Version::V2, Role::Server, Some(id)) => SocketKind::Data(id.clone()),
            (Version::V2, Role::Client, Some(id)) => SocketKind::Client(id.clone()),
            (Version::V2, Role::Client, None) => SocketKind::Client(assign()),
        }
    }
}

/// Why a `/ws` query was rejected; every variant is answered with HTTP 400 and
/// [`ParamsError::body`] as the body (spec §1.3, §0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamsError {
    /// `serverId` absent or empty.
    MissingServerId,
    /// `serverId` longer than the limit (bytes after decoding).
    ServerIdTooLong,
    /// `connectionId` longer than the limit (bytes after decoding and trimming).
    ConnectionIdTooLong,
    /// `v` is not blank, `1` or `2` after trimming.
    InvalidVersion,
    /// `role` absent or not exactly `server` / `client`.
    InvalidRole,
}

impl ParamsError {
    /// The exact response body (no trailing newline).
    pub fn body(&self) -> &'static str {
        match self {
            ParamsError::MissingServerId => "Missing serverId parameter",
            ParamsError::ServerIdTooLong => "serverId is too long",
            ParamsError::ConnectionIdTooLong => "connectionId is too long",
            ParamsError::InvalidVersion => "Invalid v parameter (expected 1 or 2)",
            ParamsError::InvalidRole => "Missing or invalid role parameter",
        }
    }
}

impl fmt::Display for ParamsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.body())
    }
}

impl std::error::Error for ParamsError {}

/// Parses and validates the query string of a `/ws` request (without the leading `?`).
///
/// Order: serverId present, serverId length, connectionId length, v, role (spec §1.3 and §0).
///
/// ```
/// use relay_module::http::params::{parse, ParamsError};
/// use relay_module::protocol::{Role, Version};
/// let p = parse("serverId=srv_1&role=server&v=%202%20", 256).unwrap();
/// assert_eq!((p.version, p.role, p.connection_id), (Version::V2, Role::Server, None));
/// assert_eq!(parse("serverId=S&v=3", 256), Err(ParamsError::InvalidVersion));
/// ```
pub fn parse(query: &str, max_id_bytes: usize) -> Result<ConnectParams, ParamsError> {
    let (mut server_id, mut role, mut version, mut connection_id) = (None, None, None, None);
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let slot = match key.as_ref() {
            "serverId" => &mut server_id,
            "role" => &mut role,
            "v" => &mut version,
            "connectionId" => &mut connection_id,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(value.into_owned());
        }
    }

    let server_id = server_id
        .filter(|s| !s.is_empty())
        .ok_or(ParamsError::MissingServerId)?;
    if server_id.len() > max_id_bytes {
        return Err(ParamsError::ServerIdTooLong);
    }
    let connection_id = connection_id
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty());
    if connection_id
        .as_ref()
        .is_some_and(|c| c.len() > max_id_bytes)
    {
        return Err(ParamsError::ConnectionIdTooLong);
    }
    let version = match version.as_deref().map(str::trim) {
        None | Some("") | Some("1") => Version::V1,
        Some("2") => Version::V2,
        Some(_) => return Err(ParamsError::InvalidVersion),
    };
    let role = match role.as_deref() {
        Some("server") => Role::Server,
        Some("client") => Role::Client,
        _ => return Err(ParamsError::InvalidRole),
    };
    Ok(ConnectParams {
        server_id,
        version,
        role,
        connection_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(q: &str) -> Result<ConnectParams, ParamsError> {
        parse(q, 256)
    }

    #[test]
    fn rejections_in_order() {
        use ParamsError::*;
        let cases = [
            ("", MissingServerId),
            ("serverId=&role=server&v=2", MissingServerId),
            ("role=server&v=2", MissingServerId),
            ("serverId=S&v=2", InvalidRole),
            ("serverId=S&role=Server&v=2", InvalidRole),
            ("serverId=S&role=%20server&v=2", InvalidRole),
            ("serverId=S&role=admin&v=2", InvalidRole),
            ("serverId=S&role=server&v=3", InvalidVersion),
            ("serverId=S&role=server&v=2.0", InvalidVersion),
            ("serverId=S&role=server&v=02", InvalidVersion),
            ("serverId=S&role=server&v=v2", InvalidVersion),
            ("serverId=S&role=server&v=nope", InvalidVersion),
            ("serverId=S&v=3", InvalidVersion),
        ];
        for (q, want) in cases {
            assert_eq!(p(q), Err(want), "{q}");
        }
    }

    #[test]
    fn id_length_limits_are_bytes_after_decoding() {
        let ok = "x".repeat(256);
        assert!(p(&format!("serverId={ok}&role=server")).is_ok());
        let long = "x".repeat(257);
        assert_eq!(
            p(&format!("serverId={long}&v=9")),
            Err(ParamsError::ServerIdTooLong)
        );
        // 129 x "é" is 129 characters but 258 bytes once decoded.
        let e = "%C3%A9".repeat(129);
        assert_eq!(
            p(&format!("serverId={e}&role=server")),
            Err(ParamsError::ServerIdTooLong)
        );
        assert_eq!(
            p(&format!("serverId=S&connectionId={long}&v=9")),
            Err(ParamsError::ConnectionIdTooLong)
        );
        // Surrounding whitespace is trimmed before the length check.
        assert!(p(&format!(
            "serverId=S&role=client&v=2&connectionId=%20{ok}%20"
        ))
        .is_ok());
    }

    #[test]
    fn normalisation() {
        let q = p("serverId=+x&role=client&v=%202%20&connectionId=%20%20abc%20").unwrap();
        assert_eq!(q.server_id, " x");
        assert_eq!(q.version, Version::V2);
        assert_eq!(q.role, Role::Client);
        assert_eq!(q.connection_id.as_deref(), Some("abc"));
        assert_eq!(p("serverId=S&role=server&v=").unwrap().version, Version::V1);
        assert_eq!(
            p("serverId=S&role=server&v=%20").unwrap().version,
            Version::V1
        );
        assert_eq!(p("serverId=S&role=server").unwrap().version, Version::V1);
        assert_eq!(
            p("serverId=S&role=server&v=1").unwrap().version,
            Version::V1
        );
        let blank = p("serverId=S&role=server&v=2&connectionId=%20").unwrap();
        assert_eq!(blank.connection_id, None);
        // First occurrence wins; unknown parameters are ignored.
        let first = p("serverId=A&serverId=B&role=client&role=x&clientId=foo&x=1").unwrap();
        assert_eq!((first.server_id.as_str(), first.role), ("A", Role::Client));
    }

    #[test]
    fn socket_kinds() {
        let kind = |q: &str| p(q).unwrap().socket_kind(|| "conn_0".into());
        assert_eq!(
            kind("serverId=S&role=server&connectionId=abc"),
            SocketKind::V1(Role::Server)
        );
        assert_eq!(kind("serverId=S&role=server&v=2"), SocketKind::Control);
        assert_eq!(
            kind("serverId=S&role=server&v=2&connectionId=a"),
            SocketKind::Data("a".into())
        );
        assert_eq!(
            kind("serverId=S&role=client&v=2&connectionId=a"),
            SocketKind::Client("a".into())
        );
        assert_eq!(
            kind("serverId=S&role=client&v=2"),
            SocketKind::Client("conn_0".into())
        );
    }
}
