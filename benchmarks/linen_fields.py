"""Writes benchmarks/linen-new-thread.fields: the members of the body Linen's backend POSTs to /api/message
when a thread is started (apps/web/services/push/index.ts: channel_id, thread_id, message_id, imitation_id,
is_thread, is_reply, and `message` and `thread` as JSON strings of the serialized message and thread).

The ids are random UUIDs, the text is 40 words drawn from loadgen.c's chat vocabulary, and the thread holds its
first message, so the frame is ~2.5 KB. run.py's fanout-linen-* scenarios send it (`loadgen --fields-file`).

    python benchmarks/linen_fields.py
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

OUT = Path(__file__).resolve().parent / "linen-new-thread.fields"
WORDS = ("the meeting is moved to thursday because half of team will be travelling please update your calendar and "
         "let me know if that works we can also review draft release notes deploy staging after lunch thanks everyone "
         "for quick feedback on design doc I think should ship it next week ok sounds good what about tests they pass "
         "now great news coffee anyone later").split()


def main() -> None:
    rnd = random.Random(7)

    def uid() -> str:
        return str(uuid.UUID(int=rnd.getrandbits(128)))

    author = {"id": uid(), "authsId": uid(), "username": "ada.lovelace", "displayName": "Ada Lovelace",
              "profileImageUrl": f"https://static.linen.dev/avatars/{uid()}.png", "externalUserId": None,
              "role": "MEMBER"}
    thread_id, channel_id = uid(), uid()
    body = " ".join(rnd.choice(WORDS) for _ in range(40))
    message = {"id": uid(), "body": body, "sentAt": "2026-12-07T01:02:03.456Z", "usersId": author["id"],
               "author": author, "mentions": [], "attachments": [], "reactions": [], "threadId": thread_id,
               "externalId": None, "messageFormat": "LINEN"}
    thread = {"id": thread_id, "incrementId": 48213, "externalThreadId": None, "viewCount": 0,
              "sentAt": "1733533323456", "lastReplyAt": "1733533323456", "slug": "-".join(body.split()[:6]),
              "messageCount": 1, "title": None, "hidden": False, "state": "OPEN", "pinned": False,
              "resolutionId": None, "channelId": channel_id,
              "channel": {"id": channel_id, "channelName": "general", "hidden": False, "default": True,
                          "accountId": uid()},
              "messages": [message]}
    fields = {"channel_id": channel_id, "thread_id": thread_id, "message_id": message["id"], "imitation_id": uid(),
              "is_thread": True, "is_reply": False, "message": json.dumps(message, separators=(",", ":")),
              "thread": json.dumps(thread, separators=(",", ":"))}  # as JSON.stringify writes them
    OUT.write_text(json.dumps(fields, separators=(",", ":"))[1:-1] + "\n")
    print(f"{OUT}: {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
