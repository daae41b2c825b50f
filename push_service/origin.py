"""WebSocket Origin checks, matching Phoenix's `check_origin` list semantics."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True, slots=True)
class AllowedOrigin:
    scheme: str | None  # None: any scheme ("//host")
    host: str           # may start with "*." for the domain and its subdomains
    port: int | None    # None: any port

    @classmethod
    def parse(cls, text: str) -> AllowedOrigin:
        parts = urlsplit(text if "//" in text else "//" + text)
        if not parts.hostname:
            raise ValueError(f"origin {text!r} has no host")
        scheme = parts.scheme.lower() or None
        port = parts.port
        if port is None and scheme is not None:
            port = _DEFAULT_PORTS.get(scheme)
        return cls(scheme, parts.hostname.lower(), port)

    def matches(self, scheme: str, host: str, port: int | None) -> bool:
        if self.scheme is not None and self.scheme != scheme:
            return False
        if self.port is not None and self.port != port:
            return False
        if self.host.startswith("*."):
            base = self.host[2:]
            return host == base or host.endswith("." + base)
        return host == self.host


class OriginPolicy:
    """Empty list: any origin. Requests without an Origin header (non-browser clients) always pass."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self._allowed = tuple(AllowedOrigin.parse(item) for item in allowed)

    def allows(self, origin: str | None) -> bool:
        if not self._allowed or origin is None:
            return True
        try:
            parts = urlsplit(origin)
            scheme = parts.scheme.lower()
            host = (parts.hostname or "").lower()
            port = parts.port if parts.port is not None else _DEFAULT_PORTS.get(scheme)
        except ValueError:
            return False
        if not host:
            return False
        return any(item.matches(scheme, host, port) for item in self._allowed)
