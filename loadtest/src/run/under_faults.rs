//! The `under-faults` scenario (`loadtest cluster-faults`): unicast and
//! broadcast calls at a paced rate while a [`Fault`] plan runs its steps one
//! after the other, every answer of every call kept; then the accounting of
//! the issue-21 fault test at scale:
//!
//! * every unicast answered 2xx reached its device (by id; the ledger of
//!   `account::messages` finds what is lost, redelivered or misrouted);
//! * no call answered only with errors was delivered (each payload names its
//!   call, so a delivery is matched to the call that made it); calls refused
//!   around a saver kill are "in doubt" and counted apart, as in
//!   `tests/tests/cluster_faults.rs`;
//! * a keyed call (every other unicast carries an idempotency key and is
//!   retried with it after an error or no answer) got through;
//! * no id was answered to two calls;
//! * every broadcast answered 2xx reached every device that was not told of
//!   a gap (SUB_OK `recovered = false` after a reconnect).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Collected, Fault, Run, lock};
use crate::args::RunArgs;
use crate::frames::{tagged_payload, unix_us};
use crate::ledger::Ledger;
use crate::receipts::TopicReceipts;

/// Attempts of a keyed call (a plain call is sent once).
const KEYED_ATTEMPTS: u32 = 20;
/// How long one call may take before it counts as unanswered.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// A call refused this close to a saver kill is in doubt: the saver may have
/// stored it before it died, and nobody can withdraw it.
const DOUBT_MARGIN: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Accepted,
    Refused(u16),
    /// No answer (connection cut, timeout, unreadable body).
    Unknown,
}

impl Answer {
    /// The answer as the report counts it: the status, or `none`.
    fn name(self) -> String {
        match self {
            Answer::Accepted => "200".to_owned(),
            Answer::Refused(status) => status.to_string(),
            Answer::Unknown => "none".to_owned(),
        }
    }
}

#[derive(Debug)]
struct Call {
    /// The tag its payload carries (1, 2, ...).
    tag: u64,
    keyed: bool,
    answers: Vec<(Answer, Instant)>,
}

impl Call {
    fn accepted(&self) -> bool {
        self.answers
            .iter()
            .any(|(answer, _)| *answer == Answer::Accepted)
    }
}

/// What the load recorded while the plan ran.
#[derive(Default)]
pub(super) struct Load {
    calls: Mutex<Vec<Call>>,
    /// (epoch, offset) of every broadcast answered 2xx.
    broadcasts: Mutex<Vec<(u64, u64)>>,
    broadcast_answers: Mutex<BTreeMap<String, u64>>,
    /// Ids answered to a call that another call had been answered already.
    ids_answered_twice: Mutex<u64>,
    /// Around each saver kill: calls refused in it are in doubt.
    doubt: Mutex<Vec<(Instant, Instant)>>,
}

/// The accounting of an under-faults run (`report.under_faults`).
#[derive(Debug, Default, Serialize)]
pub struct Accounting {
    pub unicast_calls: u64,
    pub unicast_calls_accepted: u64,
    pub answers_by_status: BTreeMap<String, u64>,
    /// Calls answered only with errors, outside the saver kills, and how
    /// many of them were delivered anyway (must be 0).
    pub refused: u64,
    pub refused_delivered: u64,
    /// Calls refused around a saver kill, and how many of them were delivered.
    pub in_doubt: u64,
    pub in_doubt_delivered: u64,
    /// Calls without any answer and without a 2xx (either outcome is right:
    /// a center killed mid-call may have stored it), and how many of them
    /// were delivered (their ids are the report's "unexpected ids").
    pub unanswered: u64,
    pub unanswered_delivered: u64,
    pub keyed_calls: u64,
    pub keyed_retried: u64,
    pub keyed_given_up: u64,
    pub ids_answered_twice: u64,
    pub broadcasts_accepted: u64,
    pub broadcast_answers: BTreeMap<String, u64>,
    pub broadcast_expected: u64,
    pub broadcast_delivered: u64,
    /// Broadcast deliveries missing on devices that were not told of a gap.
    pub broadcast_missing_without_gap: u64,
    pub broadcast_missing_sample: Vec<(u64, u64, u64)>,
    /// The streams the accepted broadcasts went to (a Redis restarted
    /// empty starts a new epoch): (epoch, broadcasts, first offset, last offset).
    pub broadcast_epochs: Vec<(u64, u64, u64, u64)>,
    /// Devices told of a gap (SUB_OK `recovered = false`) and not counted above.
    pub devices_told_of_a_gap: u64,
    /// What went wrong; empty when every check held.
    pub failures: Vec<String>,
}

impl Run<'_> {
    /// Pushes unicasts (and a broadcast every --broadcast-interval-ms) while
    /// the fault plan runs, with --hold-secs of load before the first fault
    /// and after each; then waits for the deliveries.
    pub(super) async fn under_faults(&mut self, fault: Option<&mut dyn Fault>) {
        let args = self.args;
        self.set_phase("faults");
        let stop = AtomicBool::new(false);
        let steady = Duration::from_secs(args.hold_secs.max(1));
        let this = &*self;
        let plan = async {
            tokio::time::sleep(steady).await;
            let mut outcomes = Vec::new();
            if let Some(fault) = fault {
                for step in 0..fault.count() {
                    let open_before = this.workers.total().open;
                    let began = Instant::now();
                    let outcome = fault.inject(step).await;
                    let ended = Instant::now();
                    let back = this.devices_back(open_before).await;
                    match outcome {
                        Ok(mut detail) => {
                            detail["devices_back_after_secs"] = json!(back);
                            if detail["in_doubt"].as_bool() == Some(true) {
                                lock(&this.load.doubt)
                                    .push((began - DOUBT_MARGIN, ended + DOUBT_MARGIN));
                            }
                            eprintln!("fault {}: {}", step + 1, detail["fault"]);
                            outcomes.push(detail);
                        }
                        Err(error) => {
                            outcomes.push(json!({ "fault": format!("step {step}"), "error": format!("{error:#}") }));
                        }
                    }
                    tokio::time::sleep(steady).await;
                }
            }
            tokio::time::sleep(steady).await;
            stop.store(true, Ordering::Relaxed);
            outcomes
        };
        let pushing = Instant::now();
        let (_, _, outcomes) =
            tokio::join!(this.unicast_load(&stop), this.broadcast_load(&stop), plan);
        self.report.faults = outcomes;
        self.report.messages.push_secs = pushing.elapsed().as_secs_f64();
        self.report.messages.api_calls = lock(&self.load.calls).len() as u64;
        self.report.notes.push(
            "every role process was killed and started again: the process rows are the first processes, gone by the end".into(),
        );
        self.set_phase("deliver");
        let accepted = lock(&self.ledger).len() as u64;
        let hidden = indicatif::ProgressBar::hidden();
        self.report.messages.drain_secs =
            super::scenarios::drain(&self.workers, args, accepted, |p| p.delivered, &hidden).await;
        let broadcasts = lock(&self.load.broadcasts).len() as u64;
        let expected = broadcasts * self.online.len() as u64;
        super::scenarios::drain(
            &self.workers,
            args,
            expected,
            |p| p.broadcast_delivered,
            &hidden,
        )
        .await;
    }

    /// Waits (at most --ramp-timeout-secs) until as many devices are open
    /// as before the fault: a killed room's devices come back 1 to 3 s
    /// later, as real ones do, and the next fault waits for them. Seconds
    /// it took, None when they did not all come back.
    async fn devices_back(&self, open_before: u64) -> Option<f64> {
        let started = Instant::now();
        // Progress comes every 250 ms: let the workers see the fault first.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let limit = Duration::from_secs(self.args.ramp_timeout_secs);
        let back = self
            .workers
            .wait_until(limit, |workers| workers.total().open >= open_before)
            .await;
        back.then(|| started.elapsed().as_secs_f64())
    }

    /// Unicast calls of --batch users at --push-rate messages/s,
    /// --push-concurrency in flight, spread over every API; every other call
    /// keyed, until `stop`.
    async fn unicast_load(&self, stop: &AtomicBool) {
        let args = self.args;
        if self.online.is_empty() {
            return;
        }
        let apis: Vec<&String> = std::iter::once(&args.api).chain(&args.more_apis).collect();
        let batch = args.batch.clamp(1, 10_000);
        let rate = args.push_rate.max(1) as f64;
        let started = Instant::now();
        futures::stream::iter(0u64..)
            .take_while(|_| std::future::ready(!stop.load(Ordering::Relaxed)))
            .map(|index| {
                let users: Vec<u64> = (0..batch as u64)
                    .map(|slot| {
                        self.online[((index * batch as u64 + slot) as usize) % self.online.len()]
                    })
                    .collect();
                let api = apis[index as usize % apis.len()];
                let due = started + Duration::from_secs_f64((index * batch as u64) as f64 / rate);
                async move {
                    tokio::time::sleep_until(due).await;
                    self.unicast_call(api, index + 1, index % 2 == 0, &users)
                        .await
                }
            })
            .buffer_unordered(args.push_concurrency.max(1))
            .for_each(|call| {
                lock(&self.load.calls).push(call);
                std::future::ready(())
            })
            .await;
    }

    /// One unicast call (tag `tag`), retried with its key when `keyed`.
    async fn unicast_call(&self, api: &str, tag: u64, keyed: bool, users: &[u64]) -> Call {
        let args = self.args;
        let names: Vec<String> = users
            .iter()
            .map(|user| format!("{}{user}", self.prefix))
            .collect();
        let mut body = json!({ "users": names, "payload": tagged_payload(unix_us(), tag, args.payload_bytes) });
        if keyed {
            body["idempotency_key"] = json!(format!("{}k{tag}", self.prefix));
        }
        let mut call = Call {
            tag,
            keyed,
            answers: Vec::new(),
        };
        let attempts = if keyed { KEYED_ATTEMPTS } else { 1 };
        for attempt in 0..attempts {
            let (answer, value) = self.call(&format!("{api}/api/push"), &body).await;
            call.answers.push((answer, Instant::now()));
            if answer == Answer::Accepted {
                self.accept(&value);
                break;
            }
            if attempt + 1 < attempts {
                // A keyed retry backs off, as a real caller's does.
                tokio::time::sleep(Duration::from_millis(
                    (100 * (u64::from(attempt) + 1)).min(2_000),
                ))
                .await;
            }
        }
        call
    }

    /// Every (user, id) of an accepted push into the ledger.
    fn accept(&self, value: &Value) {
        let mut ledger = lock(&self.ledger);
        let messages = value["result"]["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for message in messages {
            let id = match &message["id"] {
                Value::String(text) => text.parse().ok(),
                Value::Number(number) => number.as_u64(),
                _ => None,
            };
            let user = message["user"]
                .as_str()
                .and_then(|user| user.strip_prefix(self.prefix.as_str()))
                .and_then(|rest| rest.parse().ok());
            if let (Some(id), Some(user)) = (id, user) {
                if ledger.contains(id) {
                    *lock(&self.load.ids_answered_twice) += 1;
                }
                ledger.accept(id, user);
            }
        }
    }

    /// One POST with the run's API key: the answer and its body.
    async fn call(&self, url: &str, body: &Value) -> (Answer, Value) {
        let sent = self
            .http
            .post(url)
            .header("Authorization", format!("apikey {}", self.args.api_key))
            .timeout(CALL_TIMEOUT)
            .json(body)
            .send()
            .await;
        let Ok(response) = sent else {
            return (Answer::Unknown, Value::Null);
        };
        let status = response.status().as_u16();
        match response.json::<Value>().await {
            Ok(value) if status == 200 => (Answer::Accepted, value),
            Ok(_) => (Answer::Refused(status), Value::Null),
            Err(_) => (Answer::Unknown, Value::Null),
        }
    }

    /// A broadcast to --topic every --broadcast-interval-ms (sent once
    /// each), spread over every API, until `stop`.
    async fn broadcast_load(&self, stop: &AtomicBool) {
        let args = self.args;
        let apis: Vec<&String> = std::iter::once(&args.api).chain(&args.more_apis).collect();
        let interval = Duration::from_millis(args.broadcast_interval_ms.max(10));
        let mut index = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let due = Instant::now() + interval;
            let body = json!({ "topic": args.topic, "payload": tagged_payload(unix_us(), 0, args.payload_bytes) });
            let url = format!("{}/api/broadcast", apis[index % apis.len()]);
            let (answer, value) = self.call(&url, &body).await;
            if answer == Answer::Accepted {
                let result = &value["result"];
                match (result["epoch"].as_u64(), result["offset"].as_u64()) {
                    (Some(epoch), Some(offset)) => {
                        lock(&self.load.broadcasts).push((epoch, offset));
                    }
                    _ => eprintln!("a broadcast answer without epoch and offset: {value}"),
                }
            }
            *lock(&self.load.broadcast_answers)
                .entry(answer.name())
                .or_default() += 1;
            index += 1;
            // Paces the broadcasts.
            tokio::time::sleep_until(due).await;
        }
    }
}

/// The under-faults accounting from the load's records and the workers'
/// reports; `ledger` is the unicast ledger `account::messages` filled.
pub(super) fn account(
    load: &Load,
    collected: &Collected,
    ledger: &Ledger,
    online: &[u64],
    args: &RunArgs,
) -> Accounting {
    let mut accounting = Accounting::default();
    calls(&mut accounting, load, collected);
    accounting.ids_answered_twice = *lock(&load.ids_answered_twice);
    accounting.broadcast_answers = lock(&load.broadcast_answers).clone();
    broadcasts(&mut accounting, load, collected, online, &args.topic);
    accounting.failures = failures(&accounting, ledger);
    accounting
}

/// Every unicast call by its answers, and whether a call answered only
/// with errors was delivered (the payload's call tag says).
fn calls(accounting: &mut Accounting, load: &Load, collected: &Collected) {
    let delivered_tags: HashSet<u64> = collected
        .reports
        .iter()
        .flat_map(|report| report.delivered_calls.iter().copied())
        .filter(|tag| *tag > 0)
        .collect();
    let doubt = lock(&load.doubt).clone();
    let in_doubt_at = |at: Instant| doubt.iter().any(|(from, to)| *from <= at && at <= *to);
    for call in lock(&load.calls).iter() {
        accounting.unicast_calls += 1;
        for (answer, _) in &call.answers {
            *accounting
                .answers_by_status
                .entry(answer.name())
                .or_default() += 1;
        }
        if call.keyed {
            accounting.keyed_calls += 1;
            accounting.keyed_retried += u64::from(call.answers.len() > 1);
            accounting.keyed_given_up += u64::from(!call.accepted());
        }
        if call.accepted() {
            accounting.unicast_calls_accepted += 1;
            continue;
        }
        let only_errors = call
            .answers
            .iter()
            .all(|(answer, _)| matches!(answer, Answer::Refused(_)));
        let delivered = u64::from(delivered_tags.contains(&call.tag));
        if !only_errors {
            accounting.unanswered += 1;
            accounting.unanswered_delivered += delivered;
            continue;
        }
        if call.answers.iter().any(|(_, at)| in_doubt_at(*at)) {
            accounting.in_doubt += 1;
            accounting.in_doubt_delivered += delivered;
        } else {
            accounting.refused += 1;
            accounting.refused_delivered += delivered;
        }
    }
}

/// The checks that failed, in words.
fn failures(accounting: &Accounting, ledger: &Ledger) -> Vec<String> {
    let outcome = ledger.outcome();
    let a = accounting;
    let checks = [
        (
            outcome.lost.is_empty(),
            format!("{} accepted unicasts lost", outcome.lost.len()),
        ),
        (
            outcome.misrouted == 0,
            format!("{} deliveries misrouted", outcome.misrouted),
        ),
        (
            a.refused_delivered == 0,
            format!("{} refused calls delivered", a.refused_delivered),
        ),
        (
            a.keyed_given_up == 0,
            format!("{} keyed calls never got through", a.keyed_given_up),
        ),
        (
            a.ids_answered_twice == 0,
            format!("{} ids answered to two calls", a.ids_answered_twice),
        ),
        (
            a.broadcast_missing_without_gap == 0,
            format!(
                "{} broadcast deliveries missing without a gap told",
                a.broadcast_missing_without_gap
            ),
        ),
        (
            outcome.accepted > 0 && a.broadcasts_accepted > 0,
            "no load was accepted".to_owned(),
        ),
    ];
    checks
        .into_iter()
        .filter(|(held, _)| !held)
        .map(|(_, failure)| failure)
        .collect()
}

/// Every accepted broadcast (by epoch and offset) against every device that
/// was online after the ramp and not told of a gap.
fn broadcasts(
    accounting: &mut Accounting,
    load: &Load,
    collected: &Collected,
    online: &[u64],
    topic: &str,
) {
    let accepted = lock(&load.broadcasts).clone();
    accounting.broadcasts_accepted = accepted.len() as u64;
    let mut by_epoch: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (epoch, offset) in accepted {
        by_epoch.entry(epoch).or_default().push(offset);
    }
    for (epoch, offsets) in by_epoch.iter_mut() {
        offsets.sort_unstable();
        offsets.dedup();
        let (first, last) = (offsets[0], offsets[offsets.len() - 1]);
        accounting
            .broadcast_epochs
            .push((*epoch, offsets.len() as u64, first, last));
    }
    let mut receipts: HashMap<(u64, u64), &TopicReceipts> = HashMap::new();
    let mut told: HashSet<u64> = HashSet::new();
    for (spec, report) in collected.specs.iter().zip(&collected.reports) {
        for device in report
            .broadcast_devices
            .iter()
            .filter(|device| device.topic == topic)
        {
            receipts.insert(
                (spec.first_user + u64::from(device.device), device.epoch),
                &device.receipts,
            );
        }
        told.extend(
            report
                .broadcast_gaps
                .iter()
                .map(|(device, _)| spec.first_user + u64::from(*device)),
        );
    }
    let empty = TopicReceipts::default();
    for user in online {
        if told.contains(user) {
            accounting.devices_told_of_a_gap += 1;
            continue;
        }
        for (epoch, offsets) in &by_epoch {
            accounting.broadcast_expected += offsets.len() as u64;
            let got = receipts.get(&(*user, *epoch)).copied().unwrap_or(&empty);
            let missing = got.missing(offsets);
            accounting.broadcast_delivered += (offsets.len() - missing.len()) as u64;
            accounting.broadcast_missing_without_gap += missing.len() as u64;
            for offset in missing
                .into_iter()
                .take(20 - accounting.broadcast_missing_sample.len().min(20))
            {
                accounting
                    .broadcast_missing_sample
                    .push((*user, *epoch, offset));
            }
        }
    }
}
