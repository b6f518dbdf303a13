//! Hashing cost per GiB: the `md-5` crate, this crate's single MD5, the part + whole pair in
//! one pass (what a multipart upload needs), and 1 to 8 digests side by side; with the other
//! per-byte costs of an upload beside them: the CRC-64 and a read from the page cache (a file
//! on tmpfs, in the chunk sizes the uploader reads: 1 MiB to hash, 512 KiB to send). Prints
//! MB/s of CPU time (the thread's own CPU clock, so other load on the machine barely matters)
//! and CPU seconds per GiB.
//!
//!     cargo bench --bench md5pair

fn cpu_now() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

use md5::{Digest, Md5};
use record_offload::util::md5pair::{Md5Pair, compress_lanes, md5};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn time(name: &str, bytes: usize, runs: usize, mut f: impl FnMut() -> [u8; 16]) {
    let mut secs = Vec::new();
    let mut sink = 0u8;
    for _ in 0..runs {
        let t = cpu_now();
        sink ^= f()[0];
        secs.push(cpu_now() - t);
    }
    secs.sort_by(|a, b| a.total_cmp(b));
    let med = secs[secs.len() / 2];
    println!(
        "{name:<34} {:>8.1} MB/s {:>6.2} s/GiB  (median of {runs}; {sink})",
        bytes as f64 / med / 1e6,
        med * GIB / bytes as f64
    );
}

fn main() {
    let len = 256 * 1024 * 1024;
    let mut data = vec![0u8; len];
    let mut x = 0x9e3779b97f4a7c15u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let part = 16 * 1024 * 1024;
    let chunk = 1024 * 1024;
    time("md-5 crate, one digest", len, 5, || {
        Md5::digest(&data).into()
    });
    time("md5pair single, one digest", len, 5, || md5(&data));
    time("md-5 crate, part + whole (2 pass)", len, 5, || {
        let mut whole = Md5::new();
        let mut last = [0u8; 16];
        for p in data.chunks(part) {
            let mut h = Md5::new();
            for c in p.chunks(chunk) {
                h.update(c);
                whole.update(c);
            }
            last = h.finalize().into();
        }
        let w: [u8; 16] = whole.finalize().into();
        [w[0] ^ last[0]; 16]
    });
    time("md5pair, part + whole (1 pass)", len, 5, || {
        let mut pair = Md5Pair::new();
        let mut last = [0u8; 16];
        for p in data.chunks(part) {
            for c in p.chunks(chunk) {
                pair.update(c);
            }
            last = pair.finish_part();
        }
        let w = pair.finish_whole();
        [w[0] ^ last[0]; 16]
    });
    time("crc64fast, CRC-64/XZ", len, 5, || {
        let mut d = crc64fast::Digest::new();
        d.write(&data);
        [d.sum64() as u8; 16]
    });
    // A read from the page cache into a reused buffer (the kernel's copy), as the uploader
    // does twice per byte of a part: once to hash, once to send.
    let dir = std::env::var_os("MD5PAIR_TMP").unwrap_or_else(|| "/dev/shm".into());
    let path = std::path::Path::new(&dir).join(format!("md5pair-{}", std::process::id()));
    if std::fs::write(&path, &data).is_ok() {
        if let Ok(f) = std::fs::File::open(&path) {
            use std::os::unix::fs::FileExt;
            for step in [1024 * 1024, 512 * 1024] {
                let mut buf = vec![0u8; step];
                time(
                    &format!("pread from tmpfs, {} KiB", step / 1024),
                    len,
                    5,
                    || {
                        let mut pos = 0u64;
                        while let Ok(n) = f.read_at(&mut buf, pos) {
                            if n == 0 {
                                break;
                            }
                            pos += n as u64;
                        }
                        [buf[0]; 16]
                    },
                );
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    // Several digests side by side (what the hashing thread does with files and parts that
    // are hashed at the same time): the same bytes, cut into 1 to 8 independent lanes.
    for lanes in [1usize, 2, 4, 8] {
        let each = len / lanes / 64 * 64;
        let slices: Vec<&[u8]> = data.chunks(each).take(lanes).collect();
        time(
            &format!("lanes: {lanes} independent digest(s)"),
            each * lanes,
            5,
            || {
                let mut states = vec![[0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476]; lanes];
                // In steps of 1 MiB, as the hashing thread takes them.
                for k in (0..each / 64).step_by(16384) {
                    let n = (each / 64 - k).min(16384);
                    let at: Vec<&[u8]> = slices.iter().map(|s| &s[k * 64..]).collect();
                    compress_lanes(&mut states, &at, n);
                }
                [states[0][0] as u8; 16]
            },
        );
    }
}
