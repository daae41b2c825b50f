"""A backend for push-service in Python: it signs client tokens (PyJWT) and publishes messages (urllib).

Your real backend does the same after saving the message in its own database.

    PUSH_URL=http://127.0.0.1:4000 PUSH_SERVICE_KEY=... PUSH_JWT_SECRET=... \\
        python examples/backend.py token ada Ada        # prints a client token for user "ada"
        python examples/backend.py publish 7 "hello"    # publishes to thread 7 (room:topic:7)

Needs PyJWT (`pip install pyjwt`; push-service installs it).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import jwt

PUSH_URL = os.environ.get("PUSH_URL", "http://127.0.0.1:4000")
SERVICE_KEY = os.environ.get("PUSH_SERVICE_KEY", "")
JWT_SECRET = os.environ.get("PUSH_JWT_SECRET", "")


def client_token(sub: str, username: str | None = None, topics: tuple[str, ...] = ("room:topic:*",),
                 ttl_seconds: int = 3600) -> str:
    """Who the user is (`sub`), until when (`exp`), which topics it may join, what presence shows (`info`)."""
    now = int(time.time())
    claims = {"sub": sub, "iat": now, "exp": now + ttl_seconds, "topics": list(topics),
              "info": {"username": username or sub}}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def publish_to_thread(thread_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Broadcasts `new_msg` with `body` on room:topic:<thread_id>; the answer says how many local subscribers got it."""
    request = urllib.request.Request(
        f"{PUSH_URL}/api/thread", method="POST", data=json.dumps({"thread_id": thread_id, **body}).encode(),
        headers={"Authorization": f"Bearer {SERVICE_KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)  # {"status": 200, "published": 1, "delivered": N}
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"publish refused: HTTP {error.code} {json.load(error).get('error')}") from None


def main(argv: list[str]) -> int:
    if not SERVICE_KEY or not JWT_SECRET:
        print("set PUSH_SERVICE_KEY and PUSH_JWT_SECRET (push-service serve prints them in development)",
              file=sys.stderr)
        return 2
    if len(argv) >= 2 and argv[0] == "token":
        print(client_token(argv[1], argv[2] if len(argv) > 2 else None))
    elif len(argv) == 3 and argv[0] == "publish":
        print(json.dumps(publish_to_thread(argv[1], {"author": "backend", "text": argv[2]})))
    else:
        print("usage: python backend.py token <user id> [username] | publish <thread id> <text>", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
