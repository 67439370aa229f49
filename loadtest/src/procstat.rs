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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_sampled() {
        let own = sample(std::process::id());
        assert!(own.alive && own.rss_bytes > 0 && own.peak_rss_bytes >= own.rss_bytes / 2);
        assert!(!sample(u32::MAX).alive);
    }
}
