//! Writing a shard connection's queue to its socket: vectored writes that
//! do not wait, and how the flush ended.

use std::io::{self, IoSlice};

use super::ConnHandle;
use crate::shard_handle::Flushed;

/// Frames gathered into one vectored write.
const MAX_IOVECS: usize = 64;

impl ConnHandle {
    /// Shard writers: writes queued frames with `write` (a vectored write
    /// that does not wait) until the queue is empty or the socket is full.
    pub(crate) fn flush(
        &self,
        mut write: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
    ) -> Flushed {
        let mut queue = self.lock();
        queue.flush_asked = false;
        let (mut bytes, mut frames, mut writes) = (0, 0, 0);
        loop {
            if queue.holds > 0 || queue.frames.is_empty() || queue.closed {
                queue.stalled = false;
                return Flushed::Done {
                    bytes,
                    frames,
                    writes,
                };
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for (index, outbound) in queue.frames.iter().take(MAX_IOVECS).enumerate() {
                let start = if index == 0 { queue.offset as usize } else { 0 };
                slices[count] = IoSlice::new(&outbound.frame[start..]);
                count += 1;
            }
            writes += 1;
            let mut written = match write(&slices[..count]) {
                Ok(0) => return Flushed::Failed,
                Ok(written) => written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    queue.stalled = true;
                    return Flushed::Blocked {
                        bytes,
                        frames,
                        writes,
                    };
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Flushed::Failed,
            };
            bytes += written;
            while written > 0 {
                let Some(first) = queue.frames.front() else {
                    break;
                };
                let left = first.frame.len() - queue.offset as usize;
                if written >= left {
                    written -= left;
                    queue.offset = 0;
                    if let Some(done) = queue.frames.pop_front() {
                        queue.forget(&done);
                        frames += 1;
                    }
                } else {
                    queue.offset += written as u32;
                    written = 0;
                }
            }
        }
    }
}
