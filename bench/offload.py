#!/usr/bin/env python3
"""Throughput benchmark: record-offload against a local S3-compatible server.

For each case it starts the local server (`record-offload dev-s3`, s3s-fs) in its own process,
fills a watch directory, starts the daemon on it, waits until the journal says every file is
stored and deleted, stops the daemon with SIGTERM and prints files, bytes, wall seconds, MiB/s,
the daemon's CPU seconds and peak RSS (from wait4's rusage of the daemon process alone; the
server's CPU is not counted), and the settle-to-deleted latency (p50/p99 over the files).

The files are written before the daemon starts, with an old mtime, so the startup scan finds
them settled; the wall time runs from the daemon's start to the last file deleted. Before each
run, as much memory as the server will store is written and freed on the tmpfs, so that no run
meets the machine cold (see `warm_memory`), and the tools take turns at going first.

    bench/offload.py                      # every case: trickle latency, 8 x 256 MiB, 2000 x 256 KiB
    bench/offload.py --case small --runs 3
    bench/offload.py --data-dir /dev/shm/ro-bench --journal-dir /var/tmp/ro-bench

Data (watch root and the server's store) goes to tmpfs by default so the disk is not what is
measured; the journal goes to a real disk (--journal-dir) because its fsyncs are part of the
cost. Only 127.0.0.1 is used.
"""

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time

from ports import free_port, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCESS_KEY = "record-offload-dev"
SECRET_KEY = "record-offload-dev-secret"
MIB = 1024 * 1024

CASES = {
    "big": (8, 256 * MIB),
    "small": (2000, 256 * 1024),
}


def build(binary):
    if binary:
        return binary
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    return os.path.join(ROOT, "target", "release", "record-offload")


def make_files(root, count, size):
    os.makedirs(root, exist_ok=True)
    old = time.time() - 3600
    chunk = os.urandom(min(size, 4 * MIB))
    for i in range(count):
        sub = os.path.join(root, f"room{i % 50:02d}")
        os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, f"rec{i:05d}.mp4")
        with open(path, "wb") as f:
            left = size
            # Different bytes per file: a per-file prefix, then the shared random chunk.
            f.write(i.to_bytes(8, "little"))
            left -= 8
            while left > 0:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                left -= n
        os.utime(path, (old, old))


def warm_memory(directory, size):
    """Writes and deletes `size` bytes in `directory` (the tmpfs the server stores to).

    On the virtual machines this was measured on, the first run after some idle time was
    about 20 % slower, whichever tool it was (the server's CPU for the same work: 14.3 s
    against 11.7 s right after another run): freed memory handed back to the host has to be
    faulted in again. Touching as much memory as the run will store, right before it, gives
    every run the same warm start."""
    path = os.path.join(directory, ".warm")
    # Small writes: this process must stay small, since children started from it report its
    # size as their peak RSS until they exec.
    chunk = b"\0" * MIB
    with open(path, "wb") as f:
        for _ in range(max(1, size // len(chunk))):
            f.write(chunk)
    os.remove(path)


def config(path, root, journal, endpoint, args):
    with open(path, "w") as f:
        f.write(f"""
[node]
name = "bench"
[watch]
root = {json.dumps(root)}
settle_secs = 1
rescan_interval_secs = 3600
[journal]
path = {json.dumps(journal)}
[storage]
endpoint = "{endpoint}"
region = "us-east-1"
bucket = "recordings"
access_key_id = "{ACCESS_KEY}"
access_key_secret = "{SECRET_KEY}"
path_style = true
[lookup]
listen = ["127.0.0.1:0"]
[upload]
part_size_mib = {args.part_size_mib}
concurrency = {args.concurrency}
[log]
level = "warn"
""")


def deleted_count(journal):
    try:
        con = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM files WHERE state = 'deleted'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def latencies(journal):
    con = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT deleted_ms - queued_ms FROM files WHERE state = 'deleted'").fetchall()
    finally:
        con.close()
    return sorted(r[0] / 1000.0 for r in rows)


def pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def rclone_env(port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and not k.startswith("RCLONE_")}
    env.update({
        "RCLONE_CONFIG": "/dev/null",
        "RCLONE_CONFIG_BENCH_TYPE": "s3",
        "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
        "RCLONE_CONFIG_BENCH_ENDPOINT": f"http://127.0.0.1:{port}",
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ACCESS_KEY,
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET_KEY,
        "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
    })
    return env


def proc_cpu(pid):
    """CPU seconds (user + system) a live process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def run_case(binary, name, count, size, args, tool="record-offload"):
    data = os.path.join(args.data_dir, name)
    jdir = os.path.join(args.journal_dir, name)
    for d in (data, jdir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    root = os.path.join(data, "record")
    store = os.path.join(data, "store")
    journal = os.path.join(jdir, "journal.db")
    make_files(root, count, size)
    # The server keeps parts and objects: up to twice the data.
    warm_memory(data, 2 * count * size)

    port = free_port()
    server = subprocess.Popen(
        [binary, "dev-s3", "--data", store, "--listen", f"127.0.0.1:{port}", "--bucket", "recordings"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        if tool == "rclone":
            t0 = time.monotonic()
            proc = subprocess.Popen(["rclone", "move", root, "bench:recordings/bench"],
                                    env=rclone_env(port), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            _, status, ru = os.wait4(proc.pid, 0)
            wall = time.monotonic() - t0
            server_cpu = proc_cpu(server.pid)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise SystemExit(f"rclone failed: {proc.stderr.read().decode()[-2000:]}")
            return finish(name, tool, count, size, wall, ru, [], proc.returncode, root, data, jdir, args, server_cpu)
        cfg = os.path.join(jdir, "config.toml")
        config(cfg, root, journal, f"http://127.0.0.1:{port}", args)
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        t0 = time.monotonic()
        daemon = subprocess.Popen([binary, "run", "--config", cfg], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = t0 + args.timeout
        while deleted_count(journal) < count:
            if daemon.poll() is not None:
                raise SystemExit(f"daemon exited early: {daemon.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                daemon.kill()
                raise SystemExit(f"{name}: not done within {args.timeout} s")
            time.sleep(0.02)
        wall = time.monotonic() - t0
        server_cpu = proc_cpu(server.pid)
        daemon.send_signal(signal.SIGTERM)
        _, status, ru = os.wait4(daemon.pid, 0)
        daemon.returncode = os.waitstatus_to_exitcode(status)
        lat = latencies(journal)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
    return finish(name, tool, count, size, wall, ru, lat, daemon.returncode, root, data, jdir, args, server_cpu)


def finish(name, tool, count, size, wall, ru, lat, code, root, data, jdir, args, server_cpu):
    left = sum(len(files) for _, _, files in os.walk(root))
    total = count * size
    result = {
        "tool": tool,
        "case": name,
        "files": count,
        "bytes": total,
        "wall_s": wall,
        "mib_s": total / MIB / wall,
        "files_s": count / wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_mib": ru.ru_maxrss / 1024.0,
        "server_cpu_s": server_cpu,
        "lat_p50_s": pct(lat, 50),
        "lat_p99_s": pct(lat, 99),
        "exit": code,
        "left_on_disk": left,
    }
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(jdir, ignore_errors=True)
    return result


def run_trickle(binary, args, count=200, size=1024 * 1024, gap=0.05):
    """Files arriving one by one while the daemon runs: settle-to-deleted latency."""
    name = "trickle"
    data = os.path.join(args.data_dir, name)
    jdir = os.path.join(args.journal_dir, name)
    for d in (data, jdir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    root = os.path.join(data, "record")
    os.makedirs(root)
    store = os.path.join(data, "store")
    journal = os.path.join(jdir, "journal.db")
    port = free_port()
    server = subprocess.Popen(
        [binary, "dev-s3", "--data", store, "--listen", f"127.0.0.1:{port}", "--bucket", "recordings"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        cfg = os.path.join(jdir, "config.toml")
        config(cfg, root, journal, f"http://127.0.0.1:{port}", args)
        with open(cfg) as f:
            text = f.read().replace("settle_secs = 1", "settle_secs = 0.2")
        with open(cfg, "w") as f:
            f.write(text)
        daemon = subprocess.Popen([binary, "run", "--config", cfg], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        payload = os.urandom(size)
        for i in range(count):
            tmp = os.path.join(root, f".rec{i:05d}.tmp")
            with open(tmp, "wb") as f:
                f.write(i.to_bytes(8, "little"))
                f.write(payload[8:])
            os.rename(tmp, os.path.join(root, f"rec{i:05d}.mp4"))
            time.sleep(gap)
        deadline = time.monotonic() + args.timeout
        while deleted_count(journal) < count:
            if time.monotonic() > deadline:
                raise SystemExit("trickle: not done in time")
            time.sleep(0.05)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        lat = latencies(journal)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(jdir, ignore_errors=True)
    print(f"trickle: {count} files of {size // 1024} KiB, one every {gap * 1000:.0f} ms; "
          f"settled-to-deleted latency p50 {pct(lat, 50) * 1000:.0f} ms, "
          f"p99 {pct(lat, 99) * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["big", "small", "trickle", "all"], default="all")
    ap.add_argument("--runs", type=int, default=1, help="runs per case; medians are printed")
    ap.add_argument("--data-dir", default="/dev/shm/record-offload-bench")
    ap.add_argument("--journal-dir", default="/var/tmp/record-offload-bench")
    ap.add_argument("--binary", help="use this record-offload binary instead of building one")
    ap.add_argument("--part-size-mib", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--keep", action="store_true", help="keep the data directories")
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    ap.add_argument("--rclone", action="store_true",
                    help="also run `rclone move` (default flags) on the same files and server, "
                         "alternating with record-offload, and print the ratios")
    args = ap.parse_args()

    binary = build(args.binary)
    cases = ["big", "small"] if args.case == "all" else [args.case]
    if args.case in ("trickle", "all"):
        run_trickle(binary, args)
        cases = [c for c in cases if c != "trickle"]
    tools = ["record-offload", "rclone"] if args.rclone else ["record-offload"]
    cols = ["tool", "case", "files", "bytes", "wall_s", "mib_s", "files_s", "cpu_s",
            "peak_rss_mib", "server_cpu_s", "lat_p50_s", "lat_p99_s", "exit", "left_on_disk"]
    if not args.json:
        print(" ".join(f"{c:>14}" for c in cols))
    for name in cases:
        count, size = CASES[name]
        runs = {t: [] for t in tools}
        for i in range(args.runs):
            # Alternate the tools so drift of the machine affects both alike, and which one
            # goes first, so neither always meets the machine cold.
            for t in (tools if i % 2 == 0 else tools[::-1]):
                r = run_case(binary, name, count, size, args, t)
                runs[t].append(r)
                if args.json:
                    print(json.dumps(r))
                elif args.runs > 1:
                    print(" ".join(f"{fmt(r[c]):>14}" for c in cols))
                sys.stdout.flush()
        med = {}
        for t in tools:
            m = {c: (statistics.median(r[c] for r in runs[t]) if isinstance(runs[t][0][c], (int, float)) else runs[t][0][c]) for c in cols}
            m["case"] = name if args.runs == 1 else f"{name}(med)"
            med[t] = m
            if not args.json:
                print(" ".join(f"{fmt(m[c]):>14}" for c in cols))
        if args.rclone:
            a, b = med["record-offload"], med["rclone"]
            print(f"ratio record-offload/rclone [{name}]: MiB/s {a['mib_s'] / b['mib_s']:.2f}x, "
                  f"files/s {a['files_s'] / b['files_s']:.2f}x, CPU s {a['cpu_s'] / b['cpu_s']:.2f}x, "
                  f"peak RSS {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x")
        sys.stdout.flush()


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    return str(v)


if __name__ == "__main__":
    main()
