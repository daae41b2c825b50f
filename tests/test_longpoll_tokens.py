"""Long-poll session tokens (push_service/transports/longpoll_tokens.py), in process: which secret signs
them, so that every node of a cluster accepts every other node's tokens and nothing else does."""

from __future__ import annotations

import pytest

from push_service.config import Settings
from push_service.transports.longpoll_tokens import SessionRef, SessionTokens, parse

NODE = "0123456789ab"


def ref(token: str) -> SessionRef:
    parsed = parse(token)
    assert isinstance(parsed, SessionRef), token
    return parsed


def test_nodes_sharing_the_jwt_secret_accept_each_others_tokens_for_the_same_user_only():
    settings = Settings(jwt_secret="a-shared-secret-0123456789abcdef0123", service_keys=("publish",))
    mine, theirs = SessionTokens(settings, NODE), SessionTokens(settings, "ba9876543210")
    key, token = mine.new("ada")
    assert ref(token) == (NODE, key, ref(token).signature)
    assert theirs.valid(ref(token), "ada")
    assert not theirs.valid(ref(token), "bob")  # moved to another user
    assert not theirs.valid(ref(token)._replace(node="ba9876543210"), "ada")  # pointed at another node
    other_secret = SessionTokens(settings.replace(jwt_secret="another-secret-0123456789abcdef01234"), NODE)
    assert not other_secret.valid(ref(token), "ada")


def test_without_a_jwt_secret_the_publish_keys_sign_the_first_and_any_verifies():
    # A public-key JWT setup: PUSH_JWT_SECRET unset, the publish keys are what every node shares.
    old = SessionTokens(Settings(service_keys=("old-key",)), NODE)
    rotating = SessionTokens(Settings(service_keys=("old-key", "new-key")), NODE)
    new = SessionTokens(Settings(service_keys=("new-key",)), NODE)
    _, by_old = old.new("ada")
    _, by_rotating = rotating.new("ada")
    _, by_new = new.new("ada")
    assert rotating.valid(ref(by_old), "ada") and rotating.valid(ref(by_new), "ada")
    assert old.valid(ref(by_rotating), "ada")  # the first listed key signs
    assert not new.valid(ref(by_old), "ada")  # once the old key is gone: 410, and phoenix.js reopens


def test_with_neither_secret_each_process_draws_its_own():
    first, second = SessionTokens(Settings(), NODE), SessionTokens(Settings(), NODE)
    _, token = first.new("ada")
    assert first.valid(ref(token), "ada")
    assert not second.valid(ref(token), "ada")


@pytest.mark.parametrize("token,expected", [
    (None, False), ("eyJhbGciOi.x.y", False),  # not a session token: a GET opens one
    ("lp.", True), ("lp.a.b", True), ("lp.a..c", True), ("lp.a.b.c.d", True),  # malformed or old: 410
])
def test_parse(token, expected):
    assert parse(token) is expected
