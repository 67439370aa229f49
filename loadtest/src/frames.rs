//! Frame helpers for the load generator's own lean connections: frames are cut
//! straight out of the bytes just read, and only a partial frame is copied into
//! a per-connection carry buffer (empty, and unallocated, almost always).

use pushgrid_wire::{FrameError, HEADER_LEN, Op, parse_header};

/// Cuts every whole frame out of `carry` + `data`, calling `on_frame` for each;
/// a trailing partial frame is left in `carry`.
pub fn take_frames(
    carry: &mut Vec<u8>,
    data: &[u8],
    max_body: u32,
    mut on_frame: impl FnMut(Op, u32, &[u8]),
) -> Result<(), FrameError> {
    if carry.is_empty() {
        let used = cut(data, max_body, &mut on_frame)?;
        if used < data.len() {
            carry.extend_from_slice(&data[used..]);
        }
        return Ok(());
    }
    carry.extend_from_slice(data);
    let used = cut(carry, max_body, &mut on_frame)?;
    carry.drain(..used);
    if carry.is_empty() {
        // Give the memory back: idle connections must stay small.
        *carry = Vec::new();
    }
    Ok(())
}

fn cut(
    mut bytes: &[u8],
    max_body: u32,
    on_frame: &mut impl FnMut(Op, u32, &[u8]),
) -> Result<usize, FrameError> {
    let total = bytes.len();
    while bytes.len() >= HEADER_LEN {
        let header = parse_header(bytes, max_body)?;
        let frame_len = HEADER_LEN + header.body_len as usize;
        if bytes.len() < frame_len {
            break;
        }
        on_frame(header.op, header.seq, &bytes[HEADER_LEN..frame_len]);
        bytes = &bytes[frame_len..];
    }
    Ok(total - bytes.len())
}

/// The payload the coordinator pushes: the send time in unix microseconds, a
/// space, and padding.
pub fn payload(send_unix_us: u64, size: usize) -> String {
    let mut text = send_unix_us.to_string();
    text.push(' ');
    while text.len() < size {
        text.push('x');
    }
    text
}

/// Reads the send time back out of a payload.
/// A payload that also names the call that pushed it: the send time, a
/// space, `c<call>`, a space, and padding (`call_tag` reads it back).
pub fn tagged_payload(send_unix_us: u64, call: u64, size: usize) -> String {
    let mut text = format!("{send_unix_us} c{call} ");
    while text.len() < size {
        text.push('x');
    }
    text
}

/// The call named by a [`tagged_payload`], 0 for any other payload.
pub fn call_tag(payload: &[u8]) -> u64 {
    let mut words = payload.split(|byte| *byte == b' ');
    words
        .nth(1)
        .and_then(|word| word.strip_prefix(b"c"))
        .and_then(|digits| std::str::from_utf8(digits).ok()?.parse().ok())
        .unwrap_or(0)
}

pub fn sent_us(payload: &[u8]) -> Option<u64> {
    let end = payload
        .iter()
        .position(|byte| *byte == b' ')
        .unwrap_or(payload.len());
    std::str::from_utf8(&payload[..end]).ok()?.parse().ok()
}

pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use pushgrid_wire::{encode, msg};

    #[test]
    fn a_tagged_payload_names_its_call_and_its_send_time() {
        let tagged = tagged_payload(1_700_000_000_000_123, 42, 64);
        assert_eq!(tagged.len(), 64);
        assert_eq!(call_tag(tagged.as_bytes()), 42);
        assert_eq!(sent_us(tagged.as_bytes()), Some(1_700_000_000_000_123));
        assert_eq!(call_tag(payload(5, 64).as_bytes()), 0);
        assert_eq!(call_tag(b"5 cx y"), 0);
        assert_eq!(call_tag(b""), 0);
    }

    #[test]
    fn frames_split_anywhere_are_reassembled() {
        let mut stream = Vec::new();
        for id in 0..20u64 {
            let push = msg::Push {
                msg_id: id,
                payload: payload(1_000 + id, 40 + id as usize).into_bytes().into(),
                ..Default::default()
            };
            stream.extend_from_slice(&encode(Op::Push, id as u32, &push));
        }
        for chunk in [1usize, 5, 12, 13, 64, 1000, 4096] {
            let mut carry = Vec::new();
            let mut seen = Vec::new();
            for piece in stream.chunks(chunk) {
                take_frames(&mut carry, piece, 1024, |op, _, body| {
                    assert_eq!(op, Op::Push);
                    let push: msg::Push = prost::Message::decode(body).unwrap();
                    assert_eq!(sent_us(&push.payload), Some(1_000 + push.msg_id));
                    seen.push(push.msg_id);
                })
                .unwrap();
            }
            assert_eq!(seen, (0..20).collect::<Vec<_>>(), "chunk {chunk}");
            assert!(carry.is_empty() && carry.capacity() == 0);
        }
    }

    #[test]
    fn a_bad_header_is_an_error() {
        let mut carry = Vec::new();
        let garbage = [0u8, 0, 0, 0, 9, 1, 0, 0, 0, 0, 0, 0];
        assert!(take_frames(&mut carry, &garbage, 1024, |_, _, _| {}).is_err());
    }

    #[test]
    fn payload_round_trip() {
        assert_eq!(payload(42, 0), "42 ");
        assert_eq!(payload(42, 10).len(), 10);
        assert_eq!(sent_us(b"123"), Some(123));
        assert_eq!(sent_us(b"nope"), None);
    }
}
