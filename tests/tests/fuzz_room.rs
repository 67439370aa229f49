//! Fuzzing on the stable toolchain: the cargo-fuzz target functions over
//! generated inputs, at least 100,000 random and mutated frames fed to a live
//! room (checked frame by frame against a model of the protocol), and the
//! HTTP push API fed malformed, mistyped, oversize and mutated JSON.
//!
//! The seed is printed; `PUSHGRID_FUZZ_SEED=<n>` replays a run.
#![allow(clippy::unwrap_used)]

#[path = "../../fuzz/src/targets.rs"]
mod targets;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use pushgrid_e2e::{ClusterOptions, TestCluster, metric, next_push};
use pushgrid_wire::{Decoded, HEADER_LEN, Op, decode_frame, encode, encode_empty, msg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

const PRE_AUTH_MAX_BODY: u32 = pushgrid_wire::DEFAULT_PRE_AUTH_MAX_BODY;
const MAX_BODY: u32 = pushgrid_wire::DEFAULT_MAX_BODY;

fn seed() -> u64 {
    let seed = std::env::var("PUSHGRID_FUZZ_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(rand::random::<u64>)
        | 1;
    println!("fuzz seed {seed} (PUSHGRID_FUZZ_SEED={seed} replays it)");
    seed
}

/// xorshift64*: small, fast, reproducible from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound.max(1) as u64) as usize
    }
    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
    /// `min` to `min + spread - 1` random bytes.
    fn bytes_up_to(&mut self, min: usize, spread: usize) -> Vec<u8> {
        let len = min + self.below(spread);
        self.bytes(len)
    }
    fn text(&mut self, max: usize) -> String {
        const CHARS: &[u8] = b"abcxyz019/_.-:\0 \xc3";
        let len = self.below(max + 1);
        let raw: Vec<u8> = (0..len).map(|_| CHARS[self.below(CHARS.len())]).collect();
        String::from_utf8_lossy(&raw).into_owned()
    }
}

/// A well-formed frame of `op` with a random body of the right message type.
fn valid_frame(rng: &mut Rng, op: Op, token: &str) -> Vec<u8> {
    let seq = rng.next() as u32;
    let frame = match op {
        Op::Auth => encode(
            op,
            seq,
            &msg::Auth {
                token: token.to_string(),
                device_id: rng.text(12),
                platform: rng.text(8),
            },
        ),
        Op::AuthOk => encode(
            op,
            seq,
            &msg::AuthOk {
                conn_id: rng.next(),
                heartbeat_secs: rng.next() as u32,
                server_time_ms: rng.next(),
            },
        ),
        Op::Ping | Op::Pong => {
            if rng.chance(80) {
                encode_empty(op, seq)
            } else {
                // A body the room must skip: PING and PONG carry none.
                let body = rng.bytes_up_to(0, 2048);
                let mut frame = BytesMut::new();
                header(
                    &mut frame,
                    body.len() as u32,
                    1,
                    op as u8,
                    rng.next() as u16,
                    seq,
                );
                frame.put_slice(&body);
                frame.freeze()
            }
        }
        Op::Push => encode(
            op,
            seq,
            &msg::Push {
                msg_id: rng.next(),
                payload: rng.bytes_up_to(0, 64).into(),
                ..Default::default()
            },
        ),
        Op::Ack => encode(
            op,
            seq,
            &msg::Ack {
                msg_ids: (0..rng.below(4)).map(|_| rng.next()).collect(),
            },
        ),
        Op::Upstream => encode(
            op,
            seq,
            &msg::Upstream {
                product: rng.text(8),
                r#type: rng.text(8),
                client_msg_id: rng.text(8),
                payload: rng.bytes_up_to(0, 64).into(),
            },
        ),
        Op::UpstreamOk => encode(
            op,
            seq,
            &msg::UpstreamOk {
                client_msg_id: rng.text(8),
            },
        ),
        Op::Sub => encode(
            op,
            seq,
            &msg::Sub {
                topic: format!("fuzz{}", rng.below(8)),
                since_offset: rng.next() % 4,
                epoch: rng.next() % 2,
            },
        ),
        Op::SubOk => encode(op, seq, &msg::SubOk::default()),
        Op::Unsub => encode(
            op,
            seq,
            &msg::Unsub {
                topic: rng.text(16),
            },
        ),
        Op::Kick => encode(op, seq, &msg::Kick::default()),
        Op::Error => encode(op, seq, &msg::Error::default()),
        // Valid half the time: an FCM-looking token, or text that may break a rule.
        Op::PushToken => encode(
            op,
            seq,
            &msg::PushToken {
                provider: ["fcm", "hms", "apns", "gcm"][rng.below(4)].into(),
                token: rng.text(16),
                bundle: "com.example.fuzz".into(),
            },
        ),
        Op::PushTokenOk => encode(op, seq, &msg::PushTokenOk::default()),
    };
    frame.to_vec()
}

fn header(dst: &mut BytesMut, body_len: u32, version: u8, op: u8, flags: u16, seq: u32) {
    dst.put_u32(body_len);
    dst.put_u8(version);
    dst.put_u8(op);
    dst.put_u16(flags);
    dst.put_u32(seq);
}

fn any_op(rng: &mut Rng) -> Op {
    Op::from_u8(1 + rng.below(13) as u8).unwrap()
}

/// Mutates one encoded frame in one of the ways a broken or hostile device
/// would: flipped bits, a wrong length, a bad version or op, a garbage body,
/// an oversize claim. `last` allows truncation (the stream ends there).
fn mutate(rng: &mut Rng, frame: &mut Vec<u8>, max_body: u32, last: bool) {
    match rng.below(if last { 9 } else { 8 }) {
        0 => {
            for _ in 0..1 + rng.below(3) {
                let bit = rng.below(frame.len() * 8);
                frame[bit / 8] ^= 1 << (bit % 8);
            }
        }
        1 => {
            let len = u32::from_be_bytes(frame[0..4].try_into().unwrap());
            let wrong = match rng.below(4) {
                0 => len.wrapping_add(1 + rng.below(3) as u32),
                1 => len.saturating_sub(1 + rng.below(3) as u32),
                2 => rng.next() as u32,
                _ => 0,
            };
            frame[0..4].copy_from_slice(&wrong.to_be_bytes());
        }
        2 => frame[4] = [0, 2, 9, 255][rng.below(4)],
        3 => frame[5] = [0, 14, 99, 255][rng.below(4)],
        4 | 5 => {
            // Valid header, garbage body of a fitting length.
            let body = rng.bytes_up_to(0, 48);
            frame.truncate(HEADER_LEN);
            frame[0..4].copy_from_slice(&(body.len() as u32).to_be_bytes());
            frame.extend_from_slice(&body);
        }
        6 => {
            let claim = max_body + 1 + (rng.next() as u32 % 1024);
            let claim = if rng.chance(30) { u32::MAX } else { claim };
            frame[0..4].copy_from_slice(&claim.to_be_bytes());
            frame.truncate(HEADER_LEN);
        }
        7 => {
            let garbage = rng.bytes_up_to(1, 40);
            let at = rng.below(frame.len() + 1);
            frame.splice(at..at, garbage);
        }
        _ => {
            let keep = rng.below(frame.len());
            frame.truncate(keep);
        }
    }
}

#[test]
fn the_codec_fuzz_targets_hold_over_generated_inputs() {
    let mut rng = Rng(seed());
    let mut outcome = targets::Outcome::default();
    let mut message_decoded = 0u64;
    const INPUTS: usize = 150_000;
    let started = Instant::now();
    for index in 0..INPUTS {
        let mut input = vec![rng.next() as u8];
        if rng.chance(70) {
            input[0] |= 2; // mostly the real limits (1 KiB, 64 KiB), not 0 or 16
        }
        match index % 3 {
            0 => {
                let len = rng.below(96);
                input.extend(rng.bytes(len));
            }
            _ => {
                for position in 0..1 + rng.below(5) {
                    let op = any_op(&mut rng);
                    let mut frame = valid_frame(&mut rng, op, "t.o.k");
                    if rng.chance(50) {
                        mutate(
                            &mut rng,
                            &mut frame,
                            targets::LIMITS[usize::from(input[0] & 3)],
                            position > 2,
                        );
                    }
                    input.extend(frame);
                }
            }
        }
        outcome.add(targets::frame_decoder(&input));
        // The message decoders: a frame body (mutated or not) after an op selector.
        let op = any_op(&mut rng);
        let mut body = valid_frame(&mut rng, op, "t.o.k")[HEADER_LEN..].to_vec();
        if rng.chance(60) && !body.is_empty() {
            for _ in 0..1 + rng.below(3) {
                let bit = rng.below(body.len() * 8);
                body[bit / 8] ^= 1 << (bit % 8);
            }
        }
        let mut selector_and_body = vec![(op as u8).wrapping_sub(1)];
        selector_and_body.extend(body);
        message_decoded += u64::from(targets::message_decoders(&selector_and_body));
    }
    println!(
        "{INPUTS} inputs in {:?}: {outcome:?}, {message_decoded} message decodes",
        started.elapsed()
    );
    // Every path was reached: frames with good and bad bodies, streams that
    // end inside a frame and streams refused on a header.
    assert!(outcome.frames > 0 && outcome.bodies_ok > 0 && outcome.bodies_bad > 0);
    assert!(outcome.incomplete > 0 && outcome.header_errors > 0);
    assert!(message_decoded > 0);
}

/// What the room must do with one session's bytes, computed by a model of
/// the protocol (the codec plus the room's rules from DESIGN.md).
#[derive(Debug, Default)]
struct Expected {
    /// The AUTH frame (its bytes) is answered with AUTH_OK.
    auth_len: Option<usize>,
    pongs: usize,
    /// The ERROR code the room closes with; `None`: it closes without one.
    close: Option<msg::ErrorCode>,
    /// Frames the room reads up to and including the one it closes on.
    processed: u64,
    subs: usize,
    upstreams: usize,
    push_tokens: usize,
    refused_before_auth: u64,
    frame_errors_after_auth: u64,
}

/// The room refuses a device id (the token's, or "default", when the device
/// sends none) or a platform that is not printable text (crates/wire).
fn printable_identity(auth: &msg::Auth) -> bool {
    let device = if auth.device_id.is_empty() {
        "default"
    } else {
        &auth.device_id
    };
    pushgrid_wire::check_id("", device).is_ok()
        && auth.platform.len() <= pushgrid_wire::MAX_ID_BYTES
        && pushgrid_wire::check_text("", &auth.platform).is_ok()
}

fn model(stream: &[u8], valid_token: &str) -> Expected {
    let mut expected = Expected::default();
    let mut buf = BytesMut::from(stream);
    match decode_frame(&mut buf, PRE_AUTH_MAX_BODY) {
        Err(error) => {
            expected.processed = 1;
            expected.close = Some(error.code());
            expected.refused_before_auth = 1;
            return expected;
        }
        Ok(Decoded::Incomplete { .. }) => return expected,
        Ok(Decoded::Frame(frame)) => {
            expected.processed = 1;
            let refused = if frame.op != Op::Auth {
                Some(msg::ErrorCode::AuthRequired)
            } else {
                match frame.decode::<msg::Auth>() {
                    Err(_) => Some(msg::ErrorCode::BadBody),
                    Ok(auth) if auth.token == valid_token && printable_identity(&auth) => None,
                    Ok(_) => Some(msg::ErrorCode::AuthFailed),
                }
            };
            if refused.is_some() {
                expected.close = refused;
                expected.refused_before_auth = 1;
                return expected;
            }
            expected.auth_len = Some(stream.len() - buf.len());
        }
    }
    loop {
        let frame = match decode_frame(&mut buf, MAX_BODY) {
            Err(error) => {
                expected.processed += 1;
                expected.frame_errors_after_auth += 1;
                expected.close = Some(error.code());
                return expected;
            }
            Ok(Decoded::Incomplete { .. }) => return expected,
            Ok(Decoded::Frame(frame)) => frame,
        };
        expected.processed += 1;
        let decodes = targets::decode_body(frame.op, &frame.body);
        match frame.op {
            Op::Ping => expected.pongs += 1,
            Op::Pong => {}
            Op::Ack | Op::Unsub | Op::Upstream | Op::Sub if !decodes => {
                expected.close = Some(msg::ErrorCode::BadBody);
                return expected;
            }
            Op::Ack | Op::Unsub => {}
            Op::PushToken => match frame.decode::<msg::PushToken>() {
                Ok(token)
                    if pushgrid_wire::check_push_token(
                        &token.provider,
                        &token.token,
                        &token.bundle,
                    )
                    .is_ok() =>
                {
                    expected.push_tokens += 1;
                }
                _ => {
                    expected.close = Some(msg::ErrorCode::BadBody);
                    return expected;
                }
            },
            Op::Upstream => expected.upstreams += 1,
            Op::Sub => expected.subs += 1,
            _ => {
                expected.close = Some(msg::ErrorCode::UnknownOp);
                return expected;
            }
        }
    }
}

/// What came back from the room.
#[derive(Debug, Default)]
struct Observed {
    frames: Vec<(Op, Option<msg::ErrorCode>)>,
    /// The stream ended inside a frame (or could not be read).
    broken: Option<String>,
}

async fn read_all(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    observed: &mut Observed,
    until_one: bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        loop {
            match decode_frame(buf, MAX_BODY) {
                Ok(Decoded::Frame(frame)) => {
                    let code = (frame.op == Op::Error)
                        .then(|| frame.decode::<msg::Error>().map(|error| error.code()).ok())
                        .flatten();
                    observed.frames.push((frame.op, code));
                    if until_one {
                        return;
                    }
                }
                Ok(Decoded::Incomplete { .. }) => break,
                Err(error) => {
                    observed.broken = Some(format!("the room sent an undecodable frame: {error}"));
                    return;
                }
            }
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Ok(Ok(0)) => {
                if !buf.is_empty() {
                    observed.broken = Some(format!("closed inside a frame ({} bytes)", buf.len()));
                }
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                observed.broken = Some(format!("read failed: {error}"));
                return;
            }
            Err(_) => {
                observed.broken = Some("no close within 15 s".into());
                return;
            }
        }
    }
}

/// Sends one session's bytes (all at once when `pipelined`, else AUTH first,
/// waiting for AUTH_OK when the model says it succeeds), shuts down the write
/// half and reads until the close.
async fn run_session(
    room: &str,
    stream_bytes: &[u8],
    expected: &Expected,
    pipelined: bool,
) -> Observed {
    let mut observed = Observed::default();
    let mut stream = match TcpStream::connect(room).await {
        Ok(stream) => stream,
        Err(error) => {
            observed.broken = Some(format!("connect: {error}"));
            return observed;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(4096);
    let mut rest = stream_bytes;
    if let Some(auth_len) = expected.auth_len
        && !pipelined
    {
        let _ = stream.write_all(&stream_bytes[..auth_len]).await;
        read_all(&mut stream, &mut buf, &mut observed, true).await;
        rest = &stream_bytes[auth_len..];
    }
    // The room may close while this is written (it drains input politely).
    let _ = stream.write_all(rest).await;
    let _ = stream.shutdown().await;
    read_all(&mut stream, &mut buf, &mut observed, false).await;
    observed
}

/// Compares what the room did with what the model says; `Err` describes the difference.
fn check(expected: &Expected, observed: &Observed) -> Result<(), String> {
    if let Some(broken) = &observed.broken {
        return Err(broken.clone());
    }
    let mut frames = observed.frames.iter();
    if expected.auth_len.is_some() {
        match frames.next() {
            Some((Op::AuthOk, _)) => {}
            other => return Err(format!("expected AUTH_OK, got {other:?}")),
        }
    }
    let rest: Vec<_> = frames.collect();
    let (body, last) = match expected.close {
        Some(code) => match rest.split_last() {
            Some((last, body)) if *last == &(Op::Error, Some(code)) => (body, Some(last)),
            _ => return Err(format!("expected a closing ERROR {code:?}, got {rest:?}")),
        },
        None => (&rest[..], None),
    };
    let _ = last;
    let pongs = body.iter().filter(|(op, _)| *op == Op::Pong).count();
    if pongs != expected.pongs {
        return Err(format!("expected {} PONGs, got {pongs}", expected.pongs));
    }
    for (op, code) in body {
        let allowed = match op {
            Op::Pong => true,
            Op::SubOk => expected.subs > 0,
            Op::UpstreamOk => expected.upstreams > 0,
            Op::PushTokenOk => expected.push_tokens > 0,
            Op::Error => match code {
                Some(msg::ErrorCode::BadBody) => expected.subs > 0,
                Some(msg::ErrorCode::Unavailable) => expected.subs + expected.push_tokens > 0,
                Some(msg::ErrorCode::UpstreamFailed) => expected.upstreams > 0,
                _ => false,
            },
            _ => false,
        };
        if !allowed {
            return Err(format!("unexpected {op:?} {code:?} in {rest:?}"));
        }
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    sessions: u64,
    authenticated: u64,
    frames_written: u64,
    frames_processed: u64,
    pongs: u64,
    refused_before_auth: u64,
    frame_errors_after_auth: u64,
    closes_with_error: BTreeMap<String, u64>,
    closes_without_error: u64,
    failures: Vec<String>,
}

/// One session: a first frame (mostly a valid AUTH) and a burst of frames,
/// some of them mutated. Returns the bytes and the number of frames in them.
fn session(rng: &mut Rng, token: &str, sweep: Option<(bool, u8)>) -> (Vec<u8>, u64) {
    let mut stream = Vec::new();
    let mut frames = 0u64;
    // Every op byte (0..=15) as the first frame, and as the only frame after AUTH.
    if let Some((after_auth, op_byte)) = sweep {
        if after_auth {
            stream.extend(valid_frame(rng, Op::Auth, token));
            frames += 1;
        }
        match Op::from_u8(op_byte) {
            Some(op) => stream.extend(valid_frame(rng, op, token)),
            None => {
                let mut frame = BytesMut::new();
                header(&mut frame, 0, 1, op_byte, 0, 7);
                stream.extend_from_slice(&frame);
            }
        }
        return (stream, frames + 1);
    }
    let first = match rng.below(100) {
        0..70 => valid_frame(rng, Op::Auth, token),
        70..82 => {
            let mut auth = valid_frame(rng, Op::Auth, token);
            mutate(rng, &mut auth, PRE_AUTH_MAX_BODY, false);
            auth
        }
        82..90 => {
            let op = any_op(rng);
            valid_frame(rng, op, token)
        }
        _ => rng.bytes_up_to(1, 64),
    };
    stream.extend(first);
    frames += 1;
    let burst = 20 + rng.below(100);
    for position in 0..burst {
        let op = match rng.below(100) {
            0..55 => Op::Ping,
            55..65 => Op::Pong,
            65..80 => Op::Ack,
            80..92 => Op::Unsub,
            92..96 => Op::Sub,
            96..99 => Op::Upstream,
            _ => any_op(rng),
        };
        let mut frame = valid_frame(rng, op, token);
        // Most bursts are clean; some carry one or more mutated frames.
        if rng.chance(2) {
            mutate(rng, &mut frame, MAX_BODY, position + 1 == burst);
        }
        stream.extend(frame);
        frames += 1;
    }
    (stream, frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_room_survives_150k_random_and_mutated_frames() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let room = cluster.room_addr(0);
    let base_seed = seed();
    const TARGET_PROCESSED: u64 = 150_000;
    const WORKERS: u64 = 24;
    let processed = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();

    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let (room, processed, tally) = (room.clone(), processed.clone(), tally.clone());
        let app = cluster.app.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(base_seed ^ (worker + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut index = 0u64;
            loop {
                // The op sweep first (worker 0), then random sessions.
                let sweep = (worker == 0 && index < 32).then_some((index >= 16, index as u8 % 16));
                if sweep.is_none() && processed.load(Ordering::Relaxed) >= TARGET_PROCESSED {
                    return;
                }
                let token = app.token(&format!("fuzz{worker}-{}", index % 50));
                let (bytes, frames) = session(&mut rng, &token, sweep);
                let expected = model(&bytes, &token);
                let pipelined = rng.chance(50);
                let observed = run_session(&room, &bytes, &expected, pipelined).await;
                processed.fetch_add(expected.processed, Ordering::Relaxed);
                let mut tally = tally.lock().await;
                tally.sessions += 1;
                tally.frames_written += frames;
                tally.frames_processed += expected.processed;
                tally.pongs += observed
                    .frames
                    .iter()
                    .filter(|(op, _)| *op == Op::Pong)
                    .count() as u64;
                tally.authenticated += u64::from(expected.auth_len.is_some());
                tally.refused_before_auth += expected.refused_before_auth;
                tally.frame_errors_after_auth += expected.frame_errors_after_auth;
                match expected.close {
                    Some(code) => {
                        *tally
                            .closes_with_error
                            .entry(code.as_str_name().to_string())
                            .or_default() += 1
                    }
                    None => tally.closes_without_error += 1,
                }
                if let Err(difference) = check(&expected, &observed)
                    && tally.failures.len() < 10
                {
                    let hex: String = bytes
                        .iter()
                        .take(96)
                        .map(|byte| format!("{byte:02x}"))
                        .collect();
                    tally.failures.push(format!(
                        "worker {worker} session {index}: {difference}; stream {hex}..."
                    ));
                }
                index += 1;
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let elapsed = started.elapsed();
    let tally = tally.lock().await;
    println!(
        "{} sessions ({} authenticated) in {elapsed:?}: {} frames written, {} read by the room, {} PONGs",
        tally.sessions,
        tally.authenticated,
        tally.frames_written,
        tally.frames_processed,
        tally.pongs
    );
    println!(
        "closes with ERROR: {:?}; without: {}",
        tally.closes_with_error, tally.closes_without_error
    );
    assert!(
        tally.failures.is_empty(),
        "the room disagreed with the model:\n{}",
        tally.failures.join("\n")
    );
    assert!(tally.frames_processed >= TARGET_PROCESSED);

    // Still running, never panicked, and every refusal was counted.
    assert!(cluster.rooms[0].is_running(), "the room died");
    assert!(
        !cluster.rooms[0].log_text().contains("panicked"),
        "the room panicked"
    );
    let admin = cluster.rooms[0].addr("admin");
    assert_eq!(
        metric(admin, "pushgrid_room_refused_total", "").await as u64,
        tally.refused_before_auth,
        "refusals before AUTH counted"
    );
    assert_eq!(
        metric(admin, "pushgrid_room_frame_errors_total", "").await as u64,
        tally.frame_errors_after_auth,
        "bad headers after AUTH counted"
    );

    // A normal device still authenticates (also with frames pipelined behind
    // AUTH) and receives a push.
    check_pipelined_auth(&room, &cluster.app.token("pipelined")).await;
    let (mut device, _) = cluster.device("after-fuzz").await.unwrap();
    let ids = cluster
        .push(&["after-fuzz"], "still serving")
        .await
        .unwrap();
    assert_eq!(
        next_push(&mut device, Duration::from_secs(10))
            .await
            .unwrap()
            .msg_id,
        ids[0]
    );
    assert!(cluster.rooms[0].is_running());
    drop(tally);
    cluster.rooms[0].kill().await;
    cluster.cleanup().await;
}

/// A mutated variant of a JSON body: the mistakes a client (or an attacker) makes.
fn mutate_json(rng: &mut Rng, valid: &str) -> Vec<u8> {
    let mut body = valid.as_bytes().to_vec();
    match rng.below(10) {
        0 => {
            let at = rng.below(body.len());
            body.truncate(at);
        }
        1 => {
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(body.len());
                const BYTES: &[u8] = b"{}[]\",:0-eE.tfn\\ x\xff";
                body[at] = BYTES[rng.below(BYTES.len())];
            }
        }
        2 => {
            // A value of the wrong type.
            let text = valid.to_string();
            let wrong = [
                "1",
                "-1",
                "1e400",
                "true",
                "null",
                "[]",
                "{}",
                "\"s\"",
                "18446744073709551616",
                "[[[[]]]]",
            ][rng.below(10)];
            if let Some(colon) = text.find(':') {
                let end = text[colon..]
                    .find([',', '}'])
                    .map_or(text.len(), |end| colon + end);
                body = format!("{}{}{}", &text[..=colon], wrong, &text[end..]).into_bytes();
            }
        }
        3 => {
            let field = ["app", "colour", "users ", "USERS", "__proto__", ""][rng.below(6)];
            body = format!("{{\"{field}\":1,{}", &valid[1..]).into_bytes();
        }
        4 => body = "[".repeat(1 + rng.below(5000)).into_bytes(),
        5 => body = rng.bytes_up_to(0, 200),
        6 => body.clear(),
        7 => body = format!("{valid}{valid}").into_bytes(),
        8 => {
            let at = rng.below(body.len());
            body.splice(at..at, rng.bytes_up_to(1, 8));
        }
        _ => {
            // Duplicate keys and deep nesting inside a valid shape.
            body = format!("{{\"user\":\"a\",\"user\":\"b\",{}", &valid[1..]).into_bytes();
        }
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_answers_malformed_and_mutated_json_with_clear_errors() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let mut rng = Rng(seed());
    let center = cluster.center_url();
    let key = cluster.app.api_key.clone();
    let methods: [(&str, &str); 6] = [
        (
            "push",
            r#"{"users":["fz1","fz2"],"payload":"hi","ttl_secs":60}"#,
        ),
        ("broadcast", r#"{"topic":"fz","payload":"hi"}"#),
        ("kick", r#"{"user":"fz1","device":"d","reason":"r"}"#),
        ("presence", r#"{"user":"fz1"}"#),
        ("stats", "{}"),
        ("info", "{}"),
    ];
    // Each method's valid body is accepted as it is.
    for (method, body) in methods {
        let (status, answer) =
            post(&cluster, &center, method, &key, body.as_bytes().to_vec()).await;
        assert_eq!(status, 200, "{method}: {answer}");
    }

    const REQUESTS: usize = 10_000;
    let mut statuses: BTreeMap<(u16, String), u64> = BTreeMap::new();
    let started = Instant::now();
    for index in 0..REQUESTS {
        let (method, valid) = methods[index % methods.len()];
        let body = if index % 97 == 0 {
            // A body over max_request_bytes (1 MiB).
            format!(
                r#"{{"users":["a"],"payload":"{}"}}"#,
                "x".repeat(1024 * 1024 + rng.below(4096))
            )
            .into_bytes()
        } else {
            mutate_json(&mut rng, valid)
        };
        let (status, answer) = post(&cluster, &center, method, &key, body.clone()).await;
        let code = answer["error"]["code"].as_str().unwrap_or("").to_string();
        let shown = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
        match status {
            200 => assert!(answer.get("result").is_some(), "{method} {shown}: {answer}"),
            400 => assert_eq!(code, "bad_request", "{method} {shown}: {answer}"),
            413 => assert_eq!(code, "too_large", "{method} {shown}: {answer}"),
            other => panic!("{method} answered {other} to {shown:?}: {answer}"),
        }
        if status != 200 {
            let message = answer["error"]["message"].as_str().unwrap_or("");
            assert!(
                !message.is_empty(),
                "{method} {shown}: an error without a message: {answer}"
            );
        }
        if index % 97 == 0 {
            assert_eq!(status, 413, "{method}: a 1 MiB body");
        }
        *statuses.entry((status, code)).or_default() += 1;
    }
    println!(
        "{REQUESTS} mutated requests in {:?}: {statuses:?}",
        started.elapsed()
    );
    let bad = statuses
        .get(&(400, "bad_request".into()))
        .copied()
        .unwrap_or(0);
    let large = statuses
        .get(&(413, "too_large".into()))
        .copied()
        .unwrap_or(0);
    assert!(bad > 0 && large > 0);

    // Every refusal was counted by code.
    let admin = cluster.center.addr("admin");
    assert!(
        metric(
            admin,
            "pushgrid_center_api_errors_total",
            "code=\"bad_request\""
        )
        .await
            >= bad as f64
    );
    assert!(
        metric(
            admin,
            "pushgrid_center_api_errors_total",
            "code=\"too_large\""
        )
        .await
            >= large as f64
    );

    // Still serving.
    let (status, answer) = post(
        &cluster,
        &center,
        "push",
        &key,
        methods[0].1.as_bytes().to_vec(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(cluster.center.log_text().find("panicked").is_none());
    cluster.cleanup().await;
}

/// A body over `max_request_bytes` sent to `stats` or `info` (methods without
/// parameters) is answered 413 `too_large`, as every other method answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_bodies_to_stats_and_info_are_413() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let center = cluster.center_url();
    let key = cluster.app.api_key.clone();
    let huge = format!("{{\"padding\":\"{}\"}}", "x".repeat(2 * 1024 * 1024)).into_bytes();
    for method in ["stats", "info"] {
        let (status, answer) = post(&cluster, &center, method, &key, huge.clone()).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (413, Some("too_large")),
            "{method}: {answer}"
        );
    }
    cluster.cleanup().await;
}

async fn post(
    cluster: &TestCluster,
    center: &str,
    method: &str,
    key: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    // The server closes a connection whose oversize body it refused unread:
    // such a request gets a connection of its own, so the pool stays clean.
    let client = if body.len() > 1024 * 1024 {
        reqwest::Client::new()
    } else {
        cluster.http.clone()
    };
    let response = client
        .post(format!("{center}/api/{method}"))
        .header("Authorization", format!("apikey {key}"))
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|_| {
        panic!("{method} answered {status} with a body that is not JSON: {text:?}")
    });
    (status, value)
}

/// A device may pipeline frames behind AUTH in one write, without waiting for
/// AUTH_OK: the room answers them at once (the fuzz sessions do this too).
async fn check_pipelined_auth(room: &str, token: &str) {
    let mut stream = TcpStream::connect(room).await.unwrap();
    let auth = msg::Auth {
        token: token.to_string(),
        device_id: "pipelined-phone".into(),
        platform: "fuzz".into(),
    };
    let mut bytes = encode(Op::Auth, 7, &auth).to_vec();
    bytes.extend_from_slice(&encode_empty(Op::Ping, 42));
    stream.write_all(&bytes).await.unwrap();
    let mut buf = BytesMut::new();
    let mut observed = Observed::default();
    read_all(&mut stream, &mut buf, &mut observed, true).await;
    assert_eq!(
        observed.frames.first().map(|frame| frame.0),
        Some(Op::AuthOk)
    );
    let pong = tokio::time::timeout(Duration::from_secs(3), async {
        read_all(&mut stream, &mut buf, &mut observed, true).await;
        observed.frames.get(1).map(|frame| frame.0)
    })
    .await;
    assert_eq!(
        pong,
        Ok(Some(Op::Pong)),
        "the PING sent with AUTH was not answered"
    );
}
