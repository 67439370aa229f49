//! Exact loss accounting: every message id the push API accepted is matched to
//! its deliveries; what has none is lost, by id.

use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct Ledger {
    /// id -> (user index, deliveries)
    accepted: HashMap<u64, (u64, u32)>,
    unexpected: u64,
    misrouted: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    pub accepted: u64,
    /// Accepted messages delivered at least once.
    pub delivered: u64,
    /// Accepted messages never delivered: (message id, user index).
    pub lost: Vec<(u64, u64)>,
    /// Extra deliveries of accepted messages (at-least-once redeliveries).
    pub duplicated: u64,
    /// Messages delivered more than once.
    pub duplicated_messages: u64,
    /// Deliveries of ids the push API never returned to this run.
    pub unexpected: u64,
    /// Deliveries of accepted messages to a device of another user.
    pub misrouted: u64,
}

impl Ledger {
    pub fn accept(&mut self, id: u64, user: u64) {
        self.accepted.entry(id).or_insert((user, 0));
    }

    pub fn contains(&self, id: u64) -> bool {
        self.accepted.contains_key(&id)
    }

    pub fn deliver(&mut self, id: u64) {
        match self.accepted.get_mut(&id) {
            Some((_, count)) => *count += 1,
            None => self.unexpected += 1,
        }
    }

    /// A delivery of `id` to the device of user `device_user`: counted as
    /// [`deliver`](Self::deliver), and as misrouted when the message was
    /// accepted for another user.
    pub fn deliver_to(&mut self, id: u64, device_user: u64) {
        if let Some((user, _)) = self.accepted.get(&id)
            && *user != device_user
        {
            self.misrouted += 1;
            return;
        }
        self.deliver(id);
    }

    pub fn len(&self) -> usize {
        self.accepted.len()
    }

    pub fn outcome(&self) -> Outcome {
        let mut outcome = Outcome {
            accepted: self.accepted.len() as u64,
            unexpected: self.unexpected,
            misrouted: self.misrouted,
            ..Default::default()
        };
        for (id, (user, count)) in &self.accepted {
            match count {
                0 => outcome.lost.push((*id, *user)),
                n => {
                    outcome.delivered += 1;
                    if *n > 1 {
                        outcome.duplicated += u64::from(n - 1);
                        outcome.duplicated_messages += 1;
                    }
                }
            }
        }
        outcome.lost.sort_unstable();
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_accepted_id_is_delivered_lost_or_duplicated() {
        let mut ledger = Ledger::default();
        for id in 1..=5 {
            ledger.accept(id, id * 10);
        }
        for id in [1, 2, 2, 3, 3, 3, 5, 99] {
            ledger.deliver(id);
        }
        let outcome = ledger.outcome();
        assert_eq!(outcome.accepted, 5);
        assert_eq!(outcome.delivered, 4);
        assert_eq!(outcome.lost, vec![(4, 40)]);
        assert_eq!(outcome.duplicated, 3);
        assert_eq!(outcome.duplicated_messages, 2);
        assert_eq!(outcome.unexpected, 1);
    }

    #[test]
    fn a_delivery_to_another_users_device_is_misrouted_not_delivered() {
        let mut ledger = Ledger::default();
        ledger.accept(1, 10);
        ledger.accept(2, 20);
        ledger.deliver_to(1, 10);
        ledger.deliver_to(2, 10);
        let outcome = ledger.outcome();
        assert_eq!(outcome.delivered, 1);
        assert_eq!(outcome.misrouted, 1);
        assert_eq!(outcome.lost, vec![(2, 20)]);
    }
}
