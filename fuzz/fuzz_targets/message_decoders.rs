//! Arbitrary bytes into every client.proto message decoder; what decodes
//! must survive an encode/decode round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pushgrid_fuzz::targets::message_decoders(data);
});
