"""HTTP/1.1 without I/O, for the requests the front door answers itself (WebSocket upgrades and
publishes): a strict request-head parser and the bytes of a JSON answer.

Strict on purpose: a head this parser does not take whole (anything unusual: obsolete line
folding, control characters, HTTP/1.0, a chunked body) is handed to aiohttp, which answers it.
"""

from __future__ import annotations

import random
import re
from urllib.parse import unquote_plus

# A caller's X-Request-Id is kept when it looks like one; otherwise the answer carries a new one.
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A longer head is not ours to judge: aiohttp answers it (431/400).
MAX_HEAD_BYTES = 16384

REASONS = {101: "Switching Protocols", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           413: "Payload Too Large", 415: "Unsupported Media Type", 500: "Internal Server Error",
           503: "Service Unavailable"}


class Request:
    """A request head: method, path, raw query, and headers by lower-case name (repeats joined by ", ")."""

    __slots__ = ("method", "path", "query", "headers")

    def __init__(self, method: str, path: str, query: str, headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers


def parse_head(head: bytes) -> Request | None:
    """The request in a head (without its final blank line), or None when it is not strictly well-formed
    HTTP/1.1."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text.replace("\r\n", "").isprintable():
        return None  # control characters (NUL, DEL, a bare LF...)
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1":
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":
            return None
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    path, _, query = parts[1].partition("?")
    return Request(parts[0], path, query, headers)


def has_token(value: str | None, token: str) -> bool:
    """Whether a comma-separated header value lists `token` (given in lower case), in any case."""
    if not value:
        return False
    value = value.lower()
    # Most values are the one token, or do not contain it at all: no split then.
    return value == token or (token in value and token in [item.strip() for item in value.split(",")])


def parse_query(query: str) -> dict[str, str]:
    """First value of each name, decoded as aiohttp's request.query decodes it."""
    values: dict[str, str] = {}
    for pair in query.split("&") if query else ():
        name, _, value = pair.partition("=")
        if "%" in pair or "+" in pair:
            name, value = unquote_plus(name), unquote_plus(value)
        values.setdefault(name, value)
    return values


def new_request_id() -> str:
    # A correlation id, not a secret: the random module's generator (reseeded in a forked child)
    # spares the getrandom() system call secrets.token_hex makes on every request.
    return f"{random.getrandbits(64):016x}"


def request_id(given: str | None) -> str:
    return given if given is not None and REQUEST_ID.fullmatch(given) else new_request_id()


def json_answer(status: int, body: bytes, request_id: str, close: bool = False) -> bytes:
    """A complete response with a JSON body."""
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-Id: {request_id}\r\n")
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + body
