//! `cargo +nightly fuzz run config`: the TOML text goes through the path `check-config` takes
//! (written to a file, loaded without the environment, validated, printed redacted). Whatever
//! the text: no panic; an error is one line; a config that passes prints as TOML again with
//! every secret replaced, and the secret read from a file never shows in anything printed.
//!
//! The seeds (`fuzz/seeds/config/`) point at fixtures this target creates under
//! `/tmp/record-offload-fuzz/`: a watch root, a journal directory and a secret file (mode 0600).
#![no_main]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use record_offload::config::{Source, load, redacted_toml};

const FIXTURES: &str = "/tmp/record-offload-fuzz";
/// The content of the fixture secret file: it must never be printed.
const FILE_SECRET: &str = "FileSecret-9q7Zk2Lw5Xv8";

fn config_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = PathBuf::from(FIXTURES);
        for sub in ["record", "state"] {
            std::fs::create_dir_all(dir.join(sub)).expect("fixture directories");
        }
        let secret = dir.join("secret");
        std::fs::write(&secret, format!("{FILE_SECRET}\n")).expect("fixture secret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
            .expect("fixture secret mode");
        dir.join(format!("config-{}.toml", std::process::id()))
    })
}

fn redacted_or_empty(v: Option<&toml::Value>) -> bool {
    match v {
        None => true,
        Some(toml::Value::String(s)) => s.is_empty() || s == "<redacted>",
        Some(_) => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let path = config_path();
    std::fs::write(path, data).expect("write the config file");
    let source = Source {
        file: Some(path.clone()),
        no_env: true,
    };
    let input_has_file_secret = data
        .windows(FILE_SECRET.len())
        .any(|w| w == FILE_SECRET.as_bytes());
    match load(&source) {
        Err(e) => {
            let line = e.to_string();
            assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
            assert!(
                input_has_file_secret || !line.contains(FILE_SECRET),
                "secret in {line:?}"
            );
        }
        Ok(settings) => {
            let printed = redacted_toml(&settings);
            assert!(
                input_has_file_secret || !printed.contains(FILE_SECRET),
                "secret in {printed}"
            );
            let table: toml::Table = match printed.parse() {
                Ok(t) => t,
                Err(e) => panic!("check-config printed invalid TOML ({e}):\n{printed}"),
            };
            let storage = table.get("storage").and_then(|t| t.as_table());
            assert!(
                redacted_or_empty(storage.and_then(|s| s.get("access_key_secret"))),
                "{printed}"
            );
            let lookup = table.get("lookup").and_then(|t| t.as_table());
            assert!(
                redacted_or_empty(lookup.and_then(|l| l.get("cdn_auth_key"))),
                "{printed}"
            );
            let keys = lookup
                .and_then(|l| l.get("auth"))
                .and_then(|a| a.get("keys"))
                .and_then(|k| k.as_table());
            for (app, v) in keys.into_iter().flatten() {
                assert_eq!(v.as_str(), Some("<redacted>"), "lookup.auth.keys.{app}");
            }
            assert!(!settings.secret.is_empty());
        }
    }
});
