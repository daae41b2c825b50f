"""openapi.yaml and the server agree: where they disagreed (issue 14), and a bounded schemathesis run
against a real server process."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiohttp
import pytest
import yaml
from openapi_schema_validator import OAS31Validator
from conftest import ADMIN_KEY, PUBLISH_KEY, ROOT, ServerProcess

SPEC_PATH = ROOT / "openapi.yaml"
SPEC = yaml.safe_load(SPEC_PATH.read_text())
AUTH = {"Authorization": f"Bearer {PUBLISH_KEY}"}
TIMEOUT = aiohttp.ClientTimeout(total=5)


def spec_accepts(schema: dict[str, Any], value: Any) -> bool:
    """Whether `value` is valid for `schema`, whose refs point into openapi.yaml."""
    return OAS31Validator({**schema, "components": SPEC["components"]}).is_valid(value)


def component(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def parameter_schema(path: str, name: str) -> dict[str, Any]:
    for parameter in SPEC["paths"][path]["get"]["parameters"]:
        if "$ref" in parameter:
            parameter = SPEC["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[1]]
        if parameter["name"] == name:
            return parameter["schema"]
    raise AssertionError(f"{path} has no parameter {name}")


async def post(server: ServerProcess, path: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, \
            http.post(f"{server.http_url}{path}", json=body, headers=AUTH, timeout=TIMEOUT) as response:
        return response.status, await response.json()


async def test_a_body_token_that_is_not_a_string_is_refused_even_with_the_header(server):
    for path, body in [("/api/channel", {"channel_id": 42, "token": 7}),
                       ("/api/channel", {"channel_id": 42, "token": None}),
                       ("/api/broadcast", {"topic": "user:u1", "event": "e", "token": ["k"]})]:
        assert not spec_accepts(component("ChannelBody" if path == "/api/channel" else "BroadcastBody"), body)
        status, answer = await post(server, path, body)
        assert (status, answer) == (400, {"error": "field 'token' must be a string (the publish key)"}), path


async def test_integer_ids_beyond_64_bits_are_refused_by_spec_and_server_alike(server):
    largest, too_large, too_small = 2**64 - 1, 2**64, -(2**63) - 1
    assert spec_accepts(component("UserBody"), {"user_id": largest})
    assert await post(server, "/api/user", {"user_id": largest}) == (
        200, {"status": 200, "published": 1, "delivered": 0})
    for value in (too_large, too_small, 10**30):
        assert not spec_accepts(component("UserBody"), {"user_id": value})
        status, answer = await post(server, "/api/user", {"user_id": value})
        assert status == 400
        assert "64 bits" in answer["error"] and "as a string" in answer["error"], answer


async def test_api_message_routes_by_channel_id_in_the_spec_as_on_the_server(server):
    body = {"thread_id": 42, "message": "hi"}
    assert not spec_accepts(component("LinenMessage"), body)
    status, answer = await post(server, "/api/message", body)
    assert status == 400 and "channel_id" in answer["error"]
    assert spec_accepts(component("LinenMessage"), {"channel_id": 42, "thread_id": 42})


def test_topic_path_parameters_are_topics():
    history = parameter_schema("/api/history/{topic}", "topic")
    presence = parameter_schema("/api/presence/{topic}", "topic")
    for schema in (history, presence):
        for name in ("0", "room:", "user:", "room:lobby:", "x" * 10):
            assert not spec_accepts(schema, name), name
        assert spec_accepts(schema, "room:topic:7") and spec_accepts(schema, "room:acme")
    assert spec_accepts(history, "room:lobby:42") and spec_accepts(history, "user:u1")
    # Presence is tracked on thread and community topics unless PUSH_PRESENCE_TOPICS says otherwise.
    assert not spec_accepts(presence, "room:lobby:42") and not spec_accepts(presence, "user:u1")


def test_broadcasts_are_documented_with_their_history_position():
    """With history on (PUSH_HISTORY_SIZE > 0) a broadcast's ref is its position, not null."""
    for text in (SPEC["info"]["description"], SPEC["paths"]["/socket/websocket"]["get"]["description"]):
        assert "PUSH_HISTORY_SIZE" in text and "<epoch>~<seq>" in text, text[:600]


# --- schemathesis against a real server

CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"
# The WebSocket upgrade is not HTTP request/response, and the console's watch streams until the client leaves.
NOT_FUZZED = r"^/socket/websocket$|^/api/console/watch$"
MAX_EXAMPLES = 40  # per operation and phase
SEED = "20261206"  # fixed: a failure found here is found again by the same run
RUN_BOUND = 100.0  # seconds, for one run
RUNS = {
    # Every answer of every operation is a documented status with a body of the documented schema.
    "answers": ["--checks", CHECKS, "--exclude-path-regex", NOT_FUZZED],
    # And the HTTP API refuses what the spec calls invalid. (The long-poll transport answers a refusal
    # in-band, HTTP 200 with {"status": 403}, as phoenix.js expects: not checked that way.)
    "refusals": ["--checks", CHECKS + ",negative_data_rejection", "--include-path-regex", r"^/api/",
                 "--exclude-path-regex", NOT_FUZZED],
}


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
async def test_schemathesis_finds_no_server_error_and_nothing_outside_the_spec(run, start_server, tmp_path):
    server = await start_server(PUSH_HISTORY_SIZE="100")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "run", str(SPEC_PATH), "--url", server.http_url,
        # The admin key publishes too, so every operation is fuzzed past its key check.
        "--header", f"Authorization: Bearer {ADMIN_KEY}", *RUNS[run],
        "--max-examples", str(MAX_EXAMPLES), "--seed", SEED, "--workers", "1",
        "--phases", "examples,coverage,fuzzing", "--request-timeout", "5", "--generation-database", "none",
        "--no-color", "--continue-on-failure", "--output-truncate", "false",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), RUN_BOUND)
    except (TimeoutError, asyncio.TimeoutError):
        process.kill()
        await process.wait()
        raise AssertionError(f"schemathesis did not finish within {RUN_BOUND}s") from None
    report = output.decode(errors="replace")
    assert process.returncode == 0, report[-12000:]
    summary = report[report.rindex("Test cases:"):]
    assert " passed" in summary and "failure" not in summary and "error" not in summary, summary
    tested = int(report.split("Tested: ", 1)[1].split()[0])
    assert tested >= (22 if run == "answers" else 13), report[-3000:]
    assert not [line for line in server.log_lines if line.get("event") == "http_error"], "unhandled server errors"
