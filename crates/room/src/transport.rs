//! Device transports: plain TCP, TLS, WebSocket and WebSocket over TLS.
//!
//! Plain TCP stays on the lean path: wait for readiness, then `try_read`
//! into a buffer that exists only while bytes are waiting; writes go straight
//! into the socket, several frames in one vectored write. TLS and WebSocket
//! connections go through a boxed `AsyncRead + AsyncWrite` (a WebSocket is
//! adapted to a byte stream by `pushgrid_wire::ws::WsBytes`: every binary
//! message carries one or more whole or partial frames, every frame the room
//! writes is one binary message), so the session logic in `conn.rs` is
//! written once for all four.
//!
//! Handshakes (TLS, WebSocket) run in the connection's own task under the
//! pre-auth deadline, never in the accept loop.

use std::io::{self, IoSlice};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pushgrid_common::{StartError, StartResult};
use pushgrid_wire::ws::WsBytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// How long a write may wait for a full socket before the device counts as gone.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read at a time when no partial frame asks for more.
const READ_CHUNK: usize = 512;
/// A buffer left larger than this after a big frame is given back.
const SHRINK_ABOVE: usize = 4096;
/// Frames gathered into one vectored write.
const MAX_IOVECS: usize = 64;

/// The listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Transport {
    Tcp,
    Tls,
    Ws,
    Wss,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }

    /// True when the device speaks the frame protocol right after accept.
    pub fn is_plain(self) -> bool {
        self == Transport::Tcp
    }
}

/// Any byte stream a device can come through.
pub(crate) trait ByteStream: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> ByteStream for T {}

/// An established device stream.
pub(crate) enum DeviceStream {
    Tcp(TcpStream),
    Boxed(Pin<Box<dyn ByteStream>>),
}

/// TLS settings, loaded once at start.
#[derive(Clone)]
pub(crate) struct Tls {
    acceptor: TlsAcceptor,
}

impl Tls {
    /// Reads a PEM certificate chain and private key.
    pub fn load(cert_file: &str, key_file: &str) -> StartResult<Tls> {
        let tls = |message: String| StartError::Tls(message);
        if cert_file.is_empty() || key_file.is_empty() {
            return Err(tls(
                "a TLS listener needs tls_cert_file and tls_key_file".into()
            ));
        }
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(Path::new(cert_file))
                .map_err(|error| tls(format!("cannot read tls_cert_file {cert_file}: {error}")))?
                .collect::<Result<_, _>>()
                .map_err(|error| tls(format!("bad certificate in {cert_file}: {error}")))?;
        if certs.is_empty() {
            return Err(tls(format!("no certificate in tls_cert_file {cert_file}")));
        }
        let key = PrivateKeyDer::from_pem_file(Path::new(key_file)).map_err(|error| {
            tls(format!(
                "cannot read a private key from tls_key_file {key_file}: {error}"
            ))
        })?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| tls(format!("TLS protocol versions: {error}")))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|error| {
                tls(format!(
                    "the TLS certificate and key do not fit together: {error}"
                ))
            })?;
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }
}

fn websocket_config(max_message: usize) -> WebSocketConfig {
    // Small buffers: the defaults (128 KiB each) would cost more than the
    // rest of an idle connection many times over.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(max_message.saturating_mul(4).max(1 << 20))
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// A plain TCP connection, ready for frames.
pub(crate) fn plain(tcp: TcpStream) -> io::Result<DeviceStream> {
    let _ = tcp.set_nodelay(true);
    Ok(DeviceStream::Tcp(tcp))
}

/// Runs the transport's handshake on an accepted socket.
pub(crate) async fn handshake(
    transport: Transport,
    tcp: TcpStream,
    tls: Option<&Tls>,
    max_message: usize,
) -> io::Result<DeviceStream> {
    let _ = tcp.set_nodelay(true);
    let tls_acceptor = || {
        tls.map(|tls| tls.acceptor.clone())
            .ok_or_else(|| io::Error::other("no TLS configuration"))
    };
    match transport {
        Transport::Tcp => Ok(DeviceStream::Tcp(tcp)),
        Transport::Tls => {
            let stream = tls_acceptor()?.accept(tcp).await?;
            Ok(DeviceStream::Boxed(Box::pin(stream)))
        }
        Transport::Ws => {
            let ws = tokio_tungstenite::accept_async_with_config(
                tcp,
                Some(websocket_config(max_message)),
            )
            .await
            .map_err(io::Error::other)?;
            Ok(DeviceStream::Boxed(Box::pin(WsBytes::new(ws))))
        }
        Transport::Wss => {
            let stream = tls_acceptor()?.accept(tcp).await?;
            let ws = tokio_tungstenite::accept_async_with_config(
                stream,
                Some(websocket_config(max_message)),
            )
            .await
            .map_err(io::Error::other)?;
            Ok(DeviceStream::Boxed(Box::pin(WsBytes::new(ws))))
        }
    }
}

/// Writes as much of `frames[*frame].[*offset..]` onward as the socket takes
/// without waiting; true when everything is written.
fn try_write_frames(
    stream: &TcpStream,
    frames: &[Bytes],
    frame: &mut usize,
    offset: &mut usize,
) -> io::Result<bool> {
    loop {
        if *frame >= frames.len() {
            return Ok(true);
        }
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let mut count = 0;
        for (index, bytes) in frames[*frame..].iter().take(MAX_IOVECS).enumerate() {
            let start = if index == 0 { *offset } else { 0 };
            slices[count] = IoSlice::new(&bytes[start..]);
            count += 1;
        }
        let mut written = stream.try_write_vectored(&slices[..count])?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 && *frame < frames.len() {
            let left = frames[*frame].len() - *offset;
            if written >= left {
                written -= left;
                *frame += 1;
                *offset = 0;
            } else {
                *offset += written;
                written = 0;
            }
        }
    }
}

async fn writable_within(stream: &TcpStream, limit: Duration) -> io::Result<()> {
    tokio::time::timeout(limit, stream.writable())
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

async fn write_boxed(stream: &mut Pin<Box<dyn ByteStream>>, frames: &[Bytes]) -> io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, async {
        for frame in frames {
            stream.write_all(frame).await?;
        }
        stream.flush().await
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

impl DeviceStream {
    /// Waits for input and appends it to `buf`; `Ok(0)` at the end of the
    /// stream. A plain TCP connection allocates only once bytes are waiting.
    /// Cancel-safe: nothing is lost when another branch of a select wins.
    pub async fn read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            DeviceStream::Tcp(stream) => loop {
                stream.readable().await?;
                if buf.capacity() == buf.len() {
                    buf.reserve(READ_CHUNK);
                }
                match stream.try_read_buf(buf) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                    }
                    result => return result,
                }
            },
            DeviceStream::Boxed(stream) => {
                if buf.capacity() == buf.len() {
                    buf.reserve(READ_CHUNK);
                }
                stream.read_buf(buf).await
            }
        }
    }

    /// Writes whole frames, waiting (at most [`WRITE_TIMEOUT`] per stall)
    /// only while the socket is full. Returns the bytes written.
    pub async fn write_frames(&mut self, frames: &[Bytes]) -> io::Result<usize> {
        let total = frames.iter().map(Bytes::len).sum();
        match self {
            DeviceStream::Tcp(stream) => {
                let (mut frame, mut offset) = (0, 0);
                loop {
                    match try_write_frames(stream, frames, &mut frame, &mut offset) {
                        Ok(true) => return Ok(total),
                        Ok(false) => {}
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                            // Rare, and boxed so the wait costs an idle
                            // connection's future nothing.
                            Box::pin(writable_within(stream, WRITE_TIMEOUT)).await?;
                        }
                        Err(error) => return Err(error),
                    }
                }
            }
            DeviceStream::Boxed(stream) => {
                Box::pin(write_boxed(stream, frames)).await?;
                Ok(total)
            }
        }
    }

    async fn shutdown(&mut self) {
        match self {
            DeviceStream::Tcp(stream) => {
                let _ = stream.shutdown().await;
            }
            DeviceStream::Boxed(stream) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
            }
        }
    }

    /// Sends the last frames (ERROR or KICK, after the rest of a frame cut
    /// short), shuts down the write half and drains input for `linger`, so
    /// the kernel does not answer unread input with a reset that would
    /// destroy the frame before the device reads it.
    pub async fn close_politely(mut self, last_frames: Vec<Bytes>, linger: Duration) {
        if !last_frames.is_empty() {
            let _ = self.write_frames(&last_frames).await;
        }
        self.shutdown().await;
        let mut sink = BytesMut::new();
        let _ = tokio::time::timeout(linger, async {
            loop {
                match self.read_some(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => sink.clear(),
                }
            }
        })
        .await;
    }
}

/// Gives back a read buffer that grew for a large frame, keeping what is
/// left of the next frame.
pub(crate) fn shrink(buf: &mut BytesMut) {
    if buf.is_empty() {
        *buf = BytesMut::new();
    } else if buf.capacity() > SHRINK_ABOVE && buf.len() < READ_CHUNK {
        let mut smaller = BytesMut::with_capacity(READ_CHUNK);
        smaller.extend_from_slice(buf);
        *buf = smaller;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn vectored_writes_deliver_every_frame_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let mut all = Vec::new();
            stream.read_to_end(&mut all).await.unwrap();
            all
        });
        let (server, _) = listener.accept().await.unwrap();
        let mut device = DeviceStream::Tcp(server);
        // More frames than one vectored write takes, some large.
        let frames: Vec<Bytes> = (0..200u32)
            .map(|index| Bytes::from(vec![index as u8; 1 + (index as usize % 7) * 3000]))
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|frame| frame.to_vec()).collect();
        let written = device.write_frames(&frames).await.unwrap();
        assert_eq!(written, expected.len());
        drop(device);
        assert_eq!(client.await.unwrap(), expected);
    }

    #[test]
    fn shrink_gives_back_big_buffers_and_keeps_partial_frames() {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.extend_from_slice(b"abc");
        shrink(&mut buf);
        assert_eq!(&buf[..], b"abc");
        assert!(buf.capacity() <= READ_CHUNK * 2);
        buf.clear();
        shrink(&mut buf);
        assert_eq!(buf.capacity(), 0);
    }
}
