"""Malformed and smuggling-shaped requests (RFC 9112), over raw sockets, on both HTTP front ends.

Each case is sent twice: as a connection's first request (the front door, frontdoor.py, judges it) and
as the second request of a connection whose first was a plain GET /healthz (aiohttp judges it). Every
case must get a 4xx answer (JSON where the service writes it), the connection must then close, and no
publish may come of it: each body, as any smuggled request, is a valid publish, so a parser that takes
the wrong framing publishes and the node's publish counter shows it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson
import pytest

import conftest
from conftest import PUBLISH_KEY, ServerProcess, shared_server

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT = 5.0  # well under the module server's head timeout: a case that waits for it fails
HEAD_TIMEOUT = "30"
TOPIC = "room:lobby:conformance"
BODY = orjson.dumps({"topic": TOPIC, "event": "e", "payload": {"smuggled": True}})
AUTH = f"Authorization: Bearer {PUBLISH_KEY}\r\nContent-Type: application/json\r\n".encode()
SMUGGLED = (b"POST /api/broadcast HTTP/1.1\r\nHost: x\r\n" + AUTH
            + f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY)


def publish(*headers: bytes, body: bytes = BODY, line: bytes = b"POST /api/broadcast HTTP/1.1",
            host: bytes | None = b"Host: x\r\n") -> bytes:
    return line + b"\r\n" + (host or b"") + AUTH + b"".join(headers) + b"\r\n" + body


def chunked(size: bytes, data: bytes = BODY) -> bytes:
    return size + b"\r\n" + data + b"\r\n0\r\n\r\n"


CL = f"Content-Length: {len(BODY)}\r\n".encode()
TE = b"Transfer-Encoding: chunked\r\n"


@dataclass(frozen=True)
class Case:
    name: str
    request: bytes
    statuses: tuple[int, ...] = (400,)
    # The front door answers it itself (a JSON body); False: it goes to aiohttp, whose llhttp refuses it.
    ours: bool = True


CASES = [
    Case("cl_then_te", publish(CL, TE, body=chunked(f"{len(BODY):x}".encode()) + SMUGGLED)),
    Case("te_then_cl", publish(TE, CL, body=chunked(f"{len(BODY):x}".encode()) + SMUGGLED)),
    Case("duplicate_cl", publish(CL, CL)),
    Case("conflicting_cl", publish(CL, b"Content-Length: 0\r\n", body=BODY + SMUGGLED)),
    Case("cl_with_sign", publish(f"Content-Length: +{len(BODY)}\r\n".encode())),
    Case("cl_with_inner_space", publish(f"Content-Length: {len(BODY)} 0\r\n".encode())),
    Case("cl_comma_list", publish(f"Content-Length: {len(BODY)}, {len(BODY)}\r\n".encode())),
    Case("cl_5000_digits", publish(b"Content-Length: " + b"9" * 5000 + b"\r\n")),
    Case("te_gzip", publish(b"Transfer-Encoding: gzip\r\n"), (400, 501)),
    Case("te_chunked_then_gzip", publish(b"Transfer-Encoding: chunked, gzip\r\n"), (400, 501)),
    Case("te_identity", publish(b"Transfer-Encoding: identity\r\n", CL), (400, 501)),
    Case("chunk_size_not_hex", publish(TE, body=chunked(b"zz")), ours=False),
    Case("chunk_size_negative", publish(TE, body=chunked(b"-1")), ours=False),
    Case("chunk_size_overflow", publish(TE, body=chunked(b"1" + b"0" * 16)), ours=False),
    Case("chunk_size_too_short", publish(TE, body=chunked(b"1") + SMUGGLED), ours=False),
    Case("obs_fold", publish(b"X-Note: a\r\n folded\r\n", CL)),
    Case("bare_lf", publish(CL).replace(b"\r\n", b"\n")),
    Case("bare_lf_in_one_header", publish(b"X-Note: a\n", CL)),
    Case("bare_cr", publish(b"X-Note: a\rX-Other: b\r\n", CL)),
    Case("nul_in_header", publish(b"X-Note: a\x00b\r\n", CL)),
    Case("oversized_head", publish(b"X-Pad: " + b"a" * 20000 + b"\r\n", CL), (400, 431)),
    Case("thousand_headers", publish(*[f"X-H{i}: v\r\n".encode() for i in range(1000)], CL), (400, 431)),
    Case("header_name_with_space", publish(b"X Note: a\r\n", CL)),
    Case("header_name_space_before_colon", publish(b"X-Note : a\r\n", CL)),
    Case("header_name_with_at", publish(b"X@Note: a\r\n", CL)),
    Case("missing_host", publish(CL, host=None)),
    Case("duplicate_host", publish(CL, host=b"Host: x\r\nHost: y\r\n")),
    Case("request_line_junk", publish(CL, line=b"POST /api/broadcast HTTP/1.1 junk")),
    Case("request_line_bad_method", publish(CL, line=b"P@ST /api/broadcast HTTP/1.1")),
    Case("request_line_bad_version", publish(CL, line=b"POST /api/broadcast HTTP/1.x")),
    Case("http10_chunked", publish(TE, line=b"POST /api/broadcast HTTP/1.0", body=chunked(f"{len(BODY):x}".encode()))),
]

HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


server = shared_server(PUSH_HANDSHAKE_TIMEOUT=HEAD_TIMEOUT)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    return await conftest.read_answer(reader, TIMEOUT)


async def counters(server: ServerProcess) -> tuple[float, float]:
    """(publishes accepted, error-level log lines so far)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, body = await read_answer(reader)
    finally:
        writer.close()
    assert status == 200
    published = sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                    if line.startswith("push_messages_published_total{"))
    return published, sum(1 for entry in server.log_lines if entry.get("level") in ("error", "critical"))


async def attack(server: ServerProcess, case: Case, first: bytes) -> None:
    """`first`: a request answered 200 before the case; then aiohttp judges the case, and its own
    refusals (of what its parser rejects) are text."""
    before = await counters(server)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        if first:
            writer.write(first)
            assert (await read_answer(reader))[0] == 200
        writer.write(case.request)
        try:
            status, headers, body = await read_answer(reader)
        except asyncio.IncompleteReadError as exc:
            raise AssertionError(f"closed without an answer after {exc.partial!r}") from None
        assert status in case.statuses, (status, body)
        if (case.ours and not first) or headers.get("content-type", "").startswith("application/json"):
            assert "error" in orjson.loads(body), body
        # The framing is not trusted after a refusal: the server closes, so nothing behind it is read.
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    finally:
        writer.close()
    assert await counters(server) == before, "a publish (or an error-level log line) came of it"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_front_door_refuses(server: ServerProcess, case: Case) -> None:
    await attack(server, case, b"")


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_aiohttp_path_refuses(server: ServerProcess, case: Case) -> None:
    await attack(server, case, HEALTH)


async def test_a_body_that_holds_a_request_is_a_body(server: ServerProcess) -> None:
    """A GET with a Content-Length body: the body (a whole publish) is not a second request."""
    before = await counters(server)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {len(SMUGGLED)}\r\n\r\n".encode()
                     + SMUGGLED + HEALTH)
        assert (await read_answer(reader))[0] == 200
        assert (await read_answer(reader))[0] == 200  # the pipelined GET, not the publish inside the body
    finally:
        writer.close()
    assert await counters(server) == before


async def test_pipelined_requests_are_answered_in_order_up_to_a_bad_one(server: ServerProcess) -> None:
    published, errors = await counters(server)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(SMUGGLED + SMUGGLED + publish(CL, CL) + SMUGGLED)
        assert [(await read_answer(reader))[0] for _ in range(3)] == [200, 200, 400]
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    finally:
        writer.close()
    assert await counters(server) == (published + 2, errors)


async def test_pipelined_requests_on_the_aiohttp_path_stop_at_a_bad_one(server: ServerProcess) -> None:
    """aiohttp's parser takes what arrived in one read whole or not at all: the good requests before a bad
    one in the same read may be refused with it, but none is published unanswered, none after it is read."""
    published, errors = await counters(server)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(HEALTH)
        assert (await read_answer(reader))[0] == 200
        writer.write(SMUGGLED + SMUGGLED + publish(CL, CL) + SMUGGLED)
        statuses = [(await read_answer(reader))[0]]
        while statuses[-1] == 200:
            statuses.append((await read_answer(reader))[0])
        assert statuses in ([400], [200, 200, 400]), statuses
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    finally:
        writer.close()
    assert await counters(server) == (published + len(statuses) - 1, errors)
