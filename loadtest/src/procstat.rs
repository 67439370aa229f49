//! CPU and memory of processes, from /proc.

use serde::Serialize;

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub cpu_secs: f64,
    pub alive: bool,
}

pub fn sample(pid: u32) -> Sample {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Sample::default();
    };
    let field = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    let cpu_secs = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The command name may hold spaces: fields start after the last ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / TICKS_PER_SEC)
        })
        .unwrap_or(0.0);
    Sample {
        rss_bytes: field("VmRSS:"),
        peak_rss_bytes: field("VmHWM:"),
        cpu_secs,
        alive: true,
    }
}

/// The process name (`comm`).
pub fn name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

/// Processes whose name is one of the pushgrid binaries.
pub fn discover_pushgrid() -> Vec<u32> {
    const NAMES: [&str; 9] = [
        "pushgrid",
        "keeper",
        "dispatcher",
        "room",
        "register",
        "saver",
        "center",
        "coordinator",
        "pushgrid-client",
    ];
    pids_named(&NAMES)
}

/// Processes whose name (`comm`) is one of `names`, by pid.
pub fn pids_named(names: &[&str]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid| names.contains(&name(*pid).as_str()))
        .collect();
    pids.sort_unstable();
    pids
}

/// CPU seconds and context switches (voluntary and not) of a process's
/// threads, summed by thread name (`tokio-rt-worker`, `room-shard-0`, ...).
/// Threads that ended are not counted.
pub fn threads(pid: u32) -> std::collections::BTreeMap<String, (f64, u64)> {
    let mut by_name = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.filter_map(Result::ok) {
        let path = task.path();
        let read = |file: &str| std::fs::read_to_string(path.join(file)).unwrap_or_default();
        let (stat, status) = (read("stat"), read("status"));
        let Some(after_name) = stat.rfind(')').map(|end| &stat[end + 2..]) else {
            continue;
        };
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |index: usize| fields.get(index).and_then(|v| v.parse::<f64>().ok());
        let cpu_secs = (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / TICKS_PER_SEC;
        let switches: u64 = status
            .lines()
            .filter(|line| line.contains("ctxt_switches:"))
            .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        let entry = by_name
            .entry(read("comm").trim().to_owned())
            .or_insert((0.0, 0));
        entry.0 += cpu_secs;
        entry.1 += switches;
    }
    by_name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_sampled() {
        let own = sample(std::process::id());
        assert!(own.alive && own.rss_bytes > 0 && own.peak_rss_bytes >= own.rss_bytes / 2);
        assert!(!sample(u32::MAX).alive);
    }

    #[test]
    fn threads_are_summed_by_name_with_their_wake_ups() {
        let sleeper = std::thread::Builder::new()
            .name("pg-test-sleeper".into())
            .spawn(|| {
                for _ in 0..20 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                threads(std::process::id())
            })
            .expect("spawn a named thread");
        let seen = sleeper.join().expect("the sleeper thread finishes");
        let (cpu_secs, switches) = seen["pg-test-sleeper"];
        assert!(switches >= 20, "20 sleeps, {switches} context switches");
        assert!(cpu_secs >= 0.0);
        assert!(threads(u32::MAX).is_empty());
    }
}
