"""Messages/s through one Redis vs a three-master Redis Cluster (PUSH_BROKER=redis+cluster://...), on loopback.

Starts its own `redis-server` processes on free ports (one standalone; three cluster masters, no
replicas, so both sides do the same work per message), then for each runs `--processes` publisher
processes, each with the service's own broker (RedisBroker / RedisClusterBroker): it subscribes to its
share of `--topics` topics, publishes batches of `--batch` broadcasts round-robin over them with
`--inflight` batches pipelined, for at most `--seconds` or `--messages`, and counts what Redis
acknowledged and what came back through pub/sub. Prints messages/s for each and the ratio.

    python benchmarks/broker_throughput.py                      # defaults: 2 processes, 600 topics, 5 s
    python benchmarks/broker_throughput.py --history 0          # plain (S)PUBLISH, no history script

Every server is killed at the end (also on error or Ctrl-C). The figures depend on free cores: on a
machine with fewer cores than Redis processes plus publishers, the cluster's shards compete for them.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

START_TIMEOUT = 30.0


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, and below 65536."""
    while True:
        port = random.randrange(20000, 30000)
        try:
            with socket.socket() as first, socket.socket() as bus:
                first.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


def cli(*args: str, timeout: float = 5.0) -> str:
    done = subprocess.run(["redis-cli", *args], capture_output=True, timeout=timeout, check=False)
    return done.stdout.decode(errors="replace")


def wait(check, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {START_TIMEOUT}s")
        time.sleep(0.05)


def start_redis(stack: ExitStack, directory: Path, cluster: bool) -> int:
    port = free_cluster_port()
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory), "--save", "",
            "--appendonly", "no", "--logfile", str(directory / "redis.log")]
    if cluster:
        argv += ["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(lambda: (process.kill(), process.wait(5.0)))
    wait(lambda: "PONG" in cli("-p", str(port), "PING"), f"redis-server on {port}")
    return port


def worker(url: str, topics: list[str], args: argparse.Namespace, results: multiprocessing.Queue) -> None:
    results.put(asyncio.run(publish_all(url, topics, args)))


async def publish_all(url: str, topics: list[str], args: argparse.Namespace) -> dict[str, float]:
    from push_service.broker import create_broker
    from push_service.config import Settings
    from push_service.messages import Broadcast

    settings = Settings(broker=url, history_size=args.history)
    broker = create_broker(settings, uuid.uuid4().hex[:8], lambda up: None, lambda: None)
    heard = 0
    confirmed: set[str] = set()

    def deliver(broadcast: Broadcast) -> None:
        nonlocal heard
        heard += 1

    await broker.start(deliver, confirmed.add, lambda topic, data: None)
    try:
        for topic in topics:
            if broker.subscribe(topic):
                confirmed.add(topic)
        deadline = time.monotonic() + START_TIMEOUT
        while len(confirmed) < len(topics) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        payload = b'{"text":"' + b"x" * 100 + b'"}'
        published = errors = 0
        started = time.monotonic()
        stop_at = started + args.seconds
        in_flight: set[asyncio.Future[None]] = set()
        turn = 0
        while time.monotonic() < stop_at and published + errors < args.messages:
            batch = [Broadcast(topics[(turn + n) % len(topics)], "new_msg", payload, time.time())
                     for n in range(args.batch)]
            turn += args.batch
            in_flight.add(asyncio.ensure_future(broker.publish(batch)))  # type: ignore[arg-type]
            if len(in_flight) >= args.inflight:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    if future.exception() is None:
                        published += args.batch
                    else:
                        errors += args.batch
        for future in asyncio.as_completed(in_flight):
            try:
                await future
                published += args.batch
            except Exception:
                errors += args.batch
        elapsed = time.monotonic() - started
        drained = time.monotonic() + 10.0
        while heard < published and time.monotonic() < drained:
            await asyncio.sleep(0.01)
        return {"published": published, "errors": errors, "heard": heard, "seconds": elapsed}
    finally:
        await broker.close()


def measure(url: str, args: argparse.Namespace) -> dict[str, float]:
    topics = [f"room:lobby:bench-{uuid.uuid4().hex[:12]}" for _ in range(args.topics)]
    shares = [topics[n::args.processes] for n in range(args.processes)]
    results: multiprocessing.Queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=worker, args=(url, share, args, results)) for share in shares]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=args.seconds + 120) for _ in workers]
    for process in workers:
        process.join(10.0)
    published = sum(o["published"] for o in outcomes)
    return {"published": published, "errors": sum(o["errors"] for o in outcomes),
            "heard": sum(o["heard"] for o in outcomes), "seconds": max(o["seconds"] for o in outcomes),
            "messages/s": published / max(o["seconds"] for o in outcomes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--topics", type=int, default=600)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--messages", type=int, default=2_000_000, help="per process, at most")
    parser.add_argument("--history", type=int, default=100, help="PUSH_HISTORY_SIZE (0: plain publishes)")
    args = parser.parse_args()
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            raise SystemExit(f"{binary} is not installed")
    with ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="broker-bench-")))
        (base / "single").mkdir()
        single = start_redis(stack, base / "single", cluster=False)
        masters = []
        for n in range(3):
            (base / f"m{n}").mkdir()
            masters.append(start_redis(stack, base / f"m{n}", cluster=True))
        created = cli("--cluster", "create", *(f"127.0.0.1:{port}" for port in masters), "--cluster-replicas", "0",
                      "--cluster-yes", timeout=START_TIMEOUT)
        if "All 16384 slots covered" not in created:
            raise SystemExit(f"redis-cli --cluster create failed:\n{created}")
        for port in masters:
            wait(lambda: "cluster_state:ok" in cli("-p", str(port), "CLUSTER", "INFO"), f"cluster_state:ok on {port}")
        rows = {"one Redis": measure(f"redis://127.0.0.1:{single}/0", args),
                "3-shard cluster": measure("redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in masters), args)}
    print(f"{args.processes} publisher processes, {args.topics} topics, batches of {args.batch}, "
          f"{args.inflight} in flight, history {args.history}, {args.seconds:g} s each")
    print(f"{'broker':<16} {'messages/s':>12} {'published':>10} {'heard':>10} {'errors':>7}")
    for name, row in rows.items():
        print(f"{name:<16} {row['messages/s']:>12,.0f} {row['published']:>10,} {row['heard']:>10,} {row['errors']:>7,}")
    ratio = rows["3-shard cluster"]["messages/s"] / rows["one Redis"]["messages/s"]
    print(f"cluster / one Redis: {ratio:.2f}")


if __name__ == "__main__":
    main()
