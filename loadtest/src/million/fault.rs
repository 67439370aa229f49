//! `loadtest million --faults`: kills processes of the run's cluster with
//! SIGKILL and starts them again with the same settings (register; every
//! room, back on its own address), for `run` to measure how the devices and
//! sessions come back.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use super::FaultKind;
use super::processes::{Started, register_sessions, start};

/// `--faults`: kills processes of the run's cluster with SIGKILL and starts
/// them again with the same settings.
pub(super) struct ClusterFault<'a> {
    pub kinds: &'a [FaultKind],
    pub processes: &'a mut Vec<Started>,
    pub log_dir: &'a Path,
}

impl ClusterFault<'_> {
    async fn kill_and_restart(
        &mut self,
        index: usize,
        settings: Vec<String>,
    ) -> anyhow::Result<()> {
        let process = &mut self.processes[index];
        let _ = kill(Pid::from_raw(process.pid as i32), Signal::SIGKILL);
        let _ = process.child.wait().await;
        let (name, role, program) = (
            process.name.clone(),
            process.role.clone(),
            process.program.clone(),
        );
        let mut restarted = start(&name, &role, &program, &settings, self.log_dir).await?;
        restarted
            .wait_bound(&format!("{role} ready"), Duration::from_secs(60))
            .await?;
        self.processes[index] = restarted;
        Ok(())
    }

    async fn inject_now(&mut self, kind: FaultKind) -> anyhow::Result<Value> {
        let started = tokio::time::Instant::now();
        let mut restarted = Vec::new();
        match kind {
            FaultKind::KillRegister => {
                let index = self
                    .processes
                    .iter()
                    .position(|process| process.role == "register")
                    .context("no register")?;
                let settings = self.processes[index].settings.clone();
                self.kill_and_restart(index, settings).await?;
                restarted.push(self.processes[index].pid);
            }
            FaultKind::KillRooms => {
                let rooms: Vec<usize> = (0..self.processes.len())
                    .filter(|index| self.processes[*index].role == "room")
                    .collect();
                // Every room at once, then each back on the address its
                // devices know (the listener takes the port again with
                // SO_REUSEADDR).
                let mut addresses = Vec::new();
                for index in &rooms {
                    let process = &self.processes[*index];
                    let tcp = process.bound("room tcp").context("room tcp address")?;
                    let _ = kill(Pid::from_raw(process.pid as i32), Signal::SIGKILL);
                    addresses.push(tcp);
                }
                for (index, tcp) in rooms.iter().zip(addresses) {
                    let mut settings: Vec<String> = self.processes[*index]
                        .settings
                        .iter()
                        .filter(|setting| !setting.starts_with("tcp_listen="))
                        .cloned()
                        .collect();
                    settings.push(format!("tcp_listen={tcp}"));
                    self.kill_and_restart(*index, settings).await?;
                    restarted.push(self.processes[*index].pid);
                }
            }
        }
        Ok(json!({
            "fault": match kind {
                FaultKind::KillRegister => "kill -9 of register, restarted",
                FaultKind::KillRooms => "kill -9 of every room, restarted on the same addresses",
            },
            "restarted_pids": restarted,
            "restart_secs": started.elapsed().as_secs_f64(),
        }))
    }

    async fn sessions_now(&self) -> anyhow::Result<u64> {
        register_sessions(&self.processes[..]).await
    }
}

impl crate::run::Fault for ClusterFault<'_> {
    fn count(&self) -> usize {
        self.kinds.len()
    }

    fn inject(&mut self, step: usize) -> futures::future::BoxFuture<'_, anyhow::Result<Value>> {
        let kind = self.kinds[step];
        Box::pin(self.inject_now(kind))
    }

    fn sessions(&mut self) -> futures::future::BoxFuture<'_, anyhow::Result<u64>> {
        Box::pin(self.sessions_now())
    }
}
