"""/metrics of a fresh real server, read with prometheus_client's own text parser."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess

PROCESS_AND_PLATFORM = ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                        "python_gc_objects_collected_total", "python_gc_collections_total", "python_info")


async def scrape(server: ServerProcess) -> dict[str, list]:
    """{sample name: [samples]} and {family name: family type} of one scrape."""
    async with aiohttp.ClientSession() as http, \
            http.get(f"{server.http_url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response:
        assert response.status == 200
        text = await response.text()
    families = list(text_string_to_metric_families(text))
    samples: dict[str, list] = {}
    for family in families:
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return {"samples": samples, "families": families}


def labelled(samples: list, label: str) -> dict[str, float]:
    return {sample.labels[label]: sample.value for sample in samples}


async def test_a_fresh_server_exports_process_and_platform_metrics(server):
    scraped = await scrape(server)
    samples = scraped["samples"]
    for name in PROCESS_AND_PLATFORM:
        assert name in samples, f"{name} missing from /metrics"
    assert samples["process_resident_memory_bytes"][0].value > 1_000_000
    assert samples["process_open_fds"][0].value > 0
    assert samples["python_info"][0].labels["implementation"] == "CPython"


async def test_every_counter_family_has_samples_from_the_start(server):
    scraped = await scrape(server)
    empty = [family.name for family in scraped["families"]
             if family.name.startswith("push_") and family.type == "counter" and not family.samples]
    assert not empty, f"counter families without a sample on a fresh server: {empty}"
    samples = scraped["samples"]
    assert labelled(samples["push_connections"], "transport") == {"websocket": 0.0, "longpoll": 0.0}
    assert labelled(samples["push_recoveries_total"], "result") == {"recovered": 0.0, "not_recovered": 0.0}
    assert set(labelled(samples["push_joins_total"], "family")) == {"lobby", "topic", "community", "user"}
    assert set(labelled(samples["push_messages_published_total"], "endpoint")) >= {
        "message", "channel", "thread", "community", "user", "broadcast", "batch"}
    assert "expired" in labelled(samples["push_connects_refused_total"], "reason")
    assert "heartbeat timeout" in labelled(samples["push_disconnects_total"], "reason")
