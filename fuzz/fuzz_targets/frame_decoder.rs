//! Byte streams from a device into the frame decoder, in one buffer and in
//! TCP-sized chunks; every frame's body into the decoder of its op.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pushgrid_fuzz::targets::frame_decoder(data);
});
