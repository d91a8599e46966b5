#![no_main]
// The target's body is the library's, so the tests replay the same code.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ambassador_userspace::fuzzing::dns(data));
