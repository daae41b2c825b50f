"""A presence key is the JWT `sub`; one that names an Object.prototype member (`__proto__`,
`constructor`, ...) must not break other users' stock phoenix.js 1.6 Presence (its syncState and
syncDiff keep presences in plain objects)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import aiohttp
import pytest

from test_cluster import connect
from test_presence_js import new_topic, presence_client, presences, user_token  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow  # phoenix.js clients under Node

HOSTILE = ["__proto__", "constructor", "toString", "hasOwnProperty", "valueOf", "__defineGetter__"]
ESCAPED = {f"~{sub}" for sub in HOSTILE}  # what a client sees of them (see push_service/presence/service.py)


async def test_object_prototype_subs_cannot_break_phoenix_16_presence(server, presence_client):
    topic = new_topic()
    async with presence_client("16", server, topic, token=user_token("ada")) as ada, \
            aiohttp.ClientSession() as http, AsyncExitStack() as stack:
        await ada.joined()
        await ada.wait_sync(lambda listed: set(listed) == {"ada"})
        for sub in HOSTILE:  # their presence_diff joins reach ada's client
            await (await stack.enter_async_context(connect(http, server, sub))).join(topic)
        everyone = ESCAPED | {"ada"}
        await ada.wait_sync(lambda listed: set(listed) == everyone)

        # A client joining now gets all of them in its presence_state.
        async with presence_client("16", server, topic, token=user_token("bob")) as bob:
            await bob.joined()
            listed = await bob.wait_sync(lambda listed: set(listed) == everyone | {"bob"})
            assert all(len(metas) == 1 for metas in listed.values()), listed
            await ada.wait_sync(lambda listed: set(listed) == everyone | {"bob"})
            assert set(await presences(server, topic)) == everyone | {"bob"}
            assert not [e for e in ada.events + bob.events if e["event"] in ("error", "close", "channel_error")]

        await stack.aclose()  # the hostile users leave: their leaves apply too
        await ada.wait_sync(lambda listed: set(listed) == {"ada"})


async def test_a_sub_that_starts_with_the_escape_stays_distinct(server, presence_client):
    topic = new_topic()
    async with presence_client("16", server, topic, token=user_token("ada")) as ada, \
            aiohttp.ClientSession() as http, connect(http, server, "~constructor") as tilde, \
            connect(http, server, "constructor") as plain:
        await ada.joined()
        await tilde.join(topic)
        await plain.join(topic)
        listed = await ada.wait_sync(lambda listed: len(listed) == 3)
        assert set(listed) == {"ada", "~constructor", "~~constructor"}
