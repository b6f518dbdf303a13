#!/usr/bin/env python3
"""Look-up benchmark: record-offload's look-up server against nginx doing `return 302`.

Builds the release binary, creates a journal with the binary (a short `run`), fills it with
1,000,000 stored rows (plain SQL), starts `record-offload run` on it (empty watch root, an
unreachable store: look-ups of stored files need neither), and starts nginx (one worker,
`return 302`) on another loopback port. Then wrk (same thread and connection counts for all)
runs against:

  resolve   GET /v1/resolve?path=/record/<random existing path>   (JSON, real SigV4 signing)
  302       GET /record/<random existing path>                     (the drop-in route)
  nginx     the same requests to nginx, which answers every one with a fixed 302

and prints req/s and p99 for each, and each route's ratio to nginx. The daemon answers stored
files from its in-memory look-up index, which it builds in the background after start: the
benchmark waits for it (`--index-max-rows 0` turns it off, so that look-ups read the journal).

    apt-get install -y wrk nginx-light     # Debian
    bench/lookup.py                        # 1,000,000 rows, wrk -t1 -c32 -d10s
    bench/lookup.py --rows 100000 --duration 5 --no-build

Only 127.0.0.1 is used. The target: >= 0.7 x nginx's req/s and p99 <= 1 ms.
"""

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from ports import free_port, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stop(proc):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rel_path(i):
    # Shaped like a recording server's tree: day / room / file.
    return f"2026/{1 + i % 12:02d}/{1 + i % 28:02d}/room-{i % 997:04d}/rec-{i:07d} cam.mp4"


def fill_journal(journal, rows, node):
    con = sqlite3.connect(journal)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")
    now = int(time.time() * 1000)
    batch = []
    with con:
        for i in range(rows):
            rel = rel_path(i)
            batch.append(
                (rel.encode(), f"{node}/{rel}", 1_000_000 + i, "%032x" % (i * 2654435761), now)
            )
            if len(batch) == 50_000:
                con.executemany(
                    "INSERT INTO files (path, key, state, size, md5, bytes_sent, discovered_ms,"
                    " queued_ms, uploaded_ms, deleted_ms, updated_ms)"
                    " VALUES (?, ?, 'deleted', ?, ?, 0, ?5, ?5, ?5, ?5, ?5)",
                    batch,
                )
                batch = []
        if batch:
            con.executemany(
                "INSERT INTO files (path, key, state, size, md5, bytes_sent, discovered_ms,"
                " queued_ms, uploaded_ms, deleted_ms, updated_ms)"
                " VALUES (?, ?, 'deleted', ?, ?, 0, ?5, ?5, ?5, ?5, ?5)",
                batch,
            )
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


LUA = """
local n = {rows}
local route = "{route}"
local function path(i)
  return string.format("2026/%02d/%02d/room-%04d/rec-%07d%%20cam.mp4",
    1 + i % 12, 1 + i % 28, i % 997, i)
end
math.randomseed(42)
request = function()
  local p = "/record/" .. path(math.random(0, n - 1))
  if route == "resolve" then
    local q = p:gsub("%%", "%%25"):gsub("/", "%%2F")
    return wrk.format("GET", "/v1/resolve?path=" .. q)
  end
  return wrk.format("GET", p)
end
"""


def wrk(port, script, args):
    cmd = [
        "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s",
        "--latency", "-s", script, f"http://127.0.0.1:{port}",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rps = p99 = None
    errors = 0
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            rps = float(parts[1])
        elif parts[:1] == ["99%"]:
            p99 = to_ms(parts[1])
        elif "Non-2xx or 3xx responses" in line:
            errors += int(parts[-1])
        elif line.strip().startswith("Socket errors"):
            errors += sum(int(x.strip(",")) for x in parts[2::2] if x.strip(",").isdigit())
    if rps is None or p99 is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    return rps, p99, errors


def wait_index(port, rows, timeout=300):
    """Waits until the daemon answers stored files from its in-memory index (its build runs
    in the background after start; until then look-ups read the journal)."""
    deadline = time.time() + timeout
    entries = 0
    while time.time() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
            for line in r.read().decode().splitlines():
                if line.startswith("record_offload_lookup_index_entries "):
                    entries = int(float(line.split()[1]))
        if entries >= rows:
            return entries
        time.sleep(0.2)
    print(f"warning: the look-up index holds {entries} of {rows} rows", file=sys.stderr)
    return entries


def to_ms(s):
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if s.endswith(unit):
            return float(s[: -len(unit)]) * f
    return float(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--style", default="s3v4", help="lookup.presign_style")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--index-max-rows", type=int, default=None,
                    help="lookup.index_max_rows (0: look-ups read the journal)")
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            raise SystemExit(f"{tool} is missing: apt-get install -y wrk nginx-light")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target", "release", "record-offload")

    work = args.dir or tempfile.mkdtemp(prefix="ro-lookup-bench-")
    os.makedirs(work, exist_ok=True)
    root = os.path.join(work, "record")
    os.makedirs(root, exist_ok=True)
    journal = os.path.join(work, "journal.db")
    port = free_port()
    nginx_port = free_port()
    node = "rec-01"
    config = os.path.join(work, "config.toml")
    extra = ""
    if args.style == "cdn-a":
        extra = 'public_base_url = "https://cdn.example.com"\ncdn_auth_key = "bench-cdn-key"\n'
    with open(config, "w") as f:
        f.write(f"""[node]
name = "{node}"
[watch]
root = {json.dumps(root)}
rescan_interval_secs = 3600
[journal]
path = {json.dumps(journal)}
[storage]
# Never contacted by look-ups of stored files; a closed loopback port keeps the uploader's
# start-up calls on this machine. URLs are signed for the OSS-style host below.
endpoint = "http://127.0.0.1:9"
region = "cn-hangzhou"
bucket = "recordings"
access_key_id = "LTAI-bench-key-id"
access_key_secret = "bench-secret-not-used-for-requests"
[upload]
retry_initial_secs = 60
[lookup]
listen = ["127.0.0.1:{port}"]
presign_style = "{args.style}"
{'' if args.index_max_rows is None else f'index_max_rows = {args.index_max_rows}' + chr(10)}{extra or 'public_base_url = "https://recordings.oss-cn-hangzhou.aliyuncs.com"' + chr(10)}[log]
level = "warn"
""")
    daemon = nginx = None
    try:
        if not os.path.exists(journal):
            # The binary creates the journal (schema and all); then it is stopped.
            daemon = subprocess.Popen([binary, "--config", config, "run"])
            wait_port(port, daemon)
            stop(daemon)
            t = time.time()
            fill_journal(journal, args.rows, node)
            print(f"journal: {args.rows} rows in {time.time() - t:.1f} s", file=sys.stderr)

        daemon = subprocess.Popen([binary, "--config", config, "run"])
        wait_port(port, daemon)
        if args.index_max_rows != 0:
            t = time.time()
            entries = wait_index(port, min(args.rows, args.index_max_rows or args.rows))
            print(f"look-up index: {entries} entries after {time.time() - t:.1f} s", file=sys.stderr)
        nginx_dir = os.path.join(work, "nginx")
        os.makedirs(nginx_dir, exist_ok=True)
        with open(os.path.join(nginx_dir, "nginx.conf"), "w") as f:
            f.write(f"""worker_processes 1;
daemon off;
pid {nginx_dir}/nginx.pid;
error_log {nginx_dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  server {{
    listen 127.0.0.1:{nginx_port};
    location / {{ return 302 https://recordings.oss-cn-hangzhou.aliyuncs.com/x.mp4; }}
  }}
}}
""")
        nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
        nginx = subprocess.Popen([nginx_bin, "-p", nginx_dir, "-c", os.path.join(nginx_dir, "nginx.conf")])
        wait_port(nginx_port, nginx)

        # The answers are right before they are fast.
        i = random.randrange(args.rows)
        p = "/record/" + urllib.parse.quote(rel_path(i))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/resolve?path={urllib.parse.quote(p, safe='')}") as r:
            answer = json.load(r)
        assert answer["state"] == "uploaded" and answer["key"] == f"{node}/{rel_path(i)}", answer

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None

        try:
            urllib.request.build_opener(NoRedirect).open(f"http://127.0.0.1:{port}{p}")
            raise SystemExit("the drop-in route did not redirect")
        except urllib.error.HTTPError as e:
            location = e.headers["Location"].lower()
            assert e.code == 302 and ("signature" in location or "auth_key" in location), e.headers

        results = {}
        for name, target_port, route in (
            ("resolve", port, "resolve"),
            ("302", port, "legacy"),
            ("nginx", nginx_port, "legacy"),
        ):
            script = os.path.join(work, f"{route}.lua")
            with open(script, "w") as f:
                f.write(LUA.format(rows=args.rows, route=route))
            results[name] = wrk(target_port, script, args)

        nrps = results["nginx"][0]
        index = "off" if args.index_max_rows == 0 else "on"
        print(f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration}s, {args.rows} journal rows, "
              f"presign_style {args.style}, look-up index {index}, "
              f"{os.cpu_count()} CPUs shared by client and server")
        print(f"{'target':<10} {'req/s':>10} {'p99 ms':>8} {'errors':>7} {'x nginx':>8}")
        for name, (rps, p99, errors) in results.items():
            print(f"{name:<10} {rps:>10.0f} {p99:>8.2f} {errors:>7} {rps / nrps:>8.2f}")
    finally:
        stop(daemon)
        stop(nginx)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
