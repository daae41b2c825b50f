"""What one connect + JWT + join costs a push-service process, counted by callgrind or read from /proc.

Starts `python -m push_service serve` from a source tree (this one by default) and drives it with the C
load generator (benchmarks/loadgen.c; run benchmarks/run.py once to build it): N connections, distinct
JWTs, 200 in flight, each joining room:lobby:r0 and held open.

    python benchmarks/connect_cost.py cg 5000 && python benchmarks/connect_cost.py cg 10000
        callgrind: instructions from "listening" to "all joined"; the marginal cost per connect is
        (TOTAL(10000) - TOTAL(5000)) / 5000, repeatable whatever else the machine does
    python benchmarks/connect_cost.py cpu 10000
        user and system CPU µs per connection, minor faults, RSS before and after (noisy on a shared VM)

    --tree DIR   the source tree whose push_service runs (e.g. a worktree at an older commit)
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt

HERE = Path(__file__).resolve().parent
KEY = "bench-publish-key-0123456789abcdef"
SECRET = "bench-jwt-secret-0123456789abcdef0123456789"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def proc_stat(pid: int) -> tuple[int, int, int, int]:
    """utime, stime (ticks), minor faults, RSS (KiB)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return int(fields[11]), int(fields[12]), int(fields[7]), rss_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("cg", "cpu"))
    parser.add_argument("conns", type=int)
    parser.add_argument("--tree", type=Path, default=HERE.parent)
    parser.add_argument("--inflight", type=int, default=200)
    args = parser.parse_args()
    loadgen = HERE / "build" / "loadgen"
    if not loadgen.exists():
        sys.exit("build the load generator first: python benchmarks/run.py --quick --scenarios connect")
    work = Path(tempfile.mkdtemp(prefix="connect-cost-"))
    exp = int(time.time()) + 3600
    tokens = work / "tokens.txt"
    tokens.write_text("".join(jwt.encode({"sub": f"bench-{i}", "exp": exp}, SECRET, algorithm="HS256") + "\n"
                              for i in range(args.conns)))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSH_")}
    env.update(PUSH_SERVICE_KEY=KEY, PUSH_JWT_SECRET=SECRET, PUSH_LOG_LEVEL="warning", PUSH_HISTORY_SIZE="0",
               PUSH_HANDSHAKE_TIMEOUT="120", PUSH_HEARTBEAT_TIMEOUT="600", PYTHONHASHSEED="0")
    out = work / "callgrind.out"
    wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no"] if args.mode == "cg" else [
        "taskset", "-c", "0"]
    server = subprocess.Popen([*wrap, sys.executable, "-m", "push_service", "serve", "--port", str(port)],
                              cwd=args.tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.2)
    if args.mode == "cg":
        subprocess.run(["callgrind_control", "-d", "listening", str(server.pid)], capture_output=True, check=True)
    before = proc_stat(server.pid)
    client = subprocess.Popen([*([] if args.mode == "cg" else ["taskset", "-c", "1"]), str(loadgen), "--target", "push",
                               "--port", str(port), "--key", KEY, "--tokens", str(tokens), "--conns", str(args.conns),
                               "--inflight-connects", str(args.inflight), "--hold"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    print(client.stdout.readline().strip())
    after = proc_stat(server.pid)
    if args.mode == "cg":
        subprocess.run(["callgrind_control", "-d", "joined", str(server.pid)], capture_output=True, check=True)
    client.kill()
    client.wait()
    server.send_signal(signal.SIGINT)
    server.wait(timeout=120)
    if args.mode == "cg":
        dumps = sorted(work.glob("callgrind.out.*"), key=lambda path: int(path.suffix[1:]))
        text = subprocess.run(["callgrind_annotate", str(dumps[1])], capture_output=True, text=True).stdout
        found = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", text)
        print("instructions, listening to joined:", found.group(1) if found else "?")
    else:
        tick, n = os.sysconf("SC_CLK_TCK"), args.conns
        print(f"user {(after[0] - before[0]) / tick * 1e6 / n:.1f} µs/conn, system "
              f"{(after[1] - before[1]) / tick * 1e6 / n:.1f} µs/conn, minor faults {(after[2] - before[2]) / n:.2f}"
              f"/conn, RSS {before[3]} -> {after[3]} KiB ({(after[3] - before[3]) / n:.2f} KiB/conn)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
