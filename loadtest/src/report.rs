//! The run report: a human table on stdout and the same data as JSON.
#![allow(clippy::format_in_format_args)]

use std::collections::BTreeMap;
use std::fmt::Write;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;

use crate::ledger::Outcome;
use crate::run::{RunArgs, Scenario};

#[derive(Debug, Default, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

pub fn percentiles_ms(histogram: &Histogram<u64>) -> Percentiles {
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        count: histogram.len(),
        p50: ms(histogram.value_at_quantile(0.5)),
        p99: ms(histogram.value_at_quantile(0.99)),
        p999: ms(histogram.value_at_quantile(0.999)),
        max: ms(histogram.max()),
    }
}

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

/// Where and from what a report was made: enough to measure it again.
#[derive(Debug, Default, Serialize)]
pub struct Meta {
    /// The command line.
    pub command: String,
    /// `git rev-parse HEAD` of the working directory, `-dirty` with local changes.
    pub commit: String,
    /// UTC, ISO 8601.
    pub date: String,
    pub machine: Value,
}

impl Meta {
    pub fn now() -> Meta {
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .output()
                .ok()
                .filter(|output| output.status.success())
                .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        };
        let commit = match git(&["rev-parse", "HEAD"]) {
            Some(head) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
                Some(changes) if !changes.is_empty() => format!("{head}-dirty"),
                _ => head,
            },
            None => "unknown".into(),
        };
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split(':').nth(1))
            .map(|model| model.trim().to_owned())
            .unwrap_or_default();
        let memory_kb: u64 = read("/proc/meminfo")
            .lines()
            .find(|line| line.starts_with("MemTotal:"))
            .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        Meta {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            commit,
            date: iso_date(crate::frames::unix_us() / 1_000_000),
            machine: serde_json::json!({
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "cpu_model": cpu_model,
                "memory_gib": (memory_kb as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
                "kernel": read("/proc/sys/kernel/osrelease").trim(),
            }),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (the civil-from-days algorithm).
fn iso_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
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
            notes: Vec::new(),
        }
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let c = &self.connections;
        let m = &self.messages;
        let pct = |p: &Percentiles| {
            format!(
                "p50 {:.2} / p99 {:.2} / p99.9 {:.2} / max {:.2} ms (n={})",
                p.p50, p.p99, p.p999, p.max, p.count
            )
        };
        let _ = writeln!(
            out,
            "\n== pushgrid load test: {:?}, {:.1} s ==",
            self.scenario, self.wall_secs
        );
        let _ = writeln!(
            out,
            "{:<34} {}",
            "connections target / workers",
            format!("{} / {}", c.target, c.workers)
        );
        let _ = writeln!(
            out,
            "{:<34} {}",
            "established / failed",
            format!("{} / {}", c.established, c.failed_initial)
        );
        for (reason, count) in &c.failures_by_reason {
            let _ = writeln!(out, "{:<34} {count}", format!("  failed: {reason}"));
        }
        let _ = writeln!(
            out,
            "{:<34} {:.0}/s (ramp {:.1} s{})",
            "connect rate",
            c.connect_rate_per_sec,
            c.ramp_secs,
            if c.ramp_completed { "" } else { ", TIMED OUT" }
        );
        let _ = writeln!(out, "{:<34} {}", "connect + auth", pct(&c.connect_ms));
        let _ = writeln!(out, "{:<34} {}", "open after hold", c.open_after_hold);
        let _ = writeln!(out, "{:<34} {}", "closed by server", c.closed_by_server);
        for (reason, count) in &c.closes_by_reason {
            let _ = writeln!(out, "{:<34} {count}", format!("  closed: {reason}"));
        }
        if self.scenario != Scenario::Connect && self.scenario != Scenario::Broadcast {
            let _ = writeln!(
                out,
                "{:<34} {} calls, {:.1} s",
                "push API", m.api_calls, m.push_secs
            );
            for (reason, count) in &m.api_errors {
                let _ = writeln!(out, "{:<34} {count}", format!("  not accepted: {reason}"));
            }
            let _ = writeln!(out, "{:<34} {}", "messages accepted by the API", m.accepted);
            let _ = writeln!(out, "{:<34} {}", "delivered", m.delivered);
            let _ = writeln!(
                out,
                "{:<34} {} ({} of them to the {} devices offline at the end)",
                "LOST", m.lost, m.lost_to_offline_devices, m.offline_devices_at_end
            );
            for (id, user) in m.lost_ids.iter().take(20) {
                let _ = writeln!(out, "{:<34} user #{user}", format!("  lost id {id}"));
            }
            if m.lost_ids.len() > 20 {
                let _ = writeln!(
                    out,
                    "  ... {} more in the JSON report",
                    m.lost_ids.len() - 20
                );
            }
            let _ = writeln!(
                out,
                "{:<34} {} extra deliveries of {} messages",
                "duplicated", m.duplicated, m.duplicated_messages
            );
            let _ = writeln!(out, "{:<34} {}", "unexpected ids", m.unexpected);
            let _ = writeln!(out, "{:<34} {}", "MISROUTED", m.misrouted);
            let _ = writeln!(out, "{:<34} {}", "latency", pct(&m.latency_ms));
        }
        if let Some(rate) = &self.push_rate {
            let _ = writeln!(
                out,
                "{:<34} {}/s asked for {} s, {} user(s) per call, {} calls in flight",
                "push rate",
                rate.asked_per_sec,
                rate.secs,
                rate.users_per_call,
                rate.calls_in_flight
            );
            let _ = writeln!(
                out,
                "{:<34} {:.0}/s accepted, {:.0}/s delivered",
                "achieved", rate.accepted_per_sec, rate.delivered_per_sec
            );
            let _ = writeln!(out, "{:<34} {}", "API answer", pct(&rate.answer_ms));
            let _ = writeln!(
                out,
                "{:<34} {:.2} s = {:.1} us per delivered message",
                "CPU, pushgrid processes", rate.pushgrid_cpu_secs, rate.pushgrid_cpu_us_per_message
            );
            let _ = writeln!(
                out,
                "{:<34} {:.2} s = {:.1} us per delivered message",
                "CPU, Redis + MariaDB", rate.stores_cpu_secs, rate.stores_cpu_us_per_message
            );
            let _ = writeln!(
                out,
                "{:<34} {:.2} s",
                "CPU, load generator", rate.load_generator_cpu_secs
            );
            for row in rate.cpu.iter().filter(|row| row.kind != "load generator") {
                let _ = writeln!(
                    out,
                    "{:<34} {:.2} s",
                    format!("  {} ({})", row.name, row.pid),
                    row.cpu_secs
                );
            }
        }
        if self.scenario == Scenario::Broadcast {
            let b = &self.broadcast;
            let _ = writeln!(out, "{:<34} {}", "broadcast", b.status);
            let _ = writeln!(
                out,
                "{:<34} {} subscribed, {} broadcasts accepted",
                "", b.subscribed, b.accepted
            );
            let _ = writeln!(
                out,
                "{:<34} {} of {} (lost {} on {} devices, duplicated {}, out of order {} on {} devices, skipped ahead {}, unexpected {})",
                "broadcast delivered",
                b.delivered,
                b.expected_deliveries,
                b.lost,
                b.devices_with_loss,
                b.duplicated,
                b.out_of_order,
                b.devices_out_of_order,
                b.skipped_ahead,
                b.unexpected
            );
            let _ = writeln!(
                out,
                "{:<34} {:.0}/s ({:.3} s, {} in flight)",
                "broadcast deliveries",
                b.deliveries_per_sec,
                b.delivery_secs,
                b.in_flight
            );
            let _ = writeln!(out, "{:<34} {}", "broadcast latency", pct(&b.latency_ms));
            let _ = writeln!(out, "{:<34} {}", "  last device per broadcast", pct(&b.last_device_ms));
        }
        if self.scenario == Scenario::Slow {
            let s = &self.slow;
            let _ = writeln!(
                out,
                "{:<34} {} devices, {} messages for them",
                "slow devices", s.devices, s.accepted_for_slow
            );
            let _ = writeln!(
                out,
                "{:<34} {} (kicked SLOW_CONSUMER: {})",
                "slow closed before resume",
                s.closed_by_server_before_resume,
                s.kicked_slow_consumer
            );
            let _ = writeln!(
                out,
                "{:<34} {} delivered, {} still in inbox",
                "slow after resume", s.delivered_to_slow_after_resume, s.still_in_inbox
            );
        }
        if self.scenario == Scenario::Churn {
            for storm in &self.churn.storms {
                let _ = writeln!(
                    out,
                    "{:<34} {}",
                    format!("storm {}", storm["storm"]),
                    format!(
                        "{} devices back in {:.1} s ({:.0}/s), open after {}",
                        storm["devices"],
                        storm["reconnected_within_secs"].as_f64().unwrap_or(0.0),
                        storm["reconnect_rate_per_sec"].as_f64().unwrap_or(0.0),
                        storm["open_after"]
                    )
                );
            }
        }
        for f in &self.faults {
            let _ = writeln!(
                out,
                "{:<34} {}",
                "fault",
                f["detail"]["fault"].as_str().unwrap_or("?")
            );
            let _ = writeln!(
                out,
                "{:<34} {} open before, {} after (all open after {:.1} s; {} closed by the server)",
                "  devices",
                f["open_before"],
                f["open_after"],
                f["all_open_after_secs"].as_f64().unwrap_or(0.0),
                f["closed_by_server"]
            );
            let _ = writeln!(
                out,
                "{:<34} {} before, {} after ({:.1} s), stale or missing {}",
                "  register sessions",
                f["register_sessions_before"],
                f["register_sessions_after"],
                f["sessions_match_after_secs"].as_f64().unwrap_or(0.0),
                f["stale_or_missing_sessions"]
            );
        }
        let mem = &self.memory;
        let per = |value: Option<f64>| {
            value
                .map(|bytes| format!("{:.0} B", bytes))
                .unwrap_or_else(|| "n/a".into())
        };
        let _ = writeln!(
            out,
            "{:<34} {}",
            "room RSS per connection",
            per(mem.room_bytes_per_connection)
        );
        let _ = writeln!(
            out,
            "{:<34} {}",
            "all servers RSS per connection",
            per(mem.servers_bytes_per_connection)
        );
        let _ = writeln!(
            out,
            "{:<34} {:.0} B ({} workers, {:.0} MB, {:.1} CPU s)",
            "client RSS per connection",
            mem.client_bytes_per_connection,
            mem.workers,
            mem.client_rss_after_ramp_mb,
            mem.client_cpu_secs
        );
        if !self.processes.is_empty() {
            let _ = writeln!(
                out,
                "\n{:>8} {:<12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6}",
                "pid", "role", "conns", "RSS0 MB", "RSS1 MB", "RSSend", "peak MB", "CPU s", "CPU%"
            );
            for p in &self.processes {
                let _ = writeln!(
                    out,
                    "{:>8} {:<12} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.1} {:>6.1}{}",
                    p.pid,
                    p.role,
                    p.connections.map(|c| c.to_string()).unwrap_or_default(),
                    p.rss_start_mb,
                    p.rss_after_ramp_mb,
                    p.rss_end_mb,
                    p.rss_peak_mb,
                    p.cpu_secs,
                    p.cpu_percent,
                    if p.alive_at_end { "" } else { " (gone)" }
                );
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates_of_known_unix_times() {
        assert_eq!(iso_date(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_date(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso_date(1_796_517_045), "2026-12-06T00:30:45Z");
    }
}
