//! What the run's processes cost: every measured server and every worker
//! sampled (CPU, RSS) at the start, after the ramp and at the end, turned
//! into the report's process rows and memory per connection.

use std::collections::HashMap;
use std::time::Instant;

use super::Collected;
use crate::args::{RunArgs, ServerProc};
use crate::procstat::{self, Sample};
use crate::report::{ProcessRow, Report};

/// Every process measured, sampled at the start, after the ramp and at the end.
pub(super) struct Meter {
    servers: Vec<ServerProc>,
    start: Vec<Sample>,
    ramped: Vec<Sample>,
    workers_start: Vec<Sample>,
    workers_ramped: Vec<Sample>,
    started: Instant,
}

/// The samples taken at the end.
pub(super) struct EndSamples {
    servers: Vec<Sample>,
    workers: Vec<Sample>,
}

fn sample_all(pids: impl Iterator<Item = u32>) -> Vec<Sample> {
    pids.map(procstat::sample).collect()
}

impl Meter {
    pub fn start(servers: Vec<ServerProc>, worker_pids: &[u32]) -> Meter {
        Meter {
            start: sample_all(servers.iter().map(|server| server.pid)),
            workers_start: sample_all(worker_pids.iter().copied()),
            servers,
            ramped: Vec::new(),
            workers_ramped: Vec::new(),
            started: Instant::now(),
        }
    }

    pub fn ramped(&mut self, worker_pids: &[u32]) {
        self.ramped = sample_all(self.servers.iter().map(|server| server.pid));
        self.workers_ramped = sample_all(worker_pids.iter().copied());
    }

    pub fn end(&self, worker_pids: &[u32]) -> EndSamples {
        EndSamples {
            servers: sample_all(self.servers.iter().map(|server| server.pid)),
            workers: sample_all(worker_pids.iter().copied()),
        }
    }

    pub fn servers(&self) -> &[ServerProc] {
        &self.servers
    }
}

/// The process rows, the memory section and the wall time of the run.
pub(super) fn processes(
    report: &mut Report,
    args: &RunArgs,
    collected: &Collected,
    meter: &Meter,
    end: &EndSamples,
) {
    let wall = meter.started.elapsed().as_secs_f64();
    let mut room_connections: HashMap<usize, u64> = HashMap::new();
    for (spec, worker) in collected.specs.iter().zip(&collected.reports) {
        let room_index = args
            .rooms
            .iter()
            .position(|room| *room == spec.room)
            .unwrap_or(0);
        *room_connections.entry(room_index).or_default() += worker.progress.established;
    }
    let (mut room_growth, mut room_conns, mut server_growth) = (0i64, 0u64, 0i64);
    for (index, server) in meter.servers.iter().enumerate() {
        let (start, ramped, last) = (meter.start[index], meter.ramped[index], end.servers[index]);
        let growth = ramped.rss_bytes as i64 - start.rss_bytes as i64;
        server_growth += growth;
        if let Some(room) = server.room_index {
            room_growth += growth;
            room_conns += room_connections.get(&room).copied().unwrap_or(0);
        }
        report.processes.push(ProcessRow {
            pid: server.pid,
            role: server.role.clone(),
            connections: server
                .room_index
                .and_then(|room| room_connections.get(&room).copied()),
            rss_start_mb: mb(start.rss_bytes),
            rss_after_ramp_mb: mb(ramped.rss_bytes),
            rss_end_mb: mb(last.rss_bytes),
            rss_peak_mb: mb(last.peak_rss_bytes.max(ramped.peak_rss_bytes)),
            cpu_secs: last.cpu_secs - start.cpu_secs,
            cpu_percent: if wall > 0.0 {
                100.0 * (last.cpu_secs - start.cpu_secs) / wall
            } else {
                0.0
            },
            alive_at_end: last.alive,
        });
    }
    let established = report.connections.established.max(1);
    let memory = &mut report.memory;
    memory.room_bytes_per_connection =
        (room_conns > 0).then(|| room_growth as f64 / room_conns as f64);
    memory.servers_bytes_per_connection =
        (!meter.servers.is_empty()).then(|| server_growth as f64 / established as f64);
    workers_memory(report, collected, meter, end);
    report.wall_secs = wall;
}

/// The load generator's own share: its workers' memory and CPU.
fn workers_memory(report: &mut Report, collected: &Collected, meter: &Meter, end: &EndSamples) {
    let established = report.connections.established.max(1);
    let worker_growth: i64 = meter
        .workers_ramped
        .iter()
        .zip(&meter.workers_start)
        .map(|(ramped, start)| ramped.rss_bytes as i64 - start.rss_bytes as i64)
        .sum();
    let memory = &mut report.memory;
    memory.client_bytes_per_connection = worker_growth as f64 / established as f64;
    memory.client_rss_after_ramp_mb = mb(meter
        .workers_ramped
        .iter()
        .map(|sample| sample.rss_bytes)
        .sum());
    memory.workers = collected.specs.len();
    memory.client_cpu_secs = end
        .workers
        .iter()
        .zip(&meter.workers_start)
        .map(|(end, start)| end.cpu_secs - start.cpu_secs)
        .sum();
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
