//! `cargo +nightly fuzz run key_template`: parsing any template and rendering it for any node
//! name and any path the pipeline can hand over never panics, and a key that comes out never
//! starts with `/`, never has a `.` or `..` segment, and fits the store's limit. A template and
//! node name that configuration accepts render every such path (unless the key is too long).
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use record_offload::util::fs::check_rel;
use record_offload::util::keys::{KeyTemplate, MAX_KEY_BYTES};

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    template: &'a str,
    node: &'a str,
    rel: &'a [u8],
}

/// The rule `node.name` follows in configuration.
fn config_accepts_node(node: &str) -> bool {
    !node.is_empty()
        && node.len() <= 128
        && node != "."
        && node != ".."
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

fuzz_target!(|input: Input| {
    let Ok(template) = KeyTemplate::parse(input.template) else {
        return;
    };
    let rel = Path::new(OsStr::from_bytes(input.rel));
    let key = template.render(input.node, rel);
    if let Ok(key) = &key {
        assert!(!key.starts_with('/'), "{input:?} -> {key:?}");
        assert!(
            !key.split('/').any(|s| s == "." || s == ".."),
            "{input:?} -> {key:?}"
        );
        assert!(
            key.len() <= MAX_KEY_BYTES,
            "{input:?} -> {} bytes",
            key.len()
        );
        // Deterministic: the same file always has the same key.
        assert_eq!(template.render(input.node, rel).as_ref(), Ok(key));
        // Every key of this node starts with the node's prefix (stray uploads are found by it).
        assert!(
            key.starts_with(&template.prefix(input.node)),
            "{input:?} -> {key:?}"
        );
    }
    // What configuration accepts must work for every path the pipeline hands over: a relative
    // path of normal components, as `fsutil` accepts it.
    let accepted = config_accepts_node(input.node) && template.check_node(input.node).is_ok();
    if accepted && !input.rel.is_empty() && check_rel(rel).is_ok() {
        if let Err(e) = key {
            assert!(e.contains("bytes"), "{input:?} refused: {e}");
        }
    }
});
