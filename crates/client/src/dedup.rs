//! The duplicate filter: at-least-once delivery means the same message id can
//! arrive again (after a reconnect, or when the ACK was lost).

use std::collections::{HashMap, VecDeque};

/// What the filter knows about a message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First time: hand it to the application.
    New,
    /// Seen before and already acknowledged: the server did not get the ACK, send
    /// it again.
    DuplicateAcked,
    /// Seen before, not acknowledged yet: the application still has it; drop.
    DuplicateUnacked,
}

/// Remembers the last `capacity` message ids (oldest forgotten first) and whether
/// each was acknowledged. Memory is bounded by `capacity`.
#[derive(Debug)]
pub struct DedupFilter {
    capacity: usize,
    order: VecDeque<u64>,
    acked: HashMap<u64, bool>,
}

impl DedupFilter {
    pub fn new(capacity: usize) -> DedupFilter {
        let capacity = capacity.max(1);
        DedupFilter {
            capacity,
            order: VecDeque::new(),
            acked: HashMap::new(),
        }
    }

    /// Looks `msg_id` up without recording it.
    pub fn check(&self, msg_id: u64) -> Seen {
        match self.acked.get(&msg_id) {
            None => Seen::New,
            Some(true) => Seen::DuplicateAcked,
            Some(false) => Seen::DuplicateUnacked,
        }
    }

    /// Records `msg_id` as delivered (not acknowledged) if it is new.
    pub fn insert(&mut self, msg_id: u64) {
        if self.acked.contains_key(&msg_id) {
            return;
        }
        if self.order.len() >= self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.acked.remove(&oldest);
        }
        self.order.push_back(msg_id);
        self.acked.insert(msg_id, false);
        debug_assert_eq!(self.order.len(), self.acked.len());
    }

    /// Marks `msg_id` as acknowledged (recording it first if it was unknown, so a
    /// redelivery after an early ACK is re-acked rather than shown again).
    pub fn mark_acked(&mut self, msg_id: u64) {
        self.insert(msg_id);
        if let Some(acked) = self.acked.get_mut(&msg_id) {
            *acked = true;
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_then_unacked_then_acked() {
        let mut filter = DedupFilter::new(10);
        assert_eq!(filter.check(1), Seen::New);
        filter.insert(1);
        assert_eq!(filter.check(1), Seen::DuplicateUnacked);
        filter.mark_acked(1);
        assert_eq!(filter.check(1), Seen::DuplicateAcked);
        filter.insert(1);
        assert_eq!(
            filter.check(1),
            Seen::DuplicateAcked,
            "insert never un-acks"
        );
    }

    #[test]
    fn bounded_forgets_the_oldest() {
        let mut filter = DedupFilter::new(3);
        for id in 1..=5 {
            filter.insert(id);
        }
        assert_eq!(filter.len(), 3);
        assert_eq!(filter.check(1), Seen::New);
        assert_eq!(filter.check(2), Seen::New);
        assert_eq!(filter.check(3), Seen::DuplicateUnacked);
        assert_eq!(filter.check(5), Seen::DuplicateUnacked);
    }

    #[test]
    fn ack_of_unknown_id_is_remembered() {
        let mut filter = DedupFilter::new(3);
        filter.mark_acked(42);
        assert_eq!(filter.check(42), Seen::DuplicateAcked);
    }
}
