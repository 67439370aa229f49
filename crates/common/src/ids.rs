//! Message ids: 64-bit, time-ordered, unique across savers.
//!
//! Layout: 41 bits of milliseconds since 2024-01-01, 10 bits of worker id
//! (assigned by keeper, unique among live nodes), 12 bits of sequence. 4096 ids
//! per millisecond per worker; when a millisecond is used up the generator
//! borrows from the next one, so ids stay unique and increasing.

use std::sync::Mutex;

const EPOCH_MS: u64 = 1_704_067_200_000;
const WORKER_BITS: u32 = 10;
const SEQUENCE_BITS: u32 = 12;
pub const MAX_WORKER_ID: u32 = (1 << WORKER_BITS) - 1;

pub struct IdGenerator {
    worker_id: u64,
    /// (last millisecond used, last sequence used in it)
    state: Mutex<(u64, u64)>,
}

impl IdGenerator {
    pub fn new(worker_id: u32) -> IdGenerator {
        IdGenerator {
            worker_id: u64::from(worker_id & MAX_WORKER_ID),
            state: Mutex::new((0, 0)),
        }
    }

    /// Reserves `count` consecutive ids and returns the first ... in a Vec.
    pub fn next_ids(&self, count: usize) -> Vec<u64> {
        let now = crate::now_ms().saturating_sub(EPOCH_MS);
        let mut ids = Vec::with_capacity(count);
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (mut millis, mut sequence) = *state;
        for _ in 0..count {
            if now > millis {
                millis = now;
                sequence = 0;
            } else {
                sequence += 1;
                if sequence >= (1 << SEQUENCE_BITS) {
                    millis += 1;
                    sequence = 0;
                }
            }
            ids.push(
                (millis << (WORKER_BITS + SEQUENCE_BITS))
                    | (self.worker_id << SEQUENCE_BITS)
                    | sequence,
            );
        }
        *state = (millis, sequence);
        ids
    }

    pub fn next_id(&self) -> u64 {
        self.next_ids(1)[0]
    }
}

/// The wall-clock millisecond an id was made in.
pub fn id_time_ms(id: u64) -> u64 {
    (id >> (WORKER_BITS + SEQUENCE_BITS)) + EPOCH_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_never_repeat() {
        let generator = IdGenerator::new(3);
        let ids = generator.next_ids(20_000);
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
        let worker = (ids[0] >> SEQUENCE_BITS) & u64::from(MAX_WORKER_ID);
        assert_eq!(worker, 3);
        let made = id_time_ms(ids[0]);
        assert!(made.abs_diff(crate::now_ms()) < 10_000);
    }

    #[test]
    fn two_workers_never_collide() {
        let first = IdGenerator::new(1).next_ids(5000);
        let second = IdGenerator::new(2).next_ids(5000);
        let all: std::collections::HashSet<u64> =
            first.iter().chain(second.iter()).copied().collect();
        assert_eq!(all.len(), 10_000);
    }
}
