//! One TCP connection speaking the device protocol: the low-level API, used by
//! [`crate::Client`] and by tests that speak the raw protocol.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use pushgrid_wire::{Decoded, Frame, Op, decode_frame, encode, msg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::ClientError;

/// Timeouts and limits for [`Connection::connect_with`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Limit on the TCP handshake.
    pub connect_timeout: Duration,
    /// Limit on the wait for AUTH_OK after AUTH was sent.
    pub auth_timeout: Duration,
    /// Largest frame body accepted from the server.
    pub max_body: u32,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            auth_timeout: Duration::from_secs(10),
            max_body: pushgrid_wire::DEFAULT_MAX_BODY,
        }
    }
}

/// The read buffer shrinks back to this after a large frame.
const IDLE_BUFFER_CAPACITY: usize = 4 * 1024;

/// One open TCP connection to a room.
///
/// ```no_run
/// # async fn example() -> Result<(), pushgrid_client::ClientError> {
/// use pushgrid_client::{Connection, Op, msg};
/// let auth = msg::Auth { token: "jwt".into(), device_id: "d1".into(), platform: "cli".into() };
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
    stream: TcpStream,
    read_buffer: BytesMut,
    max_body: u32,
    peer_addr: SocketAddr,
}

impl Connection {
    /// Opens a TCP connection, sends AUTH (seq 0) and waits for the answer, with
    /// the default [`ConnectOptions`].
    ///
    /// An ERROR answer becomes [`ClientError::AuthRefused`] with the server's code
    /// and message.
    pub async fn connect(
        addr: &str,
        auth: msg::Auth,
    ) -> Result<(Connection, msg::AuthOk), ClientError> {
        Connection::connect_with(addr, auth, &ConnectOptions::default()).await
    }

    /// [`Connection::connect`] with explicit timeouts and limits.
    pub async fn connect_with(
        addr: &str,
        auth: msg::Auth,
        options: &ConnectOptions,
    ) -> Result<(Connection, msg::AuthOk), ClientError> {
        let mut connection = Connection::open_with(addr, options).await?;
        let auth_ok = tokio::time::timeout(options.auth_timeout, connection.authenticate(auth))
            .await
            .map_err(|_| ClientError::Timeout("waiting for AUTH_OK"))??;
        Ok((connection, auth_ok))
    }

    /// Opens a TCP connection without sending anything (for tests that speak the
    /// raw protocol, e.g. send a frame before AUTH).
    pub async fn open(addr: &str) -> Result<Connection, ClientError> {
        Connection::open_with(addr, &ConnectOptions::default()).await
    }

    async fn open_with(addr: &str, options: &ConnectOptions) -> Result<Connection, ClientError> {
        let stream = tokio::time::timeout(options.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout("opening the TCP connection"))?
            .map_err(|source| ClientError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        stream.set_nodelay(true)?;
        let peer_addr = stream.peer_addr()?;
        Ok(Connection {
            stream,
            read_buffer: BytesMut::with_capacity(IDLE_BUFFER_CAPACITY),
            max_body: options.max_body,
            peer_addr,
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

    /// Writes bytes as they are (already encoded frames, or garbage in tests).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).await?;
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

    /// The room's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Shuts down the write half (the server sees end of stream).
    pub async fn shutdown(&mut self) -> Result<(), ClientError> {
        self.stream.shutdown().await?;
        Ok(())
    }
}
