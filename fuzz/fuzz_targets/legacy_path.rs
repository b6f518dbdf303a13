//! `cargo +nightly fuzz run legacy_path`: look-up input parsing never panics, and whatever it
//! accepts is a relative path of normal components without NUL or `..`, that stays under the
//! root when joined onto it.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use record_offload::util::fs::check_rel;
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
        panic!(
            "{:?} with prefix {prefix:?}: {why}",
            String::from_utf8_lossy(input)
        );
    }
    // Joined onto the root, what is accepted stays under it, and the file system gate that
    // every open and unlink goes through accepts it as it is.
    if let Ok(legacy) = &result {
        let root = Path::new("/record");
        let joined = root.join(&legacy.rel);
        assert!(joined.starts_with(root) && joined != root, "{joined:?}");
        assert!(check_rel(&legacy.rel).is_ok(), "{:?}", legacy.rel);
    }
});
