"""Long-poll behind any load balancer: a request for a session another node holds is relayed to that node.

As in Phoenix, where a poll reaches the session's process through PubSub, the node a request lands on
asks the node its session token names (control.py's `call`, over the broker already there) and answers
the client with what that node answered; the holder serves it exactly as a request of its own (a GET
waits up to the window for frames, a POST passes its frames to the session). It costs one broker round
trip per request; a load balancer that keeps a client on one node (stickiness) saves it.

Bounds and answers:
* PUSH_LONGPOLL_RELAY_MAX_PENDING relayed requests wait at once on a node, each way; past that the client gets
  `{"status": 500}` with HTTP 503 (phoenix.js retries with backoff) and the refusal is counted.
* A token that does not hold for the user token beside it (forged, signed with another secret, another
  user's session) is answered 410 by the node it reached, without a broker trip: every node derives the
  signing secret alike (longpoll_tokens.py). Without a valid user token, the holder decides.
* A POST's body is read (and bounded) by the relaying node as by the holder: PUSH_MAX_FRAME_BYTES, or
  that times BATCH_FRAMES for an nd-JSON batch.
* A relayed poll's answer carries at most ANSWER_BYTES of frames (at least one): the rest wait for the
  next poll, which phoenix.js sends at once. One broker message stays under NATS's default 1 MB.
* The relaying node waits at most the window plus MARGIN; a holder that is not live, or stops
  heartbeating meanwhile (PUSH_NODE_TIMEOUT), is not waited for: the client gets 410 and opens a new
  session, as Phoenix answers a session whose server cannot be reached.
* Frames are taken from the session only while the relaying node still waits (its deadline less half
  the margin): a poll abandoned past that leaves them for the next one. A relaying node whose own client
  left meanwhile drops what it got, as a node whose client leaves after the answer is written does
  (Phoenix has the same window).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from aiohttp import web

from push_service.api import read_body
from push_service.control import Control
from push_service.transports.longpoll import NDJSON, STATUS_410, STATUS_500, LongPollTransport
from push_service.transports.longpoll_tokens import SessionRef, user_digest

KIND = "longpoll"
MARGIN = 2.0  # seconds past the window the relaying node waits (Phoenix's pubsub_timeout_ms)
ANSWER_BYTES = 256 * 1024
OUT_OUTCOMES = ("ok", "refused", "dead", "timeout", "unsent", "overloaded", "error")
IN_OUTCOMES = ("ok", "gone", "abandoned", "overloaded", "bad_request")


class LongPollRelay:
    def __init__(self, transport: LongPollTransport, control: Control) -> None:
        self.transport = transport
        self.control = control
        self.relayed = transport.admission.metrics.longpoll_relayed
        for outcome in OUT_OUTCOMES:
            self.relayed.labels("out", outcome)
        for outcome in IN_OUTCOMES:
            self.relayed.labels("in", outcome)
        self.max_pending = transport.admission.settings.longpoll_relay_max_pending
        self.pending_out = 0
        self.pending_in = 0
        control.callees[KIND] = self.serve
        transport.relay = self.forward

    # --- the node the request landed on

    async def forward(self, request: web.Request, ref: SessionRef, user_token: str | None) -> web.StreamResponse:
        transport = self.transport
        if not self.control.is_live(ref.node):
            self.relayed.labels("out", "dead").inc()
            return transport.answer(request, STATUS_410)
        if self.pending_out >= self.max_pending:
            self.relayed.labels("out", "overloaded").inc()
            return transport.answer(request, STATUS_500, 503)
        digest = user_digest(user_token)
        sub = None if digest is None else transport.sub_of(user_token)
        if sub is not None and not transport.tokens.valid(ref, sub):
            # Forged, signed with another secret, or not this user's: refused here, with no broker trip.
            # (Without a valid user token only the holder knows whose session it is: it checks.)
            self.relayed.labels("out", "refused").inc()
            return transport.answer(request, STATUS_410)
        self.pending_out += 1
        try:
            args: dict[str, Any] = {"key": ref.key, "signature": ref.signature, "poll": request.method == "GET",
                                    "user": None if digest is None else digest.hex(), "sub": sub}
            if request.method == "POST":
                batch = request.content_type == NDJSON
                body = await read_body(request, transport.body_limit(batch))
                args["batch"] = batch
                args["body"] = None if body is None else base64.b64encode(body).decode()
            answer = await self.control.call(ref.node, KIND, args, transport.window + MARGIN)
        finally:
            self.pending_out -= 1
        if isinstance(answer, str):  # dead, timeout or unsent: the session cannot be reached
            self.relayed.labels("out", answer).inc()
            return transport.answer(request, STATUS_410)
        body, status = answer.get("body"), answer.get("status")
        if not isinstance(body, str) or not isinstance(status, int):
            self.relayed.labels("out", "error").inc()
            return transport.answer(request, STATUS_500, 500)
        # The holder's own bound answers 503: counted here too, as what the client saw.
        self.relayed.labels("out", "overloaded" if status == 503 else "ok").inc()
        return transport.answer(request, body.encode(), status)

    # --- the node holding the session (a control callee)

    async def serve(self, args: dict[str, Any]) -> dict[str, Any]:
        transport = self.transport
        loop = asyncio.get_running_loop()
        received = loop.time()
        if self.pending_in >= self.max_pending:
            self.relayed.labels("in", "overloaded").inc()
            return {"status": 503, "body": STATUS_500.decode()}
        try:
            key, signature, poll = args["key"], args["signature"], args["poll"]
            user, sub = args.get("user"), args.get("sub")
            if not (isinstance(key, str) and isinstance(signature, str) and isinstance(poll, bool)
                    and (user is None or isinstance(user, str)) and (sub is None or isinstance(sub, str))):
                raise TypeError("bad field types")
            digest = None if user is None else bytes.fromhex(user)
            body: bytes | None = None
            if not poll:
                encoded = args.get("body")
                body = None if encoded is None else base64.b64decode(encoded, validate=True)
        except (KeyError, TypeError, ValueError, binascii.Error):
            self.relayed.labels("in", "bad_request").inc()
            return {"status": 200, "body": STATUS_410.decode()}
        conn = transport.find(SessionRef(transport.node_id, key, signature), digest, poll, lambda: sub)
        if conn is None:
            self.relayed.labels("in", "gone").inc()
            return {"status": 200, "body": STATUS_410.decode()}
        self.pending_in += 1
        try:
            if poll:
                # Frames are taken only while the asker still waits for them (see the module's doc).
                deadline = received + transport.window + MARGIN / 2
                answer = await transport.poll(conn, lambda: loop.time() > deadline, ANSWER_BYTES)
                if loop.time() > deadline:
                    self.relayed.labels("in", "abandoned").inc()
                    return {"status": 200, "body": STATUS_410.decode()}
            else:
                answer = transport.publish(conn, args.get("batch") is True, body)
        finally:
            self.pending_in -= 1
        self.relayed.labels("in", "ok").inc()
        return {"status": 200, "body": answer.decode()}


def setup(transport: LongPollTransport, control: Control) -> LongPollRelay:
    """Relay requests for other nodes' sessions through `control`, and serve theirs for ours."""
    return LongPollRelay(transport, control)
