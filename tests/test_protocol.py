"""The Phoenix wire protocol: V1/V2 serializers, vsn negotiation and every malformed frame."""

from __future__ import annotations

import struct

import orjson
import pytest

from push_service.protocol import V1, V2, Message, ProtocolError, negotiate

# --- round trips


V2_MESSAGES = [
    Message("1", "1", "room:lobby:42", "phx_join", {}),
    Message(None, "4", "phoenix", "heartbeat", {}),
    Message(None, None, "room:lobby:42", "new_msg", {"body": "hi", "nested": {"a": [1, 2.5, None, True]}}),
    Message("3", None, "room:topic:9", "presence_state", {"x": {"metas": [{"phx_ref": "abc"}]}}),
    Message(7, 8, "user:u1", "phx_leave", {}),  # integer refs are echoed as integers
    Message("1", "2", "room:1", "event", ["any", "json", "payload"]),
    Message("1", "2", "room:1", "event", None),
    Message("1", "2", "room:ü", "événement", {"text": "ünïcødé ✓"}),
]


@pytest.mark.parametrize("message", V2_MESSAGES)
def test_v2_round_trip(message):
    encoded = V2.encode(message)
    assert isinstance(encoded, bytes)
    # Text frames reach the serializer as str; bytes would be a binary frame.
    assert V2.decode(encoded.decode()) == message


def test_v2_frame_is_a_five_element_array():
    encoded = V2.encode(Message("1", "2", "room:lobby:42", "phx_reply", {"status": "ok", "response": {}}))
    assert orjson.loads(encoded) == ["1", "2", "room:lobby:42", "phx_reply", {"status": "ok", "response": {}}]


def test_v2_broadcast_has_null_refs():
    assert orjson.loads(V2.encode_broadcast("room:lobby:1", "new_msg", b"{\"a\":1}")) == [
        None, None, "room:lobby:1", "new_msg", {"a": 1}]


@pytest.mark.parametrize("serializer", [V1, V2])
@pytest.mark.parametrize("ref", [None, "0a1b:17"])
def test_a_broadcast_frame_is_the_bytes_of_the_same_message(serializer, ref):
    # encode_broadcast builds its frame its own way (no Message): a client must not see the difference.
    payload = {"body": "ünïcødé ✓", "n": [1, 2.5, None, True], "big": 2**63 - 1}
    message = Message(None, ref, "room:ü", "événement", payload)
    assert serializer.encode_broadcast("room:ü", "événement", orjson.dumps(payload), ref) == serializer.encode(message)


@pytest.mark.parametrize("message", [
    Message(None, "1", "room:lobby:42", "phx_join", {}),
    Message(None, None, "room:lobby:42", "new_msg", {"body": "hi"}),
    Message(None, 5, "phoenix", "heartbeat", {}),
    Message(None, "1", "room:ü", "événement", {"text": "✓"}),
])
def test_v1_round_trip(message):
    encoded = V1.encode(message)
    assert isinstance(encoded, bytes)
    assert V1.decode(encoded.decode()) == message


def test_v1_server_frames_carry_no_join_ref():
    encoded = V1.encode(Message("3", "4", "room:lobby:42", "phx_reply", {"status": "ok", "response": {}}))
    assert orjson.loads(encoded) == {"topic": "room:lobby:42", "event": "phx_reply",
                                     "payload": {"status": "ok", "response": {}}, "ref": "4"}
    assert orjson.loads(V1.encode_broadcast("room:lobby:1", "new_msg", b"{\"a\":1}")) == {
        "topic": "room:lobby:1", "event": "new_msg", "payload": {"a": 1}, "ref": None}


def test_v1_client_join_ref_is_read():
    frame = '{"topic":"room:lobby:1","event":"phx_join","payload":{},"ref":"2","join_ref":"2"}'
    assert V1.decode(frame) == Message("2", "2", "room:lobby:1", "phx_join", {})


def test_v1_extra_keys_are_ignored():
    frame = '{"topic":"t:1","event":"e","payload":{},"ref":null,"other":1}'
    assert V1.decode(frame) == Message(None, None, "t:1", "e", {})


def test_v2_extra_elements_are_ignored():
    # Phoenix matches [join_ref, ref, topic, event, payload | _].
    assert V2.decode('["1","2","t:1","e",{"a":1},"extra",7]') == Message("1", "2", "t:1", "e", {"a": 1})


def test_reply_helper():
    assert Message.reply("1", "2", "t:1", "ok", {}) == Message(
        "1", "2", "t:1", "phx_reply", {"status": "ok", "response": {}})


def test_inbound_payload_may_be_any_json_value():
    for payload in ("1", "\"s\"", "null", "[1,2]", "true"):
        assert V2.decode(f'["1","2","t:1","e",{payload}]').payload == orjson.loads(payload)


# --- negotiation


@pytest.mark.parametrize("vsn, expected", [
    (None, V1),
    ("1.0.0", V1),
    ("1.0.9", V1),
    ("2.0.0", V2),
    ("2.0.5", V2),
])
def test_negotiate_known(vsn, expected):
    assert negotiate(vsn) is expected


@pytest.mark.parametrize("vsn", ["3.0.0", "2.1.0", "1.1.0", "0.0.1", "2.0", "2", "abc", "", "v2.0.0", "2.0.0.0",
                                 "2.0.0-rc.1", " 2.0.0", "2.0.x", "2.0.0\n", "\uff12.0.0"])
def test_negotiate_unknown(vsn):
    assert negotiate(vsn) is None


# --- malformed frames: every one is a ProtocolError with a label


def _reason(serializer, data) -> str:
    with pytest.raises(ProtocolError) as caught:
        serializer.decode(data)
    assert str(caught.value)  # a human-readable detail comes with the label
    return caught.value.reason


@pytest.mark.parametrize("serializer", [V1, V2], ids=["v1", "v2"])
@pytest.mark.parametrize("data", ["", "not json", "[1,2", "{\"topic\":", "[\"1\",\"2\",\"t\",\"e\",{}]x", "\x00",
                                  "NaN", "[1,2,3,4,5]]"])
def test_invalid_json(serializer, data):
    assert _reason(serializer, data) == "invalid_json"


@pytest.mark.parametrize("data", [
    '{"topic":"t:1","event":"e","payload":{},"ref":"1","join_ref":"1"}',  # an object is v1's shape
    '[]',
    '["1","2","t:1","e"]',  # too short
    '[null]',
    '"a string"',
    '42',
    'null',
    'true',
])
def test_v2_wrong_shape(data):
    assert _reason(V2, data) == "bad_shape"


@pytest.mark.parametrize("data", [
    '["1","2","t:1","e",{}]',  # an array is v2's shape
    '[]',
    '"a string"',
    '42',
    'null',
    '{"event":"e","payload":{},"ref":"1"}',  # no topic
    '{"topic":"t:1","payload":{},"ref":"1"}',  # no event
    '{"topic":"t:1","event":"e","ref":"1"}',  # no payload
    '{"topic":"t:1","event":"e","payload":{}}',  # no ref (it must be present, even null)
    '{}',
])
def test_v1_wrong_shape(data):
    assert _reason(V1, data) == "bad_shape"


BAD_FIELDS = [
    # (join_ref, ref, topic, event, expected reason)
    ("1", "2", 5, "e", "bad_topic"),
    ("1", "2", "", "e", "bad_topic"),
    ("1", "2", None, "e", "bad_topic"),
    ("1", "2", ["t"], "e", "bad_topic"),
    ("1", "2", {"t": 1}, "e", "bad_topic"),
    ("1", "2", True, "e", "bad_topic"),
    ("1", "2", "t:1", 5, "bad_event"),
    ("1", "2", "t:1", "", "bad_event"),
    ("1", "2", "t:1", None, "bad_event"),
    ("1", "2", "t:1", ["e"], "bad_event"),
    ("1", "2", "t:1", False, "bad_event"),
    ("1", True, "t:1", "e", "bad_ref"),
    ("1", False, "t:1", "e", "bad_ref"),
    ("1", 1.5, "t:1", "e", "bad_ref"),
    ("1", ["2"], "t:1", "e", "bad_ref"),
    ("1", {"r": 2}, "t:1", "e", "bad_ref"),
    (True, "2", "t:1", "e", "bad_join_ref"),
    (False, "2", "t:1", "e", "bad_join_ref"),
    (1.5, "2", "t:1", "e", "bad_join_ref"),
    (["1"], "2", "t:1", "e", "bad_join_ref"),
    ({"j": 1}, "2", "t:1", "e", "bad_join_ref"),
]


@pytest.mark.parametrize("join_ref, ref, topic, event, reason", BAD_FIELDS)
def test_v2_bad_field_types(join_ref, ref, topic, event, reason):
    assert _reason(V2, orjson.dumps([join_ref, ref, topic, event, {}]).decode()) == reason


@pytest.mark.parametrize("join_ref, ref, topic, event, reason", BAD_FIELDS)
def test_v1_bad_field_types(join_ref, ref, topic, event, reason):
    frame = orjson.dumps({"join_ref": join_ref, "ref": ref, "topic": topic, "event": event, "payload": {}}).decode()
    assert _reason(V1, frame) == reason


def test_refs_may_be_strings_integers_or_null():
    assert V2.decode('[1, 2, "t:1", "e", {}]') == Message(1, 2, "t:1", "e", {})
    assert V2.decode('[null, null, "t:1", "e", {}]') == Message(None, None, "t:1", "e", {})
    assert V1.decode('{"topic":"t:1","event":"e","payload":{},"ref":3,"join_ref":4}') == Message(
        4, 3, "t:1", "e", {})


# --- binary frames


@pytest.mark.parametrize("data", [b'{"topic":"t:1","event":"e","payload":{},"ref":"1"}', b"\x00\x01",
                                  bytearray(b"{}")])
def test_v1_refuses_binary_frames(data):
    assert _reason(V1, data) == "binary_unsupported"


def binary_push(join_ref: bytes, ref: bytes, topic: bytes, event: bytes, data: bytes, kind: int = 0) -> bytes:
    return (struct.pack("5B", kind, len(join_ref), len(ref), len(topic), len(event))
            + join_ref + ref + topic + event + data)


def test_v2_binary_push_decodes():
    frame = binary_push(b"12", b"13", b"room:lobby:42", b"upload", b"\x00\xffraw bytes")
    assert V2.decode(frame) == Message("12", "13", "room:lobby:42", "upload", b"\x00\xffraw bytes")
    assert V2.decode(bytearray(frame)) == Message("12", "13", "room:lobby:42", "upload", b"\x00\xffraw bytes")


def test_v2_binary_push_empty_refs_are_null_and_data_may_be_empty():
    assert V2.decode(binary_push(b"", b"", b"t:1", b"e", b"")) == Message(None, None, "t:1", "e", b"")


def test_v2_binary_push_utf8_fields():
    topic, event = "room:ü".encode(), "événement".encode()
    assert V2.decode(binary_push(b"1", b"2", topic, event, b"x")) == Message("1", "2", "room:ü", "événement", b"x")


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x01\x01\x01"])
def test_v2_binary_shorter_than_header(data):
    assert _reason(V2, data) == "bad_binary"


@pytest.mark.parametrize("data", [
    struct.pack("5B", 0, 1, 1, 3, 1),  # header only, fields declared
    struct.pack("5B", 0, 1, 1, 3, 1) + b"12t:1",  # event missing
    struct.pack("5B", 0, 255, 255, 255, 255) + b"x" * 100,
])
def test_v2_binary_declared_sizes_beyond_data(data):
    assert _reason(V2, data) == "bad_binary"


@pytest.mark.parametrize("fields", [
    (b"\xff", b"1", b"t:1", b"e"),
    (b"1", b"\xc3", b"t:1", b"e"),
    (b"1", b"2", b"t:\x80", b"e"),
    (b"1", b"2", b"t:1", b"\xed\xa0\x80"),  # an encoded surrogate is not UTF-8
])
def test_v2_binary_field_not_utf8(fields):
    assert _reason(V2, binary_push(*fields, b"data")) == "bad_binary"


@pytest.mark.parametrize("kind", [1, 2, 3, 255])
def test_v2_binary_wrong_kind(kind):
    # Kinds 1 (reply) and 2 (broadcast) only go server -> client.
    assert _reason(V2, binary_push(b"1", b"2", b"t:1", b"e", b"data", kind=kind)) == "bad_binary"


def test_v2_binary_empty_topic_or_event():
    assert _reason(V2, binary_push(b"1", b"2", b"", b"e", b"")) == "bad_topic"
    assert _reason(V2, binary_push(b"1", b"2", b"t:1", b"", b"")) == "bad_event"


def test_protocol_error_is_a_value_error():
    error = ProtocolError("bad_shape", "detail text")
    assert isinstance(error, ValueError)
    assert error.reason == "bad_shape"
    assert str(error) == "detail text"
