"""Long-poll session tokens: `lp.<node id>.<key>.<signature>`, valid on every node of the cluster.

The signature is an HMAC of `<node id>.<key>.<sub>` under a secret every node derives alike, so a token
cannot be forged, pointed at another node, or carried over to another user (JWT `sub`): only the node
holding the session knows its sub, and checks the signature with it. The secret is derived from
PUSH_JWT_SECRET (one value, the same on every node, since any node verifies any client's JWT); without
one, from the publish keys (PUSH_SERVICE_KEY: the first signs, any verifies, so a rotation answers some
sessions 410 once and they reopen); with neither (a single dev node), it is drawn at start-up.

Whose session it is: besides the session token, phoenix.js sends the user's own token on every poll (the
socket's params, or `X-Phoenix-AuthToken` from 1.8), and a poll must present the very token the session
was opened with (compared by hash) or another valid token of the same sub. A POST is held to the same
rule when it carries one (phoenix.js 1.8 sends `authToken` on polls only).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import NamedTuple

from aiohttp import web

from push_service.config import Settings

PREFIX = "lp."
SESSION_HEADER = "x-phoenix-longpoll-token"
AUTH_TOKEN_HEADER = "x-phoenix-authtoken"  # phoenix.js >= 1.8 `authToken` over long-poll
CONTEXT = b"push-service long-poll session tokens v1"
SIGNATURE_BYTES = 18


class SessionRef(NamedTuple):
    """What a session token names: the node holding the session, its key there, the signature."""
    node: str
    key: str
    signature: str


def derive_secrets(settings: Settings) -> tuple[bytes, ...]:
    """The secrets this node's session tokens are checked against; the first signs."""
    if settings.jwt_secret:
        return (hmac.digest(settings.jwt_secret.encode(), CONTEXT, "sha256"),)
    keys = [key for key in settings.service_keys if key]
    if keys:
        return tuple(hmac.digest(key.encode(), CONTEXT, "sha256") for key in keys)
    return (secrets.token_bytes(32),)


def parse(token: str | None) -> SessionRef | bool:
    """False: not a session token (a GET that opens one); True: a session token that names nothing
    (malformed: 410); else what it names, still to be checked by the node that holds it."""
    if token is None or not token.startswith(PREFIX):
        return False
    parts = token[len(PREFIX):].split(".")
    if len(parts) != 3 or not all(parts):
        return True
    return SessionRef(*parts)


def user_digest(user_token: str | None) -> bytes | None:
    """The hash a session keeps of the user's token it was opened with (not the token itself)."""
    if not user_token:
        return None
    return hashlib.sha256(user_token.encode("utf-8", "surrogatepass")).digest()


class SessionTokens:
    def __init__(self, settings: Settings, node_id: str) -> None:
        self.node_id = node_id
        self._secrets = derive_secrets(settings)

    def _sign(self, secret: bytes, node: str, key: str, sub: str) -> bytes:
        message = f"{node}.{key}.{sub}".encode("utf-8", "surrogatepass")
        digest = hmac.digest(secret, message, "sha256")[:SIGNATURE_BYTES]
        return base64.urlsafe_b64encode(digest)

    def new(self, sub: str) -> tuple[str, str]:
        """A fresh session's key and token."""
        key = secrets.token_urlsafe(18)
        signature = self._sign(self._secrets[0], self.node_id, key, sub).decode()
        return key, f"{PREFIX}{self.node_id}.{key}.{signature}"

    def valid(self, ref: SessionRef, sub: str) -> bool:
        """Whether `ref` was signed for this node's session of `sub` (constant-time)."""
        given = ref.signature.encode("utf-8", "surrogatepass")
        return any(hmac.compare_digest(self._sign(secret, ref.node, ref.key, sub), given) for secret in self._secrets)


def tokens_of(request: web.Request) -> tuple[str | None, str | None]:
    """The session token (x-phoenix-longpoll-token, else the query's last `token`, as in Plug) and the
    user's token beside it (X-Phoenix-AuthToken, else the query's `token` before the session's). Without a
    session, the first is the query's last `token`: the user's, for a GET that opens one."""
    tokens = request.query.getall("token", ())
    session = request.headers.get(SESSION_HEADER)
    if session:
        query_user = tokens[-1] if tokens else None
    else:
        session = tokens[-1] if tokens else None
        query_user = tokens[-2] if len(tokens) > 1 else None
    return session, request.headers.get(AUTH_TOKEN_HEADER) or query_user
