//! `cargo +nightly fuzz run legacy_path`: look-up input parsing never panics, and whatever it
//! accepts is a relative path of normal components without NUL or `..`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use record_offload::lookup::legacy::{check_invariants, parse_legacy};

/// The first input byte picks the legacy prefix, so prefix handling is fuzzed too.
const PREFIXES: [&str; 5] = ["/record", "", "/", "/media/rec", "record/"];

fuzz_target!(|data: &[u8]| {
    let (prefix, input) = match data.split_first() {
        Some((&pick, rest)) => (PREFIXES[usize::from(pick) % PREFIXES.len()], rest),
        None => (PREFIXES[0], data),
    };
    let result = parse_legacy(input, prefix);
    if let Err(why) = check_invariants(&result) {
        panic!("{:?} with prefix {prefix:?}: {why}", String::from_utf8_lossy(input));
    }
});
