//! A worker process: up to ~18,000 device connections from one loopback source
//! address, on a single-threaded runtime. Each connection is one small task: a
//! socket, a carry buffer that is empty between frames, its ping timer (each
//! device at its own phase) and a watch receiver for commands (storm, resume,
//! stop); the read buffer lives on the stack only while a read is being
//! processed.
//!
//! This module holds the worker's shared state and its conversation with the
//! coordinator (commands on stdin, progress and the report on stdout);
//! `device` runs one device's life (connect, session, reconnect), `connect`
//! its TCP connect and AUTH/SUB handshake.

mod connect;
mod device;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::histogram::{self, connect_histogram, latency_histogram};
use crate::ipc::{Command, Event, Progress, WorkerReport, WorkerSpec};
use crate::receipts::{DeviceReceipts, OffsetReceipts, TopicReceipts};

const MAX_BODY: u32 = pushgrid_wire::DEFAULT_MAX_BODY;

#[derive(Debug, Clone, Copy, Default)]
struct Ctl {
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
    /// Unicast deliveries: (message id, latency µs, device index, call tag
    /// of the payload or 0).
    delivered: Vec<(u64, u64, u32, u64)>,
    slow_delivered: Vec<u64>,
    /// Unicast ids received at least once: the `delivered` counter (which
    /// ends the drain) counts each message once, however often it arrives.
    seen: std::collections::HashSet<u64>,
    /// Broadcast receipts: per device index, per topic and epoch.
    broadcast: Vec<Vec<(String, u64, TopicReceipts)>>,
    /// Per device: its position in the run's topic (epoch, highest offset
    /// received in it), sent in the SUB after every reconnect; None before
    /// the first SUB_OK.
    positions: Vec<Option<(u64, u64)>>,
    /// Per device: SUB_OKs after a reconnect that said the missed messages
    /// could not be recovered (`recovered = false`).
    gaps: Vec<u32>,
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
            connect_us: Some(connect_histogram()),
            broadcast: vec![Vec::new(); spec.count as usize],
            positions: vec![None; spec.count as usize],
            gaps: vec![0; spec.count as usize],
            broadcast_latency_us: Some(latency_histogram()),
            ..Default::default()
        }),
        spec,
    });
    let (ctl_tx, ctl_rx) = watch::channel(Ctl::default());
    emit(&Event::Ready {
        pid: std::process::id(),
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    if !wait_for_go(&mut lines).await? {
        return Ok(());
    }
    tokio::spawn(device::ramp(shared.clone(), ctl_rx));
    let mut progress_tick = tokio::time::interval(Duration::from_millis(250));
    let mut coordinator = Coordinator {
        shared,
        ctl: ctl_tx,
        ramped_sent: false,
        storm: None,
        storm_settle_ms: Vec::new(),
    };
    loop {
        tokio::select! {
            _ = progress_tick.tick() => coordinator.tick(),
            line = lines.next_line() => {
                let command = match line? {
                    None => Command::Stop,
                    Some(line) => match serde_json::from_str(&line) {
                        Ok(command) => command,
                        Err(_) => continue,
                    },
                };
                if coordinator.obey(command).await {
                    return Ok(());
                }
            }
        }
    }
}

/// Waits for `go`: true; false on `stop` or when the coordinator went away.
async fn wait_for_go(lines: &mut Lines<BufReader<Stdin>>) -> anyhow::Result<bool> {
    loop {
        match lines.next_line().await? {
            None => return Ok(false),
            Some(line) => {
                if let Ok(Command::Go) = serde_json::from_str(&line) {
                    return Ok(true);
                }
                if let Ok(Command::Stop) = serde_json::from_str(&line) {
                    return Ok(false);
                }
            }
        }
    }
}

/// The worker's side of the conversation with the coordinator, once the
/// devices are started.
struct Coordinator {
    shared: Arc<Shared>,
    ctl: watch::Sender<Ctl>,
    ramped_sent: bool,
    /// The storm under way: when it started and the devices open then.
    storm: Option<(Instant, u64)>,
    storm_settle_ms: Vec<u64>,
}

impl Coordinator {
    /// Every 250 ms: progress (and `ramped` once), storm settling.
    fn tick(&mut self) {
        let shared = &self.shared;
        let progress = progress_of(shared);
        if !self.ramped_sent && progress.ramped {
            self.ramped_sent = true;
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
        if let Some((started, participants)) = self.storm
            && progress.storm_settled >= participants
        {
            self.storm_settle_ms
                .push(started.elapsed().as_millis() as u64);
            self.storm = None;
        }
        emit(&Event::Progress(progress));
    }

    /// Carries out a command; true when the worker is to exit.
    async fn obey(&mut self, command: Command) -> bool {
        match command {
            Command::Go => {}
            Command::Storm => {
                let counters = &self.shared.counters;
                let participants = counters.open.load(Ordering::Relaxed);
                counters.storm_settled.store(0, Ordering::Relaxed);
                self.storm = Some((Instant::now(), participants));
                self.ctl.send_modify(|ctl| ctl.storm_gen += 1);
            }
            Command::Resume => self.ctl.send_modify(|ctl| ctl.resume = true),
            Command::Report => {
                let report = report_of(&self.shared, self.storm_settle_ms.clone());
                emit(&Event::Report(Box::new(report)));
            }
            Command::Stop => {
                self.ctl.send_modify(|ctl| ctl.stop = true);
                // Let the tasks see it and close their sockets.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return true;
            }
        }
        false
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
    WorkerReport {
        progress,
        failures: records.failures.clone(),
        closes: records.closes.clone(),
        delivered_ids: records
            .delivered
            .iter()
            .map(|delivery| delivery.0)
            .collect(),
        delivered_latency_us: records
            .delivered
            .iter()
            .map(|delivery| delivery.1)
            .collect(),
        delivered_devices: records
            .delivered
            .iter()
            .map(|delivery| delivery.2)
            .collect(),
        delivered_calls: records
            .delivered
            .iter()
            .map(|delivery| delivery.3)
            .collect(),
        slow_delivered_ids: records.slow_delivered.clone(),
        broadcast_devices: records
            .broadcast
            .iter()
            .enumerate()
            .flat_map(|(device, topics)| {
                topics
                    .iter()
                    .map(move |(topic, epoch, receipts)| DeviceReceipts {
                        device: device as u32,
                        topic: topic.clone(),
                        epoch: *epoch,
                        receipts: receipts.clone(),
                    })
            })
            .collect(),
        broadcast_offsets: records
            .broadcast_offsets
            .iter()
            .map(
                |((topic, offset), (devices, max_latency_us))| OffsetReceipts {
                    topic: topic.clone(),
                    offset: *offset,
                    devices: *devices,
                    max_latency_us: *max_latency_us,
                },
            )
            .collect(),
        broadcast_latency_histogram: histogram::to_base64(records.broadcast_latency_us.as_ref()),
        last_broadcast_receipt_unix_us: records.last_broadcast_receipt_unix_us,
        connect_histogram: histogram::to_base64(records.connect_us.as_ref()),
        broadcast_gaps: records
            .gaps
            .iter()
            .enumerate()
            .filter(|(_, gaps)| **gaps > 0)
            .map(|(device, gaps)| (device as u32, *gaps))
            .collect(),
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
