//! A WebSocket as a byte stream of frames (feature `websocket`), the one
//! adapter the room and the client SDK put under their sessions so that the
//! same frame reader and writer serve TCP, TLS and WebSocket alike.
//!
//! Reading yields the bytes of the binary messages in order, however the
//! peer split its frames over them (one frame per message, several in one,
//! or one frame over several). Each write is one binary message. Pings are
//! answered by tungstenite and carry no bytes; a text message is an
//! `InvalidData` error (frames travel in binary messages); a Close message,
//! or a connection tungstenite already saw closed, is the end of the stream.
//!
//! Memory: the adapter holds a received message only until its last byte is
//! read, then lets it go, so an idle connection keeps no message buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message};

/// A [`WebSocketStream`] read and written as a byte stream of frames.
#[derive(Debug)]
pub struct WsBytes<S> {
    ws: WebSocketStream<S>,
    /// What is left of the last binary message (empty, and unallocated,
    /// between messages).
    pending: Bytes,
}

impl<S> WsBytes<S> {
    pub fn new(ws: WebSocketStream<S>) -> WsBytes<S> {
        WsBytes {
            ws,
            pending: Bytes::new(),
        }
    }
}

/// tungstenite's error as an I/O error (its own I/O errors unwrapped).
fn io_error(error: tungstenite::Error) -> io::Error {
    match error {
        tungstenite::Error::Io(error) => error,
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let count = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..count]);
                this.pending.advance(count);
                if this.pending.is_empty() {
                    // Give the message's memory back now, not at the next message.
                    this.pending = Bytes::new();
                }
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None
                | Some(Ok(Message::Close(_)))
                | Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text message: frames travel in binary messages",
                    )));
                }
                // Ping, Pong and raw frames carry no device frames.
                Some(Ok(_)) => {}
                Some(Err(error)) => return Poll::Ready(Err(io_error(error))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(io_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.get_mut().ws).poll_close(cx)) {
            Ok(())
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Poll::Ready(Ok(()))
            }
            Err(error) => Poll::Ready(Err(io_error(error))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use bytes::BytesMut;
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::{Decoded, Op, decode_frame, encode, encode_empty, msg};

    /// A WebSocket client (the adapter) and server (the peer) over an
    /// in-memory pipe.
    async fn pair() -> (WsBytes<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let accept = tokio::spawn(tokio_tungstenite::accept_async(server));
        let (ws, _) = tokio_tungstenite::client_async("ws://room.test/device", client)
            .await
            .unwrap();
        (WsBytes::new(ws), accept.await.unwrap().unwrap())
    }

    /// Reads whole frames from the adapter until `count` are in.
    async fn read_frames(stream: &mut WsBytes<DuplexStream>, count: usize) -> Vec<(Op, u32)> {
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        while frames.len() < count {
            if let Decoded::Frame(frame) = decode_frame(&mut buf, crate::DEFAULT_MAX_BODY).unwrap()
            {
                frames.push((frame.op, frame.seq));
                continue;
            }
            let read = stream.read_buf(&mut buf).await.unwrap();
            assert!(read > 0, "the stream ended after {frames:?}");
        }
        frames
    }

    #[tokio::test]
    async fn frames_arrive_however_the_messages_split_them() {
        let (mut stream, mut peer) = pair().await;
        let push = encode(
            Op::Push,
            3,
            &msg::Push {
                msg_id: 9,
                payload: Bytes::from(vec![7u8; 40_000]),
                ..Default::default()
            },
        );
        let mut joined = BytesMut::new();
        joined.extend_from_slice(&encode_empty(Op::Pong, 1));
        joined.extend_from_slice(&encode_empty(Op::Pong, 2));
        peer.send(Message::Binary(joined.freeze())).await.unwrap();
        for part in [push.slice(..5), push.slice(5..1000), push.slice(1000..)] {
            peer.send(Message::Binary(part)).await.unwrap();
        }
        peer.send(Message::Ping(Bytes::from_static(b"are you there")))
            .await
            .unwrap();
        peer.send(Message::Binary(encode_empty(Op::Pong, 4)))
            .await
            .unwrap();
        assert_eq!(
            read_frames(&mut stream, 4).await,
            [(Op::Pong, 1), (Op::Pong, 2), (Op::Push, 3), (Op::Pong, 4)]
        );
        assert!(stream.pending.is_empty());
    }

    #[tokio::test]
    async fn each_write_is_one_binary_message_and_an_empty_write_sends_nothing() {
        let (mut stream, mut peer) = pair().await;
        assert_eq!(stream.write(&[]).await.unwrap(), 0);
        let ping = encode_empty(Op::Ping, 4);
        stream.write_all(&ping).await.unwrap();
        stream.write_all(&encode_empty(Op::Ping, 5)).await.unwrap();
        stream.flush().await.unwrap();
        assert_eq!(peer.next().await.unwrap().unwrap(), Message::Binary(ping));
        assert_eq!(
            peer.next().await.unwrap().unwrap(),
            Message::Binary(encode_empty(Op::Ping, 5))
        );
        // Shutdown sends a Close: the peer sees the end.
        stream.shutdown().await.unwrap();
        assert!(matches!(
            peer.next().await,
            Some(Ok(Message::Close(_))) | None
        ));
    }

    #[tokio::test]
    async fn a_close_message_is_the_end_and_a_text_message_an_error() {
        let (mut stream, mut peer) = pair().await;
        peer.close(None).await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(stream.read_to_end(&mut buf).await.unwrap(), 0);

        let (mut stream, mut peer) = pair().await;
        peer.send(Message::text("not a frame")).await.unwrap();
        let error = stream.read_buf(&mut BytesMut::new()).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("text message"), "{error}");
    }
}
