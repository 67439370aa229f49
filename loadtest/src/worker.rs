//! A worker process: up to ~18,000 device connections from one loopback source
//! address, on a single-threaded runtime. Each connection is one small task: a
//! socket, a carry buffer that is empty between frames, and a watch receiver for
//! commands (ping, storm, resume, stop); the read buffer lives on the stack only
//! while a read is being processed.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use hdrhistogram::Histogram;
use pushgrid_wire::{Op, encode, encode_empty, msg};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::frames::{sent_us, take_frames, unix_us};
use crate::ipc::{Command, Event, Progress, WorkerReport, WorkerSpec};
use crate::receipts::{DeviceReceipts, OffsetReceipts, Receipt, TopicReceipts};

const MAX_BODY: u32 = pushgrid_wire::DEFAULT_MAX_BODY;
/// Source port of device 0 on its first connect (device i: this + i).
const FIRST_SOURCE_PORT: u16 = 20_000;

#[derive(Debug, Clone, Copy, Default)]
struct Ctl {
    ping_gen: u64,
    storm_gen: u64,
    resume: bool,
    stop: bool,
}

#[derive(Default)]
struct Counters {
    attempted: AtomicU64,
    established: AtomicU64,
    failed: AtomicU64,
    open: AtomicU64,
    delivered: AtomicU64,
    broadcast_delivered: AtomicU64,
    subscribed: AtomicU64,
    closed_by_server: AtomicU64,
    settled_initial: AtomicU64,
    storm_settled: AtomicU64,
    reconnected: AtomicU64,
    heartbeat_secs: AtomicU32,
}

#[derive(Default)]
struct Records {
    failures: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
    failed_users: Vec<u32>,
    /// Unicast deliveries: (message id, latency µs, device index).
    delivered: Vec<(u64, u64, u32)>,
    slow_delivered: Vec<u64>,
    /// Unicast ids received at least once: the `delivered` counter (which
    /// ends the drain) counts each message once, however often it arrives.
    seen: std::collections::HashSet<u64>,
    /// Broadcast receipts: per device index, per topic.
    broadcast: Vec<Vec<(String, TopicReceipts)>>,
    /// (topic, offset) -> (devices, slowest latency µs).
    broadcast_offsets: std::collections::HashMap<(String, u64), (u64, u64)>,
    broadcast_latency_us: Option<Histogram<u64>>,
    last_broadcast_receipt_unix_us: u64,
    connect_us: Option<Histogram<u64>>,
    first_connect_unix_ms: u64,
    last_established_unix_ms: u64,
}

struct Shared {
    spec: WorkerSpec,
    /// Per device: authenticated right now.
    online: Vec<std::sync::atomic::AtomicBool>,
    room: SocketAddr,
    source: IpAddr,
    counters: Counters,
    records: Mutex<Records>,
}

impl Shared {
    fn records(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn fail(&self, index: u32, reason: String, initial: bool) {
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        let mut records = self.records();
        *records.failures.entry(reason).or_default() += 1;
        if initial {
            records.failed_users.push(index);
        }
    }

    fn closed(&self, reason: String) {
        self.counters
            .closed_by_server
            .fetch_add(1, Ordering::Relaxed);
        *self.records().closes.entry(reason).or_default() += 1;
    }
}

fn emit(event: &Event) {
    let mut stdout = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(event) {
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }
}

pub fn main(spec_json: &str) -> anyhow::Result<()> {
    let spec: WorkerSpec = serde_json::from_str(spec_json).context("worker spec")?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(spec))
}

async fn run(spec: WorkerSpec) -> anyhow::Result<()> {
    let room: SocketAddr = tokio::net::lookup_host(&spec.room)
        .await?
        .next()
        .context("room address")?;
    let source: IpAddr = spec.source_ip.parse().context("source ip")?;
    let shared = Arc::new(Shared {
        online: (0..spec.count)
            .map(|_| std::sync::atomic::AtomicBool::new(false))
            .collect(),
        room,
        source,
        counters: Counters::default(),
        records: Mutex::new(Records {
            connect_us: Histogram::new_with_bounds(1, 120_000_000, 3).ok(),
            broadcast: vec![Vec::new(); spec.count as usize],
            broadcast_latency_us: Histogram::new_with_bounds(1, 600_000_000, 3).ok(),
            ..Default::default()
        }),
        spec,
    });
    let (ctl_tx, ctl_rx) = watch::channel(Ctl::default());
    emit(&Event::Ready {
        pid: std::process::id(),
    });

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    // Wait for `go` (or exit if the coordinator went away).
    loop {
        match lines.next_line().await? {
            None => return Ok(()),
            Some(line) => {
                if let Ok(Command::Go) = serde_json::from_str(&line) {
                    break;
                }
                if let Ok(Command::Stop) = serde_json::from_str(&line) {
                    return Ok(());
                }
            }
        }
    }

    tokio::spawn(ramp(shared.clone(), ctl_rx));
    let mut progress_tick = tokio::time::interval(Duration::from_millis(250));
    let mut ping_due =
        Instant::now() + Duration::from_secs(u64::from(shared.spec.default_ping_secs));
    let mut ramped_sent = false;
    let mut storm: Option<(Instant, u64)> = None;
    let mut storm_settle_ms = Vec::new();
    loop {
        tokio::select! {
            _ = progress_tick.tick() => {
                let progress = progress_of(&shared);
                if !ramped_sent && progress.ramped {
                    ramped_sent = true;
                    // The counts first: the coordinator reads them when it sees Ramped.
                    emit(&Event::Progress(progress.clone()));
                    let mut records = shared.records();
                    let mut failed_users = std::mem::take(&mut records.failed_users);
                    failed_users.sort_unstable();
                    let slow_users = slow_users(&shared.spec);
                    emit(&Event::Ramped {
                        failed_users,
                        slow_users,
                        first_connect_unix_ms: records.first_connect_unix_ms,
                        last_established_unix_ms: records.last_established_unix_ms,
                    });
                }
                if let Some((started, participants)) = storm
                    && progress.storm_settled >= participants
                {
                    storm_settle_ms.push(started.elapsed().as_millis() as u64);
                    storm = None;
                }
                emit(&Event::Progress(progress));
                if Instant::now() >= ping_due {
                    let heartbeat = match shared.counters.heartbeat_secs.load(Ordering::Relaxed) {
                        0 => shared.spec.default_ping_secs,
                        secs => secs,
                    };
                    // Ping at 80 % of the heartbeat: well inside the server's 2.5x.
                    ping_due = Instant::now() + Duration::from_millis(u64::from(heartbeat.max(1)) * 800);
                    ctl_tx.send_modify(|ctl| ctl.ping_gen += 1);
                }
            }
            line = lines.next_line() => {
                let command = match line? {
                    None => Command::Stop,
                    Some(line) => match serde_json::from_str(&line) {
                        Ok(command) => command,
                        Err(_) => continue,
                    },
                };
                match command {
                    Command::Go => {}
                    Command::Storm => {
                        let participants = shared.counters.open.load(Ordering::Relaxed);
                        shared.counters.storm_settled.store(0, Ordering::Relaxed);
                        storm = Some((Instant::now(), participants));
                        ctl_tx.send_modify(|ctl| ctl.storm_gen += 1);
                    }
                    Command::Resume => ctl_tx.send_modify(|ctl| ctl.resume = true),
                    Command::Report => {
                        let report = report_of(&shared, storm_settle_ms.clone());
                        emit(&Event::Report(Box::new(report)));
                    }
                    Command::Stop => {
                        ctl_tx.send_modify(|ctl| ctl.stop = true);
                        // Let the tasks see it and close their sockets.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        return Ok(());
                    }
                }
            }
        }
    }
}

fn slow_users(spec: &WorkerSpec) -> Vec<u32> {
    if spec.slow_every == 0 {
        return Vec::new();
    }
    (0..spec.count)
        .filter(|index| is_slow(spec, *index))
        .collect()
}

fn is_slow(spec: &WorkerSpec, index: u32) -> bool {
    spec.slow_every > 0 && index % spec.slow_every == spec.slow_every - 1
}

fn progress_of(shared: &Shared) -> Progress {
    let counters = &shared.counters;
    Progress {
        attempted: counters.attempted.load(Ordering::Relaxed),
        established: counters.established.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        open: counters.open.load(Ordering::Relaxed),
        delivered: counters.delivered.load(Ordering::Relaxed),
        broadcast_delivered: counters.broadcast_delivered.load(Ordering::Relaxed),
        subscribed: counters.subscribed.load(Ordering::Relaxed),
        closed_by_server: counters.closed_by_server.load(Ordering::Relaxed),
        ramped: counters.settled_initial.load(Ordering::Relaxed) >= u64::from(shared.spec.count),
        storm_settled: counters.storm_settled.load(Ordering::Relaxed),
    }
}

fn report_of(shared: &Shared, storm_settle_ms: Vec<u64>) -> WorkerReport {
    let progress = progress_of(shared);
    let records = shared.records();
    let serialized = |histogram: &Option<Histogram<u64>>| {
        let mut bytes = Vec::new();
        if let Some(histogram) = histogram {
            let _ = hdrhistogram::serialization::Serializer::serialize(
                &mut hdrhistogram::serialization::V2Serializer::new(),
                histogram,
                &mut bytes,
            );
        }
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    WorkerReport {
        progress,
        failures: records.failures.clone(),
        closes: records.closes.clone(),
        delivered_ids: records.delivered.iter().map(|(id, _, _)| *id).collect(),
        delivered_latency_us: records.delivered.iter().map(|(_, us, _)| *us).collect(),
        delivered_devices: records
            .delivered
            .iter()
            .map(|(_, _, device)| *device)
            .collect(),
        slow_delivered_ids: records.slow_delivered.clone(),
        broadcast_devices: records
            .broadcast
            .iter()
            .enumerate()
            .flat_map(|(device, topics)| {
                topics.iter().map(move |(topic, receipts)| DeviceReceipts {
                    device: device as u32,
                    topic: topic.clone(),
                    receipts: receipts.clone(),
                })
            })
            .collect(),
        broadcast_offsets: records
            .broadcast_offsets
            .iter()
            .map(|((topic, offset), (devices, max_latency_us))| OffsetReceipts {
                topic: topic.clone(),
                offset: *offset,
                devices: *devices,
                max_latency_us: *max_latency_us,
            })
            .collect(),
        broadcast_latency_histogram: serialized(&records.broadcast_latency_us),
        last_broadcast_receipt_unix_us: records.last_broadcast_receipt_unix_us,
        connect_histogram: serialized(&records.connect_us),
        storm_settle_ms,
        reconnected: shared.counters.reconnected.load(Ordering::Relaxed),
        offline_users: shared
            .online
            .iter()
            .enumerate()
            .filter(|(_, online)| !online.load(Ordering::Relaxed))
            .map(|(index, _)| index as u32)
            .collect(),
    }
}

/// Starts the connections at the configured rate and concurrency.
async fn ramp(shared: Arc<Shared>, ctl: watch::Receiver<Ctl>) {
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

/// One device: connect, serve the session, reconnect after a storm.
async fn device(
    shared: Arc<Shared>,
    index: u32,
    mut ctl: watch::Receiver<Ctl>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let slow = is_slow(&shared.spec, index);
    let mut permit = Some(permit);
    let mut reconnecting = false;
    let mut storm_reconnect = false;
    loop {
        // The first connect is tried once (a failure is reported by reason and
        // the device is left out of the pushes). After a server close or a
        // storm the device keeps coming back, as a real one does, until the
        // run stops: what was stored for it must reach it.
        let counted_attempts = shared.spec.reconnect_attempts.max(1);
        let mut settled = false;
        let mut attempt = 0u32;
        let connected = loop {
            if attempt > 0 {
                tokio::time::sleep(reconnect_delay(attempt)).await;
                if ctl.borrow().stop {
                    return;
                }
            }
            let began = Instant::now();
            match establish(&shared, index).await {
                Ok(connection) => {
                    let micros = began.elapsed().as_micros() as u64;
                    let mut records = shared.records();
                    if let Some(histogram) = records.connect_us.as_mut() {
                        let _ = histogram.record(micros.max(1));
                    }
                    records.last_established_unix_ms = unix_us() / 1000;
                    break Some(connection);
                }
                Err(reason) => shared.fail(index, reason, !reconnecting),
            }
            attempt += 1;
            if !reconnecting {
                break None;
            }
            if storm_reconnect && attempt == counted_attempts {
                // Counted as not back for this storm; it goes on trying.
                shared
                    .counters
                    .storm_settled
                    .fetch_add(1, Ordering::Relaxed);
                settled = true;
            }
        };
        drop(permit.take());
        let counters = &shared.counters;
        if connected.is_some() {
            counters.open.fetch_add(1, Ordering::Relaxed);
            shared.online[index as usize].store(true, Ordering::Relaxed);
            if reconnecting {
                counters.reconnected.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.established.fetch_add(1, Ordering::Relaxed);
            }
        }
        if storm_reconnect {
            if !settled {
                counters.storm_settled.fetch_add(1, Ordering::Relaxed);
            }
        } else if !reconnecting {
            counters.settled_initial.fetch_add(1, Ordering::Relaxed);
        }
        let Some((stream, carry)) = connected else {
            return;
        };
        let end = session(&shared, index, stream, carry, slow, &mut ctl).await;
        counters.open.fetch_sub(1, Ordering::Relaxed);
        shared.online[index as usize].store(false, Ordering::Relaxed);
        match end {
            SessionEnd::Stop => return,
            SessionEnd::Closed => {
                // As a real device does: come back after a pause, and get the
                // inbox. A slow device notices only once it reads again.
                reconnecting = true;
                storm_reconnect = false;
                let wait = 1000 + rand::random_range(0..2000u64);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                if ctl.borrow().stop {
                    return;
                }
            }
            SessionEnd::Storm => {
                reconnecting = true;
                storm_reconnect = true;
                let jitter = shared.spec.storm_jitter_ms;
                if jitter > 0 {
                    let wait = rand::random_range(0..jitter);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
        }
    }
}

/// Delay before reconnect attempt `attempt` (1, 2, ...): 500 ms doubling up to
/// 16 s, each drawn uniformly from its upper half, so devices that failed
/// together do not come back together.
fn reconnect_delay(attempt: u32) -> Duration {
    let base_ms = (500u64 << attempt.saturating_sub(1).min(5)).min(16_000);
    Duration::from_millis(rand::random_range(base_ms / 2..=base_ms))
}

fn io_reason(stage: &str, error: &std::io::Error) -> String {
    let name = match error.raw_os_error() {
        Some(24) => "EMFILE (process out of file descriptors)".to_owned(),
        Some(23) => "ENFILE (system out of file descriptors)".to_owned(),
        Some(99) => "EADDRNOTAVAIL (no free source port)".to_owned(),
        Some(98) => "EADDRINUSE".to_owned(),
        Some(111) => "ECONNREFUSED".to_owned(),
        Some(104) => "ECONNRESET".to_owned(),
        Some(110) => "ETIMEDOUT".to_owned(),
        Some(code) => format!("errno {code} ({:?})", error.kind()),
        None => format!("{:?}", error.kind()),
    };
    format!("{stage}: {name}")
}

/// TCP connect from the worker's source address, AUTH, and SUB when a topic is set.
async fn establish(shared: &Shared, index: u32) -> Result<(TcpStream, Vec<u8>), String> {
    let spec = &shared.spec;
    // An explicit port per device, on reconnects too: bind(port 0) scans the
    // ports in use on the address, which grows quadratic over 18,000 sockets
    // (a reconnect storm of 17,000 devices spent minutes of system CPU in it).
    // Our side closes with a reset, so the device's port is free again.
    let port = (index < 30_000)
        .then(|| FIRST_SOURCE_PORT.checked_add(index as u16))
        .flatten();
    // A slow device is a phone on a bad network: a small receive window, so
    // what it does not read backs up into the room's queue, not the kernel's.
    let rcvbuf = is_slow(spec, index).then_some(SLOW_RCVBUF);
    let mut stream = match connect_from(shared, port, rcvbuf).await {
        // The fixed port's 4-tuple is still taken (TIME_WAIT of an earlier run
        // against the same room): let the kernel pick a port instead.
        Err(error) if port.is_some() && matches!(error.raw_os_error(), Some(98 | 99)) => {
            connect_from(shared, None, rcvbuf).await
        }
        other => other,
    }
    .map_err(|error| match error.kind() {
        std::io::ErrorKind::TimedOut => "connect: timeout".to_owned(),
        _ => io_reason("connect", &error),
    })?;
    // Close with a reset: a run that ends leaves no TIME_WAIT behind, so the
    // next run (or the next scenario of `loadtest million`) gets the same ports.
    let _ = stream.set_zero_linger();
    let _ = stream.set_nodelay(true);
    let user = format!("{}{}", spec.user_prefix, spec.first_user + u64::from(index));
    let token = pushgrid_common::jwt::sign(
        &pushgrid_common::jwt::Claims {
            sub: user,
            app: spec.app.clone(),
            exp: unix_us() / 1_000_000 + 7 * 24 * 3600,
            dev: String::new(),
        },
        &spec.jwt_secret,
    );
    let auth = encode(
        Op::Auth,
        0,
        &msg::Auth {
            token,
            device_id: "lt".into(),
            platform: "loadtest".into(),
        },
    );
    let auth_timeout = Duration::from_millis(spec.auth_timeout_ms);
    let mut carry = Vec::new();
    let handshake = async {
        stream
            .write_all(&auth)
            .await
            .map_err(|error| io_reason("auth write", &error))?;
        let frame = read_frame(&mut stream, &mut carry, "auth").await?;
        let (op, body) = frame;
        match op {
            Op::AuthOk => {
                let ok: msg::AuthOk = prost::Message::decode(&body[..])
                    .map_err(|_| "auth: bad AUTH_OK".to_owned())?;
                if ok.heartbeat_secs > 0 {
                    shared
                        .counters
                        .heartbeat_secs
                        .store(ok.heartbeat_secs, Ordering::Relaxed);
                }
            }
            Op::Error => {
                let error: msg::Error = prost::Message::decode(&body[..]).unwrap_or_default();
                return Err(format!("auth refused: {}", error.code().as_str_name()));
            }
            Op::Kick => {
                let kick: msg::Kick = prost::Message::decode(&body[..]).unwrap_or_default();
                return Err(format!("kicked during auth: {}", kick.code().as_str_name()));
            }
            other => return Err(format!("auth: unexpected {other:?}")),
        }
        if !spec.topic.is_empty() {
            let sub = encode(
                Op::Sub,
                1,
                &msg::Sub {
                    topic: spec.topic.clone(),
                    since_offset: 0,
                    epoch: 0,
                },
            );
            stream
                .write_all(&sub)
                .await
                .map_err(|error| io_reason("sub write", &error))?;
            loop {
                let (op, body) = read_frame(&mut stream, &mut carry, "sub").await?;
                match op {
                    Op::SubOk => {
                        shared.counters.subscribed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Op::Error => {
                        let error: msg::Error =
                            prost::Message::decode(&body[..]).unwrap_or_default();
                        return Err(format!("sub refused: {}", error.code().as_str_name()));
                    }
                    // Unicast pushes may arrive before SUB_OK (an inbox replay).
                    Op::Push => {
                        if let Ok(push) = prost::Message::decode(&body[..]) {
                            let ack = on_push(shared, index, push, false);
                            if let Some(ack) = ack {
                                let _ = stream.write_all(&ack).await;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(auth_timeout, handshake).await {
        Ok(Ok(())) => Ok((stream, carry)),
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err("auth: timeout".to_owned()),
    }
}

/// Receive buffer of a slow device's socket (the kernel doubles it).
const SLOW_RCVBUF: u32 = 4096;

/// TCP connect from the worker's source address, from `port` or any port.
async fn connect_from(
    shared: &Shared,
    port: Option<u16>,
    rcvbuf: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let _ = socket.set_reuseaddr(true);
    if let Some(size) = rcvbuf {
        // Before connect, so the window offered in the SYN is already small.
        socket.set_recv_buffer_size(size)?;
    }
    let bound = match port {
        Some(port) => socket.bind(SocketAddr::new(shared.source, port)).is_ok(),
        None => false,
    };
    if !bound {
        socket.bind(SocketAddr::new(shared.source, 0))?;
    }
    let limit = Duration::from_millis(shared.spec.connect_timeout_ms);
    match tokio::time::timeout(limit, socket.connect(shared.room)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Reads one frame during the handshake (extra frames stay in `carry`).
async fn read_frame(
    stream: &mut TcpStream,
    carry: &mut Vec<u8>,
    stage: &str,
) -> Result<(Op, Vec<u8>), String> {
    use tokio::io::AsyncReadExt;
    loop {
        if carry.len() >= pushgrid_wire::HEADER_LEN {
            let header = pushgrid_wire::parse_header(carry, MAX_BODY)
                .map_err(|error| format!("{stage}: {error}"))?;
            let frame_len = pushgrid_wire::HEADER_LEN + header.body_len as usize;
            if carry.len() >= frame_len {
                let body = carry[pushgrid_wire::HEADER_LEN..frame_len].to_vec();
                carry.drain(..frame_len);
                if carry.is_empty() {
                    *carry = Vec::new();
                }
                return Ok((header.op, body));
            }
        }
        let mut buf = [0u8; 1024];
        let read = stream
            .read(&mut buf)
            .await
            .map_err(|error| io_reason(stage, &error))?;
        if read == 0 {
            return Err(format!("{stage}: closed by server"));
        }
        carry.extend_from_slice(&buf[..read]);
    }
}

/// Records a push; returns the ACK frame to send for a unicast one.
/// `index` is the receiving device's (relative to `first_user`): a message
/// handed to another user's device is misrouted.
fn on_push(shared: &Shared, index: u32, push: msg::Push, slow: bool) -> Option<bytes::Bytes> {
    let now = unix_us();
    let latency = sent_us(&push.payload).map(|sent| now.saturating_sub(sent));
    if push.kind() == msg::PushKind::Broadcast {
        let mut records = shared.records();
        let Some(topics) = records.broadcast.get_mut(index as usize) else {
            return None;
        };
        let receipts = match topics.iter().position(|(topic, _)| *topic == push.topic) {
            Some(at) => &mut topics[at].1,
            None => {
                topics.push((push.topic.clone(), TopicReceipts::default()));
                &mut topics.last_mut()?.1
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
            records
                .delivered
                .push((push.msg_id, latency.unwrap_or(0), index));
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
        tokio::select! {
            changed = ctl.changed() => {
                if changed.is_err() {
                    return SessionEnd::Stop;
                }
                let now = *ctl.borrow_and_update();
                if now.stop {
                    return SessionEnd::Stop;
                }
                if now.storm_gen != seen.storm_gen {
                    return SessionEnd::Storm;
                }
                if now.resume {
                    reading = true;
                }
                if now.ping_gen != seen.ping_gen
                    && let Err(error) = stream.write_all(&encode_empty(Op::Ping, 0)).await
                {
                    shared.closed(io_reason("ping write", &error));
                    return SessionEnd::Closed;
                }
                seen = now;
            }
            ready = stream.readable(), if reading => {
                if let Err(error) = ready {
                    shared.closed(io_reason("read", &error));
                    return SessionEnd::Closed;
                }
                let mut buf = [0u8; 4096];
                loop {
                    match stream.try_read(&mut buf) {
                        Ok(0) => {
                            shared.closed("closed by server (eof)".to_owned());
                            return SessionEnd::Closed;
                        }
                        Ok(read) => {
                            if let Some(end) = consume(shared, index, &mut carry, &buf[..read], slow, &mut pending_acks) {
                                shared.closed(end);
                                return SessionEnd::Closed;
                            }
                        }
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(error) => {
                            shared.closed(io_reason("read", &error));
                            return SessionEnd::Closed;
                        }
                    }
                }
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
