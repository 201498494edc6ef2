//! Fuzz target: see `e2e::fuzz_checks::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| e2e::fuzz_checks::manifest(data));
