//! When a connection's outbound queue is full: its bounds, and the rule that
//! tells a device that does not read from a room that has not written yet.

/// Bounds of one connection's outbound queue (counted frames and their bytes).
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    pub frames: usize,
    pub bytes: usize,
}

/// How far past its bounds a queue may grow while its socket still takes
/// everything written to it: a burst of broadcasts queued for thousands of
/// connections at once waits for the shard thread, not for the devices.
pub(crate) const UNSTALLED_FACTOR: usize = 4;

impl QueueLimits {
    /// Which bound a frame of `len` bytes would break on a queue that holds
    /// `frames` counted frames of `bytes` bytes, if any: the bounds as set
    /// while the socket is full (`stalled`: the device does not read), and
    /// [`UNSTALLED_FACTOR`] times them otherwise. One frame may exceed the
    /// bytes bound alone.
    pub(crate) fn broken(
        self,
        frames: u32,
        bytes: u32,
        len: usize,
        stalled: bool,
    ) -> Option<&'static str> {
        let factor = if stalled { 1 } else { UNSTALLED_FACTOR };
        if frames as usize >= self.frames.saturating_mul(factor) {
            Some("frames")
        } else if bytes as usize + len > self.bytes.saturating_mul(factor) && frames > 0 {
            Some("bytes")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_socket_keeps_the_bounds_an_open_one_multiplies_them() {
        let limits = QueueLimits {
            frames: 3,
            bytes: 1000,
        };
        assert_eq!(limits.broken(2, 20, 10, true), None);
        assert_eq!(limits.broken(3, 30, 10, true), Some("frames"));
        assert_eq!(limits.broken(3, 30, 10, false), None);
        assert_eq!(limits.broken(11, 110, 10, false), None);
        assert_eq!(limits.broken(12, 120, 10, false), Some("frames"));
        assert_eq!(limits.broken(1, 995, 10, true), Some("bytes"));
        assert_eq!(limits.broken(1, 995, 10, false), None);
        assert_eq!(limits.broken(1, 3995, 10, false), Some("bytes"));
        assert_eq!(limits.broken(0, 0, 5000, true), None, "one frame alone");
    }
}
