//! One connection to a room speaking the device protocol, over any of the
//! room's transports (TCP, TLS, WebSocket, WebSocket over TLS): the low-level
//! API, used by [`crate::Client`] and by tests that speak the raw protocol.
//!
//! Framing, AUTH and [`Connection::next_frame`] are written once, over a byte
//! stream; a WebSocket becomes such a stream through
//! [`pushgrid_wire::ws::WsBytes`] (binary messages in, one binary message per
//! frame out).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use pushgrid_wire::ws::WsBytes;
use pushgrid_wire::{Decoded, Frame, Op, decode_frame, encode, msg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::address::{RoomAddress, Transport};
use crate::error::ClientError;

/// How `tls://` and `wss://` connections check the room's certificate.
///
/// By default the public web roots (Mozilla's list, built in) are trusted and
/// the certificate must name the address's host. Add the CA of a private
/// deployment (or a room's self-signed certificate) with `root_pem_files` or
/// `root_ders`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM files of extra trusted root certificates (each file may hold several).
    pub root_pem_files: Vec<PathBuf>,
    /// Extra trusted root certificates, DER-encoded.
    pub root_ders: Vec<Vec<u8>>,
    /// Trust the public web roots too. Turn it off to trust only the roots above.
    pub public_roots: bool,
    /// The name the certificate must carry (a DNS name or an IP address);
    /// by default the host of the address being connected to.
    pub server_name: Option<String>,
}

impl Default for TlsOptions {
    fn default() -> TlsOptions {
        TlsOptions {
            root_pem_files: Vec::new(),
            root_ders: Vec::new(),
            public_roots: true,
            server_name: None,
        }
    }
}

impl TlsOptions {
    /// Reads the root certificates and builds the rustls client configuration
    /// (ring provider, safe default protocol versions, no client certificate).
    pub(crate) fn prepare(&self) -> Result<TlsSettings, ClientError> {
        let config_error = ClientError::TlsConfig;
        let mut roots = rustls::RootCertStore::empty();
        if self.public_roots {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for path in &self.root_pem_files {
            let shown = path.display();
            let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|error| {
                    config_error(format!(
                        "cannot read root certificates from {shown}: {error}"
                    ))
                })?
                .collect::<Result<_, _>>()
                .map_err(|error| {
                    config_error(format!("bad PEM certificate in {shown}: {error}"))
                })?;
            if certificates.is_empty() {
                return Err(config_error(format!("no certificate in {shown}")));
            }
            for certificate in certificates {
                roots.add(certificate).map_err(|error| {
                    config_error(format!(
                        "a root certificate in {shown} is unusable: {error}"
                    ))
                })?;
            }
        }
        for (index, der) in self.root_ders.iter().enumerate() {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|error| {
                    config_error(format!(
                        "DER root certificate #{index} is unusable: {error}"
                    ))
                })?;
        }
        if roots.is_empty() {
            return Err(config_error(
                "no trusted root: keep public_roots on or give root certificates".into(),
            ));
        }
        let server_name = match &self.server_name {
            None => None,
            Some(name) => Some(ServerName::try_from(name.clone()).map_err(|_| {
                config_error(format!(
                    "server name {name:?} is neither a DNS name nor an IP address"
                ))
            })?),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| config_error(format!("TLS protocol versions: {error}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsSettings {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

/// [`TlsOptions`] made ready: roots read, rustls configured. Cheap to clone.
#[derive(Clone)]
pub(crate) struct TlsSettings {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("TlsSettings")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Timeouts, limits and TLS trust for [`Connection::connect_with`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Limit on opening the connection: the TCP handshake, then the TLS and
    /// WebSocket handshakes of the transports that have them.
    pub connect_timeout: Duration,
    /// Limit on the wait for AUTH_OK after AUTH was sent.
    pub auth_timeout: Duration,
    /// Largest frame body accepted from the server.
    pub max_body: u32,
    /// Certificate checks for `tls://` and `wss://` rooms.
    pub tls: TlsOptions,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            auth_timeout: Duration::from_secs(10),
            max_body: pushgrid_wire::DEFAULT_MAX_BODY,
            tls: TlsOptions::default(),
        }
    }
}

/// The read buffer shrinks back to this after a large frame.
const IDLE_BUFFER_CAPACITY: usize = 4 * 1024;
/// The WebSocket reader's own buffer (tungstenite's default is 128 KiB).
const WEBSOCKET_READ_BUFFER: usize = 4 * 1024;

/// One open connection to a room, on any transport.
///
/// ```no_run
/// # async fn example() -> Result<(), pushgrid_client::ClientError> {
/// use pushgrid_client::{Connection, Op, msg};
/// let auth = msg::Auth { token: "jwt".into(), device_id: "d1".into(), platform: "cli".into() };
/// // Or "tls://push.example.com:8443", "ws://127.0.0.1:8091/", "wss://push.example.com/".
/// let (mut connection, auth_ok) = Connection::connect("127.0.0.1:8090", auth).await?;
/// println!("connection {} heartbeat {}s", auth_ok.conn_id, auth_ok.heartbeat_secs);
/// connection.send_empty(Op::Ping, 0).await?;
/// while let Some(frame) = connection.next_frame().await? {
///     if frame.op == Op::Push {
///         let push: msg::Push = frame.decode()?;
///         connection.send_frame(Op::Ack, 0, &msg::Ack { msg_ids: vec![push.msg_id] }).await?;
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Connection {
    stream: RoomStream,
    read_buffer: BytesMut,
    max_body: u32,
    peer_addr: SocketAddr,
    address: RoomAddress,
}

impl Connection {
    /// Opens a connection to `addr` (any form [`RoomAddress`] parses), sends
    /// AUTH (seq 0) and waits for the answer, with the default
    /// [`ConnectOptions`].
    ///
    /// An ERROR answer becomes [`ClientError::AuthRefused`] with the server's code
    /// and message.
    pub async fn connect(
        addr: &str,
        auth: msg::Auth,
    ) -> Result<(Connection, msg::AuthOk), ClientError> {
        Connection::connect_with(addr, auth, &ConnectOptions::default()).await
    }

    /// [`Connection::connect`] with explicit timeouts, limits and TLS trust.
    pub async fn connect_with(
        addr: &str,
        auth: msg::Auth,
        options: &ConnectOptions,
    ) -> Result<(Connection, msg::AuthOk), ClientError> {
        let address = RoomAddress::parse(addr)?;
        Connection::connect_to(&address, auth, options).await
    }

    /// [`Connection::connect_with`] for an address parsed already.
    pub async fn connect_to(
        address: &RoomAddress,
        auth: msg::Auth,
        options: &ConnectOptions,
    ) -> Result<(Connection, msg::AuthOk), ClientError> {
        Connection::connect_prepared(address, auth, options, None).await
    }

    /// Connects and authenticates with TLS settings prepared once by the
    /// caller (`None`: prepared from `options.tls` when the transport needs them).
    pub(crate) async fn connect_prepared(
        address: &RoomAddress,
        auth: msg::Auth,
        options: &ConnectOptions,
        tls: Option<&TlsSettings>,
    ) -> Result<(Connection, msg::AuthOk), ClientError> {
        let mut connection = Connection::open_prepared(address, options, tls).await?;
        let auth_ok = tokio::time::timeout(options.auth_timeout, connection.authenticate(auth))
            .await
            .map_err(|_| ClientError::Timeout("waiting for AUTH_OK"))??;
        Ok((connection, auth_ok))
    }

    /// Opens a connection (handshakes included) without sending anything, for
    /// tests that speak the raw protocol (e.g. send a frame before AUTH).
    pub async fn open(addr: &str) -> Result<Connection, ClientError> {
        Connection::open_with(addr, &ConnectOptions::default()).await
    }

    /// [`Connection::open`] with explicit timeouts, limits and TLS trust.
    pub async fn open_with(
        addr: &str,
        options: &ConnectOptions,
    ) -> Result<Connection, ClientError> {
        let address = RoomAddress::parse(addr)?;
        Connection::open_prepared(&address, options, None).await
    }

    async fn open_prepared(
        address: &RoomAddress,
        options: &ConnectOptions,
        tls: Option<&TlsSettings>,
    ) -> Result<Connection, ClientError> {
        // TLS settings first: a bad root file is a settings error, not a network one.
        let prepared;
        let tls = match (address.transport().is_secure(), tls) {
            (false, _) => None,
            (true, Some(tls)) => Some(tls),
            (true, None) => {
                prepared = options.tls.prepare()?;
                Some(&prepared)
            }
        };
        // One deadline for every handshake of the transport.
        let deadline = Instant::now() + options.connect_timeout;
        let tcp = tokio::time::timeout_at(
            deadline,
            TcpStream::connect((address.host(), address.port())),
        )
        .await
        .map_err(|_| ClientError::Timeout("opening the TCP connection"))?
        .map_err(|source| ClientError::Connect {
            addr: address.to_string(),
            source,
        })?;
        tcp.set_nodelay(true)?;
        let peer_addr = tcp.peer_addr()?;
        let stream = match (address.transport(), tls) {
            (Transport::Tcp, _) => RoomStream::Tcp(tcp),
            (Transport::Ws, _) => {
                let ws = websocket_handshake(address, tcp, options.max_body, deadline).await?;
                RoomStream::Ws(Box::new(ws))
            }
            (Transport::Tls, Some(tls)) => {
                RoomStream::Tls(Box::new(tls_handshake(address, tcp, tls, deadline).await?))
            }
            (Transport::Wss, Some(tls)) => {
                let secured = tls_handshake(address, tcp, tls, deadline).await?;
                let ws = websocket_handshake(address, secured, options.max_body, deadline).await?;
                RoomStream::Wss(Box::new(ws))
            }
            (Transport::Tls | Transport::Wss, None) => {
                return Err(ClientError::TlsConfig(
                    "no TLS settings for a TLS transport".into(),
                ));
            }
        };
        Ok(Connection {
            stream,
            read_buffer: BytesMut::with_capacity(IDLE_BUFFER_CAPACITY),
            max_body: options.max_body,
            peer_addr,
            address: address.clone(),
        })
    }

    /// Sends AUTH and reads the answer (no timeout: wrap it in one).
    pub async fn authenticate(&mut self, auth: msg::Auth) -> Result<msg::AuthOk, ClientError> {
        self.send_frame(Op::Auth, 0, &auth).await?;
        let Some(frame) = self.next_frame().await? else {
            return Err(ClientError::Closed);
        };
        match frame.op {
            Op::AuthOk => Ok(frame.decode::<msg::AuthOk>()?),
            Op::Error => {
                let error: msg::Error = frame.decode()?;
                Err(ClientError::AuthRefused {
                    code: error.code(),
                    message: error.message,
                })
            }
            Op::Kick => {
                let kick: msg::Kick = frame.decode()?;
                Err(ClientError::Protocol(format!(
                    "kicked during AUTH ({}): {}",
                    kick.code().as_str_name(),
                    kick.reason
                )))
            }
            other => Err(ClientError::Protocol(format!(
                "expected AUTH_OK, got {other:?}"
            ))),
        }
    }

    /// Encodes and writes one frame.
    pub async fn send_frame(
        &mut self,
        op: Op,
        seq: u32,
        body: &impl prost::Message,
    ) -> Result<(), ClientError> {
        self.send_raw(&encode(op, seq, body)).await
    }

    /// Writes one frame with an empty body (PING).
    pub async fn send_empty(&mut self, op: Op, seq: u32) -> Result<(), ClientError> {
        self.send_raw(&pushgrid_wire::encode_empty(op, seq)).await
    }

    /// Writes bytes as they are (already encoded frames, or garbage in tests)
    /// and flushes them out of the TLS and WebSocket layers. Over a WebSocket
    /// one call is one binary message.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads the next whole frame. `Ok(None)` means the server closed the
    /// connection cleanly between frames; a close inside a frame is
    /// [`ClientError::Closed`]. Cancel safe: bytes read before a cancellation stay
    /// buffered for the next call.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        loop {
            match decode_frame(&mut self.read_buffer, self.max_body)? {
                Decoded::Frame(frame) => {
                    if self.read_buffer.is_empty()
                        && self.read_buffer.capacity() > 4 * IDLE_BUFFER_CAPACITY
                    {
                        // A large frame grew the buffer; do not keep that memory while idle.
                        self.read_buffer = BytesMut::with_capacity(IDLE_BUFFER_CAPACITY);
                    }
                    return Ok(Some(frame));
                }
                Decoded::Incomplete { needed } => {
                    self.read_buffer.reserve(needed.max(1024));
                    let read = self.stream.read_buf(&mut self.read_buffer).await?;
                    if read == 0 {
                        return if self.read_buffer.is_empty() {
                            Ok(None)
                        } else {
                            Err(ClientError::Closed)
                        };
                    }
                }
            }
        }
    }

    /// The room's socket address (of the TCP connection under any TLS or WebSocket).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The address this connection was opened to.
    pub fn address(&self) -> &RoomAddress {
        &self.address
    }

    pub fn transport(&self) -> Transport {
        self.address.transport()
    }

    /// Ends the sending side: a TCP half-close, a TLS close_notify, a
    /// WebSocket Close message (the server sees end of stream).
    pub async fn shutdown(&mut self) -> Result<(), ClientError> {
        self.stream.shutdown().await?;
        Ok(())
    }
}

/// Opens the TLS session over `tcp`, checking the certificate against the
/// trusted roots and the server name (by default the address's host).
async fn tls_handshake(
    address: &RoomAddress,
    tcp: TcpStream,
    tls: &TlsSettings,
    deadline: Instant,
) -> Result<TlsStream<TcpStream>, ClientError> {
    let server_name = match &tls.server_name {
        Some(name) => name.clone(),
        None => ServerName::try_from(address.host().to_owned()).map_err(|_| ClientError::Tls {
            addr: address.to_string(),
            reason: format!(
                "{:?} is not a name a certificate can be checked against: set the TLS server name",
                address.host()
            ),
        })?,
    };
    tokio::time::timeout_at(deadline, tls.connector.connect(server_name, tcp))
        .await
        .map_err(|_| ClientError::Timeout("the TLS handshake"))?
        .map_err(|error| tls_failure(address, &error))
}

/// A TLS handshake error, with a hint when the certificate was the problem.
fn tls_failure(address: &RoomAddress, error: &io::Error) -> ClientError {
    let certificate_refused = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|inner| {
            matches!(
                inner,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        });
    let mut reason = error.to_string();
    if certificate_refused {
        reason.push_str(
            " (the room's certificate is not trusted for this name: add its CA to \
             TlsOptions::root_pem_files or root_ders, `--ca <pem>` on the command line, \
             or set the server name it was issued for)",
        );
    }
    ClientError::Tls {
        addr: address.to_string(),
        reason,
    }
}

/// Small buffers (the room's frames are small); messages up to four frames of
/// the largest body, or 1 MiB.
fn websocket_config(max_body: u32) -> WebSocketConfig {
    let largest_message = (max_body as usize + pushgrid_wire::HEADER_LEN)
        .saturating_mul(4)
        .max(1 << 20);
    WebSocketConfig::default()
        .read_buffer_size(WEBSOCKET_READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(largest_message))
        .max_frame_size(Some(largest_message))
}

/// Runs the WebSocket upgrade over `stream` (TCP, or TLS for `wss://`).
async fn websocket_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    address: &RoomAddress,
    stream: S,
    max_body: u32,
    deadline: Instant,
) -> Result<WsBytes<S>, ClientError> {
    let failure = |reason: String| ClientError::WebSocket {
        addr: address.to_string(),
        reason,
    };
    let Some(url) = address.websocket_url() else {
        return Err(failure("not a WebSocket address".into()));
    };
    let handshake = tokio_tungstenite::client_async_with_config(
        url.as_str(),
        stream,
        Some(websocket_config(max_body)),
    );
    let (ws, _response) = tokio::time::timeout_at(deadline, handshake)
        .await
        .map_err(|_| ClientError::Timeout("the WebSocket handshake"))?
        .map_err(|error| match error {
            tungstenite::Error::Http(response) => failure(format!(
                "the server answered HTTP {} instead of switching protocols",
                response.status()
            )),
            other => failure(other.to_string()),
        })?;
    Ok(WsBytes::new(ws))
}

/// The byte stream under a connection. TLS and WebSocket streams are boxed:
/// they are large, and the enum stays the size of a TCP stream.
enum RoomStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Ws(Box<WsBytes<TcpStream>>),
    Wss(Box<WsBytes<TlsStream<TcpStream>>>),
}

/// What every transport's stream is.
trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

impl RoomStream {
    fn inner(&mut self) -> Pin<&mut dyn ByteStream> {
        match self {
            RoomStream::Tcp(stream) => Pin::new(stream),
            RoomStream::Tls(stream) => Pin::new(&mut **stream),
            RoomStream::Ws(stream) => Pin::new(&mut **stream),
            RoomStream::Wss(stream) => Pin::new(&mut **stream),
        }
    }
}

impl fmt::Debug for RoomStream {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let transport = match self {
            RoomStream::Tcp(_) => Transport::Tcp,
            RoomStream::Tls(_) => Transport::Tls,
            RoomStream::Ws(_) => Transport::Ws,
            RoomStream::Wss(_) => Transport::Wss,
        };
        formatter
            .debug_tuple("RoomStream")
            .field(&transport)
            .finish()
    }
}

impl AsyncRead for RoomStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().inner().poll_read(cx, buf)
    }
}

impl AsyncWrite for RoomStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().inner().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().inner().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().inner().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use bytes::Bytes;

    use super::*;

    #[test]
    fn tls_settings_errors_name_the_problem() {
        let missing = TlsOptions {
            root_pem_files: vec!["/nonexistent/ca.pem".into()],
            ..TlsOptions::default()
        };
        let error = missing.prepare().unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");

        let nothing_trusted = TlsOptions {
            public_roots: false,
            ..TlsOptions::default()
        };
        let error = nothing_trusted.prepare().unwrap_err().to_string();
        assert!(error.contains("no trusted root"), "{error}");

        let garbage = TlsOptions {
            root_ders: vec![b"not a certificate".to_vec()],
            ..TlsOptions::default()
        };
        let error = garbage.prepare().unwrap_err().to_string();
        assert!(error.contains("#0"), "{error}");

        let bad_name = TlsOptions {
            server_name: Some("bad name!".into()),
            ..TlsOptions::default()
        };
        let error = bad_name.prepare().unwrap_err().to_string();
        assert!(error.contains("bad name!"), "{error}");
        assert!(TlsOptions::default().prepare().is_ok());
    }

    /// A connection over a WebSocket (the adapter itself is tested in
    /// `pushgrid_wire::ws`): a frame goes out as one binary message, a large
    /// frame split over messages arrives whole and its buffer is given back,
    /// and a Close message is a clean end.
    #[tokio::test]
    async fn a_websocket_connection_reads_whole_frames_and_gives_large_buffers_back() {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let large_payload = Bytes::from(vec![7u8; 40_000]);
        let push = encode(
            Op::Push,
            3,
            &msg::Push {
                msg_id: 9,
                payload: large_payload.clone(),
                ..Default::default()
            },
        );
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let sent = ws.next().await.unwrap().unwrap();
            assert_eq!(
                sent,
                Message::Binary(pushgrid_wire::encode_empty(Op::Ping, 4)),
                "one frame, one binary message"
            );
            for part in [push.slice(..5), push.slice(5..1000), push.slice(1000..)] {
                ws.send(Message::Binary(part)).await.unwrap();
            }
            ws.close(None).await.unwrap();
        });

        let url = format!("ws://{addr}/device");
        let mut connection = Connection::open(&url).await.unwrap();
        assert_eq!(connection.transport(), Transport::Ws);
        assert_eq!(connection.address().to_string(), url);
        connection.send_empty(Op::Ping, 4).await.unwrap();
        let frame = connection.next_frame().await.unwrap().unwrap();
        assert_eq!((frame.op, frame.seq), (Op::Push, 3));
        let decoded: msg::Push = frame.decode().unwrap();
        assert_eq!((decoded.msg_id, decoded.payload), (9, large_payload));
        assert!(
            connection.read_buffer.capacity() <= IDLE_BUFFER_CAPACITY,
            "the large frame's buffer was given back"
        );
        assert!(
            connection.next_frame().await.unwrap().is_none(),
            "a Close message is a clean end"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_bad_address_is_an_address_error() {
        let auth = msg::Auth::default();
        let error = Connection::connect("http://localhost:1", auth)
            .await
            .unwrap_err();
        assert!(matches!(error, ClientError::Address(_)), "{error:?}");
        assert!(error.to_string().contains("unknown transport"), "{error}");
    }
}
