"""Side-by-side WebSocket fan-out benchmarks: push-service vs nginx+nchan vs Node ws.

Starts each server itself on a free loopback port (pinned to CPU 0), drives it with the C load
generator benchmarks/loadgen.c (pinned to CPU 1; it is subscriber and publisher at once, so loss,
order and latency are exact), reads the server's CPU and RSS from /proc around each measured
phase, prints one table per scenario and writes everything as JSON.

    /tmp/venv/bin/python benchmarks/run.py --quick                 # smoke test, all targets
    /tmp/venv/bin/python benchmarks/run.py --scenarios fanout-1k,rooms-10k
    /tmp/venv/bin/python benchmarks/run.py --targets push,nchan --json /tmp/out.json

Server µs per delivery = (utime + stime of the whole server process, all threads, during the
phase) / frames delivered. For nchan it is the nginx worker process (the master is idle).
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jwt
import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / "build"
RESULTS = HERE / "results"
LOADGEN_SRC = HERE / "loadgen.c"
LOADGEN = BUILD / "loadgen"
NODE_DIR = HERE / "node"
PYTHON = "/tmp/venv/bin/python" if Path("/tmp/venv/bin/python").exists() else sys.executable
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
NCHAN_INSTALL = "apt-get install -y nginx-light libnginx-mod-nchan"
KEY = "bench-publish-key-0123456789abcdef"
SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALL_TARGETS = ("push", "nchan", "ws")
SERVER_CPU, LOADGEN_CPU = "0", "1"

# Every child process we start, so Ctrl-C / errors never leave one behind.
_children: list[subprocess.Popen] = []


# ---------------------------------------------------------------- /proc readings

def proc_cpu(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def core_busy() -> dict[str, float]:
    """Busy seconds per CPU outside interrupts (user, nice, system, steal), to spot other load on
    our cores. irq/softirq time is left out: loopback TCP work for our own traffic lands there."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *ticks = line.split()
            user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(t) for t in ticks[:8])
            busy[name[3:]] = (user + nice + system + steal) / CLK_TCK
    return busy


@dataclass
class Snapshot:
    at: float
    cpu: float
    rss_kib: int
    cores: dict[str, float]


def snapshot(pids: list[int]) -> Snapshot:
    return Snapshot(time.monotonic(), sum(proc_cpu(p) for p in pids), sum(proc_rss_kib(p) for p in pids),
                    core_busy())


def measured(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    wall = max(after.at - before.at, 1e-9)
    cpu = after.cpu - before.cpu
    # CPU 0 time not spent by the server: other processes on the machine competing with it.
    other = (after.cores.get(SERVER_CPU, 0) - before.cores.get(SERVER_CPU, 0)) - cpu
    return {"cpu_s": round(cpu, 4), "wall_s": round(wall, 4), "cpu_pct": round(100 * cpu / wall, 1),
            "rss_kib_before": before.rss_kib, "rss_kib_after": after.rss_kib,
            "other_load_on_server_core_pct": round(max(other, 0) * 100 / wall, 1)}


# ---------------------------------------------------------------- helpers

def taskset(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if shutil.which("taskset") else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_port(pid: int) -> int | None:
    """The TCP port a process listens on, from its socket fds and /proc/net/tcp."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                return int(fields[1].rsplit(":", 1)[1], 16)
    return None


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def drain(stream: Any, keep: list[str], prefix: str | None = None) -> None:
    """Keep reading a child's output so it never blocks on a full pipe; remember the tail."""
    for line in iter(stream.readline, ""):
        keep.append(line.rstrip())
        del keep[:-50]
        if prefix:
            print(f"{prefix}{line.rstrip()}", file=sys.stderr, flush=True)


def build_loadgen() -> None:
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return
    BUILD.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", "-o", str(LOADGEN), str(LOADGEN_SRC), "-lz"]
    print("building:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def mint_tokens(count: int, directory: Path) -> Path:
    """One JWT per connection (distinct sub), as real clients would have; the server verifies each."""
    path = directory / "tokens.txt"
    exp = int(time.time()) + 6 * 3600
    path.write_text("".join(jwt.encode({"sub": f"bench-{i}", "exp": exp}, SECRET, algorithm="HS256") + "\n"
                            for i in range(count)))
    return path


# ---------------------------------------------------------------- servers

class Server:
    name = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log: list[str] = []

    def measured_pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid]

    def stop(self) -> None:
        stop(self.proc)


class PushServer(Server):
    name = "push"

    def __init__(self, workdir: Path, extra_env: dict[str, str] | None = None, port: int = 0) -> None:
        super().__init__(workdir)
        self.extra_env = extra_env or {}
        self.requested_port = port  # 0: any free one

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUSH_")}
        env.update(PUSH_SERVICE_KEY=KEY, PUSH_JWT_SECRET=SECRET, PUSH_LOG_FORMAT="json",
                   PUSH_LOG_LEVEL="warning", PUSH_HISTORY_SIZE="0", **self.extra_env)
        self.proc = spawn([*taskset(SERVER_CPU), PYTHON, "-m", "push_service", "serve", "--port", str(self.requested_port)],
                          env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()

        def read() -> None:
            assert self.proc and self.proc.stderr
            for line in iter(self.proc.stderr.readline, ""):
                if not self.port:
                    lines.put(line)
                self.log.append(line.rstrip())
                del self.log[:-50]
            lines.put("")

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 30
        while not self.port:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                # At PUSH_LOG_LEVEL=warning the info-level "listening" line is not printed:
                # find the process's listening socket instead.
                self.port = listening_port(self.proc.pid) or 0
                if not self.port and time.monotonic() > deadline:
                    raise RuntimeError("push-service is not listening after 30 s") from None
                continue
            if not line:
                raise RuntimeError("push-service exited: " + "\n".join(self.log[-10:]))
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if entry.get("event") == "listening":
                self.port = int(entry["port"])


class NchanServer(Server):
    name = "nchan"

    def start(self) -> None:
        prefix = Path(tempfile.mkdtemp(prefix="nchan-", dir=self.workdir))
        prefix.chmod(0o755)  # the worker may run as nobody
        self.port = free_port()
        self.prefix = prefix
        conf = prefix / "nginx.conf"
        conf.write_text(f"""
load_module {NCHAN_MODULE};
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        location ~ /sub/(\\w+)$ {{
            nchan_subscriber websocket;
            nchan_channel_id $1;
        }}
        location ~ /pub/(\\w+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
            # Keep memory small: subscribers are live, nobody replays old messages.
            nchan_message_buffer_length 2;
            nchan_message_timeout 10s;
        }}
    }}
}}
""")
        self.proc = spawn([*taskset(SERVER_CPU), "nginx", "-p", str(prefix), "-c", str(conf), "-e",
                           str(prefix / "error.log")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=drain, args=(self.proc.stderr, self.log), daemon=True).start()
        wait_for_port(self.port, self.proc)
        self.worker = self._worker_pid()

    def _worker_pid(self) -> int:
        assert self.proc is not None
        for _ in range(100):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            if children:
                return int(children[0])
            time.sleep(0.05)
        raise RuntimeError("nginx started no worker")

    def measured_pids(self) -> list[int]:
        return [self.worker]

    def stop(self) -> None:
        stop(self.proc)  # SIGTERM = nginx fast shutdown
        errors = (self.prefix / "error.log").read_text(errors="replace").strip().splitlines()
        self.log += [line for line in errors if "[alert]" in line or "[crit]" in line or "[emerg]" in line]


class WsServer(Server):
    name = "ws"

    def start(self) -> None:
        self.proc = spawn([*taskset(SERVER_CPU), "node", str(NODE_DIR / "ws-broadcast.mjs"), "0"],
                          cwd=NODE_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout and self.proc.stderr
        threading.Thread(target=drain, args=(self.proc.stderr, self.log), daemon=True).start()
        ready: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: ready.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            line = ready.get(timeout=15)
        except queue.Empty:
            raise RuntimeError("node ws server did not print its port") from None
        if not line.strip().isdigit():
            raise RuntimeError(f"node ws server: {line!r} {self.log[-5:]}")
        self.port = int(line)


SERVERS: dict[str, Callable[[Path], Server]] = {"push": PushServer, "nchan": NchanServer, "ws": WsServer}


def available_targets() -> dict[str, str | None]:
    """None = available, else the reason it is skipped."""
    found: dict[str, str | None] = {"push": None}
    if not shutil.which("nginx") or not NCHAN_MODULE.exists():
        found["nchan"] = f"nginx or the nchan module is missing; install with: {NCHAN_INSTALL}"
    else:
        found["nchan"] = None
    if not shutil.which("node"):
        found["ws"] = "node is not installed"
    elif not (NODE_DIR / "node_modules" / "ws").exists():
        if shutil.which("npm"):
            print(f"running: npm ci --prefix {NODE_DIR}", file=sys.stderr)
            done = subprocess.run(["npm", "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"])
            found["ws"] = None if done.returncode == 0 else "npm ci failed"
        else:
            found["ws"] = "npm is not installed (needed for: npm ci --prefix benchmarks/node)"
    else:
        found["ws"] = None
    return found


# ---------------------------------------------------------------- load generator

class Loadgen:
    """The C load generator as a child process, driven line by line over stdin/stdout."""

    def __init__(self, target: str, port: int, tokens: Path | None, **options: Any) -> None:
        cmd = [*taskset(LOADGEN_CPU), str(LOADGEN), "--target", target, "--port", str(port), "--key", KEY]
        if tokens and target == "push":
            cmd += ["--tokens", str(tokens)]
        for name, value in options.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                cmd.append(flag)
            elif value not in (None, False):
                cmd += [flag, str(value)]
        self._start(cmd)

    def _start(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self.proc = spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: list[str] = []
        assert self.proc.stdout and self.proc.stderr
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=drain, args=(self.proc.stderr, self.errors, "  [loadgen] "), daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in iter(self.proc.stdout.readline, ""):
            self.lines.put(line)
        self.lines.put("")

    def expect(self, phase: str, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"loadgen: no '{phase}' line within {timeout:.0f} s") from None
        if not line:
            raise RuntimeError(f"loadgen exited ({self.proc.wait()}): {self.errors[-3:]}")
        data = orjson.loads(line)
        if data.get("phase") != phase:
            raise RuntimeError(f"loadgen: expected {phase}, got {line[:200]}")
        return data

    def send(self, command: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class StormClients(Loadgen):
    """benchmarks/storm.py: phoenix.js-like clients that reconnect with its backoff (reconnect-storm)."""

    def __init__(self, port: int, tokens: Path, conns: int, storm_timeout: float) -> None:
        self._start([*taskset(LOADGEN_CPU), PYTHON, str(HERE / "storm.py"), "--port", str(port), "--tokens",
                     str(tokens), "--conns", str(conns), "--storm-timeout", str(storm_timeout)])


# ---------------------------------------------------------------- scenarios

@dataclass
class Scenario:
    name: str
    title: str
    kind: str  # publish | connect | storm | idle | publish-only | growth | scaleout | topics
    targets: tuple[str, ...] = ALL_TARGETS
    options: dict[str, Any] = field(default_factory=dict)
    quick: dict[str, Any] = field(default_factory=dict)
    columns: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # extra server environment (push)
    label: str = ""  # growth/scaleout/topics: several rows per target


FANOUT_COLS = ("deliveries/s", "us/delivery", "server CPU%", "loadgen CPU%", "p50 ms", "p99 ms", "max ms",
               "lost", "ooo", "dup", "closes", "other load%")
BURST_COLS = ("deliveries/s", "us/delivery", "server CPU%", "p50 ms", "p99 ms", "max ms", "lost", "ooo", "dup",
              "refused", "non-2xx", "closes", "other load%")
DEFLATE_COLS = ("bytes/delivery", "deliveries/s", "us/delivery", "server CPU%", "loadgen CPU%", "p50 ms", "p99 ms",
                "max ms", "lost", "ooo", "closes", "other load%")
LATENCY_COLS = ("msgs/s", "deliveries/s", "p50 ms", "p99 ms", "max ms", "lost", "ooo", "us/delivery",
                "loadgen CPU%", "closes", "other load%")


def scenarios() -> list[Scenario]:
    fanout = dict(rooms=1, http_conns=4, max_inflight=16)
    rooms = dict(conns=10000, rooms=1000, messages=200000, seconds=10, http_conns=16, max_inflight=64)
    rooms_quick = dict(conns=1000, rooms=100, messages=3000, seconds=1)
    return [
        Scenario("fanout-1k", "1,000 subscribers, one room, max rate", "publish",
                 options=dict(conns=1000, messages=2000, seconds=20, **fanout),
                 quick=dict(conns=200, messages=100, seconds=1), columns=FANOUT_COLS),
        Scenario("fanout-10k", "10,000 subscribers, one room, max rate", "publish",
                 options=dict(conns=10000, messages=300, seconds=20, **fanout),
                 quick=dict(conns=1000, messages=20, seconds=1), columns=FANOUT_COLS),
        # Open loop: 4 backends, each publishing again as soon as it has its answer, whatever has been
        # delivered: what a server accepts beyond what it can deliver shows as latency (or as 503s).
        Scenario("burst-10k", "10,000 subscribers, one room, 300 messages from 4 independent publishers (open loop)",
                 "publish", options=dict(conns=10000, rooms=1, messages=300, seconds=0, http_conns=4, max_inflight=0),
                 quick=dict(conns=1000, messages=30, seconds=1), columns=BURST_COLS),
        Scenario("rooms-10k", "10,000 subscribers in 1,000 rooms of 10, random room per message, max rate",
                 "publish", options=rooms, quick=rooms_quick, columns=FANOUT_COLS),
        *(Scenario(f"rooms-10k-{broker}", f"push only: rooms-10k through the {broker} broker (one node)", "publish",
                   targets=("push",), options=rooms, quick=rooms_quick, columns=FANOUT_COLS, env={"PUSH_BROKER": url})
          for broker, url in (("redis", "redis://127.0.0.1:6379/0"), ("nats", "nats://127.0.0.1:4222"))),
        # ~2 KB chat messages (word padding compresses as text does), with and without permessage-deflate,
        # at a fixed rate both keep up with, so the server's cost per delivery is compared at equal load
        # (at max rate the loader's inflating, not the server, sets the pace).
        *(Scenario(f"fanout-2k-{mode}", f"push only: 10,000 subscribers, one room, ~2 KB chat messages at 10/s, "
                   f"{'permessage-deflate' if deflate else 'uncompressed'}", "publish", targets=("push",),
                   options=dict(conns=10000, rooms=1, rate=10, seconds=10, http_conns=2, frame_bytes=2000,
                                text_pad=True, deflate=deflate),
                   quick=dict(conns=1000, seconds=1), columns=DEFLATE_COLS)
          for mode, deflate in (("plain", False), ("deflate", True))),
        # The same with the body Linen's backend sends for a new thread (benchmarks/linen_fields.py): JSON whose
        # keys, ids and author repeat, as real chat payloads do, where the word padding above is text alone.
        *(Scenario(f"fanout-linen-{mode}", f"push only: 10,000 subscribers, one room, Linen new-thread messages "
                   f"(~2.5 KB) at 10/s, {'permessage-deflate' if deflate else 'uncompressed'}", "publish",
                   targets=("push",), options=dict(conns=10000, rooms=1, rate=10, seconds=10, http_conns=2,
                                                   fields_file=str(HERE / "linen-new-thread.fields"), deflate=deflate),
                   quick=dict(conns=1000, seconds=1), columns=DEFLATE_COLS)
          for mode, deflate in (("plain", False), ("deflate", True))),
        Scenario("latency-5", "10,000 subscribers, one room, 5 msg/s for 10 s", "publish",
                 options=dict(conns=10000, rooms=1, rate=5, seconds=10, http_conns=2),
                 quick=dict(conns=300, seconds=1), columns=LATENCY_COLS),
        Scenario("latency-20", "10,000 subscribers, one room, 20 msg/s for 10 s", "publish",
                 options=dict(conns=10000, rooms=1, rate=20, seconds=10, http_conns=2),
                 quick=dict(conns=300, seconds=1), columns=LATENCY_COLS),
        Scenario("idle-19k", "RSS growth over 19,000 joined idle connections", "idle",
                 options=dict(conns=19000, warm=200), quick=dict(conns=500, warm=50),
                 columns=("conns", "RSS before MiB", "RSS after MiB", "KiB/conn", "connects/s", "other load%")),
        Scenario("connect", "connect + handshake + join, 200 in flight", "connect",
                 options=dict(conns=10000, inflight_connects=200), quick=dict(conns=500),
                 columns=("conns", "failed", "connects/s", "us CPU/conn", "server CPU%", "loadgen CPU%",
                          "other load%")),
        Scenario("reconnect-storm", "push only: 10,000 phoenix.js-like clients joined, the server restarted "
                 "(SIGTERM, PUSH_DRAIN_SECONDS=2), all reconnect with phoenix.js's backoff", "storm",
                 targets=("push",), options=dict(conns=10000, storm_timeout=120), quick=dict(conns=500),
                 env={"PUSH_DRAIN_SECONDS": "2"},
                 columns=("conns", "rejoined", "s to all rejoined", "s after listening", "attempts", "failed",
                          "server CPU s", "us CPU/conn", "client CPU s", "other load%")),
        Scenario("publish", "no subscribers, single-message POSTs at max rate, 32 HTTP connections",
                 "publish-only", options=dict(conns=0, seconds=5, http_conns=32), quick=dict(seconds=1),
                 columns=("requests/s", "msgs/s", "us/request", "non-2xx", "server CPU%", "loadgen CPU%",
                          "other load%")),
        Scenario("publish-batch", "no subscribers, /api/batch of 100 messages, 8 HTTP connections",
                 "publish-only", targets=("push",), options=dict(conns=0, seconds=5, http_conns=8, batch=100),
                 quick=dict(seconds=1),
                 columns=("requests/s", "msgs/s", "us/msg", "non-2xx", "server CPU%", "loadgen CPU%",
                          "other load%")),
        Scenario("growth", "one-room fanout at 1,000 / 5,000 / 19,000 subscribers", "growth",
                 options=dict(sizes=(1000, 5000, 19000), deliveries=2_000_000, seconds=20,
                                                 **fanout),
                 quick=dict(sizes=(100, 200, 400), deliveries=10000, seconds=1),
                 columns=("subscribers", "deliveries/s", "us/delivery", "server CPU%", "loadgen CPU%",
                          "p50 ms", "p99 ms", "lost", "closes", "other load%")),
        Scenario("topics", "push only: cost per publish at 10 / 1,000 / 100,000 topics, one subscriber each, "
                 "random topic per message, max rate", "topics", targets=("push",),
                 # (connections, topics per connection): topics = product, each joined by exactly one socket
                 options=dict(steps=((10, 1), (1000, 1), (1000, 100)), seconds=5, http_conns=16, max_inflight=64),
                 quick=dict(steps=((10, 1), (100, 1), (200, 10)), seconds=1),
                 env={"PUSH_MAX_TOPICS_PER_CONNECTION": "100"},
                 columns=("topics", "conns x J", "publishes/s", "us/publish", "us/delivery", "p50 ms", "p99 ms",
                          "lost", "ooo", "closes", "non-2xx", "server CPU%", "loadgen CPU%", "other load%")),
        Scenario("scaleout", "push only: 2 nodes over Redis vs 1 node, subscribers split evenly, publish to A",
                 "scaleout", targets=("push",), options=dict(conns=10000, messages=300, seconds=20, rate=20,
                                                             latency_seconds=10, light_conns=1000, **fanout),
                 quick=dict(conns=400, messages=20, seconds=1, latency_seconds=1, light_conns=100),
                 columns=("setup", "deliveries/s", "us/delivery", "server CPU%", "p50 ms", "p99 ms",
                          "p50 ms @20/s", "p99 ms @20/s", "p50 ms @20/s, light", "lost", "closes")),
    ]


def phase_timeout(options: dict[str, Any]) -> float:
    # No time limit (burst-10k): nchan answers a publish once it has written it to every subscriber, so
    # its 300 publishes take a minute or more.
    return float(options.get("seconds") or 300) + 60


def connect_timeout(conns: int) -> float:
    return 60 + conns / 100  # even a slow server joins 100 sockets a second


def fanout_row(connected: dict[str, Any], result: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    frames = result["frames_received"]
    lat = result["latency_ms"]
    return {
        "msgs/s": round(result["messages_per_s"], 1),
        "deliveries/s": round(result["deliveries_per_s"]),
        "bytes/delivery": round(result["avg_frame_bytes"]),  # the frame's payload on the wire
        "us/delivery": round(server["cpu_s"] * 1e6 / frames, 3) if frames else None,
        "server CPU%": server["cpu_pct"],
        "loadgen CPU%": result["cpu_pct"],
        "p50 ms": lat["p50"], "p99 ms": lat["p99"], "max ms": lat["max"],
        "lost": result["lost"], "ooo": result["out_of_order"], "dup": result["duplicates"],
        # Messages answered 503 (not accepted, so not lost) and every answer that was not 2xx.
        "refused": result.get("refused", 0), "non-2xx": result["http_errors"],
        "closes": result["server_closes"] + result["disconnects"],
        "other load%": server["other_load_on_server_core_pct"],
        "conns": connected["conns"],
    }


def run_publish(server: Server, target: str, tokens: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Connect, then one measured publish phase; server CPU/RSS read right around it."""
    loadgen = Loadgen(target, server.port, tokens, **options)
    try:
        joins = options.get("conns", 0) * (options.get("topics_per_conn") or 1)
        connected = loadgen.expect("connected", connect_timeout(joins))
        if connected["conns"] < options.get("conns", 0):
            print(f"  warning: only {connected['conns']} of {options['conns']} joined", file=sys.stderr)
        time.sleep(0.3)  # let the server settle after the connect burst
        before = snapshot(server.measured_pids())
        loadgen.send("go")
        result = loadgen.expect("result", phase_timeout(options))
        after = snapshot(server.measured_pids())
    finally:
        loadgen.close()
    return {"connected": connected, "result": result, "server": measured(before, after),
            "loadgen_cmd": " ".join(loadgen.cmd)}


def run_connect(server: Server, target: str, tokens: Path, options: dict[str, Any]) -> dict[str, Any]:
    before = snapshot(server.measured_pids())
    loadgen = Loadgen(target, server.port, tokens, hold=True, **options)
    try:
        connected = loadgen.expect("connected", connect_timeout(options["conns"]))
        after = snapshot(server.measured_pids())
    finally:
        loadgen.close()
    cost = measured(before, after)
    return {"connected": connected, "server": cost, "loadgen_cmd": " ".join(loadgen.cmd), "row": {
        "conns": connected["conns"], "failed": connected["failed"], "connects/s": round(connected["connects_per_s"]),
        "us CPU/conn": round(cost["cpu_s"] * 1e6 / max(connected["conns"], 1), 1),
        "server CPU%": cost["cpu_pct"], "loadgen CPU%": connected["cpu_pct"],
        "other load%": cost["other_load_on_server_core_pct"]}}


def run_storm(workdir: Path, tokens: Path, options: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Clients joined, the server stopped as a deploy stops it (SIGTERM: drain, exit) and a new one started on the
    same port; the clients come back by phoenix.js's schedule. Measured: time until all are joined again (from the
    first socket lost, and from the new server listening) and the new server's CPU from listening until then."""
    conns, timeout = options["conns"], options["storm_timeout"]
    port = free_port()
    old, new = PushServer(workdir, env, port), PushServer(workdir, env, port)
    clients = None
    try:
        old.start()
        clients = StormClients(port, tokens, conns, timeout)
        joined = clients.expect("joined", connect_timeout(conns))
        assert old.proc is not None
        old.proc.terminate()
        old.proc.wait(float(env.get("PUSH_DRAIN_SECONDS", 10)) + 30)
        new.start()
        listening = time.monotonic()
        before = snapshot(new.measured_pids())
        rejoined = clients.expect("rejoined", timeout + 30)
        after = snapshot(new.measured_pids())
        after_listening = time.monotonic() - listening
    finally:
        if clients is not None:
            clients.close()
        old.stop()
        new.stop()
    cost = measured(before, after)
    return {"joined": joined, "rejoined": rejoined, "server": cost, "row": {
        "conns": conns, "rejoined": rejoined["conns"], "s to all rejoined": rejoined["seconds_since_first_loss"],
        "s after listening": round(after_listening, 2), "attempts": rejoined["attempts"],
        "failed": rejoined["failed_attempts"], "server CPU s": cost["cpu_s"],
        "us CPU/conn": round(cost["cpu_s"] * 1e6 / max(rejoined["conns"], 1), 1),
        "client CPU s": rejoined["client_cpu_s"], "other load%": cost["other_load_on_server_core_pct"]}}


def run_idle(server: Server, target: str, tokens: Path, options: dict[str, Any]) -> dict[str, Any]:
    options = dict(options)
    warm = options.pop("warm")
    # Warm the server (first connections allocate lazily-built structures), then take the baseline.
    warmup = Loadgen(target, server.port, tokens, conns=warm, hold=True)
    warmup.expect("connected", connect_timeout(warm))
    warmup.close()
    time.sleep(1.0)
    pids = server.measured_pids()
    base = proc_rss_kib(pids[0])
    loadgen = Loadgen(target, server.port, tokens, hold=True, **options)
    try:
        connected = loadgen.expect("connected", connect_timeout(options["conns"]))
        time.sleep(1.0)  # let deferred per-connection work settle
        loaded = proc_rss_kib(pids[0])
    finally:
        loadgen.close()
    conns = max(connected["conns"], 1)
    return {"connected": connected, "rss_kib_base": base, "rss_kib_loaded": loaded, "row": {
        "conns": connected["conns"], "RSS before MiB": round(base / 1024, 1), "RSS after MiB": round(loaded / 1024, 1),
        "KiB/conn": round((loaded - base) / conns, 2), "connects/s": round(connected["connects_per_s"]),
        "other load%": None}}


def run_publish_only(server: Server, target: str, tokens: Path, options: dict[str, Any]) -> dict[str, Any]:
    run = run_publish(server, target, tokens, options)
    result, cost = run["result"], run["server"]
    per = "us/msg" if options.get("batch") else "us/request"
    count = result["published"] if options.get("batch") else result["requests"]
    run["row"] = {"requests/s": round(result["requests_per_s"]), "msgs/s": round(result["messages_per_s"]),
                  per: round(cost["cpu_s"] * 1e6 / count, 2) if count else None,
                  "non-2xx": result["http_errors"],  # non-2xx answers plus requests lost with a connection
                  "server CPU%": cost["cpu_pct"], "loadgen CPU%": result["cpu_pct"],
                  "other load%": cost["other_load_on_server_core_pct"]}
    return run


# ---------------------------------------------------------------- the run

class Runner:
    def __init__(self, args: argparse.Namespace, targets: list[str], workdir: Path) -> None:
        self.args = args
        self.targets = targets
        self.workdir = workdir
        self.deadline = time.monotonic() + args.time_limit
        self.tokens: Path | None = None
        self.report: dict[str, Any] = {}

    def token_file(self, count: int) -> Path:
        if self.tokens is None or self._token_count < count:
            self.tokens = mint_tokens(count, self.workdir)
            self._token_count = count
        return self.tokens

    def with_server(self, target: str, fn: Callable[[Server], dict[str, Any]],
                    env: dict[str, str] | None = None) -> dict[str, Any]:
        server = PushServer(self.workdir, env) if target == "push" else SERVERS[target](self.workdir)
        try:
            server.start()
            out = fn(server)
            if server.proc and server.proc.poll() is not None:
                out["server_exited"] = server.proc.returncode
            return out
        finally:
            server.stop()
            if server.log and any(word in " ".join(server.log[-20:]) for word in ("error", "alert", "crit")):
                out_log = server.log[-5:]
                print(f"  [{target} log] " + "\n  ".join(out_log), file=sys.stderr)

    def options(self, scenario: Scenario) -> dict[str, Any]:
        options = dict(scenario.options)
        if self.args.quick:
            options.update(scenario.quick)
        return options

    def run(self, scenario: Scenario) -> dict[str, Any]:
        """Each target once, or `--rounds` times taking turns (push, nchan, push, nchan, ...), so that a
        shared machine's drift falls on both alike; then the rounds' median row (combine_rounds)."""
        options = self.options(scenario)
        rounds = self.args.rounds if scenario.kind in ROUNDED_KINDS else 1
        runs: dict[str, list[dict[str, Any]]] = {t: [] for t in self.targets if t in scenario.targets}
        for number in range(rounds):
            for target in runs:
                if time.monotonic() > self.deadline:
                    print(f"time limit reached: skipping {scenario.name}/{target}", file=sys.stderr)
                    runs[target].append({"skipped": "time limit"})
                    continue
                which = f" (round {number + 1} of {rounds})" if rounds > 1 else ""
                print(f"-- {scenario.name} / {target}{which} ...", file=sys.stderr, flush=True)
                started = time.monotonic()
                try:
                    out = self.run_one(scenario, target, options)
                except Exception as exc:  # one failing target must not lose the others' results
                    print(f"  {scenario.name}/{target} failed: {exc}", file=sys.stderr)
                    out = {"error": str(exc)}
                out["run_seconds"] = round(time.monotonic() - started, 1)
                runs[target].append(out)
        return {target: combine_rounds(outs) for target, outs in runs.items()}

    def run_one(self, scenario: Scenario, target: str, options: dict[str, Any]) -> dict[str, Any]:
        if scenario.kind == "publish":
            tokens = self.token_file(options.get("conns", 0))
            out = self.with_server(target, lambda s: run_publish(s, target, tokens, options), scenario.env)
            out["row"] = fanout_row(out["connected"], out["result"], out["server"])
            return out
        if scenario.kind == "connect":
            tokens = self.token_file(options["conns"])
            return self.with_server(target, lambda s: run_connect(s, target, tokens, options))
        if scenario.kind == "storm":
            return run_storm(self.workdir, self.token_file(options["conns"]), options, scenario.env)
        if scenario.kind == "idle":
            tokens = self.token_file(options["conns"])
            return self.with_server(target, lambda s: run_idle(s, target, tokens, options))
        if scenario.kind == "publish-only":
            return self.with_server(target, lambda s: run_publish_only(s, target, self.token_file(1), options))
        if scenario.kind == "growth":
            return self.run_growth(target, options)
        if scenario.kind == "scaleout":
            return self.run_scaleout(options)
        if scenario.kind == "topics":
            return self.run_topics(target, options, scenario.env)
        raise ValueError(scenario.kind)

    def run_growth(self, target: str, options: dict[str, Any]) -> dict[str, Any]:
        options = dict(options)
        sizes, deliveries = options.pop("sizes"), options.pop("deliveries")
        steps = []
        for size in sizes:
            step = dict(options, conns=size, messages=max(10, math.ceil(deliveries / size)))
            tokens = self.token_file(size)
            out = self.with_server(target, lambda s: run_publish(s, target, tokens, step))
            out["row"] = {"subscribers": size, **fanout_row(out["connected"], out["result"], out["server"])}
            steps.append(out)
        return {"steps": steps, "rows": [s["row"] for s in steps]}

    def run_topics(self, target: str, options: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
        """Same publish load (single messages, random topic) over more and more topics, one subscriber each."""
        options = dict(options)
        steps_spec = options.pop("steps")
        steps = []
        for conns, per_conn in steps_spec:
            topics = conns * per_conn
            step = dict(options, conns=conns, rooms=topics, topics_per_conn=per_conn if per_conn > 1 else None)
            tokens = self.token_file(conns)
            out = self.with_server(target, lambda s: run_publish(s, target, tokens, step), env)
            result, cost = out["result"], out["server"]
            published = result["published"]
            row = fanout_row(out["connected"], result, cost)
            out["row"] = {"topics": topics, "conns x J": f"{conns:,} x {per_conn}",
                          "publishes/s": round(result["messages_per_s"]),
                          "us/publish": round(cost["cpu_s"] * 1e6 / published, 2) if published else None,
                          "non-2xx": result["http_errors"], **row}
            steps.append(out)
        return {"steps": steps, "rows": [s["row"] for s in steps]}

    def run_scaleout(self, options: dict[str, Any]) -> dict[str, Any]:
        """Node A + node B sharing Redis; subscribers alternate between them, publishes go to A. Latency at
        20 msg/s twice: to the peak's subscribers (the loop is busy writing them, and a Redis hop waits
        for the writes in progress) and to `light_conns` of them (the hop itself)."""
        options = dict(options)
        rate, latency_seconds = options.pop("rate"), options.pop("latency_seconds")
        light_conns = options.pop("light_conns")
        redis = {"PUSH_BROKER": "redis://127.0.0.1:6379/0"}
        tokens = self.token_file(options["conns"])
        latency = dict(options, rate=rate, seconds=latency_seconds, messages=0, http_conns=2)
        rows, runs = [], {}
        for setup, env, nodes in (("1 node, memory", {}, 1), ("1 node, redis", redis, 1), ("2 nodes, redis", redis, 2)):
            servers = [PushServer(self.workdir, env) for _ in range(nodes)]
            try:
                for server in servers:
                    server.start()
                extra = {"sub_ports": ",".join(str(s.port) for s in servers)} if nodes > 1 else {}
                pids = [pid for s in servers for pid in s.measured_pids()]

                class Group:  # the measured "server" is all nodes together
                    port = servers[0].port

                    @staticmethod
                    def measured_pids() -> list[int]:
                        return pids

                peak = run_publish(Group, "push", tokens, dict(options, **extra))  # type: ignore[arg-type]
                slow = run_publish(Group, "push", tokens, dict(latency, **extra))  # type: ignore[arg-type]
                light = run_publish(Group, "push", tokens,  # type: ignore[arg-type]
                                    dict(latency, conns=light_conns, **extra))
            finally:
                for server in servers:
                    server.stop()
            row = fanout_row(peak["connected"], peak["result"], peak["server"])
            rows.append({"setup": setup, **row, "p50 ms @20/s": slow["result"]["latency_ms"]["p50"],
                         "p99 ms @20/s": slow["result"]["latency_ms"]["p99"],
                         "p50 ms @20/s, light": light["result"]["latency_ms"]["p50"],
                         "lost": row["lost"] + slow["result"]["lost"] + light["result"]["lost"],
                         "closes": sum([row["closes"]] + [run["result"]["server_closes"] + run["result"]["disconnects"]
                                                          for run in (slow, light)])})
            runs[setup] = {"peak": peak, "latency": slow, "light latency": light}
        return {"runs": runs, "rows": rows}


# ---------------------------------------------------------------- rounds

# Scenarios of one row per target, short enough to repeat.
ROUNDED_KINDS = ("publish", "connect", "publish-only")
# Counts of what went wrong are added up over the rounds, never a median: one bad round shows.
SUMMED_COLUMNS = ("lost", "ooo", "dup", "closes", "failed", "non-2xx")


def combine_rounds(outs: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's rounds as one result: its "row" is each column's median over the rounds that ran
    (what went wrong summed), and "rounds" keeps every round. A single round is returned as it is."""
    if len(outs) == 1:
        return outs[0]
    ran = [out for out in outs if "row" in out]
    if not ran:
        return {**outs[0], "rounds": outs}
    row: dict[str, Any] = {}
    for column, first in ran[0]["row"].items():
        values = [out["row"].get(column) for out in ran]
        numbers = [value for value in values if isinstance(value, (int, float)) and not isinstance(value, bool)]
        if column in SUMMED_COLUMNS and len(numbers) == len(values):
            row[column] = sum(numbers)
        elif numbers and len(numbers) == len(values):
            row[column] = statistics.median(numbers)
        else:
            row[column] = first
    failed = len(outs) - len(ran)
    return {"row": row, "rounds": outs, "failed_rounds": failed,
            "run_seconds": round(sum(out.get("run_seconds", 0) for out in outs), 1)}


def round_ratios(scenario: Scenario, rows: dict[str, Any]) -> list[str]:
    """Per round, each target's ratio to nchan's figure of the same round: how far the rounds spread."""
    nchan = rows.get("nchan", {}).get("rounds")
    if not nchan:
        return []
    lines = []
    for target, out in rows.items():
        if target == "nchan" or not out.get("rounds"):
            continue
        for key in (k for k in RATIO_KEYS if k in scenario.columns):
            ratios = []
            for mine, theirs in zip(out["rounds"], nchan):
                a, b = mine.get("row", {}).get(key), theirs.get("row", {}).get(key)
                ratios.append(f"{a / b:.2f}x" if a is not None and b else "-")
            lines.append(f"  {target} {key} vs nchan, round by round: {', '.join(ratios)}")
    return lines


# ---------------------------------------------------------------- output

RATIO_KEYS = ("deliveries/s", "us/delivery", "KiB/conn", "connects/s", "us CPU/conn", "requests/s", "us/request", "p50 ms")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(scenario: Scenario, rows: dict[str, Any]) -> str:
    lines = [f"== {scenario.name}: {scenario.title}"]
    multi = scenario.kind in ("growth", "scaleout", "topics")
    columns = ["target", *scenario.columns]
    body: list[list[str]] = []
    nchan = rows.get("nchan", {}).get("row") if isinstance(rows.get("nchan"), dict) else None
    ratio_cols = [k for k in RATIO_KEYS if k in scenario.columns] if nchan else []
    columns += [f"{k} vs nchan" for k in ratio_cols]
    for target, out in rows.items():
        if "error" in out or "skipped" in out:
            body.append([target, f"({out.get('error') or out.get('skipped')})"[:100]])
            continue
        for row in (out["rows"] if multi else [out["row"]]):
            cells = [target] + [fmt(row.get(col)) for col in scenario.columns]
            for key in ratio_cols:
                mine, theirs = row.get(key), nchan.get(key) if nchan else None
                cells.append(f"{mine / theirs:.2f}x" if mine is not None and theirs else "-")
            body.append(cells)
    full = [r for r in body if len(r) == len(columns)]
    widths = [max([len(columns[i])] + [len(r[i]) for r in full]) for i in range(len(columns))]
    lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(columns, widths))))
    for r in body:
        if len(r) == 2 and r[1].startswith("("):
            lines.append(f"{r[0].ljust(widths[0])}  {r[1]}")
        else:
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if any(out.get("rounds") for out in rows.values()):
        rounds = max(len(out.get("rounds", [])) for out in rows.values())
        lines.append(f"(medians of {rounds} rounds, the targets taking turns)")
        lines += round_ratios(scenario, rows)
    return "\n".join(lines)


def machine_info(skipped: dict[str, str]) -> dict[str, Any]:
    def version(cmd: list[str]) -> str | None:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (done.stdout or done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None
    return {"cpus": os.cpu_count(), "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
            "uname": " ".join(os.uname()), "python": sys.version.split()[0], "nginx": version(["nginx", "-v"]),
            "node": version(["node", "--version"]), "pinning": bool(taskset("0")),
            "server_cpu": SERVER_CPU, "loadgen_cpu": LOADGEN_CPU, "skipped_targets": skipped,
            "push_tokens": "one JWT per connection (sub=bench-<i>, HS256), verified by the server on each connect",
            "frame_bytes": 200}


def main() -> int:
    all_scenarios = scenarios()
    names = [s.name for s in all_scenarios]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma list of push,nchan,ws")
    parser.add_argument("--scenarios", default=",".join(names), help="comma list of: " + ", ".join(names))
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--json", type=Path, help="output file (default benchmarks/results/<UTC time>.json)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each one-row scenario this many times, targets taking turns; report medians")
    parser.add_argument("--time-limit", type=float, default=1800, help="stop starting new runs after this (s)")
    args = parser.parse_args()
    wanted_targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for bad in set(wanted) - set(names):
        parser.error(f"unknown scenario {bad} (choose from {', '.join(names)})")
    for bad in set(wanted_targets) - set(ALL_TARGETS):
        parser.error(f"unknown target {bad}")
    if not taskset("0"):
        print("warning: taskset not found, server and load generator are not pinned", file=sys.stderr)
    build_loadgen()
    availability = available_targets()
    skipped = {t: why for t, why in availability.items() if why and t in wanted_targets}
    for target, why in skipped.items():
        print(f"skipping {target}: {why}", file=sys.stderr)
    targets = [t for t in wanted_targets if not availability.get(t)]
    if not targets:
        print("no target available", file=sys.stderr)
        return 1
    print(f"targets: {', '.join(targets)}; server on CPU {SERVER_CPU}, load generator on CPU {LOADGEN_CPU}",
          file=sys.stderr)

    out_path = args.json or RESULTS / time.strftime("%Y%m%dT%H%M%SZ.json", time.gmtime())
    report: dict[str, Any] = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "quick": args.quick, "machine": machine_info(skipped), "scenarios": {}}
    tables = []
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with tempfile.TemporaryDirectory(prefix="push-bench-") as tmp:
        runner = Runner(args, targets, Path(tmp))
        try:
            for scenario in all_scenarios:
                if scenario.name not in wanted:
                    continue
                if not set(targets) & set(scenario.targets):
                    continue
                rows = runner.run(scenario)
                report["scenarios"][scenario.name] = {"title": scenario.title, "options": runner.options(scenario),
                                                      "targets": rows}
                text = table(scenario, rows)
                tables.append(text)
                print("\n" + text + "\n", flush=True)
        except KeyboardInterrupt:
            print("interrupted; writing what ran so far", file=sys.stderr)
            report["interrupted"] = True
        finally:
            for proc in _children:
                stop(proc, 5)
    report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print("\n\n".join(tables))
    print(f"\nJSON: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
