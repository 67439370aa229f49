//! Messages between the coordinating process and its workers: one JSON object
//! per line, commands on the worker's stdin, events on its stdout.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::receipts::{DeviceReceipts, OffsetReceipts};

/// Everything a worker needs, passed as one JSON argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub id: u32,
    /// Loopback source address every connection of this worker binds to.
    pub source_ip: String,
    /// Room TCP address this worker connects to.
    pub room: String,
    pub app: String,
    pub jwt_secret: String,
    pub user_prefix: String,
    /// Global index of the first user; users are `{prefix}{index}`.
    pub first_user: u64,
    pub count: u32,
    /// New connections per second (0 = as fast as possible).
    pub connect_rate: u32,
    /// Connections being established at once, at most.
    pub connect_concurrency: u32,
    pub connect_timeout_ms: u64,
    pub auth_timeout_ms: u64,
    /// Every n-th connection (by index) stops reading after AUTH (0 = none).
    pub slow_every: u32,
    /// Topic every connection subscribes to after AUTH ("" = none).
    pub topic: String,
    /// Ping interval when AUTH_OK gives none.
    pub default_ping_secs: u32,
    /// After a storm, reconnect attempts per connection before it counts as failed.
    pub reconnect_attempts: u32,
    /// Storm reconnects are spread uniformly over this many ms.
    pub storm_jitter_ms: u64,
}

/// Commands, one per line on the worker's stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Start connecting.
    Go,
    /// Close every connection and reconnect at once (a reconnect storm).
    Storm,
    /// Slow devices start reading again.
    Resume,
    /// Send a final report (the connections stay open).
    Report,
    /// Close everything and exit.
    Stop,
}

/// Events, one per line on the worker's stdout.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    pub open: u64,
    pub delivered: u64,
    pub broadcast_delivered: u64,
    pub subscribed: u64,
    /// Connections closed by the server (EOF, reset, KICK) after AUTH.
    pub closed_by_server: u64,
    /// Initial ramp finished (every connection attempted and settled).
    pub ramped: bool,
    /// Reconnects after the last storm that are settled.
    pub storm_settled: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    Ready {
        pid: u32,
    },
    Progress(Progress),
    /// Indices (relative to `first_user`) whose initial connection failed.
    Ramped {
        failed_users: Vec<u32>,
        slow_users: Vec<u32>,
        first_connect_unix_ms: u64,
        last_established_unix_ms: u64,
    },
    Report(Box<WorkerReport>),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    pub progress: Progress,
    /// Failed connection attempts by reason (initial and reconnects).
    pub failures: BTreeMap<String, u64>,
    /// Closes after AUTH by reason (kick codes, eof, reset).
    pub closes: BTreeMap<String, u64>,
    /// Unicast deliveries: message ids, and latencies in microseconds (same order).
    pub delivered_ids: Vec<u64>,
    pub delivered_latency_us: Vec<u64>,
    /// The receiving device of each delivery (index relative to `first_user`).
    pub delivered_devices: Vec<u32>,
    /// The call tag of each delivery's payload (`frames::call_tag`), 0 for
    /// an untagged payload (same order).
    #[serde(default)]
    pub delivered_calls: Vec<u64>,
    /// Deliveries to slow devices (ids), kept apart from the loss ledger.
    pub slow_delivered_ids: Vec<u64>,
    /// Broadcast receipts per device and topic (lists, not maps: serde cannot
    /// read integer map keys inside an internally tagged enum, and a report
    /// that fails to parse is a report lost).
    pub broadcast_devices: Vec<DeviceReceipts>,
    /// Per topic and offset: devices of this worker that got it, and the
    /// latency to the last of them.
    pub broadcast_offsets: Vec<OffsetReceipts>,
    /// Devices (index relative to `first_user`) told after a reconnect that
    /// the run's topic lost messages they missed (SUB_OK `recovered =
    /// false`), and how many times.
    #[serde(default)]
    pub broadcast_gaps: Vec<(u32, u32)>,
    /// First receipts of broadcasts, API call to receipt: base64 of an
    /// hdrhistogram V2 serialisation (us).
    pub broadcast_latency_histogram: String,
    /// When the last first receipt of a broadcast arrived (unix us).
    pub last_broadcast_receipt_unix_us: u64,
    /// Connect (TCP + AUTH) durations, base64 of an hdrhistogram V2 serialisation (us).
    pub connect_histogram: String,
    /// Storms: per storm, ms from the storm start until every connection settled.
    pub storm_settle_ms: Vec<u64>,
    pub reconnected: u64,
    /// Indices (relative to `first_user`) not connected when the report was made.
    pub offline_users: Vec<u32>,
}
