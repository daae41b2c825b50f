"""HTTP/1.1 without I/O, for the requests the front door answers itself (WebSocket upgrades and
publishes): request heads read with llhttp (through httptools; aiohttp's own parser is llhttp too) and
the bytes of a JSON answer.

llhttp refuses what RFC 9112 calls malformed or ambiguous (Content-Length with Transfer-Encoding, a
repeated Content-Length, obsolete line folding, bare CR or LF, control characters, bad header names);
`HeadReader` adds what llhttp leaves to the server: one Host, a bounded number and size of header lines,
HTTP/1.0 or 1.1, and no Transfer-Encoding in HTTP/1.0. Such a request is answered 400 (431, 505) here
and its connection closed, since its framing cannot be trusted.
"""

from __future__ import annotations

import random
import re
from urllib.parse import unquote_plus

import httptools

from push_service.errors import ClientError

# A caller's X-Request-Id is kept when it looks like one; otherwise the answer carries a new one.
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A longer request head is refused (431), however it arrives: the head is held in memory until whole.
MAX_HEAD_BYTES = 16384
# As aiohttp's default limit: more header lines than any client of ours sends.
MAX_HEADERS = 128

REASONS = {101: "Switching Protocols", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           408: "Request Timeout", 413: "Payload Too Large", 415: "Unsupported Media Type",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}


class BadRequest(ClientError):
    """A request whose head cannot be served: answered with `status` and closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    """A request head: method, path, raw query, and headers by lower-case name (repeats joined by ", ").
    `http11`: HTTP/1.1 (else 1.0); `upgrade`: the request asks to switch protocols."""

    __slots__ = ("method", "path", "query", "headers", "http11", "upgrade")

    def __init__(self, method: str, path: str, query: str, headers: dict[str, str], http11: bool = True,
                 upgrade: bool = False) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.http11 = http11
        self.upgrade = upgrade


class HeadReader:
    """Reads one request head from the start of a buffer that grows as bytes arrive; `finish(body)` before
    the next request of the connection. llhttp judges the bytes as they come; the head it accepted is then
    split here, with no call back per header. The body is the caller's to take (by Content-Length): llhttp
    is given the head, then exactly that body, so a body is never parsed as a request."""

    __slots__ = ("request", "_parser", "_fed", "_upgrade")

    def __init__(self) -> None:
        self.request: Request | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._fed = 0
        self._upgrade = False

    def finish(self, body: bytes) -> None:
        """The request's Content-Length body, for llhttp to reach the end of the request: then it reads the
        next head without a new parser (a publish connection's requests, one after the other)."""
        self.request, self._fed, self._upgrade = None, 0, False
        if body:
            try:
                self._parser.feed_data(body)
            except httptools.HttpParserError:  # not for a Content-Length body; a fresh parser all the same
                self._parser = httptools.HttpRequestParser(self)

    def read(self, buffer: bytes) -> int:
        """Where the head in `buffer` ends (the index after its blank line), or -1 while it is incomplete.
        Raises BadRequest as soon as the bytes so far cannot begin a request we serve."""
        end = buffer.find(b"\r\n\r\n")
        # llhttp refuses a bare CR or LF, so the first blank line of a head it accepts is its end.
        stop = end + 4 if end >= 0 else len(buffer)
        if stop > MAX_HEAD_BYTES:
            raise BadRequest(431, f"request head is larger than {MAX_HEAD_BYTES} bytes")
        if stop > self._fed:
            try:
                self._parser.feed_data(buffer if not self._fed and stop == len(buffer) else buffer[self._fed:stop])
            except httptools.HttpParserUpgrade:
                self._upgrade = True  # the head is whole, and asks to switch protocols
            except httptools.HttpParserError as exc:
                raise BadRequest(400, f"bad request: {exc}") from None
            self._fed = stop
        if end < 0:
            return -1
        if self.request is not None:
            return stop
        # The request in a head llhttp accepted (split here, in this call: it is on every connect and publish);
        # what llhttp leaves to the server is checked here.
        lines = buffer[:end].decode("latin-1").split("\r\n")
        request_line = lines[0].split(" ")
        if len(request_line) != 3:  # llhttp lets a repeated space through; blank lines before it, too
            raise BadRequest(400, "bad request: malformed request line")
        method, target, version = request_line
        if version != "HTTP/1.1" and version != "HTTP/1.0":
            raise BadRequest(505, f"{version} is not supported")
        if len(lines) > MAX_HEADERS + 1:
            raise BadRequest(431, f"more than {MAX_HEADERS} header lines")
        del lines[0]
        # llhttp let no CR, LF or other control character into a value: strip() takes only spaces and tabs.
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        if len(headers) != len(lines):  # a name repeated: its values joined, in order
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                name, value = name.lower(), value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
        host = headers.get("host")
        # Repeats are joined with a comma, which no single Host value holds.
        if (host is None and version == "HTTP/1.1") or (host is not None and "," in host):
            raise BadRequest(400, "bad request: a request needs exactly one Host header")
        if version == "HTTP/1.0" and "transfer-encoding" in headers:
            raise BadRequest(400, "bad request: Transfer-Encoding in an HTTP/1.0 request")
        path, _, query = target.partition("?")
        self.request = Request(method, path, query, headers, version == "HTTP/1.1", self._upgrade)
        return stop


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
    # One look for an escape in the whole query (a token is most of it), not two per pair.
    escaped = "%" in query or "+" in query
    for pair in query.split("&") if query else ():
        name, _, value = pair.partition("=")
        if escaped and ("%" in pair or "+" in pair):
            name, value = unquote_plus(name), unquote_plus(value)
        values.setdefault(name, value)
    return values


def new_request_id() -> str:
    # A correlation id, not a secret: the random module's generator (reseeded in a forked child)
    # spares the getrandom() system call secrets.token_hex makes on every request.
    return f"{random.getrandbits(64):016x}"


def request_id(given: str | None) -> str:
    return given if given is not None and REQUEST_ID.fullmatch(given) else new_request_id()


_OK_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"
            b"X-Request-Id: %s\r\n\r\n%s")


def json_answer(status: int, body: bytes, request_id: str, close: bool = False,
                retry_after: int | None = None) -> bytes:
    """A complete response with a JSON body."""
    if status == 200 and not close and retry_after is None:  # every publish's answer: one formatting
        return _OK_HEAD % (len(body), request_id.encode(), body)
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-Id: {request_id}\r\n")
    if retry_after is not None:
        head += f"Retry-After: {retry_after}\r\n"
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + body
