//! Fuzz target: see `e2e::fuzz_checks::chunk`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| e2e::fuzz_checks::chunk(data));
