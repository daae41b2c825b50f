"""The console's presence figures: topics tracked in presence, and presences (connections x topics)."""

from __future__ import annotations

import pytest

from conftest import ADMIN_KEY, per_test_server, server_starter
from test_http_api import Api, api, client  # noqa: F401  (fixtures)

# test_http_api's fixtures run on the module's event loop; here each test has a server of its own.
pytestmark = pytest.mark.asyncio(loop_scope="module")
start_server = server_starter("module")
server = per_test_server("module")

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def test_stats_tell_presence_topics_from_presences(api: Api) -> None:
    # Two users on two tracked topics (and a lobby, not tracked): 2 topics in presence, 4 presences.
    async with api.subscriber("room:topic:7", "room:topic:8", "room:lobby:1", sub="ada"), \
            api.subscriber("room:topic:7", "room:topic:8", sub="bob"):
        stats = (await api.get("/api/stats", headers=AUTH)).json()
    assert (stats["topics"], stats["presence_topics"], stats["presences"]) == (3, 2, 4)
    after = (await api.get("/api/stats", headers=AUTH)).json()
    assert (after["presence_topics"], after["presences"]) == (0, 0)


async def test_the_page_labels_each_figure_by_what_it_counts(api: Api) -> None:
    # The topics table's presence column: users, then connections, as its header's title says.
    page = (await api.get("/console")).body.decode()
    script = (await api.get("/console/topics.js")).body.decode()
    assert 'title="users / connections">presence' in page
    assert "`${number(row.presence.users)} / ${number(row.presence.connections)}`" in script
