import aiohttp

from conftest import PUBLISH_KEY, make_token


async def test_publish_reaches_a_joined_socket(server):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{server.ws_url}?vsn=2.0.0&token={make_token()}") as ws:
            await ws.send_json(["1", "1", "room:lobby:42", "phx_join", {}])
            assert await ws.receive_json(timeout=5) == [
                "1", "1", "room:lobby:42", "phx_reply", {"status": "ok", "response": {}}]
            response = await http.post(f"{server.http_url}/api/message",
                                       json={"channel_id": "42", "message": "hi", "token": PUBLISH_KEY})
            assert response.status == 200
            assert (await response.json())["delivered"] == 1
            assert await ws.receive_json(timeout=5) == [
                None, None, "room:lobby:42", "new_msg", {"channel_id": "42", "message": "hi"}]
