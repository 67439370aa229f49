//! The fuzz targets of the device frame codec, as plain functions.
//!
//! This one file is compiled twice: by the cargo-fuzz crate in `fuzz/` (whose
//! libFuzzer targets only call these functions) and, through `#[path]`, by the
//! end-to-end test `tests/tests/fuzz_room.rs`, which runs the same functions
//! over generated inputs on the stable toolchain so CI exercises them too.
//! It depends only on `pushgrid_wire`, `bytes` and `prost`.
//!
//! Every function panics (through `assert!`) when an invariant is broken;
//! that is what the fuzzer reports as a crash.

use bytes::{Bytes, BytesMut};
use prost::Message;
use pushgrid_wire::{Decoded, FrameError, HEADER_LEN, Op, decode_frame, msg, parse_header};

/// Body limits a fuzz input may pick with its first byte: zero, tiny, the
/// pre-AUTH default, the post-AUTH default.
pub const LIMITS: [u32; 4] = [
    0,
    16,
    pushgrid_wire::DEFAULT_PRE_AUTH_MAX_BODY,
    pushgrid_wire::DEFAULT_MAX_BODY,
];

/// What one input did to the decoder, for tests that count outcomes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub frames: u64,
    /// Frames whose body decoded as the message of their op.
    pub bodies_ok: u64,
    /// Frames whose body did not decode (`BAD_BODY` in a room).
    pub bodies_bad: u64,
    /// The input ended inside a frame (or exactly between frames).
    pub incomplete: u64,
    /// The input ended with a refused header.
    pub header_errors: u64,
}

impl Outcome {
    pub fn add(&mut self, other: Outcome) {
        self.frames += other.frames;
        self.bodies_ok += other.bodies_ok;
        self.bodies_bad += other.bodies_bad;
        self.incomplete += other.incomplete;
        self.header_errors += other.header_errors;
    }
}

/// Decodes `body` as the message `M`; when it decodes, encoding it again and
/// decoding that must give the same message (prost's encoding is canonical for
/// a decoded value), and `encoded_len` must match what `encode` writes.
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(body: &[u8]) -> bool {
    let Ok(message) = M::decode(body) else {
        return false;
    };
    let encoded = message.encode_to_vec();
    assert_eq!(
        encoded.len(),
        message.encoded_len(),
        "encoded_len disagrees"
    );
    let again = M::decode(&encoded[..]).expect("a re-encoded message decodes");
    assert_eq!(again, message, "decode(encode(m)) != m");
    assert_eq!(again.encode_to_vec(), encoded, "encoding is not stable");
    true
}

/// Decodes a frame body as the message its op carries (both directions: a
/// device SDK decodes the server's ops with the same codec). PING and PONG
/// carry no message; any body is accepted and ignored, as a room does.
pub fn decode_body(op: Op, body: &[u8]) -> bool {
    match op {
        Op::Auth => round_trip::<msg::Auth>(body),
        Op::AuthOk => round_trip::<msg::AuthOk>(body),
        Op::Ping | Op::Pong => true,
        Op::Push => round_trip::<msg::Push>(body),
        Op::Ack => round_trip::<msg::Ack>(body),
        Op::Upstream => round_trip::<msg::Upstream>(body),
        Op::UpstreamOk => round_trip::<msg::UpstreamOk>(body),
        Op::Sub => round_trip::<msg::Sub>(body),
        Op::SubOk => round_trip::<msg::SubOk>(body),
        Op::Unsub => round_trip::<msg::Unsub>(body),
        Op::Kick => round_trip::<msg::Kick>(body),
        Op::Error => round_trip::<msg::Error>(body),
        Op::PushToken => round_trip::<msg::PushToken>(body),
        Op::PushTokenOk => round_trip::<msg::PushTokenOk>(body),
    }
}

/// One step of the decoder on `buf`, with every invariant of its contract
/// checked. Returns the frame, `None` for incomplete, or the error.
fn checked_step(
    buf: &mut BytesMut,
    max_body: u32,
) -> Result<Option<pushgrid_wire::Frame>, FrameError> {
    let before: Bytes = Bytes::copy_from_slice(buf);
    match decode_frame(buf, max_body) {
        Ok(Decoded::Frame(frame)) => {
            let header =
                parse_header(&before, max_body).expect("a decoded frame has a valid header");
            assert_eq!(frame.op, header.op);
            assert_eq!(frame.seq, header.seq);
            assert_eq!(frame.flags, header.flags);
            assert_eq!(frame.body.len(), header.body_len as usize);
            assert!(frame.body.len() <= max_body as usize, "body over the limit");
            assert_eq!(
                &frame.body[..],
                &before[HEADER_LEN..HEADER_LEN + frame.body.len()]
            );
            assert_eq!(
                &buf[..],
                &before[HEADER_LEN + frame.body.len()..],
                "consumed more or less than one frame"
            );
            Ok(Some(frame))
        }
        Ok(Decoded::Incomplete { needed }) => {
            assert!(needed > 0, "incomplete with nothing needed");
            assert_eq!(
                &buf[..],
                &before[..],
                "incomplete must leave the buffer untouched"
            );
            if before.len() < HEADER_LEN {
                assert_eq!(needed, HEADER_LEN - before.len());
            } else {
                let header =
                    parse_header(&before, max_body).expect("incomplete after a valid header");
                assert_eq!(needed, HEADER_LEN + header.body_len as usize - before.len());
            }
            Ok(None)
        }
        Err(error) => {
            assert!(before.len() >= HEADER_LEN, "an error before a whole header");
            assert_eq!(
                parse_header(&before, max_body),
                Err(error.clone()),
                "error not from the header"
            );
            // Refused on the header alone: nothing was reserved for the body.
            assert!(buf.len() == before.len());
            let _ = error.code();
            let _ = error.to_string();
            Err(error)
        }
    }
}

/// Decodes a whole input in one buffer; also returns the frames, for
/// comparison with a chunked read.
fn decode_all(
    stream: &[u8],
    max_body: u32,
) -> (Outcome, Vec<pushgrid_wire::Frame>, Option<FrameError>) {
    let mut outcome = Outcome::default();
    let mut frames = Vec::new();
    let mut buf = BytesMut::from(stream);
    loop {
        match checked_step(&mut buf, max_body) {
            Ok(Some(frame)) => {
                outcome.frames += 1;
                if decode_body(frame.op, &frame.body) {
                    outcome.bodies_ok += 1;
                } else {
                    outcome.bodies_bad += 1;
                    // The room's path: the error names the op and maps to BAD_BODY.
                    if let Err(error) = frame.decode::<msg::Auth>() {
                        assert_eq!(error.code(), msg::ErrorCode::BadBody);
                    }
                }
                frames.push(frame);
            }
            Ok(None) => {
                outcome.incomplete += 1;
                return (outcome, frames, None);
            }
            Err(error) => {
                outcome.header_errors += 1;
                return (outcome, frames, Some(error));
            }
        }
    }
}

/// Target `frame_decoder`. The first byte picks the body limit and a chunk
/// size; the rest is a byte stream from a device. The stream is decoded in
/// one buffer and again as it would arrive over TCP in chunks (the way a room
/// reads), and both must give the same frames and the same end.
pub fn frame_decoder(data: &[u8]) -> Outcome {
    let Some((&control, stream)) = data.split_first() else {
        return Outcome::default();
    };
    let max_body = LIMITS[usize::from(control & 3)];
    let chunk = 1 + usize::from(control >> 2); // 1..=64 bytes per read
    let (outcome, frames, error) = decode_all(stream, max_body);

    let mut chunked_frames = Vec::new();
    let mut chunked_error = None;
    let mut buf = BytesMut::new();
    'reads: for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match checked_step(&mut buf, max_body) {
                Ok(Some(frame)) => chunked_frames.push(frame),
                Ok(None) => break,
                Err(error) => {
                    chunked_error = Some(error);
                    break 'reads;
                }
            }
        }
    }
    assert_eq!(chunked_frames, frames, "chunked reads gave other frames");
    assert_eq!(chunked_error, error, "chunked reads ended otherwise");
    outcome
}

/// Target `message_decoders`. The first byte picks one of the fifteen ops;
/// the rest is decoded as that op's body (and, to reach every decoder from
/// every input, as each of the message types). Returns how many decoded.
pub fn message_decoders(data: &[u8]) -> u32 {
    let Some((&selector, body)) = data.split_first() else {
        return 0;
    };
    let mut decoded = 0;
    if let Some(op) = Op::from_u8(1 + selector % 15) {
        // Through the codec's own entry point, as the room calls it.
        let frame = pushgrid_wire::Frame {
            op,
            flags: 0,
            seq: 0,
            body: Bytes::copy_from_slice(body),
        };
        let through_frame = match op {
            Op::Auth => frame.decode::<msg::Auth>().is_ok(),
            Op::Ack => frame.decode::<msg::Ack>().is_ok(),
            Op::Upstream => frame.decode::<msg::Upstream>().is_ok(),
            Op::Sub => frame.decode::<msg::Sub>().is_ok(),
            Op::Unsub => frame.decode::<msg::Unsub>().is_ok(),
            Op::PushToken => frame.decode::<msg::PushToken>().is_ok(),
            _ => decode_body(op, body),
        };
        assert_eq!(
            through_frame,
            decode_body(op, body),
            "Frame::decode and prost disagree"
        );
    }
    for op_byte in 1..=15u8 {
        if let Some(op) = Op::from_u8(op_byte)
            && decode_body(op, body)
        {
            decoded += 1;
        }
    }
    decoded
}
