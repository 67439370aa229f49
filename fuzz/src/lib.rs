//! Fuzz targets for the pushgrid device codec. The target functions live in
//! `targets.rs`, shared with the stable test `tests/tests/fuzz_room.rs`; the
//! binaries in `fuzz_targets/` hand them libFuzzer's inputs.
//!
//! ```text
//! cargo +nightly fuzz run frame_decoder -- -max_total_time=60
//! cargo +nightly fuzz run message_decoders -- -max_total_time=60
//! ```

pub mod targets;
