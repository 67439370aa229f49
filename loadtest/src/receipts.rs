//! Broadcast accounting per device and topic: which offsets a device received
//! (as sorted ranges, so a device that got 200 broadcasts in order holds one
//! pair), how many arrived twice, and how many arrived after a higher offset
//! of the same topic had (out of order). The coordinator then matches every
//! offset the broadcast API accepted against every subscribed device: a
//! device that missed one is counted, by device, even when every other
//! device got it.

use serde::{Deserialize, Serialize};

/// What one device received of one topic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicReceipts {
    /// Distinct offsets received, as sorted, disjoint, non-adjacent
    /// inclusive ranges.
    pub ranges: Vec<(u64, u64)>,
    /// Deliveries of an offset already received.
    pub duplicated: u64,
    /// First deliveries of an offset lower than one already received.
    pub out_of_order: u64,
    /// First deliveries that skipped ahead: the offset was more than one
    /// above the highest received so far (a gap, filled later or never).
    pub skipped_ahead: u64,
}

/// Whether a delivery was the offset's first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    New,
    Duplicate,
}

impl TopicReceipts {
    /// The highest offset received, 0 before any.
    pub fn highest(&self) -> u64 {
        self.ranges.last().map_or(0, |(_, end)| *end)
    }

    /// Distinct offsets received.
    #[cfg(test)]
    pub fn distinct(&self) -> u64 {
        self.ranges.iter().map(|(start, end)| end - start + 1).sum()
    }

    pub fn contains(&self, offset: u64) -> bool {
        let index = self.ranges.partition_point(|(_, end)| *end < offset);
        self.ranges
            .get(index)
            .is_some_and(|(start, _)| *start <= offset)
    }

    /// Records one delivery of `offset`.
    pub fn record(&mut self, offset: u64) -> Receipt {
        let highest = self.highest();
        // The common case, in order: extend the last range.
        if let Some(last) = self.ranges.last_mut()
            && offset == last.1 + 1
        {
            last.1 = offset;
            return Receipt::New;
        }
        if self.contains(offset) {
            self.duplicated += 1;
            return Receipt::Duplicate;
        }
        if offset < highest {
            self.out_of_order += 1;
        } else if !self.ranges.is_empty() {
            self.skipped_ahead += 1;
        }
        let index = self.ranges.partition_point(|(_, end)| *end < offset);
        self.ranges.insert(index, (offset, offset));
        // Merge with the neighbours it now touches.
        if index + 1 < self.ranges.len() && self.ranges[index + 1].0 == offset + 1 {
            self.ranges[index].1 = self.ranges[index + 1].1;
            self.ranges.remove(index + 1);
        }
        if index > 0 && self.ranges[index - 1].1 + 1 == offset {
            self.ranges[index - 1].1 = self.ranges[index].1;
            self.ranges.remove(index);
        }
        Receipt::New
    }

    /// Of `accepted` (sorted, distinct), the offsets this device lacks.
    pub fn missing(&self, accepted: &[u64]) -> Vec<u64> {
        accepted
            .iter()
            .copied()
            .filter(|offset| !self.contains(*offset))
            .collect()
    }
}

/// One device's receipts of one topic, as a worker reports them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceReceipts {
    /// Index relative to the worker's `first_user`.
    pub device: u32,
    pub topic: String,
    /// The stream's epoch these offsets belong to (a restarted stream
    /// counts from 1 again in a new epoch).
    #[serde(default)]
    pub epoch: u64,
    pub receipts: TopicReceipts,
}

/// One offset as seen by one worker: first receipts and the slowest one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OffsetReceipts {
    pub topic: String,
    pub offset: u64,
    pub devices: u64,
    /// From the API call to the last of these devices' receipt.
    pub max_latency_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_deliveries_stay_one_range() {
        let mut receipts = TopicReceipts::default();
        for offset in 5..=204 {
            assert_eq!(receipts.record(offset), Receipt::New);
        }
        assert_eq!(receipts.ranges, vec![(5, 204)]);
        assert_eq!(receipts.distinct(), 200);
        assert_eq!(
            (
                receipts.duplicated,
                receipts.out_of_order,
                receipts.skipped_ahead
            ),
            (0, 0, 0)
        );
    }

    #[test]
    fn out_of_order_duplicates_and_gaps_are_told_apart() {
        let mut receipts = TopicReceipts::default();
        for offset in [1, 2, 4, 3, 3, 7, 5, 6, 1] {
            receipts.record(offset);
        }
        assert_eq!(receipts.ranges, vec![(1, 7)]);
        assert_eq!(receipts.duplicated, 2, "3 and 1 again");
        assert_eq!(receipts.out_of_order, 3, "3 after 4, 5 and 6 after 7");
        assert_eq!(receipts.skipped_ahead, 2, "4 after 2, 7 after 4");
        assert!(receipts.missing(&[1, 2, 3, 4, 5, 6, 7]).is_empty());
    }

    #[test]
    fn a_device_that_missed_an_offset_is_found_by_it() {
        let mut receipts = TopicReceipts::default();
        for offset in [10, 11, 13, 14, 20] {
            receipts.record(offset);
        }
        assert_eq!(receipts.ranges, vec![(10, 11), (13, 14), (20, 20)]);
        assert_eq!(receipts.missing(&[10, 11, 12, 13, 14, 15]), vec![12, 15]);
        assert!(receipts.contains(13) && !receipts.contains(19) && !receipts.contains(21));
        // Filling the hole merges the ranges.
        receipts.record(12);
        assert_eq!(receipts.ranges, vec![(10, 14), (20, 20)]);
    }
}
