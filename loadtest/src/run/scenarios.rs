//! What each scenario does once the devices are connected: push-rate,
//! unicast and slow push through the API and wait for the deliveries;
//! broadcast calls the broadcast API; churn sends reconnect storms while it
//! pushes. Also the fault step of `loadtest million --faults`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use indicatif::ProgressBar;
use serde_json::{Value, json};

use super::api::{PushOutcome, broadcast_call, push_batches, push_unicast};
use super::meter::Meter;
use super::workers::Workers;
use super::{Fault, Run, bar, lock, merge};
use crate::args::{RunArgs, Scenario};
use crate::frames::unix_us;
use crate::ipc::{Command, Progress};
use crate::push_rate;

impl Run<'_> {
    /// Runs the scenario's pushes; returns when the broadcasts started (unix
    /// µs, 0 for other scenarios).
    pub(super) async fn drive(&mut self, meter: &Meter, fault: Option<&mut dyn Fault>) -> u64 {
        match self.scenario {
            Scenario::Connect => {}
            Scenario::UnderFaults => self.under_faults(fault).await,
            Scenario::PushRate => self.push_rate(meter).await,
            Scenario::Unicast | Scenario::Slow => self.unicast().await,
            Scenario::Broadcast => return self.broadcast().await,
            Scenario::Churn => self.churn().await,
        }
        0
    }

    /// Pushes at --rate for --secs, then waits for the deliveries; the CPU
    /// of every measured process over that window.
    async fn push_rate(&mut self, meter: &Meter) {
        let args = self.args;
        let total = args.push_rate * args.push_secs;
        let batches = push_rate::schedule(&self.online, total, args.batch);
        let mut measured: Vec<push_rate::Measured> = meter
            .servers()
            .iter()
            .map(|server| push_rate::Measured {
                pid: server.pid,
                name: server.role.clone(),
                kind: "pushgrid",
            })
            .collect();
        measured.extend(push_rate::discover_stores());
        measured.extend(
            self.workers
                .pids()
                .into_iter()
                .chain([std::process::id()])
                .map(|pid| push_rate::Measured {
                    pid,
                    name: "loadtest".into(),
                    kind: "load generator",
                }),
        );
        self.set_phase("push");
        let push_bar = bar(args, total, "push");
        let window = push_rate::CpuWindow::start(measured);
        let pushed = push_batches(
            args,
            &self.http,
            &self.prefix,
            &batches,
            &self.ledger,
            &push_bar,
        )
        .await;
        push_bar.finish();
        let accepted = lock(&self.ledger).len() as u64;
        self.set_phase("deliver");
        let drain_bar = bar(args, accepted, "deliver");
        let drain_secs = drain(&self.workers, args, accepted, |p| p.delivered, &drain_bar).await;
        drain_bar.finish();
        let delivered = self.workers.total().delivered.min(accepted);
        self.report.push_rate = Some(push_rate::PushRate::measured(
            args,
            pushed.calls,
            pushed.seconds,
            accepted,
            delivered,
            &pushed.answer_us,
            window,
        ));
        let messages = &mut self.report.messages;
        messages.push_secs = pushed.seconds;
        messages.api_calls = pushed.calls;
        messages.api_errors = pushed.errors;
        messages.drain_secs = drain_secs;
    }

    /// --messages-per-user to every device (the slow ones in a ledger of
    /// their own), then the deliveries; slow: then resume the slow devices.
    async fn unicast(&mut self) {
        let args = self.args;
        let targets = self.online.len() as u64 * u64::from(args.messages_per_user);
        self.set_phase("push");
        let push_bar = bar(args, targets, "push");
        let (http, prefix) = (&self.http, self.prefix.as_str());
        let slow_push = async {
            if self.slow.is_empty() {
                PushOutcome::default()
            } else {
                let rounds = args.messages_per_user;
                let hidden = ProgressBar::hidden();
                push_unicast(
                    args,
                    http,
                    prefix,
                    &self.slow,
                    rounds,
                    &self.slow_ledger,
                    &hidden,
                )
                .await
            }
        };
        let (pushed, slow_pushed) = tokio::join!(
            push_unicast(
                args,
                http,
                prefix,
                &self.online,
                args.messages_per_user,
                &self.ledger,
                &push_bar
            ),
            slow_push
        );
        push_bar.finish();
        let accepted = lock(&self.ledger).len() as u64;
        let all_accepted = accepted + lock(&self.slow_ledger).len() as u64;
        self.set_phase("deliver");
        let drain_bar = bar(args, accepted, "deliver");
        let drain_secs = drain(
            &self.workers,
            args,
            all_accepted,
            |p| p.delivered,
            &drain_bar,
        )
        .await;
        drain_bar.finish();
        let messages = &mut self.report.messages;
        messages.push_secs = pushed.seconds;
        messages.api_calls = pushed.calls + slow_pushed.calls;
        messages.api_errors = merge(pushed.errors, slow_pushed.errors);
        messages.drain_secs = drain_secs;
        if self.scenario == Scenario::Slow {
            let before_resume = self.workers.total();
            self.report.slow.devices = self.slow.len() as u64;
            self.report.slow.closed_by_server_before_resume = before_resume.closed_by_server;
            self.workers.send(&Command::Resume).await;
            let resume_bar = bar(args, all_accepted, "resume");
            drain(
                &self.workers,
                args,
                all_accepted,
                |p| p.delivered,
                &resume_bar,
            )
            .await;
            resume_bar.finish();
        }
    }

    /// --broadcasts calls to --topic, --broadcast-concurrency in flight and
    /// at least --broadcast-interval-ms apart, then the deliveries of every
    /// accepted offset. Returns when the first call started (unix µs).
    async fn broadcast(&mut self) -> u64 {
        let args = self.args;
        self.set_phase("broadcast");
        let broadcast = &mut self.report.broadcast;
        broadcast.subscribed = self.workers.total().subscribed;
        broadcast.topic = args.topic.clone();
        broadcast.in_flight = args.broadcast_concurrency.max(1);
        let devices = self.online.len() as u64;
        let drain_bar = bar(args, devices * u64::from(args.broadcasts), "broadcast");
        let started_us = unix_us();
        let started = Instant::now();
        let http = &self.http;
        let results: Vec<Result<u64, String>> = futures::stream::iter(0..args.broadcasts)
            .map(|index| async move {
                let due =
                    started + Duration::from_millis(args.broadcast_interval_ms * u64::from(index));
                tokio::time::sleep_until(due.into()).await;
                broadcast_call(args, http).await
            })
            .buffer_unordered(args.broadcast_concurrency.max(1))
            .collect()
            .await;
        let offsets = self.accepted_offsets(started, results);
        if !offsets.is_empty() {
            if self.report.broadcast.status.is_empty() {
                self.report.broadcast.status = "ok".into();
            }
            let expected = devices * offsets.len() as u64;
            self.report.broadcast.expected_deliveries = expected;
            self.set_phase("deliver");
            drain_bar.set_length(expected);
            let delivered = |p: &Progress| p.broadcast_delivered;
            self.report.messages.drain_secs =
                drain(&self.workers, args, expected, delivered, &drain_bar).await;
        }
        drain_bar.finish();
        started_us
    }

    /// Puts the broadcast calls' answers into the report; the accepted
    /// offsets, in order.
    fn accepted_offsets(
        &mut self,
        started: Instant,
        results: Vec<Result<u64, String>>,
    ) -> Vec<u64> {
        let report = &mut self.report;
        report.broadcast.api_secs = started.elapsed().as_secs_f64();
        report.broadcast.api_calls = results.len() as u64;
        let mut offsets = Vec::new();
        for result in results {
            match result {
                Ok(offset) => offsets.push(offset),
                Err(reason) => {
                    *report.messages.api_errors.entry(reason).or_default() += 1;
                }
            }
        }
        offsets.sort_unstable();
        report.broadcast.accepted = offsets.len() as u64;
        report.broadcast.offsets = offsets.clone();
        if report
            .messages
            .api_errors
            .keys()
            .any(|reason| reason.contains("HTTP 404"))
        {
            report.broadcast.status =
                "broadcast API not available (POST /api/broadcast answered 404)".into();
        }
        offsets
    }

    /// --storms reconnect storms, each with one message to every device
    /// pushed while they reconnect.
    async fn churn(&mut self) {
        let args = self.args;
        for storm in 0..args.storms {
            let participants = self.workers.total().open;
            let storm_started = Instant::now();
            self.workers.send(&Command::Storm).await;
            // Push while the devices reconnect: stored messages must reach them.
            let push_bar = bar(
                args,
                self.online.len() as u64,
                &format!("storm {}", storm + 1),
            );
            let pushed = push_unicast(
                args,
                &self.http,
                &self.prefix,
                &self.online,
                1,
                &self.ledger,
                &push_bar,
            )
            .await;
            push_bar.finish();
            let messages = &mut self.report.messages;
            messages.api_calls += pushed.calls;
            messages.api_errors = merge(std::mem::take(&mut messages.api_errors), pushed.errors);
            self.workers
                .wait_until(Duration::from_secs(args.ramp_timeout_secs), |workers| {
                    // Progress lines older than the storm still carry the last count.
                    storm_started.elapsed() > Duration::from_millis(600)
                        && workers.total().storm_settled >= participants
                })
                .await;
            let settle = storm_started.elapsed().as_secs_f64();
            let accepted = lock(&self.ledger).len() as u64;
            let drain_bar = bar(args, accepted, "deliver");
            drain(&self.workers, args, accepted, |p| p.delivered, &drain_bar).await;
            drain_bar.finish();
            self.report.churn.storms.push(json!({
                "storm": storm + 1,
                "devices": participants,
                "reconnected_within_secs": settle,
                "reconnect_rate_per_sec": if settle > 0.0 { participants as f64 / settle } else { 0.0 },
                "open_after": self.workers.total().open,
            }));
        }
    }
}

/// Waits until `delivered(total) >= target`, `quiet` passes without progress, or `limit`.
pub(super) async fn drain(
    workers: &Workers,
    args: &RunArgs,
    target: u64,
    delivered: impl Fn(&Progress) -> u64,
    progress: &ProgressBar,
) -> f64 {
    let started = Instant::now();
    let mut last = (0u64, Instant::now());
    workers
        .wait_until(Duration::from_secs(args.drain_secs), |workers| {
            let now = delivered(&workers.total());
            progress.set_position(now);
            if now != last.0 {
                last = (now, Instant::now());
            }
            now >= target || last.1.elapsed() > Duration::from_secs(args.quiet_secs)
        })
        .await;
    started.elapsed().as_secs_f64()
}

/// Injects fault `step`, then waits (at most --ramp-timeout-secs) until every
/// device open before it is open again and the registers hold exactly one
/// session per open device: every session back, none stale.
pub(super) async fn inject_fault(
    fault: &mut dyn Fault,
    step: usize,
    workers: &Workers,
    args: &RunArgs,
) -> anyhow::Result<Value> {
    let before = workers.total();
    let sessions_before = fault.sessions().await?;
    let started = Instant::now();
    let detail = fault.inject(step).await?;
    let injected_secs = started.elapsed().as_secs_f64();
    let limit = Duration::from_secs(args.ramp_timeout_secs);
    // Progress comes every 250 ms: let the workers see the fault first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut all_open_secs = None;
    let (mut open, mut sessions);
    loop {
        open = workers.total().open;
        if all_open_secs.is_none() && open >= before.open {
            all_open_secs = Some(started.elapsed().as_secs_f64());
        }
        sessions = fault.sessions().await.unwrap_or(0);
        if (open >= before.open && sessions == open) || started.elapsed() >= limit {
            break;
        }
        // Polls register's /metrics: the condition is outside this process.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = workers.total();
    Ok(json!({
        "detail": detail,
        "open_before": before.open,
        "register_sessions_before": sessions_before,
        "injected_secs": injected_secs,
        "all_open_again": all_open_secs.is_some(),
        "all_open_after_secs": all_open_secs,
        "closed_by_server": after.closed_by_server - before.closed_by_server,
        "open_after": open,
        "register_sessions_after": sessions,
        "sessions_match_after_secs": started.elapsed().as_secs_f64(),
        "stale_or_missing_sessions": sessions as i64 - open as i64,
    }))
}
