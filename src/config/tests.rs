//! The configuration's unit tests: every bad value is refused naming its key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};

use super::load::{from_figment, one_line};
use super::*;
use crate::util::net::normalize_host;

fn base(root: &Path, journal: &Path) -> String {
    format!(
        "[watch]\nroot = {:?}\n[journal]\npath = {:?}\n[storage]\nbucket = \"rec\"\naccess_key_id = \"id\"\naccess_key_secret = \"s\"\n",
        root.display().to_string(),
        journal.display().to_string()
    )
}

fn err_of(toml: &str) -> ConfigError {
    from_toml_str(toml).expect_err("expected an error")
}

#[test]
fn accepts_minimal_config() {
    let dir = tempfile::tempdir().unwrap();
    let s = from_toml_str(&base(dir.path(), &dir.path().join("j.db"))).unwrap();
    assert_eq!(s.config.upload.part_size_mib, 16);
    assert_eq!(s.config.watch.disk_warn_secs, 21600.0);
    assert_eq!(s.config.watch.disk_window_secs, 900.0);
    assert_eq!(s.secret, "s");
    assert!(!redacted_toml(&s).contains("= \"s\""));
    assert!(redacted_toml(&s).contains("<redacted>"));
}

/// A config with extra lines added to some tables.
fn with(root: &Path, journal: &Path, watch: &str, storage: &str, tail: &str) -> String {
    format!(
        "[watch]\nroot = {:?}\n{watch}\n[journal]\npath = {:?}\n[storage]\n{storage}\n{tail}\n",
        root.display().to_string(),
        journal.display().to_string()
    )
}

#[test]
fn rejects_each_bad_value_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (r, j) = (dir.path(), dir.path().join("j.db"));
    let creds = "bucket = \"rec\"\naccess_key_id = \"id\"\naccess_key_secret = \"s\"";
    let ok = |tail: &str| with(r, &j, "", creds, tail);
    let cases: Vec<(String, &str)> = vec![
        (ok("[upload]\nbogus = 1"), "upload.bogus"),
        (
            with(r, &j, "disk_warn_secs = -5", creds, ""),
            "watch.disk_warn_secs",
        ),
        (
            with(r, &j, "disk_window_secs = 0.5", creds, ""),
            "watch.disk_window_secs",
        ),
        (
            with(r, &j, "disk_warn_secs = \"6h\"", creds, ""),
            "watch.disk_warn_secs",
        ),
        (ok("[upload]\npart_size_mib = 4"), "upload.part_size_mib"),
        (ok("[upload]\npart_size_mib = 5121"), "upload.part_size_mib"),
        (ok("[upload]\nconcurrency = 0"), "upload.concurrency"),
        (ok("[upload]\nconcurrency = \"many\""), "upload.concurrency"),
        (
            ok("[upload]\nwindows = [\"22:00-07:00\", \"9-5\"]"),
            "upload.windows[1]",
        ),
        (
            ok("[upload]\nmax_bytes_per_sec = 10"),
            "upload.max_bytes_per_sec",
        ),
        (ok("[lookup]\nlisten = [\"nope\"]"), "lookup.listen[0]"),
        (
            ok("[lookup]\npresign_style = \"v9\""),
            "lookup.presign_style",
        ),
        (ok("[bogus]\nx = 1"), "bogus"),
        (
            with(r, &j, "exclude = [\"a[\"]", creds, ""),
            "watch.exclude[0]",
        ),
        (
            with(r, &j, "include = [\"**/*\", \"{a\"]", creds, ""),
            "watch.include[1]",
        ),
        (
            with(r, &j, "settle_secs = -1", creds, ""),
            "watch.settle_secs",
        ),
        (
            with(
                r,
                &j,
                "",
                "access_key_id = \"id\"\naccess_key_secret = \"s\"",
                "",
            ),
            "storage.bucket",
        ),
        (
            with(r, &j, "", "bucket = \"rec\"\naccess_key_secret = \"s\"", ""),
            "storage.access_key_id",
        ),
        (
            with(r, &j, "", "bucket = \"rec\"\naccess_key_id = \"id\"", ""),
            "storage.access_key_secret",
        ),
        (
            with(
                r,
                &j,
                "",
                &format!("{creds}\nkey_template = \"{{node}}\""),
                "",
            ),
            "storage.key_template",
        ),
        (
            with(
                r,
                &j,
                "",
                &format!("{creds}\nkey_template = \"{{node}}/../{{path}}\""),
                "",
            ),
            "storage.key_template",
        ),
        (ok("[node]\nname = \"..\""), "node.name"),
        (
            ok("[[nodes]]\nname = \".\"\nlookup_url = \"http://h\""),
            "nodes[0].name",
        ),
        (
            with(r, &j, "", &format!("{creds}\nendpoint = \"ftp://x\""), ""),
            "storage.endpoint",
        ),
    ];
    for (toml, key) in cases {
        let e = err_of(&toml);
        assert_eq!(e.key, key, "for {toml}: {e}");
    }
}

#[test]
fn lookup_keys_are_validated_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), &dir.path().join("j.db"));
    let node = |extra: &str| {
        format!("{b}[[nodes]]\nname = \"n2\"\nlookup_url = \"http://10.0.0.2:8090\"\n{extra}\n")
    };
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{b}[lookup]\npublic_base_url = \"ftp://x\""),
            "lookup.public_base_url",
        ),
        (
            format!("{b}[lookup]\npublic_base_url = \"https://x/?a=1\""),
            "lookup.public_base_url",
        ),
        (
            format!("{b}[lookup]\npresign_style = \"cdn-a\""),
            "lookup.public_base_url",
        ),
        (
            format!(
                "{b}[lookup]\npresign_style = \"cdn-a\"\npublic_base_url = \"https://cdn.example.com\""
            ),
            "lookup.cdn_auth_key",
        ),
        (
            format!("{b}[lookup]\ncdn_validity_secs = 0"),
            "lookup.cdn_validity_secs",
        ),
        (
            format!("{b}[lookup]\npresign_round_secs = 9999999"),
            "lookup.presign_round_secs",
        ),
        (
            format!("{b}[lookup]\nmax_header_bytes = 100"),
            "lookup.max_header_bytes",
        ),
        (
            format!("{b}[lookup]\nmax_connections = 0"),
            "lookup.max_connections",
        ),
        (
            format!("{b}[lookup]\nrequest_timeout_secs = 0"),
            "lookup.request_timeout_secs",
        ),
        (
            format!("{b}[lookup]\nallow = [\"10.0.0.0/8\", \"nope\"]"),
            "lookup.allow[1]",
        ),
        (
            format!("{b}[lookup.auth.keys]\napp = \"short\""),
            "lookup.auth.keys.app",
        ),
        (
            format!("{b}[lookup.auth.keys]\n\"a b\" = \"0123456789abcdef\""),
            "lookup.auth.keys.a b",
        ),
        (
            format!("{b}[lookup.auth]\nwindow_secs = 0"),
            "lookup.auth.window_secs",
        ),
        (format!("{b}[lookup.auth]\nbogus = 1"), "lookup.auth.bogus"),
        (node("legacy_hosts = [\"a b\"]"), "nodes[0].legacy_hosts[0]"),
        (
            format!("{b}[[nodes]]\nname = \"n2\"\nlookup_url = \"x\""),
            "nodes[0].lookup_url",
        ),
        (
            format!("{b}[[nodes]]\nname = \"bad name\"\nlookup_url = \"http://h\""),
            "nodes[0].name",
        ),
        (
            format!(
                "{}[[nodes]]\nname = \"n3\"\nlookup_url = \"http://h\"\nlegacy_hosts = [\"H1\"]\n",
                node("legacy_hosts = [\"h1\"]")
            ),
            "nodes[1].legacy_hosts[0]",
        ),
    ];
    for (toml, key) in cases {
        let e = err_of(&toml);
        assert_eq!(e.key, key, "for {toml}: {e}");
    }
    let ok = from_toml_str(&format!(
        "{b}[lookup]\nallow = [\"::1\", \"10.0.0.0/8\"]\n[lookup.auth.keys]\napp = \"0123456789abcdef\"\n[[nodes]]\nname = \"n2\"\nlegacy_hosts = [\"10.0.0.2\", \"::2\"]\nlookup_url = \"http://10.0.0.2:8090\"\n"
    ))
    .unwrap();
    assert_eq!(ok.config.nodes.len(), 1);
    let shown = redacted_toml(&ok);
    assert!(!shown.contains("0123456789abcdef"), "{shown}");
    assert_eq!(normalize_host("[0::2]").unwrap(), "[::2]");
    assert_eq!(normalize_host("REC.example").unwrap(), "rec.example");
}

/// Every key of config.example.toml is a key this build knows.
#[test]
fn example_config_parses() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
        .unwrap();
    let config: Config = Figment::from(Serialized::defaults(Config::default()))
        .merge(Toml::string(&text))
        .extract()
        .map_err(from_figment)
        .unwrap();
    assert_eq!(config.lookup.remote_check_cache_secs, 30.0);
    assert_eq!(config.lookup.auth.window_secs, 300);
}

#[test]
fn rejects_missing_root_and_uncreatable_journal() {
    let dir = tempfile::tempdir().unwrap();
    let e = err_of(&base(&dir.path().join("missing"), &dir.path().join("j.db")));
    assert_eq!(e.key, "watch.root");
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let e = err_of(&base(dir.path(), &file.join("j.db")));
    assert_eq!(e.key, "journal.path");
}

#[test]
fn oss_region_must_match_the_endpoint() {
    assert_eq!(
        oss_endpoint_region("s3.oss-cn-hangzhou.aliyuncs.com"),
        Some("cn-hangzhou")
    );
    assert_eq!(
        oss_endpoint_region("rec.s3.oss-cn-beijing-internal.aliyuncs.com"),
        Some("cn-beijing")
    );
    assert_eq!(
        oss_endpoint_region("oss-ap-southeast-1.aliyuncs.com"),
        Some("ap-southeast-1")
    );
    assert_eq!(oss_endpoint_region("oss-accelerate.aliyuncs.com"), None);
    assert_eq!(oss_endpoint_region("s3.amazonaws.com"), None);
    assert_eq!(oss_endpoint_region("127.0.0.1"), None);

    let dir = tempfile::tempdir().unwrap();
    let toml = |region: &str| {
        format!(
            "{}endpoint = \"https://s3.oss-cn-hangzhou.aliyuncs.com\"\nregion = \"{region}\"\n",
            base(dir.path(), &dir.path().join("j.db"))
        )
    };
    assert!(from_toml_str(&toml("cn-hangzhou")).is_ok());
    let e = err_of(&toml("oss-cn-hangzhou"));
    assert_eq!(e.key, "storage.region");
    assert!(e.message.contains("set region = \"cn-hangzhou\""), "{e}");
}

#[test]
fn secret_file_must_not_be_world_readable() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "abc\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let toml = base(dir.path(), &dir.path().join("j.db")).replace(
        "access_key_secret = \"s\"",
        &format!(
            "access_key_secret_file = {:?}",
            secret.display().to_string()
        ),
    );
    assert_eq!(err_of(&toml).key, "storage.access_key_secret_file");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(from_toml_str(&toml).unwrap().secret, "abc");
}

#[test]
fn secret_file_must_be_a_small_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let toml = |p: &Path| {
        base(dir.path(), &dir.path().join("j.db")).replace(
            "access_key_secret = \"s\"",
            &format!("access_key_secret_file = {:?}", p.display().to_string()),
        )
    };
    // A directory, a FIFO (reading it would block), and an oversized file.
    let fifo = dir.path().join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'a'; 65 * 1024]).unwrap();
    std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600)).unwrap();
    for p in [&fifo, &sub, &big] {
        let e = err_of(&toml(p));
        assert_eq!(
            e.key,
            "storage.access_key_secret_file",
            "{}: {e}",
            p.display()
        );
    }
}

#[test]
fn toml_syntax_errors_are_one_line_without_the_offending_text() {
    let dir = tempfile::tempdir().unwrap();
    // An unterminated string: the parser's message quotes the line it stopped on.
    let toml = base(dir.path(), &dir.path().join("j.db")).replace(
        "access_key_secret = \"s\"",
        "access_key_secret = \"Sup3r-Secret-Value\n",
    );
    let e = err_of(&toml).to_string();
    assert!(!e.contains('\n'), "{e:?}");
    assert!(!e.contains("Sup3r"), "{e:?}");
    assert!(e.contains("line 8"), "{e:?}");
    assert_eq!(
        one_line(
            "TOML parse error at line 2, column 13\n  |\n2 | root = \"/tmp\n  |             ^\ninvalid basic string\n"
        ),
        "TOML parse error at line 2, column 13: invalid basic string"
    );
}

/// `[[notify]]` and `[notify_outbox]`: each fault names its key; secrets come from the entry
/// or a private file and never show in the printed config or the settings' Debug.
#[test]
fn notify_entries_are_checked_and_their_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let (r, j) = (dir.path(), dir.path().join("j.db"));
    let creds = "bucket = \"rec\"\naccess_key_id = \"id\"\naccess_key_secret = \"s\"";
    let ok = |tail: &str| with(r, &j, "", creds, tail);
    let good =
        "url = \"https://biz.example.com/hook?token=t0k3n\"\nsecret = \"0123456789abcdef-notify\"";
    let cases: Vec<(String, &str)> = vec![
        (
            ok("[[notify]]\nsecret = \"0123456789abcdef\""),
            "notify[0].url",
        ),
        (
            ok("[[notify]]\nurl = \"ftp://x/y\"\nsecret = \"0123456789abcdef\""),
            "notify[0].url",
        ),
        (
            ok("[[notify]]\nurl = \"https://u:p@x/y\"\nsecret = \"0123456789abcdef\""),
            "notify[0].url",
        ),
        (ok("[[notify]]\nurl = \"https://x/y\""), "notify[0].secret"),
        (
            ok("[[notify]]\nurl = \"https://x/y\"\nsecret = \"short\""),
            "notify[0].secret",
        ),
        (
            ok(
                "[[notify]]\nurl = \"https://x/y\"\nsecret = \"0123456789abcdef\"\nevents = [\"stored\", \"moved\"]",
            ),
            "notify[0].events[1]",
        ),
        (
            ok("[[notify]]\nurl = \"https://x/y\"\nsecret = \"0123456789abcdef\"\nevents = []"),
            "notify[0].events",
        ),
        (
            ok(
                "[[notify]]\nurl = \"https://x/y\"\nsecret = \"0123456789abcdef\"\ntimeout_secs = 0",
            ),
            "notify[0].timeout_secs",
        ),
        (
            ok("[[notify]]\nurl = \"https://x/y\"\nsecret = \"0123456789abcdef\"\nbogus = 1"),
            "notify.0.bogus",
        ),
        (
            ok(&format!("[[notify]]\n{good}\n[[notify]]\n{good}")),
            "notify[1].url",
        ),
        (
            ok(
                "[[notify]]\nurl = \"https://x/y\"\nsecret = \"0123456789abcdef\"\nsecret_file = \"/nonexistent\"",
            ),
            "notify[0].secret_file",
        ),
        (
            ok("[[notify]]\nurl = \"https://x/y\"\nsecret_file = \"/nonexistent/s\""),
            "notify[0].secret_file",
        ),
        (
            ok("[notify_outbox]\nmax_events = 0"),
            "notify_outbox.max_events",
        ),
        (
            ok("[notify_outbox]\nretry_initial_secs = 10\nretry_max_secs = 1"),
            "notify_outbox.retry_max_secs",
        ),
        (
            ok("[notify_outbox]\npoll_secs = -1"),
            "notify_outbox.poll_secs",
        ),
    ];
    for (toml, key) in cases {
        let e = err_of(&toml);
        assert!(e.key.starts_with(key), "{toml}\n-> {e}");
    }
    let s = from_toml_str(&ok(&format!(
        "[[notify]]\n{good}\nevents = [\"failed\", \"stored\"]"
    )))
    .unwrap();
    let n = &s.notify[0];
    assert_eq!(n.events, vec!["stored", "failed"]);
    assert_eq!(n.secret, "0123456789abcdef-notify");
    assert_eq!(n.timeout, std::time::Duration::from_secs(10));
    let shown = redacted_toml(&s);
    assert!(!shown.contains("0123456789abcdef-notify"), "{shown}");
    assert!(
        !format!("{s:?}").contains("0123456789abcdef-notify"),
        "Debug shows the secret"
    );
    assert_eq!(
        receiver_label(n.url.as_str()),
        "https://biz.example.com/hook"
    );

    // From a file only its owner may read.
    let file = dir.path().join("notify.secret");
    std::fs::write(&file, "from-a-file-0123456789\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let toml = ok(&format!(
        "[[notify]]\nurl = \"http://127.0.0.1:9/h\"\nsecret_file = {:?}",
        file.display().to_string()
    ));
    assert_eq!(err_of(&toml).key, "notify[0].secret_file", "world-readable");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        from_toml_str(&toml).unwrap().notify[0].secret,
        "from-a-file-0123456789"
    );
}

/// `[storage.standby]`: a standby that is the primary again (same endpoint host and port, in
/// any spelling, and the same bucket) is refused naming the section; another bucket or another
/// endpoint is a standby. `copy_back` is carried out, so it draws no warning.
#[test]
fn a_standby_identical_to_the_primary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (r, j) = (dir.path(), dir.path().join("j.db"));
    let primary = "endpoint = \"https://s3.oss-cn-hangzhou.aliyuncs.com\"\nregion = \"cn-hangzhou\"\nbucket = \"rec\"\naccess_key_id = \"id\"\naccess_key_secret = \"s\"";
    let standby = |endpoint: &str, bucket: &str| {
        with(
            r,
            &j,
            "",
            primary,
            &format!(
                "[storage.standby]\nendpoint = {endpoint:?}\nregion = \"cn-hangzhou\"\nbucket = {bucket:?}\naccess_key_id = \"id2\"\naccess_key_secret = \"s2\"\ncopy_back = true"
            ),
        )
    };
    for endpoint in [
        "https://s3.oss-cn-hangzhou.aliyuncs.com",
        "https://S3.OSS-CN-HANGZHOU.aliyuncs.com/",
        "https://s3.oss-cn-hangzhou.aliyuncs.com:443",
    ] {
        let e = err_of(&standby(endpoint, "rec"));
        assert_eq!(e.key, "storage.standby", "{endpoint}: {e}");
        assert!(e.message.contains("primary"), "{e}");
    }
    for (endpoint, bucket) in [
        ("https://s3.oss-cn-hangzhou.aliyuncs.com", "rec-standby"),
        ("https://s3.oss-cn-hangzhou.aliyuncs.com:8443", "rec"),
    ] {
        let s = from_toml_str(&standby(endpoint, bucket));
        assert!(s.is_ok(), "{endpoint} {bucket}: {:?}", s.as_ref().err());
        let s = s.unwrap();
        let sb = s.standby.as_ref().expect("a standby");
        assert_eq!(sb.config.storage.bucket, bucket);
        assert_eq!(sb.secret, "s2");
        assert!(s.config.storage.standby.as_ref().unwrap().copy_back);
        assert!(
            s.warnings().iter().all(|w| !w.contains("copy_back")),
            "{:?}",
            s.warnings()
        );
    }
}
