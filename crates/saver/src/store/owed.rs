//! Work a store still owes after a fault, kept until it is done:
//!
//! * **ACKs** the store did not take (Redis or SQL failed): an acknowledged
//!   message must not be delivered again, so the ACK is applied again with a
//!   back-off until it sticks.
//! * **Withdrawals**: the messages of a Store call that failed (or whose
//!   caller gave up) must not be delivered, so they are removed from Redis
//!   and SQL, again until it sticks. A write whose outcome was unknown (a
//!   commit that timed out, a connection cut mid-pipeline) may still land
//!   after the first removal, so a withdrawal is applied once more after
//!   [`CONFIRM_AFTER`].
//!
//! Until then the messages are hidden: this saver's inbox reads skip them.
//! Both queues are bounded ([`MAX_OWED_IDS`] message ids each); past that an
//! ACK is dropped (the message may be delivered again, which the SDK's
//! duplicate filter absorbs) and a withdrawal is dropped with an error log;
//! both are counted in `pushgrid_saver_owed_dropped_total{kind}`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use pushgrid_proto::cluster::AckItem;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Message ids owed at most, per kind.
pub const MAX_OWED_IDS: usize = 100_000;
/// A withdrawal of a write whose outcome was unknown is applied again this
/// long after the first time, for a write that was still on its way.
pub const CONFIRM_AFTER: Duration = Duration::from_secs(10);
/// Retries of owed work start here and double up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// One message of a withdrawal: where it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub id: u64,
    pub app: String,
    pub user: String,
}

/// The messages of one failed Store call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withdrawal {
    pub messages: Vec<Placed>,
    /// The call's idempotency key (app, key): forgotten with the messages,
    /// unless a retry of the call already answered with them.
    pub key: Option<(String, String)>,
}

impl Withdrawal {
    pub fn of(messages: &[pushgrid_proto::cluster::Message], key: Option<(&str, &str)>) -> Self {
        Withdrawal {
            messages: messages
                .iter()
                .map(|message| Placed {
                    id: message.id,
                    app: message.app.clone(),
                    user: message.user.clone(),
                })
                .collect(),
            key: key.map(|(app, key)| (app.to_string(), key.to_string())),
        }
    }

    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.messages.iter().map(|message| message.id)
    }
}

/// How a withdrawal ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawn {
    /// The messages are gone from every store.
    Removed,
    /// A retry with the same idempotency key answered with these messages
    /// first: they stay, and will be delivered.
    KeptForRetry,
}

/// A withdrawal still owed.
pub struct OwedWithdrawal {
    pub withdrawal: Withdrawal,
    /// Applied once already: the next application confirms it.
    pub confirming: bool,
    retry_at: Instant,
    delay: Duration,
}

/// An ACK still owed.
pub struct OwedAck {
    pub item: AckItem,
    retry_at: Instant,
    delay: Duration,
}

#[derive(Default)]
struct Queues {
    acks: VecDeque<OwedAck>,
    ack_ids: usize,
    withdrawals: VecDeque<OwedWithdrawal>,
    withdrawn_ids: usize,
    /// Message id -> how many owed entries hide it.
    hidden: HashMap<u64, u32>,
}

impl Queues {
    fn hide(&mut self, ids: impl Iterator<Item = u64>) {
        for id in ids {
            *self.hidden.entry(id).or_default() += 1;
        }
    }

    fn unhide(&mut self, ids: impl Iterator<Item = u64>) {
        for id in ids {
            if let Some(count) = self.hidden.get_mut(&id) {
                *count -= 1;
                if *count == 0 {
                    self.hidden.remove(&id);
                }
            }
        }
    }

    fn gauges(&self) {
        metrics::gauge!("pushgrid_saver_owed", "kind" => "ack").set(self.ack_ids as f64);
        metrics::gauge!("pushgrid_saver_owed", "kind" => "withdrawal")
            .set(self.withdrawn_ids as f64);
    }
}

/// ACKs and withdrawals a store still owes. Shared by the clones of a store.
#[derive(Default)]
pub struct Owed {
    queues: Mutex<Queues>,
    wake: Notify,
}

impl Owed {
    fn queues(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether an inbox read must skip message `id` (acked, or being withdrawn).
    pub fn hides(&self, id: u64) -> bool {
        let queues = self.queues();
        !queues.hidden.is_empty() && queues.hidden.contains_key(&id)
    }

    /// Message ids hidden now, counted once each.
    pub fn hidden_count(&self) -> usize {
        self.queues().hidden.len()
    }

    /// Keeps ACKs the store did not take, to be applied again.
    pub fn owe_acks(&self, items: Vec<AckItem>) {
        self.owe_acks_at(items, Instant::now());
    }

    fn owe_acks_at(&self, items: Vec<AckItem>, now: Instant) {
        let mut queues = self.queues();
        for item in items {
            let ids = item.msg_ids.len();
            if ids == 0 {
                continue;
            }
            if queues.ack_ids + ids > MAX_OWED_IDS {
                metrics::counter!("pushgrid_saver_owed_dropped_total", "kind" => "ack")
                    .increment(ids as u64);
                tracing::warn!(
                    ids,
                    "too many acks owed; dropping this one (its messages may be delivered again)"
                );
                continue;
            }
            queues.ack_ids += ids;
            queues.hide(item.msg_ids.iter().copied());
            queues.acks.push_back(OwedAck {
                item,
                retry_at: now + RETRY_MIN,
                delay: RETRY_MIN,
            });
        }
        queues.gauges();
        drop(queues);
        self.wake.notify_one();
    }

    /// Keeps a withdrawal to be applied. `applied`: it was applied once
    /// already, and is owed only to be confirmed after [`CONFIRM_AFTER`].
    pub fn owe_withdrawal(&self, withdrawal: Withdrawal, applied: bool) {
        self.owe_withdrawal_at(withdrawal, applied, Instant::now());
    }

    fn owe_withdrawal_at(&self, withdrawal: Withdrawal, applied: bool, now: Instant) {
        let mut queues = self.queues();
        let ids = withdrawal.messages.len();
        if queues.withdrawn_ids + ids > MAX_OWED_IDS {
            metrics::counter!("pushgrid_saver_owed_dropped_total", "kind" => "withdrawal")
                .increment(ids as u64);
            tracing::error!(
                ids,
                "too many withdrawals owed; the messages of a failed call may still be delivered"
            );
            return;
        }
        queues.withdrawn_ids += ids;
        queues.hide(withdrawal.ids());
        queues.withdrawals.push_back(OwedWithdrawal {
            withdrawal,
            confirming: applied,
            retry_at: now + if applied { CONFIRM_AFTER } else { RETRY_MIN },
            delay: RETRY_MIN,
        });
        queues.gauges();
        drop(queues);
        self.wake.notify_one();
    }

    /// Takes out the work that is due now. Each piece goes back with one of
    /// the `*_failed` / `*_applied` / `*_done` calls.
    pub fn take_due(&self) -> (Vec<OwedAck>, Vec<OwedWithdrawal>) {
        self.take_due_at(Instant::now())
    }

    fn take_due_at(&self, now: Instant) -> (Vec<OwedAck>, Vec<OwedWithdrawal>) {
        let mut queues = self.queues();
        let (due_acks, kept): (VecDeque<OwedAck>, VecDeque<OwedAck>) =
            queues.acks.drain(..).partition(|ack| ack.retry_at <= now);
        queues.acks = kept;
        let (due_withdrawals, kept): (VecDeque<OwedWithdrawal>, VecDeque<OwedWithdrawal>) = queues
            .withdrawals
            .drain(..)
            .partition(|owed| owed.retry_at <= now);
        queues.withdrawals = kept;
        (due_acks.into(), due_withdrawals.into())
    }

    /// ACKs that were applied: their messages are no longer hidden.
    pub fn acks_done(&self, acks: Vec<OwedAck>) {
        let mut queues = self.queues();
        for ack in acks {
            queues.ack_ids = queues.ack_ids.saturating_sub(ack.item.msg_ids.len());
            queues.unhide(ack.item.msg_ids.iter().copied());
        }
        queues.gauges();
    }

    /// ACKs that failed again: back in the queue after their delay, which doubles.
    pub fn acks_failed(&self, acks: Vec<OwedAck>) {
        self.acks_failed_at(acks, Instant::now());
    }

    fn acks_failed_at(&self, acks: Vec<OwedAck>, now: Instant) {
        let mut queues = self.queues();
        for mut ack in acks {
            ack.retry_at = now + ack.delay;
            ack.delay = (ack.delay * 2).min(RETRY_MAX);
            queues.acks.push_back(ack);
        }
    }

    /// A withdrawal that was applied: a first application stays owed, to be
    /// confirmed after [`CONFIRM_AFTER`]; a confirming one ends it.
    pub fn withdrawal_applied(&self, owed: OwedWithdrawal) {
        self.withdrawal_applied_at(owed, Instant::now());
    }

    fn withdrawal_applied_at(&self, mut owed: OwedWithdrawal, now: Instant) {
        if owed.confirming {
            self.withdrawal_done(owed);
            return;
        }
        owed.confirming = true;
        owed.retry_at = now + CONFIRM_AFTER;
        owed.delay = RETRY_MIN;
        self.queues().withdrawals.push_back(owed);
    }

    /// A withdrawal that ended: applied and confirmed, or kept because a
    /// retry of its call answered with its messages.
    pub fn withdrawal_done(&self, owed: OwedWithdrawal) {
        let mut queues = self.queues();
        queues.withdrawn_ids = queues
            .withdrawn_ids
            .saturating_sub(owed.withdrawal.messages.len());
        queues.unhide(owed.withdrawal.ids());
        queues.gauges();
    }

    /// A withdrawal that failed: tried again after its delay, which doubles.
    pub fn withdrawal_failed(&self, mut owed: OwedWithdrawal) {
        owed.retry_at = Instant::now() + owed.delay;
        owed.delay = (owed.delay * 2).min(RETRY_MAX);
        self.queues().withdrawals.push_back(owed);
    }

    /// How long until the earliest owed work is due ([`RETRY_MAX`] when none).
    pub fn next_due(&self) -> Duration {
        let queues = self.queues();
        let now = Instant::now();
        queues
            .acks
            .iter()
            .map(|ack| ack.retry_at)
            .chain(queues.withdrawals.iter().map(|owed| owed.retry_at))
            .min()
            .map(|at| at.saturating_duration_since(now))
            .unwrap_or(RETRY_MAX)
    }

    /// Resolves when work is added, or after `max`.
    pub async fn wait(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.wake.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(ids: &[u64]) -> AckItem {
        AckItem {
            app: "a".into(),
            user: "u".into(),
            msg_ids: ids.to_vec(),
            device: String::new(),
            delivered_ms: Vec::new(),
        }
    }

    fn withdrawal(ids: &[u64]) -> Withdrawal {
        Withdrawal {
            messages: ids
                .iter()
                .map(|id| Placed {
                    id: *id,
                    app: "a".into(),
                    user: "u".into(),
                })
                .collect(),
            key: None,
        }
    }

    /// Owed work hides its messages until it is done, comes due after its
    /// delay (doubling on each failure), and a withdrawal is applied twice.
    #[test]
    fn owed_work_hides_its_messages_until_done_and_backs_off() {
        let owed = Owed::default();
        let start = Instant::now();
        let at = |offset: Duration| start + offset;
        owed.owe_acks_at(vec![ack(&[1, 2])], start);
        owed.owe_withdrawal_at(withdrawal(&[3]), false, start);
        assert!(owed.hides(1) && owed.hides(2) && owed.hides(3) && !owed.hides(4));
        let (acks, withdrawals) = owed.take_due_at(start);
        assert!(
            acks.is_empty() && withdrawals.is_empty(),
            "nothing due at once"
        );

        let now = at(RETRY_MIN);
        let (acks, withdrawals) = owed.take_due_at(now);
        assert_eq!((acks.len(), withdrawals.len()), (1, 1));
        assert!(!withdrawals[0].confirming);
        // Taken work stays hidden while it is tried.
        assert!(owed.hides(1) && owed.hides(3));
        owed.acks_failed_at(acks, now);
        for taken in withdrawals {
            owed.withdrawal_applied_at(taken, now);
        }
        assert!(
            owed.hides(1) && owed.hides(3),
            "a failed ack and an unconfirmed withdrawal stay"
        );

        // The ack's next try waits its first delay, the one after twice that.
        let now = at(RETRY_MIN * 2);
        let (acks, withdrawals) = owed.take_due_at(now);
        assert_eq!((acks.len(), withdrawals.len()), (1, 0));
        owed.acks_failed_at(acks, now);
        assert!(owed.take_due_at(at(RETRY_MIN * 3)).0.is_empty());
        let (acks, _) = owed.take_due_at(at(RETRY_MIN * 4));
        assert_eq!(acks.len(), 1);
        owed.acks_done(acks);
        assert!(!owed.hides(1) && !owed.hides(2));

        // The withdrawal is applied again after CONFIRM_AFTER, and then ends.
        assert!(owed.take_due_at(at(CONFIRM_AFTER)).1.is_empty());
        let now = at(RETRY_MIN + CONFIRM_AFTER);
        let (_, withdrawals) = owed.take_due_at(now);
        assert_eq!(withdrawals.len(), 1);
        assert!(withdrawals[0].confirming);
        for taken in withdrawals {
            owed.withdrawal_applied_at(taken, now);
        }
        assert!(!owed.hides(3));
        assert_eq!(owed.hidden_count(), 0);
    }

    /// The queues are bounded: past MAX_OWED_IDS an ack is dropped, not kept.
    #[test]
    fn owed_acks_are_bounded() {
        let owed = Owed::default();
        let ids: Vec<u64> = (0..MAX_OWED_IDS as u64).collect();
        owed.owe_acks(vec![ack(&ids)]);
        owed.owe_acks(vec![ack(&[u64::MAX])]);
        assert!(owed.hides(0));
        assert!(!owed.hides(u64::MAX), "over the bound: dropped");
        assert_eq!(owed.hidden_count(), MAX_OWED_IDS);
    }
}
