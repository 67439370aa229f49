//! The run report: the sections of the JSON document a run writes (the same
//! data `table` prints for a human). Filled in by `run`; `meta` says where and
//! from what it was made, `table` renders it.

mod meta;
mod table;

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;

use crate::args::{RunArgs, Scenario};
use crate::histogram::{Percentiles, percentiles_ms};
use crate::ledger::Outcome;
use meta::Meta;

#[derive(Debug, Default, Serialize)]
pub struct Connections {
    pub target: u64,
    pub workers: usize,
    pub established: u64,
    pub failed_initial: u64,
    /// Failed attempts by reason (initial and reconnects).
    pub failures_by_reason: BTreeMap<String, u64>,
    pub ramp_completed: bool,
    pub ramp_secs: f64,
    /// Established connections / (last AUTH_OK - first connect).
    pub connect_rate_per_sec: f64,
    /// TCP connect + AUTH (+ SUB) per connection.
    pub connect_ms: Percentiles,
    pub open_after_hold: u64,
    pub closed_by_server: u64,
    pub closes_by_reason: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Messages {
    pub api_calls: u64,
    /// Messages the API did not accept, by reason.
    pub api_errors: BTreeMap<String, u64>,
    pub push_secs: f64,
    pub accepted: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Every lost message: [message id, user index].
    pub lost_ids: Vec<(u64, u64)>,
    /// Of the lost: messages of devices not connected at the end of the run
    /// (their initial connect failed, or they were still reconnecting); these
    /// wait in the inbox for the device's next AUTH.
    pub lost_to_offline_devices: u64,
    /// Devices not connected when the workers reported.
    pub offline_devices_at_end: u64,
    pub duplicated: u64,
    pub duplicated_messages: u64,
    pub unexpected: u64,
    /// Deliveries of accepted messages to another user's device.
    pub misrouted: u64,
    pub drain_secs: f64,
    /// Send (payload timestamp) to receipt.
    pub latency_ms: Percentiles,
}

impl Messages {
    pub fn set_outcome(&mut self, outcome: Outcome, latency: &Histogram<u64>) {
        self.accepted = outcome.accepted;
        self.delivered = outcome.delivered;
        self.lost = outcome.lost.len() as u64;
        self.lost_ids = outcome.lost;
        self.duplicated = outcome.duplicated;
        self.duplicated_messages = outcome.duplicated_messages;
        self.unexpected = outcome.unexpected;
        self.misrouted = outcome.misrouted;
        self.latency_ms = percentiles_ms(latency);
    }
}

/// Broadcast accounting: every accepted offset matched against every
/// subscribed device (see `receipts.rs`).
#[derive(Debug, Default, Serialize)]
pub struct Broadcast {
    pub status: String,
    pub topic: String,
    /// Broadcast API calls in flight at once.
    pub in_flight: usize,
    /// Devices subscribed when the broadcasts started.
    pub subscribed: u64,
    /// Devices expected to receive every broadcast (connected at the ramp).
    pub devices: u64,
    pub accepted: u64,
    pub offsets: Vec<u64>,
    /// devices x accepted offsets.
    pub expected_deliveries: u64,
    /// (device, accepted offset) pairs received at least once.
    pub delivered: u64,
    /// (device, accepted offset) pairs never received.
    pub lost: u64,
    pub devices_with_loss: u64,
    /// Up to 20 devices that missed offsets: (user index, up to 20 offsets).
    pub lost_sample: Vec<(u64, Vec<u64>)>,
    /// offset -> devices that did not get it.
    pub lost_by_offset: BTreeMap<u64, u64>,
    /// Deliveries of an offset the device already had.
    pub duplicated: u64,
    /// First deliveries of an offset lower than one the device already had.
    pub out_of_order: u64,
    pub devices_out_of_order: u64,
    /// First deliveries more than one above the device's highest offset.
    pub skipped_ahead: u64,
    /// Distinct offsets received that the API did not accept in this run.
    pub unexpected: u64,
    /// API call to each device's first receipt.
    pub latency_ms: Percentiles,
    /// Per broadcast: API call to the receipt of the last device.
    pub last_device_ms: Percentiles,
    /// offset -> API call to the receipt of its last device, ms (each
    /// broadcast's own figure behind `last_device_ms`).
    pub last_device_ms_by_offset: BTreeMap<u64, f64>,
    /// First broadcast call to the last receipt.
    pub delivery_secs: f64,
    /// `delivered` / `delivery_secs`.
    pub deliveries_per_sec: f64,
    /// Every broadcast call answered, from the first call.
    pub api_secs: f64,
    pub api_calls: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Slow {
    pub devices: u64,
    pub accepted_for_slow: u64,
    pub closed_by_server_before_resume: u64,
    pub kicked_slow_consumer: u64,
    pub delivered_to_slow_after_resume: u64,
    /// Messages to slow devices not delivered: still in their inbox (at-least-once), not lost.
    pub still_in_inbox: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Churn {
    pub storms: Vec<Value>,
    pub reconnected: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Memory {
    /// RSS growth of the room processes over the ramp / their connections.
    pub room_bytes_per_connection: Option<f64>,
    /// RSS growth of every measured pushgrid process / connections.
    pub servers_bytes_per_connection: Option<f64>,
    /// RSS growth of the load generator's workers / connections.
    pub client_bytes_per_connection: f64,
    pub client_rss_after_ramp_mb: f64,
    pub workers: usize,
    pub client_cpu_secs: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct ProcessRow {
    pub pid: u32,
    pub role: String,
    pub connections: Option<u64>,
    pub rss_start_mb: f64,
    pub rss_after_ramp_mb: f64,
    pub rss_end_mb: f64,
    pub rss_peak_mb: f64,
    pub cpu_secs: f64,
    pub cpu_percent: f64,
    pub alive_at_end: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub meta: Meta,
    pub scenario: Scenario,
    pub started_unix_ms: u64,
    pub user_prefix: String,
    pub args: Value,
    pub wall_secs: f64,
    pub connections: Connections,
    pub messages: Messages,
    pub broadcast: Broadcast,
    pub slow: Slow,
    pub churn: Churn,
    /// `loadtest push-rate` only.
    pub push_rate: Option<crate::push_rate::PushRate>,
    pub memory: Memory,
    pub processes: Vec<ProcessRow>,
    /// The cluster `loadtest million` started for the run (null otherwise).
    pub cluster: Value,
    /// What `loadtest million --faults` injected and how the cluster came
    /// back, one entry per fault.
    pub faults: Vec<Value>,
    /// The under-faults scenario's accounting of every call (null otherwise).
    pub under_faults: Value,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: Scenario, args: &RunArgs, prefix: &str) -> Report {
        let mut args_json = serde_json::to_value(args).unwrap_or(Value::Null);
        if let Some(object) = args_json.as_object_mut() {
            object.remove("jwt_secret");
            object.remove("api_key");
        }
        Report {
            meta: Meta::now(),
            scenario,
            started_unix_ms: crate::frames::unix_us() / 1000,
            user_prefix: prefix.to_owned(),
            args: args_json,
            wall_secs: 0.0,
            connections: Connections {
                target: args.connections,
                workers: args
                    .connections
                    .div_ceil(u64::from(args.per_worker.clamp(1, 18_000)))
                    as usize,
                ..Default::default()
            },
            messages: Messages::default(),
            broadcast: Broadcast::default(),
            slow: Slow::default(),
            churn: Churn::default(),
            push_rate: None,
            memory: Memory::default(),
            processes: Vec::new(),
            cluster: Value::Null,
            faults: Vec::new(),
            under_faults: Value::Null,
            notes: Vec::new(),
        }
    }
}
