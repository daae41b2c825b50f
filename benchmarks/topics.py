"""What 10,000 topics cost a node on a broker: join time, server RSS, Redis memory and CPU.

Starts one server with PUSH_BROKER (default: the local Redis), opens --sockets WebSockets that
each join --per-socket distinct topics (so the node subscribes --sockets x --per-socket broker
channels), then publishes one message to every topic through /api/batch and waits for all of
them. Prints the figures as JSON. Loopback only, bounded in time.

    python benchmarks/topics.py --broker redis://127.0.0.1:6379/0 --sockets 100 --per-socket 100
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from pathlib import Path

import aiohttp
import orjson

from common import KEY, cpu_seconds, start_server, stop_server, token


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def redis_figures(url: str) -> dict[str, int]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        memory = await client.info("memory")
        cpu = await client.info("cpu")
        channels = await client.execute_command("PUBSUB", "NUMPAT")  # noqa: F841 - warms the connection
        numsub = len(await client.pubsub_channels("push:t:*"))
        return {"used_memory": memory["used_memory"], "channels": numsub,
                "cpu_us": int((cpu["used_cpu_sys"] + cpu["used_cpu_user"]) * 1e6)}
    finally:
        await client.aclose()


async def run(broker: str, sockets: int, per_socket: int) -> dict[str, object]:
    prefix = uuid.uuid4().hex[:8]
    redis = broker.startswith("redis")
    before_redis = await redis_figures(broker) if redis else {}
    server, port = await start_server({"PUSH_BROKER": broker})
    try:
        rss_before = rss_bytes(server.pid)
        cpu_before = cpu_seconds(server.pid)
        started = time.perf_counter()
        topics = [[f"room:lobby:{prefix}-{s}-{t}" for t in range(per_socket)] for s in range(sockets)]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            connections = []
            for socket_topics in topics:
                ws = await http.ws_connect(f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0&token={token()}")
                connections.append(ws)
                for n, topic in enumerate(socket_topics):
                    await ws.send_str(orjson.dumps([str(n), str(n), topic, "phx_join", {}]).decode())

            async def joined(ws: aiohttp.ClientWebSocketResponse) -> None:
                for _ in range(per_socket):
                    reply = await ws.receive_json(timeout=60)
                    assert reply[4]["status"] == "ok", reply

            await asyncio.wait_for(asyncio.gather(*(joined(ws) for ws in connections)), 120)
            join_seconds = time.perf_counter() - started
            join_cpu = cpu_seconds(server.pid) - cpu_before
            rss_after = rss_bytes(server.pid)
            after_redis = await redis_figures(broker) if redis else {}

            started = time.perf_counter()
            items = [{"topic": topic, "event": "new_msg", "payload": {"n": 1}}
                     for socket_topics in topics for topic in socket_topics]
            for first in range(0, len(items), 1000):
                async with http.post(f"http://127.0.0.1:{port}/api/batch", json={"messages": items[first:first + 1000]},
                                     headers={"Authorization": f"Bearer {KEY}"}) as response:
                    assert response.status == 200, await response.text()

            async def received(ws: aiohttp.ClientWebSocketResponse) -> None:
                for _ in range(per_socket):
                    await ws.receive_json(timeout=60)

            await asyncio.wait_for(asyncio.gather(*(received(ws) for ws in connections)), 120)
            publish_seconds = time.perf_counter() - started
            for ws in connections:
                await ws.close()
        count = sockets * per_socket
        result: dict[str, object] = {
            "broker": broker, "topics": count,
            "join_seconds": round(join_seconds, 2), "joins_per_second": round(count / join_seconds),
            "server_cpu_us_per_join": round(join_cpu * 1e6 / count, 1),
            "server_rss_delta_bytes_per_topic": round((rss_after - rss_before) / count),
            "publish_all_seconds": round(publish_seconds, 2),
            "messages_per_second": round(count / publish_seconds),
        }
        if redis:
            result["redis_channels_of_ours"] = after_redis["channels"] - before_redis["channels"]
            result["redis_memory_delta_bytes_per_topic"] = round(
                (after_redis["used_memory"] - before_redis["used_memory"]) / count)
            result["redis_cpu_us_per_join"] = round((after_redis["cpu_us"] - before_redis["cpu_us"]) / count, 1)
        return result
    finally:
        await stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--sockets", type=int, default=100)
    parser.add_argument("--per-socket", type=int, default=100)
    args = parser.parse_args()
    result = asyncio.run(run(args.broker, args.sockets, args.per_socket))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
