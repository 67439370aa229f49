//! The coordinating process of a run, in phases: fork the workers, ramp the
//! connections, hold, inject faults, drive the scenario through the push API
//! (`scenarios`), collect the workers' reports and account for every message
//! (`account`) and for the processes' CPU and memory (`meter`). `workers`
//! talks to the worker processes, `api` to the push API.
//!
//! Depends on `report`, `push_rate` and the shared types below them (`args`,
//! `histogram`, `ipc`, `ledger`, `receipts`); nothing below depends on it.

mod account;
mod api;
mod meter;
mod scenarios;
mod under_faults;
mod workers;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::args::{RunArgs, Scenario, ServerProc};
use crate::frames::unix_us;
use crate::ipc::{Command, WorkerReport, WorkerSpec};
use crate::ledger::Ledger;
use crate::procstat;
use crate::report::Report;
use meter::{EndSamples, Meter};
use workers::{Ramped, Workers, spawn_workers};

/// Faults injected one after the other after the hold and before the pushes
/// (`loadtest million --faults`): after each the run waits until every device
/// that was open is open again and the registers hold exactly one session per
/// open device; then it pushes as usual, so the report's loss accounting
/// covers the faults.
pub trait Fault: Send {
    /// How many faults there are.
    fn count(&self) -> usize;
    /// Injects fault `step` (and repairs it: a restart); returns what it did.
    fn inject(&mut self, step: usize) -> futures::future::BoxFuture<'_, anyhow::Result<Value>>;
    /// Sessions the register instances hold now.
    fn sessions(&mut self) -> futures::future::BoxFuture<'_, anyhow::Result<u64>>;
}

/// What every phase of a run works on.
struct Run<'a> {
    scenario: Scenario,
    args: &'a RunArgs,
    http: reqwest::Client,
    prefix: String,
    workers: Workers,
    /// The phase the --quiet status lines show.
    phase: Arc<Mutex<&'static str>>,
    report: Report,
    /// Messages the API accepted for the devices that read (unicast).
    ledger: Mutex<Ledger>,
    /// Messages the API accepted for the slow devices (`slow`).
    slow_ledger: Mutex<Ledger>,
    /// Devices connected at the end of the ramp (global user indices), by class.
    online: Vec<u64>,
    slow: Vec<u64>,
    /// The calls of the under-faults scenario.
    load: under_faults::Load,
}

impl Run<'_> {
    fn set_phase(&self, name: &'static str) {
        *lock(&self.phase) = name;
    }
}

/// What the workers handed back at the end.
struct Collected {
    specs: Vec<WorkerSpec>,
    reports: Vec<WorkerReport>,
}

pub async fn run(
    scenario: Scenario,
    args: RunArgs,
    servers: Vec<ServerProc>,
    fault: Option<&mut dyn Fault>,
) -> anyhow::Result<Report> {
    check_targets(&args)?;
    let servers = measured_servers(&args, servers);
    let prefix = args
        .user_prefix
        .clone()
        .unwrap_or_else(|| format!("lt{:x}-", unix_us() / 1000 % 0xffff_ffff));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(args.push_concurrency.max(1))
        .build()?;
    let report = Report::new(scenario, &args, &prefix);
    let workers = spawn_workers(&args, scenario, &prefix).await?;
    let mut meter = Meter::start(servers, &workers.pids());
    let (phase, status_task) = workers.status_lines(args.quiet);
    let mut run = Run {
        scenario,
        args: &args,
        http,
        prefix,
        workers,
        phase,
        report,
        ledger: Mutex::new(Ledger::default()),
        slow_ledger: Mutex::new(Ledger::default()),
        online: Vec::new(),
        slow: Vec::new(),
        load: under_faults::Load::default(),
    };
    let infos = run.ramp().await;
    // Let the servers settle (sessions flushed, allocators quiet), then measure memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    meter.ramped(&run.workers.pids());
    let fault = run.hold_and_inject(fault).await?;
    (run.online, run.slow) = push_targets(&run.workers.specs, &infos);
    let broadcast_started_us = run.drive(&meter, fault).await;
    let (collected, end) = run.collect(&meter).await;
    status_task.abort();
    run.workers.stop().await;
    let mut report = run.report;
    account::messages(
        &mut report,
        &collected,
        &mut lock(&run.ledger),
        &mut lock(&run.slow_ledger),
    );
    if scenario == Scenario::UnderFaults {
        let ledger = lock(&run.ledger);
        let accounting = under_faults::account(&run.load, &collected, &ledger, &run.online, &args);
        report.under_faults = serde_json::to_value(accounting).unwrap_or(Value::Null);
    }
    if scenario == Scenario::Broadcast {
        account::broadcasts(
            &mut report,
            &args,
            &collected,
            &run.online,
            broadcast_started_us,
        );
    }
    meter::processes(&mut report, &args, &collected, &meter, &end);
    Ok(report)
}

impl Run<'_> {
    /// Holds the connections, then injects the faults one after the other;
    /// under-faults runs keep the faults for the load instead (returned).
    async fn hold_and_inject<'f>(
        &mut self,
        fault: Option<&'f mut dyn Fault>,
    ) -> anyhow::Result<Option<&'f mut dyn Fault>> {
        if self.scenario == Scenario::UnderFaults {
            return Ok(fault);
        }
        self.hold().await;
        if let Some(fault) = fault {
            self.set_phase("fault");
            for step in 0..fault.count() {
                let outcome =
                    scenarios::inject_fault(&mut *fault, step, &self.workers, self.args).await?;
                self.report.faults.push(outcome);
            }
        }
        Ok(None)
    }

    /// Sends `go` and waits (at most --ramp-timeout-secs) until every worker
    /// has settled its initial connections; what each said then.
    async fn ramp(&mut self) -> Vec<Ramped> {
        let args = self.args;
        self.set_phase("connect");
        let ramp_bar = bar(args, args.connections, "connect");
        self.workers.send(&Command::Go).await;
        let ramp_started = Instant::now();
        let ramped = self
            .workers
            .wait_until(Duration::from_secs(args.ramp_timeout_secs), |workers| {
                let total = workers.total();
                ramp_bar.set_position(total.established + total.failed);
                ramp_bar.set_message(format!("failed {}", total.failed));
                total.ramped
            })
            .await;
        ramp_bar.finish();
        let ramp_wall = ramp_started.elapsed().as_secs_f64();
        let infos: Vec<Ramped> = self
            .workers
            .state()
            .iter()
            .map(|worker| worker.ramped.clone().unwrap_or_default())
            .collect();
        let first_ms = infos
            .iter()
            .map(|info| info.first_connect_unix_ms)
            .filter(|ms| *ms > 0)
            .min()
            .unwrap_or(0);
        let last_ms = infos
            .iter()
            .map(|info| info.last_established_unix_ms)
            .max()
            .unwrap_or(0);
        let total = self.workers.total();
        let connections = &mut self.report.connections;
        connections.ramp_completed = ramped;
        connections.ramp_secs = ramp_wall;
        connections.established = total.established;
        // Devices whose first connect failed (reconnect failures are in the reasons).
        connections.failed_initial = infos
            .iter()
            .map(|info| info.failed_users.len() as u64)
            .sum();
        let active_secs = last_ms.saturating_sub(first_ms) as f64 / 1000.0;
        connections.connect_rate_per_sec = if active_secs > 0.0 {
            total.established as f64 / active_secs
        } else {
            0.0
        };
        infos
    }

    /// Holds every connection open for --hold-secs, showing what is open.
    async fn hold(&mut self) {
        let args = self.args;
        if args.hold_secs > 0 {
            self.set_phase("hold");
            let hold_bar = bar(args, args.hold_secs, "hold");
            let hold_started = Instant::now();
            while hold_started.elapsed() < Duration::from_secs(args.hold_secs) {
                // Paces the progress display; the hold itself is the point.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let total = self.workers.total();
                hold_bar.set_position(hold_started.elapsed().as_secs());
                hold_bar.set_message(format!(
                    "open {} closed by server {}",
                    total.open, total.closed_by_server
                ));
            }
            hold_bar.finish();
        }
        self.report.connections.open_after_hold = self.workers.total().open;
    }

    /// Asks every worker for its final report (120 s at most) and samples
    /// the measured processes at the end.
    async fn collect(&mut self, meter: &Meter) -> (Collected, EndSamples) {
        self.set_phase("collect");
        self.workers.send(&Command::Report).await;
        let reported = self
            .workers
            .wait_until(Duration::from_secs(120), |workers| {
                workers
                    .state()
                    .iter()
                    .all(|worker| worker.report.is_some() || worker.exited)
            })
            .await;
        if !reported {
            self.report
                .notes
                .push("some workers did not report in 120 s".into());
        }
        let end = meter.end(&self.workers.pids());
        let reports: Vec<WorkerReport> = self
            .workers
            .state()
            .iter_mut()
            .map(|worker| worker.report.take().unwrap_or_default())
            .collect();
        let collected = Collected {
            specs: self.workers.specs.clone(),
            reports,
        };
        (collected, end)
    }
}

/// Every room and the API must be on 127.0.0.0/8; at least one connection.
fn check_targets(args: &RunArgs) -> anyhow::Result<()> {
    for room in &args.rooms {
        check_loopback(room)?;
    }
    for api in std::iter::once(&args.api).chain(&args.more_apis) {
        let api_host = api
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        check_loopback(api_host)?;
    }
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    Ok(())
}

/// `servers` and the processes --server-pids and --discover-servers name.
fn measured_servers(args: &RunArgs, mut servers: Vec<ServerProc>) -> Vec<ServerProc> {
    for pid in &args.server_pids {
        servers.push(ServerProc {
            pid: *pid,
            role: procstat::name(*pid),
            room_index: None,
        });
    }
    if args.discover_servers {
        for pid in procstat::discover_pushgrid() {
            if !servers.iter().any(|server| server.pid == pid) {
                servers.push(ServerProc {
                    pid,
                    role: procstat::name(pid),
                    room_index: None,
                });
            }
        }
    }
    servers
}

/// Users to push to: those whose initial connect succeeded (global
/// indices), as (reading devices, slow devices).
fn push_targets(specs: &[WorkerSpec], infos: &[Ramped]) -> (Vec<u64>, Vec<u64>) {
    let mut online = Vec::new();
    let mut slow = Vec::new();
    for (spec, info) in specs.iter().zip(infos) {
        let failed: std::collections::HashSet<u32> = info.failed_users.iter().copied().collect();
        let slow_set: std::collections::HashSet<u32> = info.slow_users.iter().copied().collect();
        for index in 0..spec.count {
            if failed.contains(&index) {
                continue;
            }
            let user = spec.first_user + u64::from(index);
            if slow_set.contains(&index) {
                slow.push(user)
            } else {
                online.push(user)
            }
        }
    }
    (online, slow)
}

fn check_loopback(addr: &str) -> anyhow::Result<()> {
    let host = addr.rsplit_once(':').map(|(host, _)| host).unwrap_or(addr);
    let host = host
        .trim_start_matches("http://")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let ip: std::net::IpAddr = if host == "localhost" {
        std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse()
            .with_context(|| format!("{addr}: not an IP address"))?
    };
    if !ip.is_loopback() {
        bail!("{addr}: load targets must be on 127.0.0.0/8");
    }
    Ok(())
}

fn bar(args: &RunArgs, len: u64, label: &str) -> ProgressBar {
    if args.quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(label.to_owned());
    bar
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn merge(mut a: BTreeMap<String, u64>, b: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    for (key, value) in b {
        *a.entry(key).or_default() += value;
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        assert!(check_loopback("127.0.0.1:8090").is_ok());
        assert!(check_loopback("127.3.4.5:1").is_ok());
        assert!(check_loopback("localhost:80").is_ok());
        assert!(check_loopback("10.0.0.1:8090").is_err());
        assert!(check_loopback("example.com:80").is_err());
    }
}
