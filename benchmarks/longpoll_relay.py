"""What relaying a long-poll request to the node that holds its session costs (docs/scaling.md).

Starts two servers on one broker, opens a long-poll session on the first, then sends --requests
sequential pairs of requests, first to the holder (local), then to the other node (relayed over the
broker): a POST carrying a heartbeat, and a poll that finds its reply waiting. Prints the median and
p99 latency of each, per broker, as JSON. Loopback only, bounded in time.

    python benchmarks/longpoll_relay.py --broker redis://127.0.0.1:6379/0 --broker nats://127.0.0.1:4222
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
import orjson

from common import start_server, stop_server, token

READY_WAIT = 10.0  # seconds for the nodes to hear each other's heartbeats


def figures(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 2)}


async def run(broker: str, requests: int) -> dict[str, object]:
    env = {"PUSH_BROKER": broker, "PUSH_LONGPOLL_WINDOW": "5", "PUSH_NODE_TIMEOUT": "3"}
    servers = await asyncio.gather(start_server(env), start_server(env))
    try:
        urls = [f"http://127.0.0.1:{port}/socket/longpoll" for _, port in servers]
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            jwt = token()
            async with http.get(urls[0], params=[("token", jwt), ("vsn", "2.0.0")]) as response:
                session = orjson.loads(await response.read())["token"]
            params = [("token", jwt), ("vsn", "2.0.0"), ("token", session)]

            async def exchange(url: str, ref: int) -> tuple[float, float, int]:
                frame = orjson.dumps([None, str(ref), "phoenix", "heartbeat", {}])
                began = time.perf_counter()
                async with http.post(url, params=params, data=frame) as response:
                    status = orjson.loads(await response.read())["status"]
                posted = time.perf_counter()
                if status == 200:
                    async with http.get(url, params=params) as response:
                        assert orjson.loads(await response.read())["status"] == 200
                return posted - began, time.perf_counter() - posted, status

            deadline = time.monotonic() + READY_WAIT
            while (await exchange(urls[1], 0))[2] != 200:  # 410 until the holder is heard as live
                assert time.monotonic() < deadline, "the nodes did not hear each other"
                await asyncio.sleep(0.2)
            result: dict[str, object] = {"broker": broker.split(":")[0], "requests": requests}
            for name, url in (("local", urls[0]), ("relayed", urls[1])):
                posts, polls = [], []
                for ref in range(requests):
                    post, poll, _ = await exchange(url, ref)
                    posts.append(post)
                    polls.append(poll)
                result[name] = {"post": figures(posts), "poll": figures(polls)}
            return result
    finally:
        for server, _ in servers:
            await stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", action="append", help="repeatable (default: the local Redis)")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    for broker in args.broker or ["redis://127.0.0.1:6379/0"]:
        print(orjson.dumps(asyncio.run(run(broker, args.requests))).decode())


if __name__ == "__main__":
    main()
