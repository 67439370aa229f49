//! The accounting at the end of a run: every accepted message id and every
//! accepted broadcast offset matched against what the workers received, by
//! device; connect and delivery latencies.

use std::collections::{BTreeMap, HashMap, HashSet};

use hdrhistogram::Histogram;

use super::Collected;
use crate::args::{RunArgs, Scenario};
use crate::histogram::{self, connect_histogram, latency_histogram, percentiles_ms};
use crate::ipc::{WorkerReport, WorkerSpec};
use crate::ledger::Ledger;
use crate::receipts::TopicReceipts;
use crate::report::{self, Report};

/// Connections and unicast messages: failures and closes by reason, every
/// delivered id into its ledger (by receiving device), what is lost, and
/// the connect and delivery latencies.
pub(super) fn messages(
    report: &mut Report,
    collected: &Collected,
    ledger: &mut Ledger,
    slow_ledger: &mut Ledger,
) {
    let mut connect = connect_histogram();
    let mut latency = latency_histogram();
    for (spec, worker) in collected.specs.iter().zip(&collected.reports) {
        for (reason, count) in &worker.failures {
            *report
                .connections
                .failures_by_reason
                .entry(reason.clone())
                .or_default() += count;
        }
        for (reason, count) in &worker.closes {
            *report
                .connections
                .closes_by_reason
                .entry(reason.clone())
                .or_default() += count;
        }
        report.connections.closed_by_server += worker.progress.closed_by_server;
        report.churn.reconnected += worker.reconnected;
        deliver(spec, worker, ledger, slow_ledger, &mut latency);
        if let Some(histogram) = histogram::from_base64(&worker.connect_histogram) {
            let _ = connect.add(histogram);
        }
    }
    let outcome = ledger.outcome();
    // Undelivered messages of devices that were not connected at the end
    // wait in their inbox (at-least-once); the others were lost in flight.
    let offline = offline_devices(&collected.specs, &collected.reports);
    report.messages.lost_to_offline_devices = outcome
        .lost
        .iter()
        .filter(|(_, user)| offline.contains(user))
        .count() as u64;
    report.messages.offline_devices_at_end = offline.len() as u64;
    report.messages.set_outcome(outcome, &latency);
    if report.scenario == Scenario::Slow {
        slow_outcome(report, slow_ledger);
    }
    // The worker reports are final; progress lines seen at the ramp may trail them.
    let established: u64 = collected
        .reports
        .iter()
        .map(|worker| worker.progress.established)
        .sum();
    let connections = &mut report.connections;
    if established > connections.established && connections.established > 0 {
        connections.connect_rate_per_sec *= established as f64 / connections.established as f64;
    }
    connections.established = connections.established.max(established);
    connections.connect_ms = percentiles_ms(&connect);
}

/// One worker's unicast deliveries into the ledgers; latencies of the
/// devices that read.
fn deliver(
    spec: &WorkerSpec,
    worker: &WorkerReport,
    ledger: &mut Ledger,
    slow_ledger: &mut Ledger,
    latency: &mut Histogram<u64>,
) {
    for (index, (id, us)) in worker
        .delivered_ids
        .iter()
        .zip(&worker.delivered_latency_us)
        .enumerate()
    {
        if slow_ledger.contains(*id) {
            slow_ledger.deliver(*id);
        } else {
            match worker.delivered_devices.get(index) {
                Some(device) => ledger.deliver_to(*id, spec.first_user + u64::from(*device)),
                None => ledger.deliver(*id),
            }
            if *us > 0 {
                let _ = latency.record(*us);
            }
        }
    }
    for id in &worker.slow_delivered_ids {
        slow_ledger.deliver(*id);
    }
}

fn slow_outcome(report: &mut Report, slow_ledger: &Ledger) {
    let slow_outcome = slow_ledger.outcome();
    report.slow.accepted_for_slow = slow_outcome.accepted;
    report.slow.delivered_to_slow_after_resume = slow_outcome.delivered;
    report.slow.still_in_inbox = slow_outcome.lost.len() as u64;
    report.slow.kicked_slow_consumer = report
        .connections
        .closes_by_reason
        .iter()
        .filter(|(reason, _)| reason.contains("SLOW_CONSUMER"))
        .map(|(_, count)| *count)
        .sum();
}

/// Global indices of the devices not connected when their worker reported.
fn offline_devices(specs: &[WorkerSpec], reports: &[WorkerReport]) -> HashSet<u64> {
    specs
        .iter()
        .zip(reports)
        .flat_map(|(spec, report)| {
            report
                .offline_users
                .iter()
                .map(move |index| spec.first_user + u64::from(*index))
        })
        .collect()
}

/// The broadcast section: loss per device and offset, latencies, and the
/// delivery rate from the first call (`started_us`) to the last receipt.
pub(super) fn broadcasts(
    report: &mut Report,
    args: &RunArgs,
    collected: &Collected,
    devices: &[u64],
    started_us: u64,
) {
    let mut broadcast_latency = latency_histogram();
    // offset -> slowest device's latency (µs), over every worker.
    let mut last_device_us: BTreeMap<u64, u64> = BTreeMap::new();
    let mut last_receipt_us = 0u64;
    for worker in &collected.reports {
        for receipt in &worker.broadcast_offsets {
            if receipt.topic == args.topic {
                let slowest = last_device_us.entry(receipt.offset).or_default();
                *slowest = (*slowest).max(receipt.max_latency_us);
            }
        }
        last_receipt_us = last_receipt_us.max(worker.last_broadcast_receipt_unix_us);
        if let Some(histogram) = histogram::from_base64(&worker.broadcast_latency_histogram) {
            let _ = broadcast_latency.add(histogram);
        }
    }
    let broadcast = &mut report.broadcast;
    account_broadcasts(
        broadcast,
        &collected.specs,
        &collected.reports,
        devices,
        &last_device_us,
    );
    broadcast.latency_ms = percentiles_ms(&broadcast_latency);
    if broadcast.delivered > 0 && last_receipt_us > started_us {
        let secs = (last_receipt_us - started_us) as f64 / 1e6;
        broadcast.delivery_secs = secs;
        broadcast.deliveries_per_sec = broadcast.delivered as f64 / secs;
    }
}

/// Matches every accepted offset against every device expected to get it
/// (`devices`: global user indices connected at the ramp), by device.
fn account_broadcasts(
    broadcast: &mut report::Broadcast,
    specs: &[WorkerSpec],
    reports: &[WorkerReport],
    devices: &[u64],
    last_device_us: &BTreeMap<u64, u64>,
) {
    let accepted = broadcast.offsets.clone();
    let accepted_set: HashSet<u64> = accepted.iter().copied().collect();
    let empty = TopicReceipts::default();
    let mut by_device: HashMap<u64, &TopicReceipts> = HashMap::new();
    for (spec, worker) in specs.iter().zip(reports) {
        for device in &worker.broadcast_devices {
            if device.topic == broadcast.topic {
                by_device.insert(spec.first_user + u64::from(device.device), &device.receipts);
            }
        }
    }
    broadcast.devices = devices.len() as u64;
    broadcast.expected_deliveries = broadcast.devices * accepted.len() as u64;
    let mut unexpected = HashSet::new();
    for receipts in by_device.values() {
        broadcast.duplicated += receipts.duplicated;
        broadcast.out_of_order += receipts.out_of_order;
        broadcast.skipped_ahead += receipts.skipped_ahead;
        if receipts.out_of_order > 0 {
            broadcast.devices_out_of_order += 1;
        }
        for (start, end) in &receipts.ranges {
            // Bounded: a run accepts at most --broadcasts offsets, and a
            // range longer than that holds unexpected ones anyway.
            for offset in *start..=(*end).min(start.saturating_add(100_000)) {
                if !accepted_set.contains(&offset) {
                    unexpected.insert(offset);
                }
            }
        }
    }
    broadcast.unexpected = unexpected.len() as u64;
    for user in devices {
        let receipts = by_device.get(user).copied().unwrap_or(&empty);
        let missing = receipts.missing(&accepted);
        broadcast.delivered += (accepted.len() - missing.len()) as u64;
        if missing.is_empty() {
            continue;
        }
        broadcast.lost += missing.len() as u64;
        broadcast.devices_with_loss += 1;
        for offset in &missing {
            *broadcast.lost_by_offset.entry(*offset).or_default() += 1;
        }
        if broadcast.lost_sample.len() < 20 {
            broadcast
                .lost_sample
                .push((*user, missing.into_iter().take(20).collect()));
        }
    }
    let mut last = latency_histogram();
    for offset in &accepted {
        if let Some(us) = last_device_us.get(offset) {
            let _ = last.record((*us).max(1));
            broadcast
                .last_device_ms_by_offset
                .insert(*offset, *us as f64 / 1000.0);
        }
    }
    broadcast.last_device_ms = percentiles_ms(&last);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn spec(first_user: u64) -> WorkerSpec {
        serde_json::from_value(json!({
            "id": 0, "source_ip": "127.0.0.2", "room": "127.0.0.1:1", "app": "a",
            "jwt_secret": "s", "user_prefix": "u", "first_user": first_user, "count": 2,
            "connect_rate": 0, "connect_concurrency": 1, "connect_timeout_ms": 1,
            "auth_timeout_ms": 1, "slow_every": 0, "topic": "t", "default_ping_secs": 1,
            "reconnect_attempts": 1, "storm_jitter_ms": 0
        }))
        .unwrap()
    }

    fn receipts(device: u32, offsets: &[u64]) -> crate::receipts::DeviceReceipts {
        let mut receipts = TopicReceipts::default();
        for offset in offsets {
            receipts.record(*offset);
        }
        crate::receipts::DeviceReceipts {
            device,
            topic: "t".into(),
            epoch: 1,
            receipts,
        }
    }

    #[test]
    fn broadcast_loss_is_counted_per_device_even_when_others_got_the_offset() {
        let specs = [spec(0), spec(2)];
        let reports = [
            WorkerReport {
                broadcast_devices: vec![receipts(0, &[1, 2, 3]), receipts(1, &[1, 3, 2, 2])],
                ..Default::default()
            },
            WorkerReport {
                // Device 2 missed offset 2; device 3 never got anything.
                broadcast_devices: vec![receipts(0, &[1, 3, 9])],
                ..Default::default()
            },
        ];
        let mut broadcast = report::Broadcast {
            topic: "t".into(),
            offsets: vec![1, 2, 3],
            ..Default::default()
        };
        account_broadcasts(
            &mut broadcast,
            &specs,
            &reports,
            &[0, 1, 2, 3],
            &BTreeMap::from([(1, 5_000), (2, 9_000), (3, 7_000)]),
        );
        assert_eq!(broadcast.expected_deliveries, 12);
        assert_eq!(broadcast.delivered, 8);
        assert_eq!(broadcast.lost, 4);
        assert_eq!(broadcast.devices_with_loss, 2);
        assert_eq!(
            broadcast.lost_sample,
            vec![(2, vec![2]), (3, vec![1, 2, 3])]
        );
        assert_eq!(
            broadcast.lost_by_offset,
            BTreeMap::from([(1, 1), (2, 2), (3, 1)])
        );
        assert_eq!(broadcast.duplicated, 1);
        assert_eq!(broadcast.out_of_order, 1);
        assert_eq!(broadcast.devices_out_of_order, 1);
        assert_eq!(broadcast.unexpected, 1, "offset 9 was never accepted");
        assert_eq!(broadcast.last_device_ms.count, 3);
        assert!(
            (broadcast.last_device_ms.max - 9.0).abs() < 0.01,
            "{:?}",
            broadcast.last_device_ms
        );
        assert_eq!(
            broadcast.last_device_ms_by_offset,
            BTreeMap::from([(1, 5.0), (2, 9.0), (3, 7.0)])
        );
    }
}
