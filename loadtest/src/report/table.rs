//! The human table a run prints on stdout: one section per part of the
//! report, each a function that appends its lines (labels padded to 34).
#![allow(clippy::format_in_format_args)]

use std::fmt::Write;

use super::{Broadcast, Connections, Memory, Messages, ProcessRow, Report, Slow};
use crate::args::Scenario;
use crate::histogram::Percentiles;
use crate::push_rate::PushRate;

impl Report {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n== pushgrid load test: {:?}, {:.1} s ==",
            self.scenario, self.wall_secs
        );
        connections(&mut out, &self.connections);
        if self.scenario != Scenario::Connect && self.scenario != Scenario::Broadcast {
            messages(&mut out, &self.messages);
        }
        if let Some(rate) = &self.push_rate {
            push_rate(&mut out, rate);
        }
        if self.scenario == Scenario::Broadcast {
            broadcast(&mut out, &self.broadcast);
        }
        if self.scenario == Scenario::Slow {
            slow(&mut out, &self.slow);
        }
        if self.scenario == Scenario::Churn {
            storms(&mut out, &self.churn.storms);
        }
        faults(&mut out, &self.faults);
        if !self.under_faults.is_null() {
            under_faults(&mut out, &self.under_faults);
        }
        memory(&mut out, &self.memory);
        processes(&mut out, &self.processes);
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }
}

fn pct(p: &Percentiles) -> String {
    format!(
        "p50 {:.2} / p99 {:.2} / p99.9 {:.2} / max {:.2} ms (n={})",
        p.p50, p.p99, p.p999, p.max, p.count
    )
}

fn connections(out: &mut String, c: &Connections) {
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
}

fn messages(out: &mut String, m: &Messages) {
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

fn push_rate(out: &mut String, rate: &PushRate) {
    let _ = writeln!(
        out,
        "{:<34} {}/s asked for {} s, {} user(s) per call, {} calls in flight",
        "push rate", rate.asked_per_sec, rate.secs, rate.users_per_call, rate.calls_in_flight
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

fn broadcast(out: &mut String, b: &Broadcast) {
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
        "broadcast deliveries", b.deliveries_per_sec, b.delivery_secs, b.in_flight
    );
    let _ = writeln!(out, "{:<34} {}", "broadcast latency", pct(&b.latency_ms));
    let _ = writeln!(
        out,
        "{:<34} {}",
        "  last device per broadcast",
        pct(&b.last_device_ms)
    );
}

fn slow(out: &mut String, s: &Slow) {
    let _ = writeln!(
        out,
        "{:<34} {} devices, {} messages for them",
        "slow devices", s.devices, s.accepted_for_slow
    );
    let _ = writeln!(
        out,
        "{:<34} {} (kicked SLOW_CONSUMER: {})",
        "slow closed before resume", s.closed_by_server_before_resume, s.kicked_slow_consumer
    );
    let _ = writeln!(
        out,
        "{:<34} {} delivered, {} still in inbox",
        "slow after resume", s.delivered_to_slow_after_resume, s.still_in_inbox
    );
}

fn storms(out: &mut String, storms: &[serde_json::Value]) {
    for storm in storms {
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

fn faults(out: &mut String, faults: &[serde_json::Value]) {
    for f in faults {
        if f.get("detail").is_none() {
            // An under-faults step: what it did and how long the role took to come back.
            let _ = writeln!(
                out,
                "{:<34} {} (back after {:.1} s){}",
                "fault",
                f["fault"].as_str().unwrap_or("?"),
                f["back_after_secs"].as_f64().unwrap_or(0.0),
                f["error"]
                    .as_str()
                    .map(|error| format!(" FAILED: {error}"))
                    .unwrap_or_default()
            );
            continue;
        }
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
}

fn under_faults(out: &mut String, accounting: &serde_json::Value) {
    let a = accounting;
    let lines = [
        (
            "unicast calls",
            format!(
                "{} ({} answered 2xx); answers by status {}",
                a["unicast_calls"], a["unicast_calls_accepted"], a["answers_by_status"]
            ),
        ),
        (
            "refused calls / delivered",
            format!("{} / {}", a["refused"], a["refused_delivered"]),
        ),
        (
            "in doubt (saver kill) / delivered",
            format!("{} / {}", a["in_doubt"], a["in_doubt_delivered"]),
        ),
        (
            "unanswered calls / delivered",
            format!("{} / {}", a["unanswered"], a["unanswered_delivered"]),
        ),
        (
            "keyed calls / retried / given up",
            format!(
                "{} / {} / {}",
                a["keyed_calls"], a["keyed_retried"], a["keyed_given_up"]
            ),
        ),
        (
            "ids answered to two calls",
            a["ids_answered_twice"].to_string(),
        ),
        (
            "broadcasts accepted",
            format!(
                "{} (answers {})",
                a["broadcasts_accepted"], a["broadcast_answers"]
            ),
        ),
        (
            "broadcast deliveries",
            format!(
                "{} of {}, missing without a gap told {}; devices told of a gap {}",
                a["broadcast_delivered"],
                a["broadcast_expected"],
                a["broadcast_missing_without_gap"],
                a["devices_told_of_a_gap"]
            ),
        ),
        ("failed checks", a["failures"].to_string()),
    ];
    for (label, value) in lines {
        let _ = writeln!(out, "{label:<34} {value}");
    }
}

fn memory(out: &mut String, mem: &Memory) {
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
}

fn processes(out: &mut String, processes: &[ProcessRow]) {
    if processes.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n{:>8} {:<12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6}",
        "pid", "role", "conns", "RSS0 MB", "RSS1 MB", "RSSend", "peak MB", "CPU s", "CPU%"
    );
    for p in processes {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;
    use serde_json::json;

    use super::*;
    use crate::args::RunArgs;
    use crate::push_rate::CpuRow;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    /// A report with something in every section the table shows.
    fn full_report(scenario: Scenario) -> Report {
        let args = Cli::parse_from(["loadtest"]).run;
        let mut report = Report::new(scenario, &args, "lt-");
        report.wall_secs = 12.34;
        let c = &mut report.connections;
        c.established = 290;
        c.failed_initial = 10;
        c.failures_by_reason
            .insert("connect: ECONNREFUSED".into(), 10);
        c.closes_by_reason.insert("kick: SLOW_CONSUMER".into(), 3);
        c.connect_rate_per_sec = 1234.4;
        c.ramp_secs = 2.21;
        c.closed_by_server = 3;
        c.open_after_hold = 287;
        c.connect_ms = Percentiles {
            count: 290,
            p50: 1.5,
            p99: 9.25,
            p999: 12.0,
            max: 13.5,
        };
        let m = &mut report.messages;
        m.api_calls = 7;
        m.push_secs = 1.5;
        m.api_errors.insert("push: HTTP 503".into(), 2);
        m.accepted = 600;
        m.delivered = 577;
        m.lost = 23;
        m.lost_ids = (0..23).map(|id| (id, id * 2)).collect();
        m.lost_to_offline_devices = 4;
        m.offline_devices_at_end = 2;
        m.duplicated = 5;
        m.duplicated_messages = 3;
        m.unexpected = 1;
        m.misrouted = 1;
        report.push_rate = Some(crate::push_rate::PushRate {
            asked_per_sec: 1000,
            secs: 5,
            users_per_call: 1,
            calls_in_flight: 8,
            accepted_per_sec: 990.4,
            delivered_per_sec: 985.6,
            pushgrid_cpu_secs: 1.234,
            pushgrid_cpu_us_per_message: 250.5,
            stores_cpu_secs: 0.5,
            stores_cpu_us_per_message: 100.25,
            load_generator_cpu_secs: 0.75,
            threads: Vec::new(),
            cpu: vec![
                CpuRow {
                    pid: 10,
                    name: "center".into(),
                    kind: "pushgrid",
                    cpu_secs: 0.5,
                },
                CpuRow {
                    pid: 11,
                    name: "loadtest".into(),
                    kind: "load generator",
                    cpu_secs: 0.7,
                },
            ],
            ..Default::default()
        });
        let b = &mut report.broadcast;
        b.status = "ok".into();
        b.subscribed = 290;
        b.accepted = 3;
        b.delivered = 860;
        b.expected_deliveries = 870;
        b.lost = 10;
        b.devices_with_loss = 2;
        b.duplicated = 1;
        b.out_of_order = 2;
        b.devices_out_of_order = 1;
        b.skipped_ahead = 1;
        b.unexpected = 1;
        b.deliveries_per_sec = 4321.0;
        b.delivery_secs = 0.199;
        b.in_flight = 2;
        let s = &mut report.slow;
        s.devices = 29;
        s.accepted_for_slow = 58;
        s.closed_by_server_before_resume = 3;
        s.kicked_slow_consumer = 3;
        s.delivered_to_slow_after_resume = 50;
        s.still_in_inbox = 8;
        report.churn.storms.push(json!({
            "storm": 1, "devices": 287, "reconnected_within_secs": 2.5,
            "reconnect_rate_per_sec": 114.8, "open_after": 287
        }));
        report.faults.push(json!({
            "detail": {"fault": "kill -9 of register, restarted"},
            "open_before": 287, "open_after": 287, "all_open_after_secs": 3.25,
            "closed_by_server": 0, "register_sessions_before": 287,
            "register_sessions_after": 287, "sessions_match_after_secs": 4.5,
            "stale_or_missing_sessions": 0
        }));
        report.memory.room_bytes_per_connection = Some(2048.4);
        report.memory.client_bytes_per_connection = 512.6;
        report.memory.workers = 3;
        report.memory.client_rss_after_ramp_mb = 30.2;
        report.memory.client_cpu_secs = 1.25;
        report.processes.push(ProcessRow {
            pid: 42,
            role: "room".into(),
            connections: Some(290),
            rss_start_mb: 10.0,
            rss_after_ramp_mb: 12.5,
            rss_end_mb: 12.0,
            rss_peak_mb: 13.0,
            cpu_secs: 1.5,
            cpu_percent: 12.2,
            alive_at_end: false,
        });
        report.notes.push("a note".into());
        report
    }

    #[test]
    fn the_table_shows_every_section_of_its_scenario() {
        let table = full_report(Scenario::Slow).table();
        for line in [
            "== pushgrid load test: Slow, 12.3 s ==",
            "  failed: connect: ECONNREFUSED",
            "connect rate                       1234/s (ramp 2.2 s, TIMED OUT)",
            "LOST                               23 (4 of them to the 2 devices offline at the end)",
            "  ... 3 more in the JSON report",
            "push rate                          1000/s asked for 5 s, 1 user(s) per call, 8 calls in flight",
            "  center (10)                      0.50 s",
            "slow after resume                  50 delivered, 8 still in inbox",
            "fault                              kill -9 of register, restarted",
            "room RSS per connection            2048 B",
            "all servers RSS per connection     n/a",
            "note: a note",
        ] {
            assert!(table.contains(line), "{line:?} missing from\n{table}");
        }
        assert!(table.contains(" (gone)"), "{table}");
        assert!(
            !table.contains("loadtest (11)"),
            "the load generator's own row is left out"
        );
        assert!(!table.contains("broadcast delivered"), "{table}");
        let broadcast = full_report(Scenario::Broadcast).table();
        assert!(
            broadcast.contains("broadcast delivered                860 of 870"),
            "{broadcast}"
        );
        assert!(!broadcast.contains("push API"), "{broadcast}");
        assert!(full_report(Scenario::Churn).table().contains("storm 1"));
    }
}
