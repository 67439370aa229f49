//! The push API as the load test drives it: unicast pushes in batches of
//! users, paced and with a bounded number of calls in flight, every accepted
//! message id put into a ledger; and broadcast calls. Calls refused with
//! 429/503 are retried as Retry-After says.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde_json::{Value, json};

use super::lock;
use crate::args::RunArgs;
use crate::frames::{payload, unix_us};
use crate::histogram::latency_histogram;
use crate::ledger::Ledger;

/// Attempts of one call that the API refuses with 429/503.
const ATTEMPTS: usize = 20;

pub(super) struct PushOutcome {
    pub calls: u64,
    pub errors: BTreeMap<String, u64>,
    pub seconds: f64,
    /// Request to answer of each accepted call, in microseconds.
    pub answer_us: Histogram<u64>,
}

impl Default for PushOutcome {
    fn default() -> Self {
        PushOutcome {
            calls: 0,
            errors: BTreeMap::new(),
            seconds: 0.0,
            answer_us: latency_histogram(),
        }
    }
}

/// Pushes `rounds` messages to each of `users` (global indices) through the
/// API, `--batch` users per call.
pub(super) async fn push_unicast(
    args: &RunArgs,
    http: &reqwest::Client,
    prefix: &str,
    users: &[u64],
    rounds: u32,
    ledger: &Mutex<Ledger>,
    progress: &ProgressBar,
) -> PushOutcome {
    let batches: Vec<Vec<u64>> = (0..rounds)
        .flat_map(|_| users.chunks(args.batch.clamp(1, 10_000)))
        .map(<[u64]>::to_vec)
        .collect();
    push_batches(args, http, prefix, &batches, ledger, progress).await
}

/// When each batch is due: paced at `--push-rate` messages per second from
/// the start when set, all at once otherwise.
fn schedule(args: &RunArgs, batches: &[Vec<u64>]) -> Vec<(usize, Duration)> {
    let mut sent_messages = 0u64;
    batches
        .iter()
        .enumerate()
        .map(|(index, batch)| {
            let at = if args.push_rate > 0 {
                Duration::from_secs_f64(sent_messages as f64 / args.push_rate as f64)
            } else {
                Duration::ZERO
            };
            sent_messages += batch.len() as u64;
            (index, at)
        })
        .collect()
}

/// One push call per batch of users (global indices), paced at
/// `--push-rate` messages per second when set, `--push-concurrency` calls in
/// flight; every accepted id goes into `ledger`.
pub(super) async fn push_batches(
    args: &RunArgs,
    http: &reqwest::Client,
    prefix: &str,
    batches: &[Vec<u64>],
    ledger: &Mutex<Ledger>,
    progress: &ProgressBar,
) -> PushOutcome {
    let started = Instant::now();
    let errors = Mutex::new(BTreeMap::<String, u64>::new());
    let answers = Mutex::new(latency_histogram());
    let schedule = schedule(args, batches);
    let calls = schedule.len() as u64;
    futures::stream::iter(schedule)
        .map(|(index, at)| {
            let batch = &batches[index];
            let (errors, answers) = (&errors, &answers);
            async move {
                tokio::time::sleep_until((started + at).into()).await;
                let names: Vec<String> =
                    batch.iter().map(|user| format!("{prefix}{user}")).collect();
                let called = Instant::now();
                match push_call(args, http, &names).await {
                    Ok(messages) => {
                        let _ = lock(answers).record((called.elapsed().as_micros() as u64).max(1));
                        let mut ledger = lock(ledger);
                        for (user, id) in messages {
                            let index = user
                                .strip_prefix(prefix)
                                .and_then(|rest| rest.parse().ok())
                                .unwrap_or(u64::MAX);
                            ledger.accept(id, index);
                        }
                        progress.inc(batch.len() as u64);
                    }
                    Err(reason) => {
                        *lock(errors).entry(reason).or_default() += batch.len() as u64;
                    }
                }
            }
        })
        .buffer_unordered(args.push_concurrency.max(1))
        .collect::<()>()
        .await;
    PushOutcome {
        calls,
        errors: errors.into_inner().unwrap_or_default(),
        seconds: started.elapsed().as_secs_f64(),
        answer_us: answers.into_inner().unwrap_or_else(|_| latency_histogram()),
    }
}

/// For an answer that refuses the call for now (429, 503): how long it asks
/// to wait (Retry-After, 1 s without one, kept within 50 ms to 10 s).
fn refused_for(response: &reqwest::Response) -> Option<Duration> {
    let status = response.status().as_u16();
    if status != 429 && status != 503 {
        return None;
    }
    let wait = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok()?.parse::<f64>().ok())
        .unwrap_or(1.0);
    Some(Duration::from_secs_f64(wait.clamp(0.05, 10.0)))
}

/// One push call, retried on 429/503 as told by Retry-After. Returns (user, id).
async fn push_call(
    args: &RunArgs,
    http: &reqwest::Client,
    users: &[String],
) -> Result<Vec<(String, u64)>, String> {
    let body = json!({ "users": users, "payload": payload(unix_us(), args.payload_bytes) });
    for _attempt in 0..ATTEMPTS {
        let response = http
            .post(format!("{}/api/push", args.api))
            .header("Authorization", format!("apikey {}", args.api_key))
            .json(&body)
            .send()
            .await
            .map_err(|error| {
                if error.is_timeout() {
                    "push: timeout (outcome unknown)".to_owned()
                } else {
                    format!("push: {error}")
                }
            })?;
        if let Some(wait) = refused_for(&response) {
            tokio::time::sleep(wait).await;
            continue;
        }
        let status = response.status();
        let value: Value = response
            .json()
            .await
            .map_err(|error| format!("push: {error}"))?;
        if !status.is_success() {
            return Err(format!(
                "push: HTTP {} {}",
                status.as_u16(),
                value["error"]["code"]
            ));
        }
        return accepted_messages(&value);
    }
    Err("push: still refused (429/503) after 20 attempts".to_owned())
}

/// The (user, message id) pairs of a push answer.
fn accepted_messages(answer: &Value) -> Result<Vec<(String, u64)>, String> {
    let messages = answer["result"]["messages"]
        .as_array()
        .ok_or_else(|| "push: answer without messages".to_owned())?;
    Ok(messages
        .iter()
        .filter_map(|message| {
            let user = message["user"].as_str()?.to_owned();
            let id = match &message["id"] {
                Value::String(text) => text.parse().ok()?,
                Value::Number(number) => number.as_u64()?,
                _ => return None,
            };
            Some((user, id))
        })
        .collect())
}

/// One broadcast call to `--topic`, retried on 429/503 as told by
/// Retry-After. Returns the accepted offset.
pub(super) async fn broadcast_call(args: &RunArgs, http: &reqwest::Client) -> Result<u64, String> {
    // The payload carries the time of the first attempt: latency is from the
    // API call, retries included.
    let body = json!({ "topic": args.topic, "payload": payload(unix_us(), args.payload_bytes) });
    for _attempt in 0..ATTEMPTS {
        let response = http
            .post(format!("{}/api/broadcast", args.api))
            .header("Authorization", format!("apikey {}", args.api_key))
            .json(&body)
            .send()
            .await
            .map_err(|error| format!("broadcast: {error}"))?;
        if let Some(wait) = refused_for(&response) {
            tokio::time::sleep(wait).await;
            continue;
        }
        let status = response.status();
        let value: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(format!("broadcast: HTTP {}", status.as_u16()));
        }
        return value["result"]["offset"]
            .as_u64()
            .ok_or_else(|| "broadcast: answer without an offset".to_owned());
    }
    Err("broadcast: still refused (429/503) after 20 attempts".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_answer_gives_every_user_and_id_in_either_form() {
        let answer = json!({"result": {"messages": [
            {"user": "u1", "id": "17"},
            {"user": "u2", "id": 18},
            {"user": "u3", "id": null},
            {"id": 19}
        ]}});
        assert_eq!(
            accepted_messages(&answer),
            Ok(vec![("u1".to_owned(), 17), ("u2".to_owned(), 18)])
        );
        assert_eq!(
            accepted_messages(&json!({"result": {}})),
            Err("push: answer without messages".to_owned())
        );
    }
}
