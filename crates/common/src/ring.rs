//! Consistent hashing with virtual nodes, deterministic across processes (FNV-1a
//! plus a 64-bit finaliser), so center and room agree on which register owns a
//! user without talking to each other.

pub const VIRTUAL_NODES: usize = 160;

/// Stable 64-bit hash of bytes.
pub fn hash64(data: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in data {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser: spreads FNV's weak low bits.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The hash key of a user within an app.
pub fn user_key(app: &str, user: &str) -> u64 {
    let mut key = Vec::with_capacity(app.len() + user.len() + 1);
    key.extend_from_slice(app.as_bytes());
    key.push(0);
    key.extend_from_slice(user.as_bytes());
    hash64(&key)
}

/// A ring of node ids.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    points: Vec<(u64, usize)>,
    nodes: Vec<String>,
}

impl Ring {
    pub fn new<I, S>(nodes: I) -> Ring
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        let mut points = Vec::with_capacity(nodes.len() * VIRTUAL_NODES);
        for (index, node) in nodes.iter().enumerate() {
            for replica in 0..VIRTUAL_NODES {
                points.push((hash64(format!("{node}#{replica}").as_bytes()), index));
            }
        }
        points.sort_unstable();
        Ring { points, nodes }
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node owning `key`.
    pub fn node_for(&self, key: u64) -> Option<&str> {
        if self.points.is_empty() {
            return None;
        }
        let position = self.points.partition_point(|(point, _)| *point < key);
        let (_, index) = self.points[position % self.points.len()];
        Some(&self.nodes[index])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_a_node_moves_only_its_keys() {
        let full = Ring::new(["a", "b", "c", "d"]);
        let reduced = Ring::new(["a", "b", "d"]);
        let mut moved = 0;
        for user in 0..10_000u32 {
            let key = user_key("app", &user.to_string());
            let before = full.node_for(key).map(str::to_string);
            let after = reduced.node_for(key).map(str::to_string);
            if before != after {
                assert_eq!(
                    before.as_deref(),
                    Some("c"),
                    "only keys of the removed node move"
                );
                moved += 1;
            }
        }
        // About a quarter of the keys lived on c.
        assert!((1_500..3_500).contains(&moved), "moved {moved}");
    }

    #[test]
    fn empty_ring_has_no_owner() {
        assert_eq!(Ring::new(Vec::<String>::new()).node_for(1), None);
    }
}
