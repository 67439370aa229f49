//! The pushgrid device frame codec. Pure: no sockets, no async.
//!
//! A frame is a 12-byte big-endian header followed by `body_len` bytes of a
//! protobuf message from `proto/client.proto`, chosen by `op`:
//!
//! ```text
//! 0       4     5    6       8       12
//! | body_len u32 | ver | op | flags u16 | seq u32 | body ...
//! ```
//!
//! [`decode_frame`] checks the version, the op and the body limit on the header
//! alone, before a single body byte is read or any memory is reserved for it, so a
//! peer that claims a 4 GiB body costs nothing. "Not enough bytes yet" is not an
//! error: it is [`Decoded::Incomplete`], which says how many more bytes are needed.
//!
//! With the `websocket` feature, [`ws::WsBytes`] (the codec's one I/O
//! neighbour) reads and writes a WebSocket as a byte stream of frames, for
//! the room and the client SDK alike; the codec above stays pure.

#[cfg(feature = "websocket")]
pub mod ws;

use bytes::{Buf, BufMut, Bytes, BytesMut};
pub use pushgrid_proto::client as msg;

mod push_token;
pub use push_token::{
    APNS_TOKEN_HEX, MAX_BUNDLE_BYTES, MAX_TOKEN_BYTES, PROVIDERS, check_bundle, check_provider,
    check_push_token,
};

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// The only protocol version this codec speaks.
pub const VERSION: u8 = 1;
/// Default body limit before AUTH succeeded.
pub const DEFAULT_PRE_AUTH_MAX_BODY: u32 = 1024;
/// Default body limit after AUTH.
pub const DEFAULT_MAX_BODY: u32 = 64 * 1024;

/// Frame operation codes, as carried in the header's `op` byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    Auth = 1,
    AuthOk = 2,
    Ping = 3,
    Pong = 4,
    Push = 5,
    Ack = 6,
    Upstream = 7,
    UpstreamOk = 8,
    Sub = 9,
    SubOk = 10,
    Unsub = 11,
    Kick = 12,
    Error = 13,
    PushToken = 14,
    PushTokenOk = 15,
}

impl Op {
    pub fn from_u8(value: u8) -> Option<Op> {
        Some(match value {
            1 => Op::Auth,
            2 => Op::AuthOk,
            3 => Op::Ping,
            4 => Op::Pong,
            5 => Op::Push,
            6 => Op::Ack,
            7 => Op::Upstream,
            8 => Op::UpstreamOk,
            9 => Op::Sub,
            10 => Op::SubOk,
            11 => Op::Unsub,
            12 => Op::Kick,
            13 => Op::Error,
            14 => Op::PushToken,
            15 => Op::PushTokenOk,
            _ => return None,
        })
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub body_len: u32,
    pub op: Op,
    pub flags: u16,
    pub seq: u32,
}

/// A whole frame: header fields and the undecoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub op: Op,
    pub flags: u16,
    pub seq: u32,
    pub body: Bytes,
}

/// Why bytes from a peer are not a valid frame. Every variant maps to an
/// [`msg::ErrorCode`] for the ERROR frame the server sends before it closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unsupported protocol version {0} (this server speaks {VERSION})")]
    BadVersion(u8),
    #[error("unknown op {0}")]
    UnknownOp(u8),
    #[error("frame body of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: u32, limit: u32 },
    #[error("undecodable {op:?} body: {reason}")]
    BadBody { op: Op, reason: String },
}

impl FrameError {
    pub fn code(&self) -> msg::ErrorCode {
        match self {
            FrameError::BadVersion(_) => msg::ErrorCode::BadVersion,
            FrameError::UnknownOp(_) => msg::ErrorCode::UnknownOp,
            FrameError::TooLarge { .. } => msg::ErrorCode::FrameTooLarge,
            FrameError::BadBody { .. } => msg::ErrorCode::BadBody,
        }
    }
}

/// Result of trying to take one frame off the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Frame(Frame),
    /// At least this many more bytes are needed before a frame can be returned.
    Incomplete {
        needed: usize,
    },
}

/// Parses and validates a header. `buf` must hold at least [`HEADER_LEN`] bytes.
pub fn parse_header(buf: &[u8], max_body: u32) -> Result<Header, FrameError> {
    debug_assert!(buf.len() >= HEADER_LEN);
    let mut cursor = &buf[..HEADER_LEN];
    let body_len = cursor.get_u32();
    let version = cursor.get_u8();
    let op_byte = cursor.get_u8();
    let flags = cursor.get_u16();
    let seq = cursor.get_u32();
    if version != VERSION {
        return Err(FrameError::BadVersion(version));
    }
    let op = Op::from_u8(op_byte).ok_or(FrameError::UnknownOp(op_byte))?;
    if body_len > max_body {
        return Err(FrameError::TooLarge {
            len: body_len,
            limit: max_body,
        });
    }
    Ok(Header {
        body_len,
        op,
        flags,
        seq,
    })
}

/// Takes one frame off the front of `buf` if a whole one is there.
///
/// The header is validated as soon as its 12 bytes have arrived, so an oversize
/// or malformed frame is refused before its body is read. On `Incomplete` the
/// buffer is left untouched.
pub fn decode_frame(buf: &mut BytesMut, max_body: u32) -> Result<Decoded, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(Decoded::Incomplete {
            needed: HEADER_LEN - buf.len(),
        });
    }
    let header = parse_header(buf, max_body)?;
    let frame_len = HEADER_LEN + header.body_len as usize;
    if buf.len() < frame_len {
        return Ok(Decoded::Incomplete {
            needed: frame_len - buf.len(),
        });
    }
    buf.advance(HEADER_LEN);
    let body = buf.split_to(header.body_len as usize).freeze();
    Ok(Decoded::Frame(Frame {
        op: header.op,
        flags: header.flags,
        seq: header.seq,
        body,
    }))
}

/// Writes a header and a protobuf body into `dst`.
pub fn encode_into(dst: &mut BytesMut, op: Op, seq: u32, body: &impl prost::Message) {
    let body_len = body.encoded_len();
    dst.reserve(HEADER_LEN + body_len);
    put_header(dst, op, seq, body_len as u32);
    // `reserve` above guarantees the capacity, so encoding cannot fail.
    body.encode(dst).expect("buffer reserved for the body");
}

/// Encodes a frame into a fresh, exactly sized `Bytes` (one allocation), ready to
/// be shared by reference count among many connections.
pub fn encode(op: Op, seq: u32, body: &impl prost::Message) -> Bytes {
    let mut dst = BytesMut::with_capacity(HEADER_LEN + body.encoded_len());
    encode_into(&mut dst, op, seq, body);
    dst.freeze()
}

/// Encodes a frame with an empty body (PING, PONG).
pub fn encode_empty(op: Op, seq: u32) -> Bytes {
    let mut dst = BytesMut::with_capacity(HEADER_LEN);
    put_header(&mut dst, op, seq, 0);
    dst.freeze()
}

fn put_header(dst: &mut BytesMut, op: Op, seq: u32, body_len: u32) {
    dst.put_u32(body_len);
    dst.put_u8(VERSION);
    dst.put_u8(op as u8);
    dst.put_u16(0);
    dst.put_u32(seq);
}

impl Frame {
    /// Decodes the body as the protobuf message `M`.
    pub fn decode<M: prost::Message + Default>(&self) -> Result<M, FrameError> {
        M::decode(self.body.clone()).map_err(|error| FrameError::BadBody {
            op: self.op,
            reason: error.to_string(),
        })
    }
}

/// The app-wide broadcast topic: every device of the app, no SUB needed.
pub const ALL_TOPIC: &str = "all";
/// Longest topic name.
pub const MAX_TOPIC_BYTES: usize = 128;

/// A topic name as devices and the push API may write it: empty means
/// [`ALL_TOPIC`]; otherwise 1 to [`MAX_TOPIC_BYTES`] bytes of printable text
/// (see [`check_text`]).
pub fn normalize_topic(topic: &str) -> Result<&str, String> {
    if topic.is_empty() {
        return Ok(ALL_TOPIC);
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(format!(
            "a topic must be 1 to {MAX_TOPIC_BYTES} bytes, not {}",
            topic.len()
        ));
    }
    check_text("a topic", topic)?;
    Ok(topic)
}

/// Longest user id and device id, in bytes.
pub const MAX_ID_BYTES: usize = 255;

/// A user id or device id (named `what` in the message): 1 to
/// [`MAX_ID_BYTES`] bytes of printable text (see [`check_text`]). Ids compare
/// byte for byte.
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(format!(
            "{what} must be 1 to {MAX_ID_BYTES} bytes, not {}",
            id.len()
        ));
    }
    check_text(what, id)
}

/// Text that ids and topics may hold: any UTF-8 but control characters
/// (U+0000 to U+001F, U+007F to U+009F: NUL, CR, LF, TAB, ESC, ...) and the
/// line and paragraph separators U+2028 and U+2029, which would split or
/// forge lines in logs, webhooks and the keys they are stored under.
pub fn check_text(what: &str, text: &str) -> Result<(), String> {
    match text.char_indices().find(|(_, character)| {
        character.is_control() || matches!(character, '\u{2028}' | '\u{2029}')
    }) {
        None => Ok(()),
        Some((at, character)) => Err(format!(
            "{what} must be printable text: U+{:04X} at byte {at} is a control character",
            u32::from(character)
        )),
    }
}

/// The ERROR frame for a codec failure.
pub fn error_frame(code: msg::ErrorCode, message: impl Into<String>) -> Bytes {
    encode(
        Op::Error,
        0,
        &msg::Error {
            code: code as i32,
            message: message.into(),
        },
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn auth() -> msg::Auth {
        msg::Auth {
            token: "t".into(),
            device_id: "d1".into(),
            platform: "ios".into(),
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(Op::Auth, 7, &auth());
        let mut buf = BytesMut::from(&bytes[..]);
        let Decoded::Frame(frame) = decode_frame(&mut buf, 1024).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(frame.op, Op::Auth);
        assert_eq!(frame.seq, 7);
        assert_eq!(frame.decode::<msg::Auth>().unwrap(), auth());
        assert!(buf.is_empty());
    }

    #[test]
    fn incomplete_says_how_much_is_missing_and_keeps_the_buffer() {
        let bytes = encode(Op::Auth, 1, &auth());
        let mut buf = BytesMut::from(&bytes[..5]);
        assert_eq!(
            decode_frame(&mut buf, 1024).unwrap(),
            Decoded::Incomplete { needed: 7 }
        );
        assert_eq!(buf.len(), 5);
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 2]);
        assert_eq!(
            decode_frame(&mut buf, 1024).unwrap(),
            Decoded::Incomplete { needed: 2 }
        );
        assert_eq!(buf.len(), bytes.len() - 2);
    }

    #[test]
    fn two_frames_in_one_buffer() {
        let mut buf = BytesMut::new();
        encode_into(&mut buf, Op::Ping, 1, &msg::Ack::default());
        encode_into(
            &mut buf,
            Op::Ack,
            2,
            &msg::Ack {
                msg_ids: vec![1, 2, 3],
            },
        );
        let Decoded::Frame(first) = decode_frame(&mut buf, 1024).unwrap() else {
            panic!()
        };
        let Decoded::Frame(second) = decode_frame(&mut buf, 1024).unwrap() else {
            panic!()
        };
        assert_eq!(first.op, Op::Ping);
        assert_eq!(second.decode::<msg::Ack>().unwrap().msg_ids, vec![1, 2, 3]);
        assert_eq!(
            decode_frame(&mut buf, 1024).unwrap(),
            Decoded::Incomplete { needed: 12 }
        );
    }

    #[test]
    fn oversize_is_refused_on_the_header_alone() {
        // Only the header has arrived; it claims 4 GiB. Refused without waiting.
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        buf.put_u8(VERSION);
        buf.put_u8(Op::Auth as u8);
        buf.put_u16(0);
        buf.put_u32(0);
        let error = decode_frame(&mut buf, 1024).unwrap_err();
        assert_eq!(
            error,
            FrameError::TooLarge {
                len: u32::MAX,
                limit: 1024
            }
        );
        assert_eq!(error.code(), msg::ErrorCode::FrameTooLarge);
        assert!(
            buf.capacity() < 1024,
            "no memory was reserved for the claimed body"
        );
    }

    #[test]
    fn bad_version_and_unknown_op() {
        let mut frame = encode(Op::Ping, 0, &msg::Ack::default()).to_vec();
        frame[4] = 2;
        assert_eq!(
            decode_frame(&mut BytesMut::from(&frame[..]), 1024),
            Err(FrameError::BadVersion(2))
        );
        frame[4] = VERSION;
        frame[5] = 99;
        assert_eq!(
            decode_frame(&mut BytesMut::from(&frame[..]), 1024),
            Err(FrameError::UnknownOp(99))
        );
        frame[5] = 0;
        assert_eq!(
            decode_frame(&mut BytesMut::from(&frame[..]), 1024),
            Err(FrameError::UnknownOp(0))
        );
    }

    #[test]
    fn undecodable_body_is_an_error_not_a_panic() {
        let mut buf = BytesMut::new();
        put_header(&mut buf, Op::Auth, 0, 3);
        buf.put_slice(&[0xff, 0xff, 0xff]);
        let Decoded::Frame(frame) = decode_frame(&mut buf, 1024).unwrap() else {
            panic!()
        };
        let error = frame.decode::<msg::Auth>().unwrap_err();
        assert_eq!(error.code(), msg::ErrorCode::BadBody);
    }

    #[test]
    fn topic_names() {
        assert_eq!(normalize_topic(""), Ok(ALL_TOPIC));
        assert_eq!(normalize_topic("news"), Ok("news"));
        assert!(normalize_topic(&"x".repeat(MAX_TOPIC_BYTES)).is_ok());
        assert!(normalize_topic(&"x".repeat(MAX_TOPIC_BYTES + 1)).is_err());
        assert!(normalize_topic("a\0b").is_err());
        assert!(normalize_topic("news\r\nx").is_err());
        assert_eq!(normalize_topic("nouvelles/été ☀"), Ok("nouvelles/été ☀"));
    }

    #[test]
    fn ids_are_printable_and_bounded() {
        assert!(check_id("user", "alice").is_ok());
        assert!(check_id("user", "Zoë 🚀 #1").is_ok());
        assert!(check_id("user", &"x".repeat(MAX_ID_BYTES)).is_ok());
        assert_eq!(
            check_id("user", ""),
            Err("user must be 1 to 255 bytes, not 0".to_string())
        );
        assert!(check_id("user", &"x".repeat(MAX_ID_BYTES + 1)).is_err());
        assert_eq!(
            check_id("user", "al\nice"),
            Err("user must be printable text: U+000A at byte 2 is a control character".to_string())
        );
        for bad in [
            "a\0",
            "a\r",
            "\t",
            "a\u{1b}[31m",
            "a\u{7f}",
            "a\u{85}",
            "a\u{2028}b",
        ] {
            assert!(check_id("device", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_op_byte_round_trips() {
        for byte in 0..=255u8 {
            match Op::from_u8(byte) {
                Some(op) => assert_eq!(op as u8, byte),
                None => assert!(byte == 0 || byte > 15),
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small deterministic xorshift stream: the decoder must return frames,
        // errors or Incomplete, and never panic or over-read.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let (mut frames, mut incomplete, mut errors) = (0, 0, 0);
        for _ in 0..20_000 {
            let len = (state % 64) as usize;
            let mut data = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                data.push(state as u8);
            }
            // Steer a share of the inputs past each header check in turn, so
            // every path (frame, incomplete, each error) is exercised.
            let steer = data.first().copied().unwrap_or(0) % 4;
            if data.len() >= HEADER_LEN && steer > 0 {
                data[4] = VERSION;
                data[5] = 1 + data[5] % 13;
                if steer > 1 {
                    let body_len =
                        ((data.len() - HEADER_LEN) as u32).saturating_sub(u32::from(steer == 2));
                    data[0..4].copy_from_slice(&body_len.to_be_bytes());
                }
            }
            let mut buf = BytesMut::from(&data[..]);
            loop {
                match decode_frame(&mut buf, 1024) {
                    Ok(Decoded::Frame(frame)) => {
                        frames += 1;
                        assert!(frame.body.len() <= 1024);
                        let _ = frame.decode::<msg::Auth>();
                    }
                    Ok(Decoded::Incomplete { needed }) => {
                        assert!(needed > 0);
                        incomplete += 1;
                        break;
                    }
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
        }
        assert!(
            frames > 0 && incomplete > 0 && errors > 0,
            "{frames} {incomplete} {errors}"
        );
    }
}
