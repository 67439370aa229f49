//! One device's life in a worker: started by the ramp at the configured rate,
//! it connects (`connect`), serves its session (pushes recorded and
//! acknowledged, pings, broadcast receipts), and comes back after a server
//! close or a reconnect storm until the run stops.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pushgrid_wire::{Op, encode, encode_empty, msg};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::connect::{establish, io_reason};
use super::{Ctl, MAX_BODY, Shared, is_slow};
use crate::frames::{call_tag, sent_us, take_frames, unix_us};
use crate::receipts::{Receipt, TopicReceipts};

/// Starts the connections at the configured rate and concurrency.
pub(super) async fn ramp(shared: Arc<Shared>, ctl: watch::Receiver<Ctl>) {
    let spec = &shared.spec;
    let permits = Arc::new(Semaphore::new(spec.connect_concurrency.max(1) as usize));
    let started = Instant::now();
    shared.records().first_connect_unix_ms = unix_us() / 1000;
    for index in 0..spec.count {
        if ctl.borrow().stop {
            break;
        }
        if spec.connect_rate > 0 {
            let due =
                started + Duration::from_secs_f64(f64::from(index) / f64::from(spec.connect_rate));
            tokio::time::sleep_until(due).await;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        shared.counters.attempted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(device(shared.clone(), index, ctl.clone(), permit));
    }
}

enum SessionEnd {
    Stop,
    Storm,
    Closed,
}

/// Which connect of a device this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connect {
    /// The first: tried once; a failure is reported by reason and the device
    /// is left out of the pushes.
    Initial,
    /// After the server closed the session.
    AfterClose,
    /// After a reconnect storm.
    AfterStorm,
}

/// How the connect attempts of a device ended.
struct Attempts {
    connected: Option<(TcpStream, Vec<u8>)>,
    /// Already counted as settled for the storm (not back after
    /// --reconnect-attempts; it goes on trying).
    settled: bool,
}

/// One device: connect, serve the session, reconnect after a storm.
async fn device(
    shared: Arc<Shared>,
    index: u32,
    mut ctl: watch::Receiver<Ctl>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let slow = is_slow(&shared.spec, index);
    let mut permit = Some(permit);
    let mut connect = Connect::Initial;
    loop {
        let Some(attempts) = attempt(&shared, index, &ctl, connect).await else {
            return;
        };
        drop(permit.take());
        count_connect(&shared, index, connect, &attempts);
        let Some((stream, carry)) = attempts.connected else {
            return;
        };
        let end = session(&shared, index, stream, carry, slow, &mut ctl).await;
        shared.counters.open.fetch_sub(1, Ordering::Relaxed);
        shared.online[index as usize].store(false, Ordering::Relaxed);
        match end {
            SessionEnd::Stop => return,
            SessionEnd::Closed => {
                // As a real device does: come back after a pause, and get the
                // inbox. A slow device notices only once it reads again.
                connect = Connect::AfterClose;
                let wait = 1000 + rand::random_range(0..2000u64);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                if ctl.borrow().stop {
                    return;
                }
            }
            SessionEnd::Storm => {
                connect = Connect::AfterStorm;
                let jitter = shared.spec.storm_jitter_ms;
                if jitter > 0 {
                    let wait = rand::random_range(0..jitter);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
        }
    }
}

/// Connects device `index`: once for the initial connect; after a server
/// close or a storm the device keeps coming back, as a real one does, until
/// the run stops (`None`): what was stored for it must reach it.
async fn attempt(
    shared: &Shared,
    index: u32,
    ctl: &watch::Receiver<Ctl>,
    connect: Connect,
) -> Option<Attempts> {
    let counted_attempts = shared.spec.reconnect_attempts.max(1);
    let mut settled = false;
    let mut attempt = 0u32;
    loop {
        if attempt > 0 {
            tokio::time::sleep(reconnect_delay(attempt)).await;
            if ctl.borrow().stop {
                return None;
            }
        }
        let began = Instant::now();
        match establish(shared, index).await {
            Ok(connection) => {
                let micros = began.elapsed().as_micros() as u64;
                let mut records = shared.records();
                if let Some(histogram) = records.connect_us.as_mut() {
                    let _ = histogram.record(micros.max(1));
                }
                records.last_established_unix_ms = unix_us() / 1000;
                let connected = Some(connection);
                return Some(Attempts { connected, settled });
            }
            Err(reason) => shared.fail(index, reason, connect == Connect::Initial),
        }
        attempt += 1;
        if connect == Connect::Initial {
            let connected = None;
            return Some(Attempts { connected, settled });
        }
        if connect == Connect::AfterStorm && attempt == counted_attempts {
            // Counted as not back for this storm; it goes on trying.
            shared
                .counters
                .storm_settled
                .fetch_add(1, Ordering::Relaxed);
            settled = true;
        }
    }
}

/// The counters after the connect attempts of a device.
fn count_connect(shared: &Shared, index: u32, connect: Connect, attempts: &Attempts) {
    let counters = &shared.counters;
    if attempts.connected.is_some() {
        counters.open.fetch_add(1, Ordering::Relaxed);
        shared.online[index as usize].store(true, Ordering::Relaxed);
        if connect == Connect::Initial {
            counters.established.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.reconnected.fetch_add(1, Ordering::Relaxed);
        }
    }
    match connect {
        Connect::AfterStorm if !attempts.settled => {
            counters.storm_settled.fetch_add(1, Ordering::Relaxed);
        }
        Connect::Initial => {
            counters.settled_initial.fetch_add(1, Ordering::Relaxed);
        }
        Connect::AfterStorm | Connect::AfterClose => {}
    }
}

/// Delay before reconnect attempt `attempt` (1, 2, ...): 500 ms doubling up to
/// 16 s, each drawn uniformly from its upper half, so devices that failed
/// together do not come back together.
fn reconnect_delay(attempt: u32) -> Duration {
    let base_ms = (500u64 << attempt.saturating_sub(1).min(5)).min(16_000);
    Duration::from_millis(rand::random_range(base_ms / 2..=base_ms))
}

/// Records a push; returns the ACK frame to send for a unicast one.
/// `index` is the receiving device's (relative to `first_user`): a message
/// handed to another user's device is misrouted.
pub(super) fn on_push(
    shared: &Shared,
    index: u32,
    push: msg::Push,
    slow: bool,
) -> Option<bytes::Bytes> {
    let now = unix_us();
    let latency = sent_us(&push.payload).map(|sent| now.saturating_sub(sent));
    if push.kind() == msg::PushKind::Broadcast {
        let mut records = shared.records();
        if push.topic == shared.spec.topic {
            let position = records.positions.get_mut(index as usize)?;
            *position = match *position {
                Some((epoch, highest)) if epoch == push.epoch => {
                    Some((epoch, highest.max(push.offset)))
                }
                Some((epoch, _)) if epoch > push.epoch => *position,
                _ => Some((push.epoch, push.offset)),
            };
        }
        let topics = records.broadcast.get_mut(index as usize)?;
        let at = topics
            .iter()
            .position(|(topic, epoch, _)| *topic == push.topic && *epoch == push.epoch);
        let receipts = match at {
            Some(at) => &mut topics[at].2,
            None => {
                topics.push((push.topic.clone(), push.epoch, TopicReceipts::default()));
                &mut topics.last_mut()?.2
            }
        };
        if receipts.record(push.offset) == Receipt::Duplicate {
            return None;
        }
        // The progress counts each (device, offset) once, so that the drain
        // does not end early on duplicates.
        shared
            .counters
            .broadcast_delivered
            .fetch_add(1, Ordering::Relaxed);
        records.last_broadcast_receipt_unix_us = now;
        let latency = latency.unwrap_or(0);
        if let Some(histogram) = records.broadcast_latency_us.as_mut() {
            let _ = histogram.record(latency.max(1));
        }
        let slot = records
            .broadcast_offsets
            .entry((push.topic, push.offset))
            .or_default();
        slot.0 += 1;
        slot.1 = slot.1.max(latency);
        return None;
    }
    {
        let mut records = shared.records();
        if records.seen.insert(push.msg_id) {
            shared.counters.delivered.fetch_add(1, Ordering::Relaxed);
        }
        if slow {
            records.slow_delivered.push(push.msg_id);
        } else {
            let call = call_tag(&push.payload);
            records
                .delivered
                .push((push.msg_id, latency.unwrap_or(0), index, call));
        }
    }
    Some(encode(
        Op::Ack,
        0,
        &msg::Ack {
            msg_ids: vec![push.msg_id],
        },
    ))
}

/// Serves an authenticated connection until stop, storm or a server close.
async fn session(
    shared: &Shared,
    index: u32,
    mut stream: TcpStream,
    mut carry: Vec<u8>,
    slow: bool,
    ctl: &mut watch::Receiver<Ctl>,
) -> SessionEnd {
    let mut seen = *ctl.borrow_and_update();
    let mut reading = !slow || seen.resume;
    let mut pending_acks: Vec<u64> = Vec::new();
    // Frames that arrived with AUTH_OK/SUB_OK.
    if !carry.is_empty() {
        let data = std::mem::take(&mut carry);
        if let Some(end) = consume(shared, index, &mut carry, &data, slow, &mut pending_acks) {
            shared.closed(end);
            return SessionEnd::Closed;
        }
    }
    let ping_every = ping_interval(shared);
    // Each device pings at its own phase, as devices that connected at
    // different times do: all of a worker's devices pinging in the same
    // instant is a load no cluster sees, and it delayed a broadcast by a
    // second in the 100,000-device runs.
    let ping = tokio::time::sleep(ping_every.mul_f64(rand::random_range(0.0..1.0)));
    tokio::pin!(ping);
    loop {
        if !pending_acks.is_empty() {
            let ack = encode(
                Op::Ack,
                0,
                &msg::Ack {
                    msg_ids: std::mem::take(&mut pending_acks),
                },
            );
            if let Err(error) = stream.write_all(&ack).await {
                shared.closed(io_reason("ack write", &error));
                return SessionEnd::Closed;
            }
        }
        let end = tokio::select! {
            () = &mut ping => {
                ping.as_mut().reset(Instant::now() + ping_every);
                match stream.write_all(&encode_empty(Op::Ping, 0)).await {
                    Ok(()) => None,
                    Err(error) => {
                        shared.closed(io_reason("ping write", &error));
                        Some(SessionEnd::Closed)
                    }
                }
            }
            changed = ctl.changed() => {
                if changed.is_err() {
                    return SessionEnd::Stop;
                }
                let now = *ctl.borrow_and_update();
                let end = obey(seen, now, &mut reading);
                seen = now;
                end
            }
            ready = stream.readable(), if reading => match ready {
                Err(error) => {
                    shared.closed(io_reason("read", &error));
                    Some(SessionEnd::Closed)
                }
                Ok(()) => read_ready(shared, index, &stream, &mut carry, slow, &mut pending_acks),
            },
        };
        if let Some(end) = end {
            return end;
        }
    }
}

/// A change of the worker's commands (`now`, after `seen`): stop, storm,
/// resume reading.
fn obey(seen: Ctl, now: Ctl, reading: &mut bool) -> Option<SessionEnd> {
    if now.stop {
        return Some(SessionEnd::Stop);
    }
    if now.storm_gen != seen.storm_gen {
        return Some(SessionEnd::Storm);
    }
    if now.resume {
        *reading = true;
    }
    None
}

/// How often a device pings: at 80 % of the heartbeat the room asked for
/// (well inside its 2.5 times), or of --ping-secs when it did not say.
fn ping_interval(shared: &Shared) -> Duration {
    let heartbeat = match shared.counters.heartbeat_secs.load(Ordering::Relaxed) {
        0 => shared.spec.default_ping_secs,
        secs => secs,
    };
    Duration::from_millis(u64::from(heartbeat.max(1)) * 800)
}

/// Reads what the socket holds (until it would block) and handles it.
fn read_ready(
    shared: &Shared,
    index: u32,
    stream: &TcpStream,
    carry: &mut Vec<u8>,
    slow: bool,
    pending_acks: &mut Vec<u64>,
) -> Option<SessionEnd> {
    let mut buf = [0u8; 4096];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => {
                shared.closed("closed by server (eof)".to_owned());
                return Some(SessionEnd::Closed);
            }
            Ok(read) => {
                if let Some(end) = consume(shared, index, carry, &buf[..read], slow, pending_acks) {
                    shared.closed(end);
                    return Some(SessionEnd::Closed);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(error) => {
                shared.closed(io_reason("read", &error));
                return Some(SessionEnd::Closed);
            }
        }
    }
}

/// Handles received bytes; returns a close reason when the server said goodbye.
fn consume(
    shared: &Shared,
    index: u32,
    carry: &mut Vec<u8>,
    data: &[u8],
    slow: bool,
    acks: &mut Vec<u64>,
) -> Option<String> {
    let mut end = None;
    let result = take_frames(carry, data, MAX_BODY, |op, _seq, body| match op {
        Op::Push => {
            if let Ok(push) = prost::Message::decode(body) {
                let push: msg::Push = push;
                let id = push.msg_id;
                if on_push(shared, index, push, slow).is_some() {
                    acks.push(id);
                }
            }
        }
        Op::Kick => {
            let kick: msg::Kick = prost::Message::decode(body).unwrap_or_default();
            end.get_or_insert(format!("kick: {}", kick.code().as_str_name()));
        }
        Op::Error => {
            let error: msg::Error = prost::Message::decode(body).unwrap_or_default();
            end.get_or_insert(format!("error: {}", error.code().as_str_name()));
        }
        _ => {}
    });
    if let Err(error) = result {
        return Some(format!("bad frame: {error}"));
    }
    end
}
