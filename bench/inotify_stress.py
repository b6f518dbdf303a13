#!/usr/bin/env python3
"""inotify stress (not CI; needs root): the release binary against the local server.

1. Overflow: fs.inotify.max_queued_events is lowered (default 64) before the daemon starts,
   then 50,000 files are written into 1,000 new directories as fast as Python can. The
   periodic rescan is off (1 h), so what finds them is inotify, the scans of new directories
   and the full rescans that queue overflows trigger. Checks: every file stored (journal
   `deleted`, object present with the right size), none uploaded twice
   (`record_offload_uploaded_files_total` equals the file count), overflow warnings logged.
2. Watch limit: fs.inotify.max_user_watches is set a little above what this user's other
   processes already use, and below the tree's directory count; the daemon must say so (a
   warning) and still store files written later into directories it could not watch (the
   periodic rescan drops to 60 s once the limit is hit).

Both sysctls are system-wide: they are restored on exit, whatever happens (also on SIGINT and
SIGTERM). Another process of the same user that adds inotify watches during part 2 may be
refused one; run it on a machine that is not otherwise busy with inotify.

    sudo bench/inotify_stress.py                # both parts
    sudo bench/inotify_stress.py --part overflow --files 50000 --dirs 1000 --queue 64
    sudo bench/inotify_stress.py --binary target/release/record-offload
"""

import argparse
import glob
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

from ports import free_port, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCESS_KEY = "record-offload-dev"
SECRET_KEY = "record-offload-dev-secret"
SYSCTL = "/proc/sys/fs/inotify/"


def read_sysctl(name):
    with open(SYSCTL + name) as f:
        return int(f.read().strip())


def write_sysctl(name, value):
    with open(SYSCTL + name, "w") as f:
        f.write(str(value))


def user_watches():
    """inotify watches held by this user's processes (from /proc/*/fdinfo)."""
    uid = os.getuid()
    n = 0
    for fdinfo in glob.glob("/proc/[0-9]*/fdinfo/*"):
        try:
            if os.stat(os.path.dirname(os.path.dirname(fdinfo))).st_uid != uid:
                continue
            with open(fdinfo) as f:
                n += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            pass
    return n


def rows(journal):
    try:
        con = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)
        try:
            return dict(con.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
        finally:
            con.close()
    except sqlite3.Error:
        return {}


def metric(port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


class Setup:
    def __init__(self, base, rescan):
        self.base = base
        self.root = os.path.join(base, "record")
        self.store = os.path.join(base, "store")
        self.journal = os.path.join(base, "state", "journal.db")
        self.log = os.path.join(base, "daemon.log")
        self.server = self.daemon = None
        os.makedirs(self.root)
        os.makedirs(os.path.dirname(self.journal))
        self.s3_port = free_port()
        self.http_port = free_port()
        self.cfg = os.path.join(base, "config.toml")
        with open(self.cfg, "w") as f:
            f.write(f"""
[node]
name = "stress"
[watch]
root = {json.dumps(self.root)}
settle_secs = 1
rescan_interval_secs = {rescan}
[journal]
path = {json.dumps(self.journal)}
[storage]
endpoint = "http://127.0.0.1:{self.s3_port}"
region = "us-east-1"
bucket = "recordings"
access_key_id = "{ACCESS_KEY}"
access_key_secret = "{SECRET_KEY}"
path_style = true
[lookup]
listen = ["127.0.0.1:{self.http_port}"]
[upload]
concurrency = 8
[log]
level = "info"
""")

    def start(self, binary):
        self.server = subprocess.Popen(
            [binary, "dev-s3", "--data", self.store, "--listen", f"127.0.0.1:{self.s3_port}",
             "--bucket", "recordings"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.daemon = None
        wait_port(self.s3_port)
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        self.logf = open(self.log, "w")
        self.daemon = subprocess.Popen([binary, "run", "--config", self.cfg], env=env,
                                       stdout=subprocess.DEVNULL, stderr=self.logf)
        wait_port(self.http_port)

    def log_count(self, text):
        with open(self.log, errors="replace") as f:
            return sum(1 for line in f if text in line)

    def object_size(self, key):
        try:
            return os.path.getsize(os.path.join(self.store, "recordings", key))
        except OSError:
            return None

    def wait_deleted(self, n, timeout):
        t0 = time.monotonic()
        while True:
            r = rows(self.journal)
            if r.get("deleted", 0) >= n:
                return time.monotonic() - t0
            if self.daemon.poll() is not None:
                raise SystemExit(f"daemon exited: {self.daemon.returncode}; log {self.log}")
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"not done after {timeout} s: {r}; log {self.log}")
            time.sleep(0.5)

    def stop(self):
        for p in (self.daemon, self.server):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if hasattr(self, "logf"):
            self.logf.close()


def part_overflow(binary, base, args):
    write_sysctl("max_queued_events", args.queue)
    s = Setup(base, rescan=3600)
    try:
        s.start(binary)
        per_dir = args.files // args.dirs
        total = per_dir * args.dirs
        t0 = time.monotonic()
        for d in range(args.dirs):
            dd = os.path.join(s.root, f"burst/d{d:04d}")
            os.makedirs(dd)
            for i in range(per_dir):
                with open(os.path.join(dd, f"f{i:03d}.mp4"), "wb") as f:
                    f.write(f"{d}/{i}\n".encode() * 8)
        written = time.monotonic() - t0
        took = s.wait_deleted(total, args.timeout)
        missing = []
        for d in range(args.dirs):
            for i in range(per_dir):
                rel = f"burst/d{d:04d}/f{i:03d}.mp4"
                want = len(f"{d}/{i}\n".encode() * 8)
                if s.object_size(f"stress/{rel}") != want or os.path.exists(os.path.join(s.root, rel)):
                    missing.append(rel)
        uploaded = metric(s.http_port, "record_offload_uploaded_files_total")
        r = rows(s.journal)
        con = sqlite3.connect(f"file:{s.journal}?mode=ro", uri=True)
        regen = con.execute("SELECT COUNT(*) FROM files WHERE generation > 0").fetchone()[0]
        con.close()
        overflows = s.log_count("inotify queue overflowed")
    finally:
        s.stop()
    print(f"overflow: max_queued_events={args.queue}; {total} files in {args.dirs} new directories "
          f"written in {written:.1f} s, all deleted {took:.1f} s after the burst began writing")
    print(f"overflow: queue overflows logged {overflows}; journal {r}; rows re-queued {regen}; "
          f"uploaded_files_total {uploaded:.0f}; missing or wrong {len(missing)}")
    ok = not missing and uploaded == total and r.get("deleted") == total and overflows > 0
    if overflows == 0:
        print("overflow: the queue never overflowed: lower --queue or raise --files")
    return ok


def part_watch_limit(binary, base, args):
    used = user_watches()
    limit = used + args.spare
    s_dirs = args.spare * 2
    s = Setup(base, rescan=3600)
    try:
        # The tree exists before the daemon starts, with one old file per directory.
        old = time.time() - 3600
        for d in range(s_dirs):
            dd = os.path.join(s.root, f"tree/d{d:04d}")
            os.makedirs(dd)
            p = os.path.join(dd, "old.mp4")
            with open(p, "wb") as f:
                f.write(b"old\n")
            os.utime(p, (old, old))
        write_sysctl("max_user_watches", limit)
        s.start(binary)
        s.wait_deleted(s_dirs, args.timeout)
        # A new file in every directory: the ones without a watch are found by the rescans.
        new = []
        for d in range(s_dirs):
            rel = f"tree/d{d:04d}/new.mp4"
            with open(os.path.join(s.root, rel), "wb") as f:
                f.write(b"new\n")
            new.append(rel)
        t1 = time.monotonic()
        s.wait_deleted(s_dirs + len(new), args.timeout)
        found_after = time.monotonic() - t1
        warned = s.log_count("max_user_watches")
        stored = sum(1 for rel in new if s.object_size(f"stress/{rel}") == 4)
    finally:
        s.stop()
    print(f"watch limit: max_user_watches={limit} ({used} already used by this user), "
          f"tree of {s_dirs} directories; warnings naming max_user_watches: {warned}")
    print(f"watch limit: {stored}/{len(new)} files written later into unwatched directories stored, "
          f"{found_after:.1f} s after they were written")
    return warned > 0 and stored == len(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary")
    ap.add_argument("--part", choices=["overflow", "watch-limit", "all"], default="all")
    ap.add_argument("--files", type=int, default=50000)
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--queue", type=int, default=64, help="max_queued_events during part 1")
    ap.add_argument("--spare", type=int, default=200,
                    help="watches allowed above current use in part 2 (the tree has twice as many directories)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--base", default="/dev/shm")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("inotify_stress.py changes system-wide sysctls: run it as root")
    binary = args.binary
    if not binary:
        subprocess.run(["nice", "-n", "15", "cargo", "build", "--release", "--locked", "--quiet"],
                       cwd=ROOT, check=True)
        binary = os.path.join(ROOT, "target", "release", "record-offload")
    saved = {n: read_sysctl(n) for n in ("max_queued_events", "max_user_watches")}

    def restore(*_):
        for n, v in saved.items():
            try:
                write_sysctl(n, v)
            except OSError as e:
                print(f"cannot restore fs.inotify.{n}={v}: {e}", file=sys.stderr)
    def on_signal(sig, _frame):
        restore()
        raise SystemExit(128 + sig)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ok = True
    try:
        for name, part in (("overflow", part_overflow), ("watch-limit", part_watch_limit)):
            if args.part not in (name, "all"):
                continue
            base = tempfile.mkdtemp(prefix="ro-inotify-", dir=args.base)
            try:
                ok &= part(binary, base, args)
            finally:
                restore()
                shutil.rmtree(base, ignore_errors=True)
    finally:
        restore()
        print("sysctls restored: " + ", ".join(f"fs.inotify.{n}={read_sysctl(n)}" for n in saved))
    print("inotify stress: " + ("ok" if ok else "FAILED"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
