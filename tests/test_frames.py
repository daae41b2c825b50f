"""RFC 6455 framing without I/O (push_service/transports/frames.py): however the bytes are split."""

from __future__ import annotations

import os
import random
import struct
import time

import pytest

from push_service.transports.frames import (
    BINARY, CLOSE, MAX_FRAGMENTS, PING, PONG, TEXT, FrameError, FrameReader, accept_key, close_code, frame,
    frame_close,
)


def client_frame(opcode: int, payload: bytes, final: bool = True, mask: bytes | None = None) -> bytes:
    mask = os.urandom(4) if mask is None else mask
    size = len(payload)
    first = (0x80 if final else 0) | opcode
    if size < 126:
        header = struct.pack("!BB", first, 0x80 | size)
    elif size < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    return header + mask + bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))


def test_accept_key_is_the_rfc_example():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 section 1.3


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_server_frames_use_the_shortest_length_encoding(size):
    data = frame(TEXT, b"x" * size)
    header = 2 if size < 126 else 4 if size < 65536 else 10
    assert len(data) == header + size and data[0] == 0x81 and not data[1] & 0x80


def test_any_split_gives_the_same_messages():
    stream = b"".join([
        client_frame(TEXT, b'["1","1","room:lobby:1","phx_join",{}]'),
        client_frame(PING, b"p"),
        client_frame(TEXT, b"x" * 126),  # 16-bit length
        client_frame(BINARY, bytes(range(256)) * 300),  # 64-bit length
        client_frame(TEXT, "h\u00e9l".encode(), final=False),
        client_frame(PONG, b""),  # control frames may come between fragments
        client_frame(0x0, "lo \u2603".encode()),
        client_frame(CLOSE, struct.pack("!H", 1000)),
    ])
    expected = [(TEXT, b'["1","1","room:lobby:1","phx_join",{}]'), (PING, b"p"), (TEXT, b"x" * 126),
                (BINARY, bytes(range(256)) * 300), (PONG, b""), (TEXT, "h\u00e9llo \u2603".encode()),
                (CLOSE, struct.pack("!H", 1000))]
    assert FrameReader(1 << 20).feed(stream) == expected
    one_by_one = FrameReader(1 << 20)
    assert [message for index in range(len(stream)) for message in one_by_one.feed(stream[index:index + 1])] \
        == expected
    rng = random.Random(7)
    for _ in range(20):
        reader, cuts = FrameReader(1 << 20), sorted(rng.sample(range(1, len(stream)), 12))
        pieces = [stream[start:end] for start, end in zip([0, *cuts], [*cuts, len(stream)])]
        assert [message for piece in pieces for message in reader.feed(piece)] == expected


@pytest.mark.parametrize("data, code", [
    (struct.pack("!BB", 0x81, 2) + b"{}", 1002),  # unmasked
    (bytes([0xC1]) + client_frame(TEXT, b"{}")[1:], 1002),  # RSV1 without an extension
    (client_frame(0x0, b"x"), 1002),  # continuation of nothing
    (client_frame(TEXT, b"a", final=False) + client_frame(TEXT, b"b"), 1002),  # new message mid-fragments
    (client_frame(0x3, b""), 1002),  # reserved data opcode
    (client_frame(0xB, b""), 1002),  # reserved control opcode
    (client_frame(PING, b"x" * 126), 1002),  # control frame too long
    (client_frame(PING, b"x", final=False), 1002),  # fragmented control frame
    (client_frame(TEXT, b"x" * 1025), 1009),  # over the limit
    (client_frame(TEXT, b"x" * 600, final=False) + client_frame(0x0, b"x" * 600), 1009),  # over it in pieces
], ids=["unmasked", "rsv1", "stray-continuation", "interleaved", "opcode-3", "opcode-b", "long-ping",
        "fragmented-ping", "too-big", "too-big-in-fragments"])
def test_violations(data, code):
    with pytest.raises(FrameError) as caught:
        FrameReader(1024).feed(data)
    assert caught.value.code == code


def test_a_huge_declared_length_is_refused_before_any_payload_arrives():
    header = struct.pack("!BBQ", 0x82, 0x80 | 127, 1 << 40) + b"\0\0\0\0"
    with pytest.raises(FrameError) as caught:
        FrameReader(65536).feed(header)
    assert caught.value.code == 1009


# What a peer may send (RFC 6455 7.4 and the IANA registry); the server itself sends 1012 and 1013.
PEER_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
REFUSED_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


def test_close_without_a_code():
    assert close_code(b"") == 1005


@pytest.mark.parametrize("code", PEER_CLOSE_CODES)
def test_close_codes(code):
    assert close_code(struct.pack("!H", code)) == code
    assert close_code(struct.pack("!H", code) + "bye \u2603".encode()) == code


@pytest.mark.parametrize("code", REFUSED_CLOSE_CODES)
def test_refused_close_codes(code):
    with pytest.raises(FrameError) as caught:
        close_code(struct.pack("!H", code))
    assert caught.value.code == 1002


@pytest.mark.parametrize("payload, code", [(b"\x03", 1002), (struct.pack("!H", 1000) + b"\xff", 1007)])
def test_invalid_close_payloads(payload, code):
    with pytest.raises(FrameError) as caught:
        close_code(payload)
    assert caught.value.code == code


def test_close_frame_reason_is_bounded():
    data = frame_close(1001, "x" * 500)
    assert data[1] == 2 + 123 and struct.unpack("!H", data[2:4])[0] == 1001


@pytest.mark.parametrize("character", ["\u00e9", "\u2603", "\U0001f600"])
@pytest.mark.parametrize("prefix", range(4))
def test_close_frame_reason_is_cut_between_characters(character, prefix):
    reason = "x" * prefix + character * 100
    data = frame_close(1001, reason)
    assert data[1] <= 125 and data[1] == len(data) - 2
    kept = data[4:].decode()  # raises if a character was cut in half
    assert reason.startswith(kept) and len(kept.encode()) > 123 - len(character.encode())


def test_a_message_in_empty_fragments_is_bounded():
    reader = FrameReader(1 << 20)
    empty = client_frame(0x0, b"", final=False)
    reader.feed(client_frame(TEXT, b"[", final=False))
    with pytest.raises(FrameError) as caught:
        for _ in range(MAX_FRAGMENTS):
            reader.feed(empty * 64)  # 64 times the limit in all: it must give up well before that
    assert caught.value.code == 1009


def test_a_message_in_many_fragments_up_to_the_bound_is_accepted():
    reader = FrameReader(1 << 20)
    pieces = [client_frame(TEXT, b"a", final=False)]
    pieces += [client_frame(0x0, b"b" if index % 2 else b"", final=False) for index in range(MAX_FRAGMENTS - 2)]
    pieces.append(client_frame(0x0, b"c"))
    assert reader.feed(b"".join(pieces)) == [(TEXT, b"a" + b"b" * ((MAX_FRAGMENTS - 2) // 2) + b"c")]


def _one_byte_per_feed(size: int) -> float:
    data = client_frame(BINARY, b"x" * size)
    reader = FrameReader(size)
    # CPU time of this process: the other processes on a loaded machine do not count against it.
    began = time.process_time()
    for index in range(len(data) - 1):
        assert not reader.feed(data[index:index + 1])
    assert reader.feed(data[-1:]) == [(BINARY, b"x" * size)]
    return time.process_time() - began


def test_a_big_frame_one_byte_per_read_costs_linear_time():
    """Sixteen times the bytes cost about sixteen times the time, not 256 (no copy of the whole
    buffer per read)."""
    small = min(_one_byte_per_feed(16 * 1024) for _ in range(3))
    large = min(_one_byte_per_feed(256 * 1024) for _ in range(2))
    assert large < 40 * small, (small, large)
