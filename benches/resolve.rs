//! CPU cost of one look-up without HTTP: `Resolver::resolve` (journal read or in-memory index,
//! and URL signing), the signer alone, and the bare SQLite read, on the journal
//! `bench/lookup.py --dir DIR` leaves behind. Prints the median over runs of the thread's CPU
//! time per call.
//!
//!     python3 bench/lookup.py --dir /tmp/lb        # once: 1,000,000 stored rows
//!     cargo bench --bench resolve -- /tmp/lb

#![allow(clippy::unwrap_used)]

use record_offload::config::{self, Source};
use record_offload::lookup::resolve::Resolver;
use record_offload::lookup::signer::Signer;

fn cpu_now() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

fn rel_path(i: u64) -> String {
    format!(
        "2026/{:02}/{:02}/room-{:04}/rec-{i:07} cam.mp4",
        1 + i % 12,
        1 + i % 28,
        i % 997
    )
}

fn per_call(name: &str, runs: usize, n: usize, mut f: impl FnMut(u64)) {
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut per = Vec::new();
    for _ in 0..runs {
        let t = cpu_now();
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f(x);
        }
        per.push((cpu_now() - t) / n as f64);
    }
    per.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name:<28} {:>8.2} µs/call  (median of {runs} × {n})",
        per[per.len() / 2] * 1e6
    );
}

fn main() {
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "/tmp/lb".to_string());
    let dir = std::path::PathBuf::from(dir);
    let settings = match config::load(&Source {
        file: Some(dir.join("config.toml")),
        no_env: true,
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "{}: {e} (run bench/lookup.py --dir {} first)",
                dir.display(),
                dir.display()
            );
            std::process::exit(2);
        }
    };
    let rows: u64 = std::fs::read_to_string(dir.join("rows"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1_000_000);
    let resolver = Resolver::new(&settings, "http://127.0.0.1:8090".into(), None).unwrap();
    let signer = Signer::new(&settings).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let now = 1_790_000_000;
    sqlite_only(&dir, rows);
    per_call("sign", 5, 100_000, |x| {
        let key = format!("rec-01/{}", rel_path(x % rows));
        std::hint::black_box(signer.sign(&key, now).unwrap());
    });
    per_call("format key only", 5, 100_000, |x| {
        std::hint::black_box(format!("rec-01/{}", rel_path(x % rows)));
    });
    per_call("resolve (journal + sign)", 5, 50_000, |x| {
        let p = format!("/record/{}", rel_path(x % rows));
        let a = rt.block_on(resolver.resolve(p.as_bytes(), None)).unwrap();
        std::hint::black_box(a.to_json(None));
    });
    resolver.enable_index(usize::MAX);
    let start = std::time::Instant::now();
    while resolver.index_len().unwrap_or(0) < rows as usize {
        assert!(start.elapsed().as_secs() < 120, "the index was not built");
        resolver.maintain();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    println!(
        "look-up index built: {} entries in {:.1} s",
        rows,
        start.elapsed().as_secs_f64()
    );
    per_call("resolve (index + sign)", 5, 50_000, |x| {
        let p = format!("/record/{}", rel_path(x % rows));
        let a = rt.block_on(resolver.resolve(p.as_bytes(), None)).unwrap();
        std::hint::black_box(a.to_json(None));
    });
}

/// The journal read alone: a statement per look-up as the server runs it, and the same inside
/// one long read transaction (what keeping a snapshot open across look-ups would save).
fn sqlite_only(dir: &std::path::Path, rows: u64) {
    let conn = record_offload::journal::open_ro(&dir.join("journal.db")).unwrap();
    let _ = conn.pragma_update(None, "mmap_size", 1i64 << 30);
    for txn in [false, true] {
        if txn {
            conn.execute_batch("BEGIN").unwrap();
        }
        per_call(
            if txn {
                "sqlite row, open txn"
            } else {
                "sqlite row"
            },
            5,
            50_000,
            |x| {
                let p = rel_path(x % rows);
                let mut st = conn
                    .prepare_cached(
                        "SELECT state, key, size, md5, bytes_sent FROM files WHERE path = ?1",
                    )
                    .unwrap();
                let r: (String, String, i64) = st
                    .query_row([p.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .unwrap();
                std::hint::black_box(r);
            },
        );
    }
}
