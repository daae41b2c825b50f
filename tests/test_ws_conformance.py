"""RFC 6455 conformance of the WebSocket transport: the Autobahn|Testsuite case groups that apply to a
server without compression (1 framing, 2 ping/pong, 3 reserved bits, 4 opcodes, 5 fragmentation,
6 UTF-8, 7 close handling, 9 limits), against one real server process.

The client is websockets' sans-I/O ClientProtocol (it frames what we send and checks everything the
server sends), plus raw frames for what it refuses to send. The server is a Phoenix server, not an
echo server: a "message" is a heartbeat, padded with JSON whitespace to the size under test, and its
reply proves the message arrived whole; junk must end in the documented close code.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from websockets.frames import Opcode

from conftest import ServerProcess, make_token, shared_server
from ws_client import (
    BINARY, CLOSE, CONT, PING, PONG, TEXT, Client, binary_heartbeat, close_payload, heartbeat, heartbeat_reply,
    raw_frame,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX = 64 * 1024  # the server's PUSH_MAX_FRAME_BYTES (the default)
MAX_FRAGMENTS = 1024  # documented in push_service/transports/frames.py
SMALLEST = len(heartbeat())


server = shared_server()


@pytest_asyncio.fixture(loop_scope="module")
async def client(server: ServerProcess) -> AsyncIterator[Client]:
    connected = await Client.connect(server.port, make_token())
    yield connected
    connected.close()


def encoded(client: Client, method: str, *args: object) -> bytes:
    """The bytes the client library produces for one of its send_* calls, for the test to split."""
    getattr(client.protocol, method)(*args)
    return b"".join(client.protocol.data_to_send())


async def send_chopped(client: Client, data: bytes, chunk: int) -> None:
    for start in range(0, len(data), chunk):
        await client.send_raw(data[start:start + chunk])


async def expect_reply(client: Client, ref: str = "1") -> None:
    assert await client.next_json() == heartbeat_reply(ref)


async def expect_alive(client: Client) -> None:
    """The server still serves this socket, and had nothing else queued for it."""
    await client.heartbeat_round_trip("alive")


async def expect_close(client: Client, code: int) -> None:
    assert (await client.closed_with())[0] == code


# --- 1 framing: text and binary messages of every size class, however the bytes are split


TEXT_SIZES = [SMALLEST, 125, 126, 127, 128, 65535, MAX]


@pytest.mark.parametrize("size", TEXT_SIZES)
async def test_1_text_message(client: Client, size: int) -> None:
    await client.send_text(heartbeat("1", size))
    await expect_reply(client)
    await expect_alive(client)


@pytest.mark.parametrize("size", [22, 125, 126, 127, 128, 65535, MAX])
async def test_1_binary_message(client: Client, size: int) -> None:
    await client.send_binary(binary_heartbeat(b"1", size))
    await expect_reply(client)
    await expect_alive(client)


@pytest.mark.parametrize("method", ["send_text", "send_binary"])
async def test_1_empty_message_is_not_a_phoenix_message(client: Client, method: str) -> None:
    await getattr(client, method)(b"")
    assert await client.closed_with() == (1007, "invalid message")


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 13, 64, 125, 126, 1000, 4096])
async def test_1_any_split_of_the_bytes(client: Client, chunk: int) -> None:
    size = 300 if chunk < 64 else 70_000 - 5_000
    data = encoded(client, "send_text", heartbeat("1", size)) + encoded(client, "send_binary",
                                                                          binary_heartbeat(b"2", 200))
    await send_chopped(client, data, chunk)
    await expect_reply(client, "1")
    await expect_reply(client, "2")
    await expect_alive(client)


async def test_1_many_messages_in_one_write(client: Client) -> None:
    data = b"".join(encoded(client, "send_text", heartbeat(str(ref))) for ref in range(200))
    await client.send_raw(data)
    for ref in range(200):
        await expect_reply(client, str(ref))


# --- 2 ping and pong


@pytest.mark.parametrize("payload", [b"", b"Hello, world!", bytes(range(125)), b"\xff\xfe\x00" * 41],
                         ids=["empty", "text", "125-bytes", "binary"])
async def test_2_ping_is_answered_with_its_payload(client: Client, payload: bytes) -> None:
    await client.send_raw(raw_frame(PING, payload))
    frame = await client.next_frame()
    assert (frame.opcode, frame.data) == (Opcode.PONG, payload)
    await expect_alive(client)


async def test_2_ping_written_a_byte_at_a_time(client: Client) -> None:
    await send_chopped(client, raw_frame(PING, b"x" * 125), 1)
    frame = await client.next_frame()
    assert (frame.opcode, frame.data) == (Opcode.PONG, b"x" * 125)


async def test_2_ping_over_125_bytes_is_refused(client: Client) -> None:
    await client.send_raw(raw_frame(PING, b"x" * 126))
    await expect_close(client, 1002)


@pytest.mark.parametrize("payload", [b"", b"unsolicited"])
async def test_2_unsolicited_pong_is_ignored(client: Client, payload: bytes) -> None:
    await client.send_raw(raw_frame(PONG, payload))
    await expect_alive(client)


async def test_2_pong_then_ping_answers_the_ping_only(client: Client) -> None:
    await client.send_raw(raw_frame(PONG, b"p") + raw_frame(PING, b"q"))
    frame = await client.next_frame()
    assert (frame.opcode, frame.data) == (Opcode.PONG, b"q")
    await expect_alive(client)


@pytest.mark.parametrize("chunk", [None, 1])
async def test_2_ten_pings_get_ten_pongs_in_order(client: Client, chunk: int | None) -> None:
    data = b"".join(raw_frame(PING, f"ping {index}".encode()) for index in range(10))
    await (client.send_raw(data) if chunk is None else send_chopped(client, data, chunk))
    for index in range(10):
        frame = await client.next_frame()
        assert (frame.opcode, frame.data) == (Opcode.PONG, f"ping {index}".encode())
    await expect_alive(client)


# --- 3 reserved bits: no extension is negotiated, so any RSV bit fails the connection


@pytest.mark.parametrize("rsv", range(1, 8))
@pytest.mark.parametrize("opcode", [TEXT, BINARY, PING])
async def test_3_reserved_bits_are_refused(client: Client, rsv: int, opcode: int) -> None:
    payload = heartbeat() if opcode == TEXT else binary_heartbeat() if opcode == BINARY else b"p"
    await client.send_raw(raw_frame(opcode, payload, rsv=rsv))
    await expect_close(client, 1002)


async def test_3_frames_before_the_bad_one_are_served_and_none_after(client: Client) -> None:
    await client.send_raw(raw_frame(TEXT, heartbeat("1")) + raw_frame(TEXT, heartbeat("2"), rsv=2)
                          + raw_frame(PING, b"never answered"))
    await expect_reply(client, "1")
    await expect_close(client, 1002)


# --- 4 opcodes: reserved data (3-7) and control (0xB-0xF) opcodes fail the connection


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
@pytest.mark.parametrize("payload", [b"", b"reserved"], ids=["empty", "payload"])
async def test_4_reserved_opcodes_are_refused(client: Client, opcode: int, payload: bytes) -> None:
    await client.send_raw(raw_frame(opcode, payload))
    await expect_close(client, 1002)


@pytest.mark.parametrize("opcode", [5, 0xD])
async def test_4_a_reserved_opcode_after_a_message_and_before_a_ping(client: Client, opcode: int) -> None:
    await client.send_raw(raw_frame(TEXT, heartbeat("1")) + raw_frame(opcode, b"x") + raw_frame(PING, b"no"))
    await expect_reply(client, "1")
    await expect_close(client, 1002)


# --- 5 fragmentation


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
async def test_5_fragmented_control_frames_are_refused(client: Client, opcode: int) -> None:
    await client.send_raw(raw_frame(opcode, b"frag", fin=False) + raw_frame(CONT, b"ment"))
    await expect_close(client, 1002)


@pytest.mark.parametrize("pieces", [2, 3, 10, 200])
@pytest.mark.parametrize("separate_writes", [False, True])
async def test_5_fragmented_text_message(client: Client, pieces: int, separate_writes: bool) -> None:
    text = heartbeat("1", 1000)
    cuts = [len(text) * index // pieces for index in range(pieces + 1)]
    frames = [encoded(client, "send_text" if index == 0 else "send_continuation", text[cuts[index]:cuts[index + 1]],
                      index == pieces - 1) for index in range(pieces)]
    if separate_writes:
        for frame in frames:
            await client.send_raw(frame)
    else:
        await client.send_raw(b"".join(frames))
    await expect_reply(client)
    await expect_alive(client)


async def test_5_fragmented_binary_message_with_empty_fragments(client: Client) -> None:
    data = binary_heartbeat(b"1", 500)
    await client.send_raw(raw_frame(BINARY, b"", fin=False) + raw_frame(CONT, data[:100], fin=False)
                          + raw_frame(CONT, b"", fin=False) + raw_frame(CONT, data[100:], fin=False)
                          + raw_frame(CONT, b""))
    await expect_reply(client)


@pytest.mark.parametrize("chunk", [None, 1])
async def test_5_pings_between_fragments_are_answered_first(client: Client, chunk: int | None) -> None:
    text = heartbeat("1", 100)
    data = b"".join([raw_frame(TEXT, text[:10], fin=False), raw_frame(PING, b"a"), raw_frame(CONT, text[10:50], fin=False),
                     raw_frame(PONG, b"ignored"), raw_frame(PING, b"b"), raw_frame(CONT, text[50:])])
    await (client.send_raw(data) if chunk is None else send_chopped(client, data, chunk))
    for payload in (b"a", b"b"):
        frame = await client.next_frame()
        assert (frame.opcode, frame.data) == (Opcode.PONG, payload)
    await expect_reply(client)


@pytest.mark.parametrize("fin", [True, False])
@pytest.mark.parametrize("separate_writes", [False, True])
async def test_5_continuation_without_a_message_is_refused(client: Client, fin: bool, separate_writes: bool) -> None:
    frames = [raw_frame(CONT, b"fragment", fin=fin), raw_frame(TEXT, heartbeat("1"))]
    if separate_writes:
        for frame in frames:
            await client.send_raw(frame)
    else:
        await client.send_raw(b"".join(frames))
    await expect_close(client, 1002)


async def test_5_continuation_after_a_finished_message_is_refused(client: Client) -> None:
    await client.send_raw(raw_frame(TEXT, heartbeat("1")) + raw_frame(CONT, b"more"))
    await expect_reply(client, "1")
    await expect_close(client, 1002)


@pytest.mark.parametrize("opcode, fin", [(TEXT, True), (TEXT, False), (BINARY, True), (BINARY, False)])
async def test_5_a_new_message_inside_a_fragmented_one_is_refused(client: Client, opcode: int, fin: bool) -> None:
    await client.send_raw(raw_frame(TEXT, b"[null,", fin=False) + raw_frame(opcode, b"x", fin=fin))
    await expect_close(client, 1002)


# --- 6 UTF-8 in text frames (fail-fast is optional: the whole message is checked at its end)

VALID_UTF8 = ["", "Hello-\u00b5@\u00df\u00f6\u00e4\u00fc\u00e0\u00e1-UTF-8!!", "\u03ba\u1f79\u03c3\u03bc\u03b5",
              "\u0080", "\u07ff", "\u0800", "\ud7ff", "\ue000", "\ufffd", "\uffff", "\U00010000", "\U0010ffff",
              "\U0001f600 \u2603 \u00e9"]
INVALID_UTF8 = [
    b"\x80", b"\xbf", b"\x80\xbf\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf", b"\xf8\x88\x80\x80\xaf",
    b"\xfc\x84\x80\x80\x80\xaf", b"\xc1\xbf", b"\xe0\x9f\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
    b"\xed\xa0\x80\xed\xb0\x80", b"\xf4\x90\x80\x80", b"\xfe", b"\xff", b"\xfe\xfe\xff\xff", b"\xc2", b"\xe2\x82",
    b"\xf0\x9f\x98", b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
]


def with_text(text: bytes) -> bytes:
    """A heartbeat carrying `text` (raw bytes) inside a JSON string of its payload."""
    return b'[null,"1","phoenix","heartbeat",{"text":"' + text + b'"}]'


@pytest.mark.parametrize("text", VALID_UTF8)
@pytest.mark.parametrize("fragmented", [False, True])
async def test_6_valid_utf8(client: Client, text: str, fragmented: bool) -> None:
    data = with_text(text.encode())
    if fragmented:  # one byte per frame: every code point is cut
        await client.send_raw(raw_frame(TEXT, data[:1], fin=False)
                              + b"".join(raw_frame(CONT, data[index:index + 1], fin=index == len(data) - 1)
                                         for index in range(1, len(data))))
    else:
        await client.send_raw(raw_frame(TEXT, data))
    await expect_reply(client)


@pytest.mark.parametrize("sequence", INVALID_UTF8, ids=lambda sequence: sequence.hex())
@pytest.mark.parametrize("fragmented", [False, True])
async def test_6_invalid_utf8_is_refused(client: Client, sequence: bytes, fragmented: bool) -> None:
    data = with_text(sequence)
    if fragmented:  # cut inside the bad sequence
        cut = data.index(sequence) + max(1, len(sequence) // 2)
        await client.send_raw(raw_frame(TEXT, data[:cut], fin=False) + raw_frame(CONT, data[cut:]))
    else:
        await client.send_raw(raw_frame(TEXT, data))
    await expect_close(client, 1007)


# --- 7 close handling

PEER_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
REFUSED_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


async def test_7_close_is_echoed_and_the_server_ends_the_connection(client: Client) -> None:
    client.protocol.send_close(1000, "bye")
    await client.flush()
    assert await client.closed_with() == (1000, "")


async def test_7_close_without_a_code_is_answered_1000(client: Client) -> None:
    await client.send_raw(raw_frame(CLOSE, b""))
    await expect_close(client, 1000)


@pytest.mark.parametrize("code", PEER_CLOSE_CODES)
async def test_7_valid_close_codes_are_echoed(client: Client, code: int) -> None:
    await client.send_raw(raw_frame(CLOSE, close_payload(code, b"reason \xe2\x98\x83")))
    await expect_close(client, code)


@pytest.mark.parametrize("code", REFUSED_CLOSE_CODES)
async def test_7_invalid_close_codes_are_refused(client: Client, code: int) -> None:
    await client.send_raw(raw_frame(CLOSE, close_payload(code)))
    await expect_close(client, 1002)


@pytest.mark.parametrize("payload, code", [
    (b"\x03", 1002),  # a one-byte payload
    (close_payload(1000, b"x" * 123), 1000),  # the longest reason
    (close_payload(1000, b"x" * 124), 1002),  # a control frame of 126 bytes
    (close_payload(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"), 1007),  # reason not UTF-8
], ids=["one-byte", "reason-123", "reason-124", "reason-not-utf8"])
async def test_7_close_payloads(client: Client, payload: bytes, code: int) -> None:
    await client.send_raw(raw_frame(CLOSE, payload))
    await expect_close(client, code)


@pytest.mark.parametrize("after", [raw_frame(CLOSE, close_payload(1001)), raw_frame(PING, b"no"),
                                   raw_frame(TEXT, heartbeat("2")), raw_frame(CONT, b"x"), b"\x81"],
                         ids=["close", "ping", "text", "continuation", "half-a-frame"])
async def test_7_nothing_after_the_clients_close_is_answered(client: Client, after: bytes) -> None:
    await client.send_raw(raw_frame(TEXT, b"[null,", fin=False) + raw_frame(CLOSE, close_payload(1000)) + after)
    await expect_close(client, 1000)


async def test_7_after_the_servers_close_data_is_dropped_until_the_clients_close(client: Client) -> None:
    await client.send_raw(raw_frame(TEXT, b"junk") + raw_frame(TEXT, heartbeat("2")) + raw_frame(PING, b"no"))
    # No reply, no pong: the Close, then (once the library answered it) the end of the connection.
    assert await client.closed_with() == (1007, "invalid message")


@pytest.mark.slow
async def test_7_a_client_that_never_answers_the_servers_close_is_cut_off(client: Client) -> None:
    await client.send_raw(raw_frame(TEXT, b"junk"))
    started = time.monotonic()
    received = b""
    while True:  # read around the library, which would answer the Close
        chunk = await asyncio.wait_for(client.loop.sock_recv(client.sock, 65536), 10)
        if not chunk:
            break
        received += chunk
    assert received[:2] == b"\x88\x11" and received[2:4] == struct.pack("!H", 1007)
    assert 1.0 < time.monotonic() - started < 5.0


# --- 9 limits: messages up to PUSH_MAX_FRAME_BYTES are served, one byte more closes with 1009


@pytest.mark.parametrize("method", ["send_text", "send_binary"])
@pytest.mark.parametrize("pieces", [1, 4, MAX_FRAGMENTS])
async def test_9_the_largest_message_is_served(client: Client, method: str, pieces: int) -> None:
    data = heartbeat("1", MAX) if method == "send_text" else binary_heartbeat(b"1", MAX)
    step = MAX // pieces
    frames = [encoded(client, method if index == 0 else "send_continuation", data[index * step:(index + 1) * step],
                      index == pieces - 1) for index in range(pieces)]
    await client.send_raw(b"".join(frames))
    await expect_reply(client)


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
@pytest.mark.parametrize("pieces", [1, 4])
async def test_9_one_byte_over_the_limit_is_refused(client: Client, opcode: int, pieces: int) -> None:
    data = heartbeat("1", MAX + 1) if opcode == TEXT else binary_heartbeat(b"1", MAX + 1)
    step = len(data) // pieces + 1
    chunks = [data[start:start + step] for start in range(0, len(data), step)]
    await client.send_raw(b"".join(raw_frame(opcode if index == 0 else CONT, chunk, fin=index == len(chunks) - 1)
                                   for index, chunk in enumerate(chunks)))
    assert await client.closed_with() == (1009, "message too big")


async def test_9_a_declared_length_over_the_limit_is_refused_before_its_payload(client: Client) -> None:
    await client.send_raw(struct.pack("!BBQ", 0x82, 0x80 | 127, 1 << 62) + b"mask")
    assert await client.closed_with() == (1009, "message too big")


async def test_9_a_message_in_too_many_fragments_is_refused(client: Client) -> None:
    await client.send_raw(raw_frame(TEXT, b"[", fin=False) + raw_frame(CONT, b"", fin=False) * MAX_FRAGMENTS)
    assert await client.closed_with() == (1009, "message in too many fragments")


async def test_the_server_is_still_serving(client: Client, server: ServerProcess) -> None:
    await expect_alive(client)
    assert server.process is not None and server.process.returncode is None
    assert not [line for line in server.log_lines if line.get("level") == "error"], server.log_lines[-5:]
