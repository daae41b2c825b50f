"""V1 (JSON object) and V2 (JSON array, plus binary) serializers, as Phoenix negotiates them."""

from __future__ import annotations

import re
import struct
from typing import Any

import orjson

from push_service.errors import ProtocolError
from push_service.protocol.message import REPLY, Message, Ref

_REF_TYPES = (str, int, type(None))
# The exact types _check_fields lets through as refs (bool, an int subclass, is not one of them).
_REF_EXACT = frozenset(_REF_TYPES)


def _check_fields(join_ref: Any, ref: Any, topic: Any, event: Any) -> None:
    if isinstance(join_ref, bool) or not isinstance(join_ref, _REF_TYPES):
        raise ProtocolError("bad_join_ref", "join_ref must be a string, an integer or null")
    if isinstance(ref, bool) or not isinstance(ref, _REF_TYPES):
        raise ProtocolError("bad_ref", "ref must be a string, an integer or null")
    if not isinstance(topic, str) or not topic:
        raise ProtocolError("bad_topic", "topic must be a non-empty string")
    if not isinstance(event, str) or not event:
        raise ProtocolError("bad_event", "event must be a non-empty string")


def _loads(data: str | bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError("invalid_json", "frame is not valid JSON") from None


class Serializer:
    """Encodes outgoing and decodes incoming frames for one protocol version."""

    vsn: str

    def decode(self, data: str | bytes) -> Message:
        raise NotImplementedError

    def encode(self, message: Message) -> bytes:
        raise NotImplementedError

    def encode_broadcast(self, topic: str, event: str, payload_json: bytes, ref: str | None = None) -> bytes:
        """A fan-out frame (no join_ref; ref null, or the history position) around an already-encoded
        payload, embedded as is."""
        return self.encode(Message(None, ref, topic, event, orjson.Fragment(payload_json)))

    def encode_reply(self, join_ref: Ref, ref: Ref, topic: str, status: str, response: Any) -> bytes:
        """`encode(Message.reply(...))`: a reply (a join's, a heartbeat's) without a Message built to be encoded."""
        return self.encode(Message.reply(join_ref, ref, topic, status, response))

    def __repr__(self) -> str:
        return f"<Serializer vsn={self.vsn}>"


class _V1(Serializer):
    """vsn 1.0.0: `{"topic","event","payload","ref"[,"join_ref"]}`; server frames carry no join_ref."""

    vsn = "1.0.0"

    def decode(self, data: str | bytes) -> Message:
        if isinstance(data, (bytes, bytearray)):
            # Phoenix's V1 serializer only speaks text frames.
            raise ProtocolError("binary_unsupported", "vsn 1.0.0 takes text frames only")
        obj = _loads(data)
        if not isinstance(obj, dict):
            raise ProtocolError("bad_shape", "vsn 1.0.0 frames are JSON objects")
        missing = [key for key in ("topic", "event", "payload", "ref") if key not in obj]
        if missing:
            raise ProtocolError("bad_shape", f"missing key(s): {', '.join(missing)}")
        join_ref = obj.get("join_ref")
        _check_fields(join_ref, obj["ref"], obj["topic"], obj["event"])
        return Message(join_ref, obj["ref"], obj["topic"], obj["event"], obj["payload"])

    def encode(self, message: Message) -> bytes:
        return orjson.dumps({"topic": message.topic, "event": message.event,
                             "payload": message.payload, "ref": message.ref})

    def encode_broadcast(self, topic: str, event: str, payload_json: bytes, ref: str | None = None) -> bytes:
        # As encode, without building a Message: once per broadcast and wire.
        return orjson.dumps({"topic": topic, "event": event, "payload": orjson.Fragment(payload_json), "ref": ref})

    def encode_reply(self, join_ref: Ref, ref: Ref, topic: str, status: str, response: Any) -> bytes:
        return orjson.dumps({"topic": topic, "event": REPLY, "payload": {"status": status, "response": response},
                             "ref": ref})


class _V2(Serializer):
    """vsn 2.0.0: `[join_ref, ref, topic, event, payload]` text frames, and binary push frames."""

    vsn = "2.0.0"
    _PUSH = 0  # binary kind byte of a client push

    def decode(self, data: str | bytes) -> Message:
        if isinstance(data, (bytes, bytearray)):
            return self._decode_binary(bytes(data))
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProtocolError("invalid_json", "frame is not valid JSON") from None
        # Phoenix matches [join_ref, ref, topic, event, payload | _]: extra elements are ignored.
        if type(obj) is not list or len(obj) < 5:
            raise ProtocolError("bad_shape", "vsn 2.0.0 frames are arrays [join_ref, ref, topic, event, payload]")
        join_ref, ref, topic, event, payload = obj[:5]
        # What clients send (string refs, a topic and an event) passes without the checks' call.
        if (type(join_ref) not in _REF_EXACT or type(ref) not in _REF_EXACT or type(topic) is not str
                or type(event) is not str or not topic or not event):
            _check_fields(join_ref, ref, topic, event)
        return Message(join_ref, ref, topic, event, payload)

    def _decode_binary(self, data: bytes) -> Message:
        # kind(1) join_ref_size(1) ref_size(1) topic_size(1) event_size(1) then the strings, then the data.
        if len(data) < 5:
            raise ProtocolError("bad_binary", "binary frame shorter than its header")
        kind, join_ref_size, ref_size, topic_size, event_size = struct.unpack_from("5B", data)
        if kind != self._PUSH:
            raise ProtocolError("bad_binary", f"clients may only send binary pushes (kind 0), got kind {kind}")
        end = 5 + join_ref_size + ref_size + topic_size + event_size
        if len(data) < end:
            raise ProtocolError("bad_binary", "binary frame shorter than its declared fields")
        try:
            fields = []
            offset = 5
            for size in (join_ref_size, ref_size, topic_size, event_size):
                fields.append(data[offset:offset + size].decode("utf-8"))
                offset += size
        except UnicodeDecodeError:
            raise ProtocolError("bad_binary", "binary frame field is not UTF-8") from None
        join_ref, ref, topic, event = fields
        _check_fields(join_ref, ref, topic, event)
        return Message(join_ref or None, ref or None, topic, event, data[end:])

    def encode(self, message: Message) -> bytes:
        return orjson.dumps([message.join_ref, message.ref, message.topic, message.event, message.payload])

    def encode_broadcast(self, topic: str, event: str, payload_json: bytes, ref: str | None = None) -> bytes:
        # As encode, without building a Message: once per broadcast and wire.
        return orjson.dumps([None, ref, topic, event, orjson.Fragment(payload_json)])

    def encode_reply(self, join_ref: Ref, ref: Ref, topic: str, status: str, response: Any) -> bytes:
        return orjson.dumps([join_ref, ref, topic, REPLY, {"status": status, "response": response}])


V1: Serializer = _V1()
V2: Serializer = _V2()

_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)", re.ASCII)
_EXACT = {"1.0.0": V1, "2.0.0": V2}  # what clients send: no regex for them


def negotiate(vsn: str | None) -> Serializer | None:
    """The serializer for a `vsn` query value ("~> 1.0.0" and "~> 2.0.0" as Phoenix), None if unknown.

    A missing vsn means 1.0.0, as in Phoenix.
    """
    if vsn is None:
        return V1
    if vsn in _EXACT:
        return _EXACT[vsn]
    match = _VERSION.fullmatch(vsn)  # fullmatch: "$" alone would let "2.0.0\n" through
    if not match:
        return None
    major, minor = int(match.group(1)), int(match.group(2))
    if minor != 0:
        return None
    return {1: V1, 2: V2}.get(major)


__all__ = ["Ref", "Serializer", "V1", "V2", "negotiate"]
