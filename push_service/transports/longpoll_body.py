"""A long-poll POST's body as the frames it carries: one text frame, or an nd-JSON batch.

phoenix.js sends one frame per POST, or, when frames queued while a POST was out, `application/x-ndjson`
lines: a line starting with `[` or `{` is a text frame, any other a base64 binary frame (longpoll.js).
"""

from __future__ import annotations

import base64
import binascii

from push_service.connection import Disconnect

NDJSON = "application/x-ndjson"
# An nd-JSON batch POST may hold this many PUSH_MAX_FRAME_BYTES (256KiB by default) in at most this many
# lines (Phoenix 1.8.6: splitting a body costs memory per line); each frame is checked too. A batch is what
# phoenix.js queued while its previous POST was out: a rejoin of every channel fits many times over.
BATCH_FRAMES = 4
MAX_BATCH_LINES = 200

TOO_BIG = Disconnect(1009, "message too big")
INVALID_FRAME = Disconnect(1007, "invalid message")

# Why a body, or one of its frames, was refused: the client-error metric's reason and the close.
Refused = tuple[str, Disconnect]


def body_limit(frame_limit: int, batch: bool) -> int:
    return frame_limit * BATCH_FRAMES if batch else frame_limit


def frames_of(body: bytes, batch: bool, frame_limit: int) -> tuple[list[str | bytes], Refused | None]:
    """The body's frames up to the first refused one, and why that one was (None: all were taken)."""
    if not batch:
        if not body:
            return [], None
        try:  # a single body is a text frame, whatever it starts with
            return [body.decode("utf-8")], None
        except UnicodeDecodeError:
            return [], ("invalid_utf8", INVALID_FRAME)
    if body.count(b"\n") + (not body.endswith(b"\n")) > MAX_BATCH_LINES:
        return [], ("batch_too_many_lines", TOO_BIG)
    frames: list[str | bytes] = []
    for line in body.split(b"\n"):
        raw = line.removesuffix(b"\r")
        if not raw:
            continue
        if raw[:1] in (b"[", b"{"):
            if len(raw) > frame_limit:
                return frames, ("frame_too_big", TOO_BIG)
            try:
                frames.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                return frames, ("invalid_utf8", INVALID_FRAME)
        else:
            try:
                decoded = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                return frames, ("invalid_base64", INVALID_FRAME)
            if len(decoded) > frame_limit:
                return frames, ("frame_too_big", TOO_BIG)
            frames.append(decoded)
    return frames, None
