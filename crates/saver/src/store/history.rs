//! The History answer both stores give: what a device missed on a topic,
//! and whether the stream still covers it (same epoch, offsets kept).

use pushgrid_proto::cluster::BroadcastMessage;

use super::{History, HistoryQuery};

/// The History answer, given the topic's current epoch and offset (0, 0
/// when it has no stream) and the entries it holds after `since_offset`
/// (at most `limit`, oldest first, none older than `oldest_kept_ms`).
pub(super) fn history_answer(
    query: &HistoryQuery,
    current_epoch: u64,
    current_offset: u64,
    mut entries: Vec<BroadcastMessage>,
    oldest_kept_ms: u64,
) -> History {
    let not_recovered = History {
        messages: Vec::new(),
        recovered: false,
        offset: current_offset,
        epoch: current_epoch,
    };
    // A first subscription: nothing to recover, start at the current offset.
    if query.epoch == 0 {
        return History {
            recovered: true,
            ..not_recovered
        };
    }
    if query.epoch != current_epoch || query.since_offset > current_offset {
        return not_recovered;
    }
    if query.since_offset == current_offset {
        return History {
            recovered: true,
            ..not_recovered
        };
    }
    entries.retain(|entry| entry.created_ms >= oldest_kept_ms);
    let covers = entries
        .first()
        .is_some_and(|entry| entry.offset == query.since_offset + 1);
    let contiguous = entries
        .windows(2)
        .all(|pair| pair[1].offset == pair[0].offset + 1);
    if !covers || !contiguous {
        return not_recovered;
    }
    History {
        messages: entries,
        recovered: true,
        offset: current_offset,
        epoch: current_epoch,
    }
}
