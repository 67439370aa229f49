//! Room addresses: which transport a connection speaks, and where.
//!
//! | form | transport |
//! |---|---|
//! | `host:port` or `tcp://host:port` | plain TCP |
//! | `tls://host:port` | the same frames inside TLS |
//! | `ws://host[:port][/path]` | WebSocket, frames in binary messages (port 80, path `/` by default) |
//! | `wss://host[:port][/path]` | WebSocket over TLS (port 443, path `/` by default) |
//!
//! An address is parsed once, into [`RoomAddress`]; a bad one is an
//! [`AddressError`] that says what is wrong with it.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// The byte stream a room connection runs over. The frame protocol is the
/// same on all four.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// Plain TCP.
    #[default]
    Tcp,
    /// TCP inside TLS.
    Tls,
    /// WebSocket: each binary message carries frames.
    Ws,
    /// WebSocket over TLS.
    Wss,
}

impl Transport {
    /// Every transport, plain TCP first.
    pub const ALL: [Transport; 4] = [
        Transport::Tcp,
        Transport::Tls,
        Transport::Ws,
        Transport::Wss,
    ];

    /// The URL scheme that names it (`tcp`, `tls`, `ws`, `wss`).
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }

    /// True for the transports inside TLS (`tls`, `wss`).
    pub fn is_secure(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }

    /// True for the WebSocket transports (`ws`, `wss`).
    pub fn is_websocket(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }

    fn from_scheme(scheme: &str) -> Option<Transport> {
        Transport::ALL
            .into_iter()
            .find(|transport| transport.scheme().eq_ignore_ascii_case(scheme))
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.scheme())
    }
}

impl FromStr for Transport {
    type Err = AddressError;

    /// `tcp`, `tls`, `ws` or `wss` (any case).
    fn from_str(text: &str) -> Result<Transport, AddressError> {
        Transport::from_scheme(text.trim()).ok_or_else(|| AddressError {
            address: text.to_owned(),
            reason: "unknown transport: use tcp, tls, ws or wss".into(),
        })
    }
}

/// A room address that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid room address {address:?}: {reason}")]
pub struct AddressError {
    /// The address as it was given.
    pub address: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Where a room listens and which transport to speak there. Parse it with
/// [`RoomAddress::parse`] (or `str::parse`); it prints back in the same forms,
/// plain TCP as a bare `host:port`.
///
/// ```
/// use pushgrid_client::{RoomAddress, Transport};
/// let address: RoomAddress = "wss://push.example.com/device".parse().unwrap();
/// assert_eq!(address.transport(), Transport::Wss);
/// assert_eq!((address.host(), address.port()), ("push.example.com", 443));
/// assert_eq!(address.to_string(), "wss://push.example.com:443/device");
/// assert!(RoomAddress::parse("http://push.example.com").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RoomAddress {
    /// `host:port` or `tcp://host:port`.
    Tcp { host: String, port: u16 },
    /// `tls://host:port`.
    Tls { host: String, port: u16 },
    /// `ws://host:port/path`; `path` starts with `/` and may carry a query.
    Ws {
        host: String,
        port: u16,
        path: String,
    },
    /// `wss://host:port/path`.
    Wss {
        host: String,
        port: u16,
        path: String,
    },
}

/// The WebSocket request path when an address names none.
const DEFAULT_WEBSOCKET_PATH: &str = "/";

impl RoomAddress {
    /// Parses any of the forms in the [module docs](self).
    pub fn parse(text: &str) -> Result<RoomAddress, AddressError> {
        let fail = |reason: &str| AddressError {
            address: text.to_owned(),
            reason: reason.to_owned(),
        };
        if text.is_empty() {
            return Err(fail("empty"));
        }
        if text
            .chars()
            .any(|character| character.is_whitespace() || character.is_control())
        {
            return Err(fail("contains whitespace or control characters"));
        }
        let Some((scheme, rest)) = text.split_once("://") else {
            // No scheme: a bare host:port is plain TCP, as it always was.
            if text.contains('/') {
                return Err(fail(
                    "a bare address is host:port; a WebSocket URL needs its scheme (ws://host:port/path)",
                ));
            }
            let (host, port) = parse_authority(text, None).map_err(|reason| fail(&reason))?;
            return Ok(RoomAddress::Tcp { host, port });
        };
        let Some(transport) = Transport::from_scheme(scheme) else {
            return Err(fail(&format!(
                "unknown transport {scheme:?}: use tcp://, tls://, ws:// or wss://"
            )));
        };
        if rest.contains('#') {
            return Err(fail("a room address has no #fragment"));
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(index) => rest.split_at(index),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(fail("a room address has no user@ part"));
        }
        let default_port = match transport {
            Transport::Ws => Some(80),
            Transport::Wss => Some(443),
            Transport::Tcp | Transport::Tls => None,
        };
        let (host, port) =
            parse_authority(authority, default_port).map_err(|reason| fail(&reason))?;
        if !transport.is_websocket() {
            if !path.is_empty() && path != "/" {
                return Err(fail(&format!(
                    "a {scheme}:// address is host:port, without a path"
                )));
            }
            return Ok(RoomAddress::from_parts(
                transport,
                host,
                port,
                String::new(),
            ));
        }
        let path = if path.is_empty() {
            DEFAULT_WEBSOCKET_PATH.to_owned()
        } else if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        Ok(RoomAddress::from_parts(transport, host, port, path))
    }

    /// An address of `transport` given either whole (with a scheme, which must
    /// name `transport`) or as a bare `host:port`, as the dispatcher and KICK
    /// frames give them. A WebSocket address given bare gets the path `/`.
    pub fn with_transport(transport: Transport, text: &str) -> Result<RoomAddress, AddressError> {
        if text.contains("://") {
            let address = RoomAddress::parse(text)?;
            if address.transport() != transport {
                return Err(AddressError {
                    address: text.to_owned(),
                    reason: format!("expected a {transport}:// address"),
                });
            }
            return Ok(address);
        }
        let bare = RoomAddress::parse(text)?;
        Ok(RoomAddress::from_parts(
            transport,
            bare.host().to_owned(),
            bare.port(),
            DEFAULT_WEBSOCKET_PATH.to_owned(),
        ))
    }

    /// Builds an address from its parts; `path` counts only for WebSocket
    /// transports (empty means `/`).
    fn from_parts(transport: Transport, host: String, port: u16, path: String) -> RoomAddress {
        let path = if path.is_empty() {
            DEFAULT_WEBSOCKET_PATH.to_owned()
        } else {
            path
        };
        match transport {
            Transport::Tcp => RoomAddress::Tcp { host, port },
            Transport::Tls => RoomAddress::Tls { host, port },
            Transport::Ws => RoomAddress::Ws { host, port, path },
            Transport::Wss => RoomAddress::Wss { host, port, path },
        }
    }

    /// The same host and port on another transport (the WebSocket path kept
    /// when both are WebSockets, else `/`).
    pub fn on_transport(&self, transport: Transport) -> RoomAddress {
        let path = self.path().unwrap_or_default().to_owned();
        RoomAddress::from_parts(transport, self.host().to_owned(), self.port(), path)
    }

    /// This address's transport (and WebSocket path) at another host and port.
    pub fn with_endpoint(&self, host: &str, port: u16) -> RoomAddress {
        let path = self.path().unwrap_or_default().to_owned();
        RoomAddress::from_parts(self.transport(), host.to_owned(), port, path)
    }

    pub fn transport(&self) -> Transport {
        match self {
            RoomAddress::Tcp { .. } => Transport::Tcp,
            RoomAddress::Tls { .. } => Transport::Tls,
            RoomAddress::Ws { .. } => Transport::Ws,
            RoomAddress::Wss { .. } => Transport::Wss,
        }
    }

    /// The host name or IP address (an IPv6 address without its brackets).
    pub fn host(&self) -> &str {
        match self {
            RoomAddress::Tcp { host, .. }
            | RoomAddress::Tls { host, .. }
            | RoomAddress::Ws { host, .. }
            | RoomAddress::Wss { host, .. } => host,
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            RoomAddress::Tcp { port, .. }
            | RoomAddress::Tls { port, .. }
            | RoomAddress::Ws { port, .. }
            | RoomAddress::Wss { port, .. } => *port,
        }
    }

    /// The WebSocket request path (with its query, if any); `None` for TCP and TLS.
    pub fn path(&self) -> Option<&str> {
        match self {
            RoomAddress::Ws { path, .. } | RoomAddress::Wss { path, .. } => Some(path),
            RoomAddress::Tcp { .. } | RoomAddress::Tls { .. } => None,
        }
    }

    /// `host:port`, an IPv6 host in brackets.
    pub fn authority(&self) -> String {
        if self.host().contains(':') {
            format!("[{}]:{}", self.host(), self.port())
        } else {
            format!("{}:{}", self.host(), self.port())
        }
    }

    /// The URL of the WebSocket handshake (`ws://` or `wss://`); `None` for TCP and TLS.
    pub fn websocket_url(&self) -> Option<String> {
        let path = self.path()?;
        Some(format!(
            "{}://{}{path}",
            self.transport().scheme(),
            self.authority()
        ))
    }
}

impl fmt::Display for RoomAddress {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Bare, as plain TCP addresses always were (and as rooms announce them).
            RoomAddress::Tcp { .. } => formatter.write_str(&self.authority()),
            RoomAddress::Tls { .. } => write!(formatter, "tls://{}", self.authority()),
            RoomAddress::Ws { path, .. } | RoomAddress::Wss { path, .. } => write!(
                formatter,
                "{}://{}{path}",
                self.transport().scheme(),
                self.authority()
            ),
        }
    }
}

impl FromStr for RoomAddress {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<RoomAddress, AddressError> {
        RoomAddress::parse(text)
    }
}

/// Splits `host:port` (`[v6]:port`); a missing port takes `default_port` when
/// there is one. The error is the reason, without the address.
fn parse_authority(authority: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let (host, port_text) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((inside, after)) = bracketed.split_once(']') else {
            return Err("an IPv6 host needs its closing bracket, e.g. [::1]:8090".into());
        };
        if inside.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{inside:?} in brackets is not an IPv6 address"));
        }
        let port_text = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err("expected :port after the IPv6 host".into()),
            },
        };
        (inside.to_owned(), port_text)
    } else {
        match authority.split_once(':') {
            None => (authority.to_owned(), None),
            Some((host, port)) if !port.contains(':') => (host.to_owned(), Some(port)),
            Some(_) => return Err("an IPv6 host needs brackets, e.g. [::1]:8090".into()),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    let valid_name = host.contains(':')
        || host
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_'));
    if !valid_name {
        return Err(format!(
            "{host:?} is not a host name (letters, digits, '-', '.', '_') or an IP address"
        ));
    }
    let port = match (port_text, default_port) {
        (None, Some(default_port)) => default_port,
        (None, None) | (Some(""), _) => return Err("missing :port".into()),
        (Some(text), _) => match text.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(format!("port {text:?} is not a number from 1 to 65535")),
        },
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parsed(text: &str) -> RoomAddress {
        RoomAddress::parse(text).unwrap_or_else(|error| panic!("{text}: {error}"))
    }

    fn reason(text: &str) -> String {
        let error = RoomAddress::parse(text).expect_err(text);
        assert_eq!(error.address, text);
        assert!(error.to_string().contains(text), "{error}");
        error.reason
    }

    #[test]
    fn every_good_form_parses_to_its_transport() {
        let tcp = |host: &str, port| RoomAddress::Tcp {
            host: host.into(),
            port,
        };
        assert_eq!(parsed("127.0.0.1:8090"), tcp("127.0.0.1", 8090));
        assert_eq!(
            parsed("tcp://room-1.internal:8090"),
            tcp("room-1.internal", 8090)
        );
        assert_eq!(parsed("TCP://localhost:1/"), tcp("localhost", 1));
        assert_eq!(parsed("[::1]:8090"), tcp("::1", 8090));
        assert_eq!(
            parsed("tls://push.example.com:8443"),
            RoomAddress::Tls {
                host: "push.example.com".into(),
                port: 8443
            }
        );
        assert_eq!(
            parsed("ws://127.0.0.1:8091/device?v=1"),
            RoomAddress::Ws {
                host: "127.0.0.1".into(),
                port: 8091,
                path: "/device?v=1".into()
            }
        );
        assert_eq!(
            parsed("ws://localhost:8091"),
            RoomAddress::Ws {
                host: "localhost".into(),
                port: 8091,
                path: "/".into()
            }
        );
        assert_eq!(
            parsed("ws://localhost?token=x").path(),
            Some("/?token=x"),
            "a query alone gets the root path"
        );
        assert_eq!(parsed("ws://localhost").port(), 80);
        assert_eq!(
            parsed("WSS://[2001:db8::7]/push"),
            RoomAddress::Wss {
                host: "2001:db8::7".into(),
                port: 443,
                path: "/push".into()
            }
        );
    }

    #[test]
    fn addresses_print_back_in_a_form_that_parses_to_the_same() {
        for (text, printed) in [
            ("127.0.0.1:8090", "127.0.0.1:8090"),
            ("tcp://127.0.0.1:8090", "127.0.0.1:8090"),
            ("tls://localhost:8443", "tls://localhost:8443"),
            ("ws://localhost:8091", "ws://localhost:8091/"),
            ("wss://[::1]/p?q=1", "wss://[::1]:443/p?q=1"),
            ("[::1]:9", "[::1]:9"),
        ] {
            let address = parsed(text);
            assert_eq!(address.to_string(), printed);
            assert_eq!(parsed(printed), address);
        }
        assert_eq!(
            parsed("wss://[::1]:9443/x").websocket_url().as_deref(),
            Some("wss://[::1]:9443/x")
        );
        assert_eq!(parsed("tls://a:1").websocket_url(), None);
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        assert_eq!(reason(""), "empty");
        assert!(reason("http://localhost:80").contains("unknown transport"));
        assert!(reason("localhost").contains("missing :port"));
        assert!(reason("tls://localhost").contains("missing :port"));
        assert!(reason("tcp://localhost:").contains("missing :port"));
        assert!(reason("localhost:0").contains("1 to 65535"));
        assert!(reason("localhost:70000").contains("1 to 65535"));
        assert!(reason("localhost:80x").contains("1 to 65535"));
        assert!(reason(":8090").contains("missing host"));
        assert!(reason("ws://:8090/").contains("missing host"));
        assert!(reason("::1:8090").contains("brackets"));
        assert!(reason("[::1:8090").contains("closing bracket"));
        assert!(reason("[nothost]:8090").contains("not an IPv6 address"));
        assert!(reason("[::1]8090").contains(":port"));
        assert!(reason("tcp://localhost:8090/path").contains("without a path"));
        assert!(reason("tls://localhost:8443/x").contains("without a path"));
        assert!(reason("localhost:8091/ws").contains("needs its scheme"));
        assert!(reason("ws://user@localhost:8091/").contains("user@"));
        assert!(reason("ws://localhost:8091/#top").contains("fragment"));
        assert!(reason("local host:1").contains("whitespace"));
        assert!(reason("bad!host:1").contains("not a host name"));
    }

    #[test]
    fn a_bare_endpoint_takes_the_transport_it_is_listed_under() {
        let ws = RoomAddress::with_transport(Transport::Ws, "127.0.0.1:8091").unwrap();
        assert_eq!(ws.to_string(), "ws://127.0.0.1:8091/");
        let tls = RoomAddress::with_transport(Transport::Tls, "push.example:443").unwrap();
        assert_eq!(tls.to_string(), "tls://push.example:443");
        let url = RoomAddress::with_transport(Transport::Wss, "wss://a:1/push").unwrap();
        assert_eq!(url.path(), Some("/push"));
        let mismatch = RoomAddress::with_transport(Transport::Wss, "ws://a:1/").unwrap_err();
        assert!(mismatch.reason.contains("wss://"), "{mismatch}");
        assert!(RoomAddress::with_transport(Transport::Tls, "no-port").is_err());
        assert_eq!(
            ws.on_transport(Transport::Tcp).to_string(),
            "127.0.0.1:8091"
        );
        assert_eq!(
            parsed("ws://a:1/push")
                .on_transport(Transport::Wss)
                .to_string(),
            "wss://a:1/push"
        );
    }

    #[test]
    fn transports_parse_by_name() {
        assert_eq!("WSS".parse::<Transport>().unwrap(), Transport::Wss);
        assert_eq!("tcp".parse::<Transport>().unwrap(), Transport::Tcp);
        assert!("udp".parse::<Transport>().is_err());
        assert!(Transport::Tls.is_secure() && !Transport::Ws.is_secure());
        assert!(Transport::Wss.is_websocket() && !Transport::Tls.is_websocket());
    }
}
