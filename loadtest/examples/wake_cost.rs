//! The floor under a message's CPU at low rates on this machine: two threads
//! pass a token back and forth through channels, paced at a fixed rate, and
//! the CPU of both threads per round trip is printed as JSON for 200, 2,000
//! and 20,000 round trips per second. Each round trip is three wake-ups: the
//! pacing sleep ends, the echo thread wakes for the token, the first thread
//! wakes for the answer. At a low rate every thread sleeps between round
//! trips, as the threads on a push's path do (docs/benchmarks.md, issue 19).
//!
//! cargo run --release -p pushgrid-loadtest --example wake_cost

use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Nanoseconds on CPU of this process's live threads (`/proc/self/task/*/schedstat`).
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn main() {
    let (to_echo, echo_inbox) = mpsc::channel::<u64>();
    let (to_main, main_inbox) = mpsc::channel::<u64>();
    let echo = std::thread::spawn(move || {
        for token in echo_inbox {
            if to_main.send(token).is_err() {
                return;
            }
        }
    });
    let mut rows = Vec::new();
    for (rate, round_trips) in [(200u64, 2_000u64), (2_000, 10_000), (20_000, 100_000)] {
        let interval = Duration::from_nanos(1_000_000_000 / rate);
        let cpu_before = cpu_ns();
        let started = Instant::now();
        let mut next = started;
        for token in 0..round_trips {
            next += interval;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            to_echo
                .send(token)
                .expect("the echo thread runs until the end");
            let echoed = main_inbox.recv().expect("the echo thread answers");
            assert_eq!(echoed, token, "the echo thread answers in order");
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu_us = cpu_ns().saturating_sub(cpu_before) as f64 / 1000.0;
        rows.push(serde_json::json!({
            "asked_round_trips_per_sec": rate,
            "round_trips": round_trips,
            "achieved_round_trips_per_sec": round_trips as f64 / secs,
            "cpu_us_per_round_trip": cpu_us / round_trips as f64,
        }));
    }
    drop(to_echo);
    echo.join()
        .expect("the echo thread ends when its inbox closes");
    let report = serde_json::json!({ "wake_cost": rows });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("plain JSON values")
    );
}
