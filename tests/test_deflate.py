"""permessage-deflate (RFC 7692) on a real server process: what is negotiated for which offer, that big
messages arrive compressed (RSV1) and small ones plain, that clients which offer nothing get plain
frames of the same broadcasts, and that compressed client messages are read within the size limit.

The raw cases read the server's frames byte for byte; the library cases use `websockets`, a client we
did not write, to check that what we compress is what it inflates."""

from __future__ import annotations

import asyncio
import gzip
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from conftest import make_token, read_answer, shared_server
from http_helpers import publish
from nodejs import JS_DIR, run_script
from test_console_browser import CHROMIUM, require_tools
from ws_client import CLOSE, PING, TEXT, Client, heartbeat, heartbeat_reply, raw_frame, upgrade_head

TIMEOUT = 5.0
MAX_FRAME_BYTES = 16 * 1024
BROWSER_TIMEOUT = 60.0  # Chromium's start, on a busy machine
TAIL = b"\x00\x00\xff\xff"
BIG = {"body": "a chat message that says the same thing over and over. " * 40}  # ~2 KB of JSON
SMALL = {"body": "hi"}

server = shared_server(PUSH_MAX_FRAME_BYTES=str(MAX_FRAME_BYTES))
pytestmark = pytest.mark.asyncio(loop_scope="module")


class Raw:
    """One upgraded connection spoken to byte for byte: the server's frames as (first byte, payload)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
        self.reader, self.writer, self.headers = reader, writer, headers

    @classmethod
    async def connect(cls, port: int, offer: str | None, token: str | None = None) -> Raw:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
        head = upgrade_head(token or make_token())
        if offer is not None:
            head = head[:-2] + f"Sec-WebSocket-Extensions: {offer}\r\n\r\n".encode()
        writer.write(head)
        status, headers, _ = await read_answer(reader, TIMEOUT)
        assert status == 101, (status, headers)
        return cls(reader, writer, headers)

    @property
    def extensions(self) -> str | None:
        return self.headers.get("sec-websocket-extensions")

    async def frame(self) -> tuple[int, bytes]:
        first, second = await asyncio.wait_for(self.reader.readexactly(2), TIMEOUT)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return first, await asyncio.wait_for(self.reader.readexactly(size), TIMEOUT)

    async def message(self, window_bits: int = 15) -> tuple[bool, object]:
        """The next frame as (compressed, JSON)."""
        first, payload = await self.frame()
        assert first & 0x80 and first & 0x0F == TEXT and not first & 0x30, hex(first)
        if first & 0x40:
            payload = zlib.decompressobj(-window_bits).decompress(payload + TAIL)
        return bool(first & 0x40), orjson.loads(payload)

    async def join(self, topic: str) -> None:
        self.writer.write(raw_frame(TEXT, orjson.dumps(["1", "1", topic, "phx_join", {}])))
        assert (await self.message())[1] == ["1", "1", topic, "phx_reply", {"status": "ok", "response": {}}]

    async def closed_with(self) -> int:
        first, payload = await self.frame()
        assert first & 0x0F == CLOSE, hex(first)
        return struct.unpack("!H", payload[:2])[0]

    def close(self) -> None:
        self.writer.close()


def deflate(data: bytes, window_bits: int = 15) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -window_bits)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# --- negotiation


@pytest.mark.parametrize(("offer", "answer"), [
    ("permessage-deflate", "permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
    ("permessage-deflate; client_max_window_bits",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
    ("permessage-deflate; server_max_window_bits=10; client_no_context_takeover",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10"),
    ('permessage-deflate; server_max_window_bits="12"',
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12"),
    # The first offer cannot be honoured (zlib has no 8-bit raw window), the second can.
    ("permessage-deflate; server_max_window_bits=8, permessage-deflate",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
    ("x-webkit-deflate-frame, permessage-deflate; server_no_context_takeover",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
])
async def test_an_acceptable_offer_is_answered_without_context_takeover(server, offer: str, answer: str) -> None:
    raw = await Raw.connect(server.port, offer)
    try:
        assert raw.extensions == answer
    finally:
        raw.close()


@pytest.mark.parametrize("offer", [
    None,
    "x-webkit-deflate-frame",
    "permessage-deflate; server_max_window_bits=8",
    "permessage-deflate; server_max_window_bits=16",
    "permessage-deflate; server_max_window_bits",
    "permessage-deflate; server_max_window_bits=010",
    "permessage-deflate; client_max_window_bits=7",
    "permessage-deflate; server_no_context_takeover=1",
    "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
    "permessage-deflate; unknown_parameter",
])
async def test_no_acceptable_offer_means_plain_frames(server, http, offer: str | None) -> None:
    raw = await Raw.connect(server.port, offer)
    try:
        assert raw.extensions is None
        await raw.join("room:lobby:plain")
        await publish(http, server, "room:lobby:plain", BIG)
        compressed, message = await raw.message()
        assert not compressed and message[2:] == ["room:lobby:plain", "new_msg", BIG]
    finally:
        raw.close()


# --- what goes out


async def test_a_broadcast_is_compressed_for_those_who_offered_and_plain_for_the_rest(server, http) -> None:
    topic = "room:lobby:mixed"
    deflating = await Raw.connect(server.port, "permessage-deflate")
    limited = await Raw.connect(server.port, "permessage-deflate; server_max_window_bits=9")
    plain = await Raw.connect(server.port, None)
    try:
        for raw in (deflating, limited, plain):
            await raw.join(topic)
        await publish(http, server, topic, BIG)
        first, payload = await deflating.frame()
        assert first == 0xC1 and len(payload) * 3 < len(orjson.dumps(BIG)), (hex(first), len(payload))
        assert orjson.loads(zlib.decompressobj(-15).decompress(payload + TAIL))[2:] == [topic, "new_msg", BIG]
        # A 9-bit window: what the client can inflate with no more than 512 bytes of history.
        assert (await limited.message(window_bits=9))[1][2:] == [topic, "new_msg", BIG]
        compressed, message = await plain.message()
        assert not compressed and message[2:] == [topic, "new_msg", BIG]
        # Below PUSH_COMPRESSION_MIN_BYTES, a frame goes as it is, RSV1 clear.
        await publish(http, server, topic, SMALL)
        assert (await deflating.message())[0] is False
    finally:
        for raw in (deflating, limited, plain):
            raw.close()


async def test_the_websockets_library_inflates_what_we_send_and_we_what_it_sends(server, http) -> None:
    offer = ClientPerMessageDeflateFactory(compress_settings={"memLevel": 5})
    client = await Client.connect(server.port, make_token(), extensions=[offer])
    try:
        assert client.response.headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
        # websockets compresses every data frame it sends, a heartbeat included.
        await client.heartbeat_round_trip("7")
        await client.send_text(orjson.dumps(["1", "1", "room:lobby:lib", "phx_join", {"pad": "p" * 3000}]))
        assert (await client.next_json())[3] == "phx_reply"
        await publish(http, server, "room:lobby:lib", BIG)
        assert (await client.next_json())[2:] == ["room:lobby:lib", "new_msg", BIG]
    finally:
        client.sock.close()


# --- what comes in


async def test_a_compressed_client_message_is_read(server) -> None:
    raw = await Raw.connect(server.port, "permessage-deflate")
    try:
        raw.writer.write(raw_frame(TEXT, deflate(heartbeat("c1")), rsv=4))
        # Fragmented: RSV1 on the first frame only.
        body = deflate(heartbeat("c2", size=600))
        raw.writer.write(raw_frame(TEXT, body[:10], fin=False, rsv=4) + raw_frame(0, body[10:]))
        assert (await raw.message())[1] == heartbeat_reply("c1")
        assert (await raw.message())[1] == heartbeat_reply("c2")
    finally:
        raw.close()


@pytest.mark.parametrize(("offer", "frames", "code"), [
    (None, [raw_frame(TEXT, deflate(heartbeat()), rsv=4)], 1002),                      # RSV1 without the extension
    ("permessage-deflate", [raw_frame(PING, b"", rsv=4)], 1002),                      # RSV1 on a control frame
    ("permessage-deflate", [raw_frame(TEXT, b"[", fin=False), raw_frame(0, b"]", rsv=4)], 1002),  # on a continuation
    ("permessage-deflate", [raw_frame(TEXT, heartbeat(), rsv=2)], 1002),              # RSV2 is no extension's
    ("permessage-deflate", [raw_frame(TEXT, b"\xff\xff\xff not deflate", rsv=4)], 1002),
    # A bomb: 5 KiB of compressed spaces that would inflate to 5 MiB; the reader stops past 16 KiB.
    ("permessage-deflate", [raw_frame(TEXT, deflate(b" " * (5 * 1024 * 1024)), rsv=4)], 1009),
])
async def test_a_bad_compressed_frame_closes_the_socket(server, offer: str | None, frames: list[bytes],
                                                       code: int) -> None:
    raw = await Raw.connect(server.port, offer)
    try:
        raw.writer.write(b"".join(frames))
        assert await raw.closed_with() == code
    finally:
        raw.close()


async def test_compression_off_negotiates_nothing(module_servers) -> None:
    [off] = await module_servers(1, PUSH_COMPRESSION="off")
    raw = await Raw.connect(off.port, "permessage-deflate")
    try:
        assert raw.extensions is None
        raw.writer.write(raw_frame(TEXT, deflate(heartbeat()), rsv=4))
        assert await raw.closed_with() == 1002
    finally:
        raw.close()



# --- clients we did not write


@pytest.mark.parametrize("plain", [False, True], ids=["deflate", "plain"])
async def test_node_ws_negotiates_it_and_reads_what_it_is_sent(server, http, plain: bool) -> None:
    topic = f"room:lobby:node-{plain}"
    url = f"ws://127.0.0.1:{server.port}/socket/websocket?vsn=2.0.0&token={make_token()}"
    async with run_script(JS_DIR / "deflate.mjs", url, topic, *(["--plain"] if plain else [])) as client:
        opened = await client.wait_event("open")
        assert opened["extensions"] == ("" if plain else
                                        "permessage-deflate; server_no_context_takeover; client_no_context_takeover")
        # ws compressed its 2 KB join: the reply says the server read it.
        reply = await client.wait_event("frame")
        assert reply["data"] == ["1", "1", topic, "phx_reply", {"status": "ok", "response": {}}]
        await publish(http, server, topic, BIG)
        assert (await client.wait_event("frame"))["data"][2:] == [topic, "new_msg", BIG]


@pytest.mark.slow  # headless Chromium
async def test_phoenix_js_in_chromium_negotiates_it_and_reads_a_broadcast(server, http) -> None:
    require_tools()
    topic = "room:lobby:chromium"
    async with run_script(JS_DIR / "deflate_browser.mjs", "--socket", f"ws://127.0.0.1:{server.port}/socket",
                          "--token", make_token("browser"), "--topic", topic, "--chromium", str(CHROMIUM)) as page:
        joined = await page.wait_for(lambda line: line["step"] in ("joined", "failed"), BROWSER_TIMEOUT)
        assert joined["step"] == "joined", joined
        assert joined["extensions"].startswith("permessage-deflate; server_no_context_takeover"), joined
        await publish(http, server, topic, BIG)
        message = await page.wait_for(lambda line: line["step"] in ("message", "failed"), BROWSER_TIMEOUT)
        assert message == {"step": "message", "payload": BIG}


# --- long-poll


async def poll_until_messages(server, session: str, jwt: str, accept_encoding: str) -> tuple[Any, dict]:
    """The first long-poll answer with messages in it: its headers (the body as sent) and its JSON."""
    params = [("token", jwt), ("vsn", "2.0.0"), ("token", session)]
    async with aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=30)) as raw:
        for _ in range(5):
            async with raw.get(f"{server.http_url}/socket/longpoll", params=params,
                               headers={"Accept-Encoding": accept_encoding}) as answer:
                body = await answer.read()
                if answer.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if orjson.loads(body)["status"] == 200:
                    return answer.headers, orjson.loads(body)
    raise AssertionError("no messages in five polls")


@pytest.mark.parametrize(("accept_encoding", "gzipped"), [
    ("gzip, deflate", True), ("br;q=1, *;q=0.5", True), ("identity", False), ("gzip;q=0, *", False),
])
async def test_a_long_poll_answer_is_gzipped_when_accepted(module_servers, http, accept_encoding: str,
                                                           gzipped: bool) -> None:
    [lp] = await module_servers(1, PUSH_LONGPOLL_WINDOW="2s")
    jwt, topic = make_token(), f"room:lobby:lp-{gzipped}"
    url = f"{lp.http_url}/socket/longpoll"
    async with http.get(url, params={"token": jwt, "vsn": "2.0.0"}) as answer:
        session = (await answer.json())["token"]
    params = [("token", jwt), ("vsn", "2.0.0"), ("token", session)]
    async with http.post(url, params=params, data=orjson.dumps(["1", "1", topic, "phx_join", {}])) as answer:
        assert answer.status == 200
    await poll_until_messages(lp, session, jwt, accept_encoding)  # the join's reply: smaller than 256 bytes
    await publish(http, lp, topic, BIG)
    headers, body = await poll_until_messages(lp, session, jwt, accept_encoding)
    assert (headers.get("Content-Encoding") == "gzip") is gzipped
    assert "Accept-Encoding" in headers["Vary"]
    if gzipped:
        assert int(headers["Content-Length"]) * 3 < len(orjson.dumps(BIG))
    assert orjson.loads(body["messages"][0])[2:] == [topic, "new_msg", BIG]
