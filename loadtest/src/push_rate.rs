//! `loadtest push-rate`: pushes at a paced rate for a fixed time, each call
//! naming one user (or `--users-per-call` users), every message acknowledged
//! by its device and accounted for by id, and the CPU that every pushgrid
//! process, Redis and MariaDB spent meanwhile.
//!
//! ```text
//! loadtest push-rate --connections 5000 --rate 10000 --secs 10 \
//!     --push-concurrency 64 --discover-servers --json push-rate.json
//! ```

use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::args::RunArgs;
use crate::histogram::{Percentiles, percentiles_ms};
use crate::procstat::{self, Sample};

#[derive(Debug, Clone, clap::Args)]
pub struct PushRateArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Messages per second asked of the push API (paced from the start, not
    /// from the last answer: a slow answer does not lower the rate asked).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Seconds of pushing: rate x secs messages in all.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Users named in each push call (1: single-user pushes).
    #[arg(long, default_value_t = 1)]
    pub users_per_call: usize,
}

impl PushRateArgs {
    /// The run's arguments with this scenario's pacing in them.
    pub fn into_run(self) -> anyhow::Result<RunArgs> {
        if self.rate == 0 || self.secs == 0 {
            anyhow::bail!("--rate and --secs must be at least 1");
        }
        if !(1..=10_000).contains(&self.users_per_call) {
            anyhow::bail!("--users-per-call must be 1 to 10,000");
        }
        let mut run = self.run;
        run.push_rate = self.rate;
        run.push_secs = self.secs;
        run.batch = self.users_per_call;
        Ok(run)
    }
}

/// The calls of a run: `total` messages over `users` (global indices) in
/// calls of `per_call` distinct users, round-robin, so every device gets
/// about the same share.
pub fn schedule(users: &[u64], total: u64, per_call: usize) -> Vec<Vec<u64>> {
    if users.is_empty() || total == 0 {
        return Vec::new();
    }
    let per_call = per_call.clamp(1, users.len()) as u64;
    let calls = total.div_ceil(per_call);
    let mut next = 0usize;
    (0..calls)
        .map(|call| {
            let size = per_call.min(total - call * per_call);
            (0..size)
                .map(|_| {
                    let user = users[next % users.len()];
                    next += 1;
                    user
                })
                .collect()
        })
        .collect()
}

/// A process whose CPU time the run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub pid: u32,
    pub name: String,
    /// `pushgrid`, `store` (Redis, MariaDB) or `load generator`.
    pub kind: &'static str,
}

/// Redis and MariaDB/MySQL server processes on this machine.
pub fn discover_stores() -> Vec<Measured> {
    const NAMES: [&str; 3] = ["redis-server", "mariadbd", "mysqld"];
    procstat::pids_named(&NAMES)
        .into_iter()
        .map(|pid| Measured {
            pid,
            name: procstat::name(pid),
            kind: "store",
        })
        .collect()
}

/// CPU time of a set of processes from the first push call to the end of
/// the drain.
pub struct CpuWindow {
    processes: Vec<Measured>,
    start: Vec<Sample>,
    /// Per thread name, for pushgrid processes only.
    start_threads: Vec<ThreadTimes>,
    started: Instant,
}

type ThreadTimes = std::collections::BTreeMap<String, (f64, u64)>;

/// One thread name of one pushgrid process over the window: where its CPU
/// went and how often its threads slept and woke (each context switch is a
/// wake-up paid for, which at low rates is most of a message's cost).
#[derive(Debug, Default, Serialize)]
pub struct ThreadRow {
    pub pid: u32,
    pub process: String,
    pub thread: String,
    pub cpu_secs: f64,
    pub context_switches: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct CpuRow {
    pub pid: u32,
    pub name: String,
    pub kind: &'static str,
    pub cpu_secs: f64,
}

impl CpuWindow {
    pub fn start(processes: Vec<Measured>) -> CpuWindow {
        let start = processes.iter().map(|p| procstat::sample(p.pid)).collect();
        let start_threads = processes.iter().map(thread_times).collect();
        CpuWindow {
            processes,
            start,
            start_threads,
            started: Instant::now(),
        }
    }

    fn finish(self) -> (f64, Vec<CpuRow>, Vec<ThreadRow>) {
        let mut threads = Vec::new();
        for (process, start) in self.processes.iter().zip(&self.start_threads) {
            for (thread, (cpu_end, switches_end)) in thread_times(process) {
                let (cpu_start, switches_start) = start.get(&thread).copied().unwrap_or_default();
                threads.push(ThreadRow {
                    pid: process.pid,
                    process: process.name.clone(),
                    thread,
                    cpu_secs: (cpu_end - cpu_start).max(0.0),
                    context_switches: switches_end.saturating_sub(switches_start),
                });
            }
        }
        let rows = self
            .processes
            .into_iter()
            .zip(self.start)
            .map(|(process, start)| {
                let end = procstat::sample(process.pid);
                CpuRow {
                    pid: process.pid,
                    name: process.name,
                    kind: process.kind,
                    cpu_secs: (end.cpu_secs - start.cpu_secs).max(0.0),
                }
            })
            .collect();
        (self.started.elapsed().as_secs_f64(), rows, threads)
    }
}

fn thread_times(process: &Measured) -> ThreadTimes {
    if process.kind == "pushgrid" {
        procstat::threads(process.pid)
    } else {
        ThreadTimes::new()
    }
}

/// The push-rate section of the report.
#[derive(Debug, Default, Serialize)]
pub struct PushRate {
    pub asked_per_sec: u64,
    pub secs: u64,
    pub users_per_call: usize,
    pub calls_in_flight: usize,
    pub calls: u64,
    /// Messages the API accepted per second, from the first call to the last answer.
    pub accepted_per_sec: f64,
    /// Messages delivered per second, from the first call to the end of the drain.
    pub delivered_per_sec: f64,
    /// Seconds from the first call to the last answer.
    pub push_secs: f64,
    /// Seconds from the first call to the last delivery (or the drain's end).
    pub window_secs: f64,
    /// Request to answer of each accepted call.
    pub answer_ms: Percentiles,
    /// CPU seconds of each measured process over the window.
    pub cpu: Vec<CpuRow>,
    /// The pushgrid processes' CPU and context switches by thread name.
    pub threads: Vec<ThreadRow>,
    pub pushgrid_cpu_secs: f64,
    /// All pushgrid processes together, per delivered (and acknowledged) message.
    pub pushgrid_cpu_us_per_message: f64,
    /// Redis and MariaDB together.
    pub stores_cpu_secs: f64,
    pub stores_cpu_us_per_message: f64,
    /// The load generator (this process and its workers).
    pub load_generator_cpu_secs: f64,
}

impl PushRate {
    #[allow(clippy::too_many_arguments)]
    pub fn measured(
        args: &RunArgs,
        calls: u64,
        push_secs: f64,
        accepted: u64,
        delivered: u64,
        answers: &Histogram<u64>,
        window: CpuWindow,
    ) -> PushRate {
        let (window_secs, cpu, threads) = window.finish();
        let sum = |kind: &str| -> f64 {
            cpu.iter()
                .filter(|row| row.kind == kind)
                .map(|row| row.cpu_secs)
                .sum()
        };
        let per_message = |secs: f64| {
            if delivered == 0 {
                0.0
            } else {
                secs * 1e6 / delivered as f64
            }
        };
        let rate = |count: u64, secs: f64| if secs > 0.0 { count as f64 / secs } else { 0.0 };
        let (pushgrid, stores) = (sum("pushgrid"), sum("store"));
        PushRate {
            asked_per_sec: args.push_rate,
            secs: args.push_secs,
            users_per_call: args.batch,
            calls_in_flight: args.push_concurrency,
            calls,
            accepted_per_sec: rate(accepted, push_secs),
            delivered_per_sec: rate(delivered, window_secs),
            push_secs,
            window_secs,
            answer_ms: percentiles_ms(answers),
            pushgrid_cpu_secs: pushgrid,
            pushgrid_cpu_us_per_message: per_message(pushgrid),
            stores_cpu_secs: stores,
            stores_cpu_us_per_message: per_message(stores),
            load_generator_cpu_secs: sum("load generator"),
            cpu,
            threads,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_spreads_messages_round_robin_in_calls_of_distinct_users() {
        let users = [10, 11, 12];
        let calls = schedule(&users, 7, 2);
        assert_eq!(
            calls,
            vec![vec![10, 11], vec![12, 10], vec![11, 12], vec![10]]
        );
        assert_eq!(schedule(&users, 4, 1).len(), 4);
        // More users per call than devices: each call names every device once.
        assert_eq!(
            schedule(&users, 6, 5),
            vec![vec![10, 11, 12], vec![10, 11, 12]]
        );
        assert!(schedule(&[], 5, 1).is_empty());
    }
}
