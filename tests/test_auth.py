"""Client JWT verification, publish keys, topic families and the join rule, Origin checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from push_service import auth
from push_service.auth import (AuthError, Identity, PublishKeys, TokenVerifier, _identity_from, accepted_algorithms,
                               mint_token)
from push_service.config import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS, Settings
from push_service.origin import AllowedOrigin, OriginPolicy
from push_service.topics import (
    COMMUNITY,
    LOBBY,
    THREAD,
    USER,
    Topic,
    claim_allows,
    is_topic,
    may_join,
    parse_topic,
    topic_for,
)

SECRET = "unit-test-secret-" + "0123456789abcdef" * 4


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(sub: str | None = "u1", ttl: float = 3600, **extra) -> dict:
    now = int(time.time())
    body = {"iat": now, "exp": now + ttl}
    if sub is not None:
        body["sub"] = sub
    body.update(extra)
    return {key: value for key, value in body.items() if value is not None}


def hs(body: dict, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(body, secret, algorithm=algorithm)


def hand_signed(header: dict, body: dict, key: bytes, digest=hashlib.sha256) -> str:
    """A JWT assembled by hand, HMAC-signed with any bytes (PyJWT refuses PEM keys as HMAC secrets)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(body).encode())}"
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def verifier(**settings) -> TokenVerifier:
    settings.setdefault("jwt_secret", SECRET)
    return TokenVerifier(Settings(**settings))


def refused(verifier: TokenVerifier, token: str | None) -> str:
    with pytest.raises(AuthError) as caught:
        verifier.verify(token)
    return caught.value.reason


def public_pem(private_key) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def private_pem(private_key) -> str:
    return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key():
    return ed25519.Ed25519PrivateKey.generate()


# --- HS256 tokens


def test_valid_token():
    body = claims("42", topics=["room:lobby:*"], info={"username": "ada"})
    identity = verifier().verify(hs(body))
    assert identity == Identity(sub="42", exp=float(body["exp"]), topics=("room:lobby:*",),
                                info={"username": "ada"})


def test_valid_token_without_optional_claims():
    identity = verifier().verify(hs(claims("42")))
    assert identity.topics is None
    assert identity.info == {}


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token(token):
    assert refused(verifier(), token) == "missing"


@pytest.mark.parametrize("token", ["abc", "a.b.c", "a.b", "....", "eyJhbGciOiJIUzI1NiJ9", "not a jwt at all",
                                   b64url(b'{"alg":"HS256"}') + ".!!!." + b64url(b"sig")])
def test_malformed_token(token):
    assert refused(verifier(), token) == "malformed"


def test_header_ok_but_garbage_payload_is_malformed():
    header = b64url(b'{"alg":"HS256","typ":"JWT"}')
    signing_input = f"{header}.{b64url(b'not json')}"
    signature = b64url(hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest())
    assert refused(verifier(), f"{signing_input}.{signature}") == "malformed"


def test_expired():
    assert refused(verifier(), hs(claims(ttl=-10))) == "expired"


def test_not_yet_valid():
    assert refused(verifier(), hs(claims(nbf=int(time.time()) + 60))) == "not_yet_valid"


def test_issued_in_the_future():
    assert refused(verifier(), hs(claims(iat=int(time.time()) + 60))) == "not_yet_valid"


def test_wrong_secret():
    assert refused(verifier(), hs(claims(), secret="another-secret-" + "x" * 64)) == "bad_signature"


def test_tampered_payload():
    token = hs(claims("u1"))
    header, _, signature = token.split(".")
    forged = f"{header}.{b64url(json.dumps(claims('admin')).encode())}.{signature}"
    assert refused(verifier(), forged) == "bad_signature"


def test_alg_none_is_refused():
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims()).encode())
    for token in (f"{header}.{body}.", f"{header}.{body}.{b64url(b'x')}"):
        assert refused(verifier(), token) == "bad_algorithm"
    # Spelling variants of none, too.
    for alg in ("None", "NONE", "nOnE"):
        header = b64url(json.dumps({"alg": alg}).encode())
        assert refused(verifier(), f"{header}.{body}.") == "bad_algorithm"


def test_missing_alg_header_is_refused():
    assert refused(verifier(), hand_signed({"typ": "JWT"}, claims(), SECRET.encode())) == "bad_algorithm"


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_other_hmac_algorithm_refused_when_only_hs256_accepted(algorithm):
    assert verifier().algorithms == ("HS256",)
    assert refused(verifier(), hs(claims(), algorithm=algorithm)) == "bad_algorithm"


def test_configured_algorithms_are_honoured():
    check = verifier(jwt_algorithms=("HS512",))
    assert check.verify(hs(claims(), algorithm="HS512")).sub == "u1"
    assert refused(check, hs(claims())) == "bad_algorithm"


# --- asymmetric keys and key confusion


def test_key_confusion_hs256_signed_with_the_public_key_is_refused(rsa_key):
    pem = public_pem(rsa_key)
    check = TokenVerifier(Settings(jwt_public_key=pem))
    assert check.algorithms == ("RS256",)
    for key in (pem.encode(), pem.strip().encode()):
        assert refused(check, hand_signed({"alg": "HS256", "typ": "JWT"}, claims(), key)) == "bad_algorithm"


def test_key_confusion_refused_even_when_hs256_is_configured_too(rsa_key):
    pem = public_pem(rsa_key)
    check = TokenVerifier(Settings(jwt_secret=SECRET, jwt_public_key=pem, jwt_algorithms=("HS256", "RS256")))
    # HS256 is checked against the secret only, never against the public key.
    assert refused(check, hand_signed({"alg": "HS256"}, claims(), pem.encode())) == "bad_signature"
    assert check.verify(hs(claims())).sub == "u1"
    assert check.verify(jwt.encode(claims(), private_pem(rsa_key), algorithm="RS256")).sub == "u1"


def test_hmac_algorithm_configured_without_a_secret_is_refused(rsa_key):
    # Settings validation forbids this; the verifier stays safe even if handed such settings.
    check = TokenVerifier(Settings(jwt_public_key=public_pem(rsa_key), jwt_algorithms=("HS256",)))
    assert refused(check, hand_signed({"alg": "HS256"}, claims(), public_pem(rsa_key).encode())) == "bad_algorithm"


@pytest.mark.parametrize("key_name, algorithm", [("rsa_key", "RS256"), ("ec_key", "ES256"), ("ed_key", "EdDSA")])
def test_asymmetric_tokens_accepted(request, key_name, algorithm):
    private_key = request.getfixturevalue(key_name)
    check = TokenVerifier(Settings(jwt_public_key=public_pem(private_key)))
    assert check.algorithms == (algorithm,)
    token = jwt.encode(claims("7", topics=["user:7"]), private_pem(private_key), algorithm=algorithm)
    identity = check.verify(token)
    assert identity.sub == "7"
    assert identity.topics == ("user:7",)
    # An HS256 token (valid for some secret) is not accepted by a public-key-only verifier.
    assert refused(check, hs(claims())) == "bad_algorithm"


def test_asymmetric_token_signed_by_another_key_is_refused(rsa_key):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    check = TokenVerifier(Settings(jwt_public_key=public_pem(rsa_key)))
    assert refused(check, jwt.encode(claims(), private_pem(other), algorithm="RS256")) == "bad_signature"


def test_rs256_key_does_not_accept_rs512_unless_configured(rsa_key):
    token = jwt.encode(claims(), private_pem(rsa_key), algorithm="RS512")
    assert refused(TokenVerifier(Settings(jwt_public_key=public_pem(rsa_key))), token) == "bad_algorithm"
    check = TokenVerifier(Settings(jwt_public_key=public_pem(rsa_key), jwt_algorithms=("RS512",)))
    assert check.verify(token).sub == "u1"


def test_accepted_algorithms_defaults(rsa_key):
    assert accepted_algorithms(Settings(jwt_secret=SECRET)) == ("HS256",)
    assert accepted_algorithms(Settings()) == ()
    public = rsa_key.public_key()
    assert accepted_algorithms(Settings(jwt_secret=SECRET), public) == ("HS256", "RS256")
    assert accepted_algorithms(Settings(jwt_algorithms=("ES384",)), public) == ("ES384",)


def test_no_key_configured_refuses_everything():
    check = TokenVerifier(Settings())
    assert refused(check, hs(claims())) == "bad_algorithm"


# --- audience, issuer, leeway, required claims


def test_audience_and_issuer_required_when_configured():
    check = verifier(jwt_audience="push", jwt_issuer="backend")
    assert check.verify(hs(claims(aud="push", iss="backend"))).sub == "u1"
    assert check.verify(hs(claims(aud=["other", "push"], iss="backend"))).sub == "u1"
    assert refused(check, hs(claims(aud="other", iss="backend"))) == "bad_audience"
    assert refused(check, hs(claims(iss="backend"))) == "missing_claim"
    assert refused(check, hs(claims(aud="push", iss="someone-else"))) == "bad_issuer"
    assert refused(check, hs(claims(aud="push"))) == "missing_claim"


def test_token_with_an_audience_refused_when_none_is_configured():
    assert refused(verifier(), hs(claims(aud="push"))) == "bad_audience"


def test_issuer_not_checked_when_unset():
    assert verifier().verify(hs(claims(iss="anyone"))).sub == "u1"


def test_leeway():
    expired_a_bit = hs(claims(ttl=-5))
    early_a_bit = hs(claims(nbf=int(time.time()) + 5))
    assert refused(verifier(), expired_a_bit) == "expired"
    assert refused(verifier(), early_a_bit) == "not_yet_valid"
    lenient = verifier(jwt_leeway=30.0)
    assert lenient.verify(expired_a_bit).sub == "u1"
    assert lenient.verify(early_a_bit).sub == "u1"
    assert refused(lenient, hs(claims(ttl=-60))) == "expired"


def test_missing_exp_refused():
    body = claims()
    del body["exp"]
    assert refused(verifier(), hs(body)) == "missing_claim"


def test_missing_sub_refused():
    assert refused(verifier(), hs(claims(sub=None))) == "missing_claim"


def test_bad_sub_refused():
    assert refused(verifier(), hs(claims(sub=""))) == "bad_claims"
    # PyJWT itself refuses a non-string sub (InvalidSubjectError); older versions left it to us.
    assert refused(verifier(), hs({**claims(), "sub": 42})) in ("invalid", "bad_claims")


@pytest.mark.parametrize("topics", ["room:lobby:*", {"room:lobby:1": True}, [1, 2], ["room:lobby:1", None], [""],
                                    ["ok", ""], 42, True])
def test_bad_topics_claim(topics):
    assert refused(verifier(), hs(claims(topics=topics))) == "bad_claims"


def test_empty_topics_claim_means_nothing_may_be_joined():
    identity = verifier().verify(hs(claims(topics=[])))
    assert identity.topics == ()
    assert not may_join(identity, parse_topic("room:lobby:1"), False)


@pytest.mark.parametrize("info", ["ada", ["ada"], 42, True])
def test_bad_info_claim(info):
    assert refused(verifier(), hs(claims(info=info))) == "bad_claims"


def test_null_info_claim_is_refused():
    # `null` is not an object either.
    token = hand_signed({"alg": "HS256"}, {**claims(), "info": None}, SECRET.encode())
    assert refused(verifier(), token) == "bad_claims"


def test_auth_error_carries_its_label():
    error = AuthError("expired", "detail")
    assert error.reason == "expired"
    assert str(error) == "detail"


def test_mint_token_round_trip():
    settings = Settings(jwt_secret=SECRET, jwt_audience="push", jwt_issuer="backend")
    token = mint_token(settings, "42", ttl=60, topics=["room:lobby:*"], info={"username": "ada"})
    identity = TokenVerifier(settings).verify(token)
    assert identity.sub == "42"
    assert identity.topics == ("room:lobby:*",)
    assert identity.info == {"username": "ada"}
    assert 55 <= identity.exp - time.time() <= 61


def test_mint_token_with_a_private_key(ec_key):
    settings = Settings(jwt_public_key=public_pem(ec_key), jwt_algorithms=("ES256",))
    token = mint_token(settings, "42", ttl=60, private_key=private_pem(ec_key))
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert TokenVerifier(settings).verify(token).sub == "42"


def test_mint_token_without_a_key():
    with pytest.raises(ValueError):
        mint_token(Settings(), "42", ttl=60)


# --- parity with PyJWT's own decode


_PYJWT_REASONS = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "bad_audience"),
    (jwt.InvalidIssuerError, "bad_issuer"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.DecodeError, "malformed"),
    (jwt.InvalidTokenError, "invalid"),
)


def pyjwt_verdict(settings: Settings, token):
    """What TokenVerifier answered when it called jwt.decode (before it parsed tokens itself):
    an Identity, the AuthError reason, or the type of any other exception."""
    public_key = None
    if settings.jwt_public_key:
        public_key = serialization.load_pem_public_key(settings.jwt_public_key.encode())
    algorithms = accepted_algorithms(settings, public_key)

    def key_for(algorithm):
        if algorithm in HMAC_ALGORITHMS:
            return settings.jwt_secret
        return public_key if algorithm in ASYMMETRIC_ALGORITHMS else None

    if not token:
        return "missing"
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        return "malformed"
    algorithm = header.get("alg")
    if algorithm not in algorithms or key_for(algorithm) is None:
        return "bad_algorithm"
    try:
        body = jwt.decode(token, key_for(algorithm), algorithms=[algorithm], audience=settings.jwt_audience,
                          issuer=settings.jwt_issuer, leeway=settings.jwt_leeway,
                          options={"require": ["exp", "sub"]})
    except jwt.InvalidTokenError as exc:
        return next(reason for kind, reason in _PYJWT_REASONS if isinstance(exc, kind))
    except Exception as exc:  # noqa: BLE001 - e.g. InvalidKeyError: compared by type
        return type(exc)
    try:
        return _identity_from(body, int(body["exp"]))
    except AuthError as exc:
        return exc.reason


def our_verdict(check: TokenVerifier, token):
    try:
        return check.verify(token)
    except AuthError as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001
        return type(exc)


def raw_signed(header: bytes, body: bytes, key: bytes = SECRET.encode(), digest=hashlib.sha256) -> str:
    """A JWT from exact header and payload bytes, HMAC-signed with any key."""
    signing_input = f"{b64url(header)}.{b64url(body)}"
    return f"{signing_input}.{b64url(hmac.new(key, signing_input.encode(), digest).digest())}"


def parity_tokens(rsa_key, ec_key, ed_key) -> dict[str, str | None]:
    now = int(time.time())
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    good = hs(claims("u1", topics=["room:lobby:*"], info={"username": "ada"}))
    header, payload, signature = good.split(".")
    hs256 = b'{"alg":"HS256","typ":"JWT"}'
    body = json.dumps(claims()).encode()
    none_header = b64url(b'{"alg":"none","typ":"JWT"}')
    capital_none_header = b64url(b'{"alg":"None"}')
    # The last signature character with its unused low bits set: same bytes, non-canonical base64.
    loose_signature = signature[:-1] + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(signature[-1]) | 1]
    tokens: dict[str, str | None] = {
        "none": None, "empty": "",
        "valid": good,
        "valid_plain": hs(claims("u2")),
        "valid_hs512": hs(claims(), algorithm="HS512"),
        "expired": hs(claims(ttl=-60)),
        "expired_within_leeway": hs(claims(ttl=-5)),
        "exp_now": hs(claims(ttl=0)),
        "nbf_future": hs(claims(nbf=now + 60)),
        "nbf_within_leeway": hs(claims(nbf=now + 5)),
        "nbf_past": hs(claims(nbf=now - 5)),
        "nbf_string": hs(claims(nbf="soon")),
        "iat_future": hs(claims(iat=now + 60)),
        "iat_within_leeway": hs(claims(iat=now + 5)),
        "iat_string": hs(claims(iat="now")),
        "iat_null": raw_signed(hs256, json.dumps({**claims(), "iat": None}).encode()),
        "missing_exp": hs({key: value for key, value in claims().items() if key != "exp"}),
        "exp_null": raw_signed(hs256, json.dumps({**claims(), "exp": None}).encode()),
        "missing_sub": hs(claims(sub=None)),
        "sub_null": raw_signed(hs256, json.dumps({**claims(), "sub": None}).encode()),
        "sub_int": hs({**claims(), "sub": 42}),
        "sub_empty": hs(claims(sub="")),
        "exp_string_number": hs({**claims(), "exp": str(now + 3600)}),
        "exp_string": hs({**claims(), "exp": "tomorrow"}),
        "exp_float": hs({**claims(), "exp": now + 3600.5}),
        "exp_float_expired": hs({**claims(), "exp": now - 0.5}),
        "exp_true": hs({**claims(), "exp": True}),
        "exp_list": hs({**claims(), "exp": [now + 3600]}),
        "exp_nan": raw_signed(hs256, b'{"sub":"u1","exp":NaN}'),
        "exp_infinity": raw_signed(hs256, b'{"sub":"u1","exp":1e400}'),
        "exp_huge": raw_signed(hs256, b'{"sub":"u1","exp":100000000000000000000000000000}'),
        "info_huge_int": raw_signed(hs256, b'{"sub":"u1","exp":%d,"info":{"n":123456789012345678901234567890}}'
                                    % (now + 60)),
        "jti_int": hs(claims(jti=7)),
        "aud_right": hs(claims(aud="push")),
        "aud_list": hs(claims(aud=["other", "push"])),
        "aud_wrong": hs(claims(aud="other")),
        "aud_wrong_list": hs(claims(aud=["other", "more"])),
        "aud_empty_list": hs(claims(aud=[])),
        "aud_empty_string": hs(claims(aud="")),
        "aud_number": hs(claims(aud=5)),
        "aud_list_with_number": hs(claims(aud=["push", 5])),
        "aud_object": hs(claims(aud={"push": True})),
        "iss_right": hs(claims(iss="backend")),
        "iss_wrong": hs(claims(iss="someone-else")),
        "iss_number": raw_signed(hs256, json.dumps({**claims(), "iss": 5}).encode()),
        "aud_and_iss": hs(claims(aud="push", iss="backend")),
        "aud_list_and_iss": hs(claims(aud=["push"], iss="backend")),
        "wrong_secret": hs(claims(), secret="another-secret-" + "x" * 64),
        "tampered_payload": f"{header}.{b64url(json.dumps(claims('admin')).encode())}.{signature}",
        "tampered_signature": f"{header}.{payload}.{b64url(b'x' * 32)}",
        "empty_signature": f"{header}.{payload}.",
        "alg_none": f"{none_header}.{b64url(body)}.",
        "alg_none_signed": f"{none_header}.{b64url(body)}.{b64url(b'x')}",
        "alg_None": f"{capital_none_header}.{b64url(body)}.",
        "alg_missing": raw_signed(b'{"typ":"JWT"}', body),
        "alg_empty": raw_signed(b'{"alg":""}', body),
        "alg_list": raw_signed(b'{"alg":["HS256"]}', body),
        "key_confusion": hand_signed({"alg": "HS256", "typ": "JWT"}, claims(), public_pem(rsa_key).encode()),
        "rs256": jwt.encode(claims("7", topics=["user:7"]), private_pem(rsa_key), algorithm="RS256"),
        "rs256_expired": jwt.encode(claims(ttl=-60), private_pem(rsa_key), algorithm="RS256"),
        "rs256_other_key": jwt.encode(claims(), private_pem(other_rsa), algorithm="RS256"),
        "rs512": jwt.encode(claims(), private_pem(rsa_key), algorithm="RS512"),
        "ps256": jwt.encode(claims(), private_pem(rsa_key), algorithm="PS256"),
        "es256": jwt.encode(claims("8", aud="push", iss="backend"), private_pem(ec_key), algorithm="ES256"),
        "es256_short_signature": jwt.encode(claims(), private_pem(ec_key), algorithm="ES256")[:-8],
        "eddsa": jwt.encode(claims("9"), private_pem(ed_key), algorithm="EdDSA"),
        "two_segments": f"{header}.{payload}",
        "four_segments": f"{good}.{signature}",
        "one_segment": header,
        "dots_only": "..",
        "four_dots": "....",
        "bad_base64_header": f"!!{header}.{payload}.{signature}",
        "bad_base64_payload": f"{header}.{payload[:-1]}*.{signature}",
        "bad_base64_signature": f"{header}.{payload}.{signature}!",
        "base64_length_1_mod_4": f"{header}.{payload}.{signature}" + "A" * ((1 - len(signature)) % 4),
        "padded_signature": f"{header}.{payload}.{signature}" + "=" * (-len(signature) % 4),
        "over_padded_signature": f"{header}.{payload}.{signature}===",
        "padding_on_a_wrong_length": f"{header}.{payload}.{signature}" + "=" * (-len(signature) % 4 + 1),
        "padded_payload": f"{header}.{payload}" + "=" * (-len(payload) % 4) + f".{signature}",
        "junk_inside_payload": f"{header}.{payload[:8]}!!!!{payload[8:]}.{signature}",
        "newlines_inside_payload": f"{header}.{payload[:8]}\n\n\n\n{payload[8:]}.{signature}",
        "padding_inside_signature": f"{header}.{payload}.{signature[:4]}===={signature[4:]}",
        "non_canonical_signature": f"{header}.{payload}.{loose_signature}",
        "standard_alphabet": good.replace("-", "+").replace("_", "/"),
        "non_ascii": f"{header}.{payload}.{signature}é",
        "header_not_json": raw_signed(b"HS256", body),
        "header_array": raw_signed(b'["HS256"]', body),
        "header_kid_int": raw_signed(b'{"alg":"HS256","kid":1}', body),
        "header_kid_string": raw_signed(b'{"alg":"HS256","kid":"k1"}', body),
        "header_crit_unknown": raw_signed(b'{"alg":"HS256","crit":["exp"],"exp":1}', body),
        "header_crit_empty": raw_signed(b'{"alg":"HS256","crit":[]}', body),
        "header_crit_b64_absent": raw_signed(b'{"alg":"HS256","crit":["b64"]}', body),
        "header_b64_true": raw_signed(b'{"alg":"HS256","b64":true,"crit":["b64"]}', body),
        "header_b64_false": raw_signed(b'{"alg":"HS256","b64":false,"crit":["b64"]}', body),
        "header_b64_false_no_crit": raw_signed(b'{"alg":"HS256","b64":false}', body),
        "header_b64_false_detached": raw_signed(b'{"alg":"HS256","b64":false,"crit":["b64"]}', b""),
        "header_b64_false_no_crit_detached": raw_signed(b'{"alg":"HS256","b64":false}', b""),
        "header_nan": raw_signed(b'{"alg":"HS256","x":NaN}', body),
        "payload_not_json": raw_signed(hs256, b"not json"),
        "payload_array": raw_signed(hs256, b'["u1"]'),
        "payload_null": raw_signed(hs256, b"null"),
        "payload_empty": raw_signed(hs256, b""),
        "payload_bom": raw_signed(hs256, b"\xef\xbb\xbf" + body),
        "payload_utf16": raw_signed(hs256, json.dumps(claims()).encode("utf-16")),
        "payload_invalid_utf8": raw_signed(hs256, b'{"sub":"\xff","exp":%d}' % (now + 60)),
        "payload_lone_surrogate": raw_signed(hs256, b'{"sub":"u1","exp":%d,"info":{"x":"\\ud800"}}' % (now + 60)),
        "payload_duplicate_keys": raw_signed(hs256, b'{"sub":"a","sub":"b","exp":%d}' % (now + 60)),
        "payload_deep": raw_signed(hs256, b'{"sub":"u1","exp":%d,"info":{"x":%s}}'
                                   % (now + 60, b"[" * 5000 + b"]" * 5000)),
    }
    return tokens


def test_parity_with_pyjwt(rsa_key, ec_key, ed_key):
    """Every token, under every configuration, gets the verdict jwt.decode gave it (identity, or reason)."""
    rsa_pem, ec_pem, ed_pem = public_pem(rsa_key), public_pem(ec_key), public_pem(ed_key)
    configurations = {
        "hs256": Settings(jwt_secret=SECRET),
        "hs256_aud_iss": Settings(jwt_secret=SECRET, jwt_audience="push", jwt_issuer="backend"),
        "hs256_leeway": Settings(jwt_secret=SECRET, jwt_leeway=30.0),
        "hs_all": Settings(jwt_secret=SECRET, jwt_algorithms=("HS256", "HS384", "HS512")),
        "rs256": Settings(jwt_public_key=rsa_pem),
        "rs256_ps256": Settings(jwt_public_key=rsa_pem, jwt_algorithms=("RS256", "PS256")),
        "hs256_rs256": Settings(jwt_secret=SECRET, jwt_public_key=rsa_pem, jwt_algorithms=("HS256", "RS256")),
        "es256_aud_iss": Settings(jwt_public_key=ec_pem, jwt_audience="push", jwt_issuer="backend"),
        "eddsa_leeway": Settings(jwt_public_key=ed_pem, jwt_leeway=30.0),
        "pem_as_secret": Settings(jwt_secret=rsa_pem),  # PyJWT refuses the key itself, on every token
        "nothing": Settings(),
    }
    tokens = parity_tokens(rsa_key, ec_key, ed_key)
    verdicts: dict[tuple[str, str], object] = {}
    for config_name, settings in configurations.items():
        shared = TokenVerifier(settings)  # its header cache warm, unlike a fresh verifier's
        for token_name, token in tokens.items():
            expected = pyjwt_verdict(settings, token)
            assert our_verdict(TokenVerifier(settings), token) == expected, (config_name, token_name)
            assert our_verdict(shared, token) == expected, (config_name, token_name, "shared")
            verdicts[config_name, token_name] = expected
    # The matrix means something only if it reaches every verdict; a few pinned down by name.
    outcomes = {verdict if isinstance(verdict, (str, type)) else "accepted" for verdict in verdicts.values()}
    assert outcomes >= {"accepted", "missing", "malformed", "bad_algorithm", "bad_signature", "expired",
                        "not_yet_valid", "missing_claim", "bad_audience", "bad_issuer", "invalid", "bad_claims",
                        jwt.InvalidKeyError}
    assert verdicts["hs256", "expired"] == "expired"
    assert verdicts["hs256_leeway", "expired_within_leeway"].sub == "u1"
    assert verdicts["hs256", "exp_string"] == "malformed"
    assert isinstance(verdicts["hs256", "exp_float"], Identity)
    assert verdicts["hs256", "iat_future"] == "not_yet_valid"
    assert verdicts["hs256", "aud_right"] == "bad_audience"
    assert verdicts["hs256_aud_iss", "aud_list_and_iss"].sub == "u1"
    assert verdicts["hs256_aud_iss", "aud_right"] == "missing_claim"  # no iss
    assert verdicts["rs256", "key_confusion"] == "bad_algorithm"
    assert verdicts["hs256_rs256", "key_confusion"] == "bad_signature"
    assert verdicts["hs256", "alg_none"] == "bad_algorithm"
    assert verdicts["hs256", "four_segments"] == verdicts["hs256", "two_segments"] == "malformed"
    assert verdicts["hs256", "padded_signature"].sub == "u1"
    assert verdicts["hs256", "payload_bom"].sub == "u1"
    assert verdicts["hs256", "info_huge_int"].info == {"n": 123456789012345678901234567890}
    assert verdicts["es256_aud_iss", "es256"].sub == "8"
    assert verdicts["eddsa_leeway", "eddsa"].sub == "9"


def test_header_cache_is_bounded():
    check = verifier()
    for index in range(500):
        header = {"alg": "HS256", "kid": f"key-{index}"}
        assert check.verify(jwt.encode(claims(), SECRET, algorithm="HS256", headers=header)).sub == "u1"
    assert len(check._headers) <= 64


def test_a_token_accepted_before_is_refused_once_it_expires(monkeypatch):
    check = verifier(jwt_leeway=5.0)
    now = time.time()
    token = hs(claims(ttl=60))
    assert check.verify(token).sub == "u1"
    monkeypatch.setattr(auth.time, "time", lambda: now + 64)  # past exp, within the leeway
    assert check.verify(token).sub == "u1"
    monkeypatch.setattr(auth.time, "time", lambda: now + 66)
    assert refused(check, token) == "expired"
    assert refused(check, token) == "expired"  # and again, from the full check


def test_a_token_accepted_before_does_not_vouch_for_another():
    check = verifier()
    token = hs(claims())
    assert check.verify(token).sub == "u1"
    assert check.verify(token) == check.verify(token)
    head, payload, signature = token.split(".")
    assert refused(check, f"{head}.{payload}.{signature[:-2]}AA") == "bad_signature"
    assert refused(check, f"{head}.{b64url(json.dumps(claims('u2')).encode())}.{signature}") == "bad_signature"
    assert refused(verifier(), token[:-1]) in ("bad_signature", "malformed")


def test_verified_tokens_held_are_bounded(monkeypatch):
    monkeypatch.setattr(auth, "VERIFIED_CACHE_SIZE", 10)
    check = verifier()
    tokens = [hs(claims(f"u{index}")) for index in range(50)]
    for token in tokens:
        assert check.verify(token).sub == jwt.decode(token, SECRET, algorithms=["HS256"])["sub"]
    assert len(check._verified) == 10
    assert check.verify(tokens[0]).sub == "u0"  # out of the cache: verified again


# --- publish keys


def test_publish_keys_rotation():
    keys = PublishKeys(("old-key", "new-key"))
    assert keys.check("old-key")
    assert keys.check("new-key")
    assert not keys.check("other-key")
    assert not keys.check("old-key ")
    assert not keys.check("old")
    assert not keys.check("old-keyX")
    assert not keys.check("OLD-KEY")


@pytest.mark.parametrize("candidate", ["", None])
def test_publish_keys_empty_or_none(candidate):
    assert not PublishKeys(("key",)).check(candidate)


def test_no_publish_keys_accept_nothing():
    keys = PublishKeys(())
    for candidate in ("", None, "anything"):
        assert not keys.check(candidate)


def test_publish_keys_non_ascii():
    keys = PublishKeys(("clé-✓",))
    assert keys.check("clé-✓")
    assert not keys.check("cle-✓")


# --- topics


@pytest.mark.parametrize("name, family, ident", [
    ("room:lobby:42", LOBBY, "42"),
    ("room:lobby:a:b", LOBBY, "a:b"),
    ("room:topic:9", THREAD, "9"),
    ("room:community-1", COMMUNITY, "community-1"),
    ("room:lobby", COMMUNITY, "lobby"),   # no second colon: a community named "lobby"
    ("room:topic", COMMUNITY, "topic"),
    ("room:lobbyist", COMMUNITY, "lobbyist"),
    ("user:u1", USER, "u1"),
    ("user:ü", USER, "ü"),
])
def test_parse_topic_families(name, family, ident):
    assert parse_topic(name) == Topic(name, family, ident)


@pytest.mark.parametrize("name", ["room:lobby:", "room:topic:", "room:", "user:", "user", "room", "", "phoenix",
                                  "rooms:1", "users:1", "Room:1", "chat:1", "userx:1", " room:1",
                                  "room:lobby:" + "x" * 245])
def test_parse_topic_unmatched(name):
    assert parse_topic(name) is None


def test_parse_topic_255_byte_limit():
    fits = "room:" + "x" * 250
    assert len(fits.encode()) == 255
    assert parse_topic(fits) == Topic(fits, COMMUNITY, "x" * 250)
    assert parse_topic(fits + "x") is None
    # Bytes, not characters: 2-byte characters count twice.
    assert parse_topic("room:" + "é" * 125) is not None
    assert parse_topic("room:" + "é" * 126) is None


def test_is_topic_says_what_parse_topic_says():
    pieces = ["room:", "user:", "lobby:", "topic:", "room", "user", ":", "x", "é", "", " ", "Room:"]
    names = {a + b + c for a in pieces for b in pieces for c in pieces}
    names |= {"room:" + "x" * 250, "room:" + "x" * 251, "room:" + "é" * 125, "room:" + "é" * 126,
              "user:" + "x" * 250, "user:" + "x" * 251, "room:lobby:" + "x" * 244, "room:lobby:" + "x" * 245}
    for name in names:
        assert is_topic(name) == (parse_topic(name) is not None), name


@pytest.mark.parametrize("family, ident, name", [
    (LOBBY, "1", "room:lobby:1"), (THREAD, "2", "room:topic:2"), (COMMUNITY, "3", "room:3"), (USER, "4", "user:4")])
def test_topic_for(family, ident, name):
    assert topic_for(family, ident) == name
    assert parse_topic(name) == Topic(name, family, ident)


def test_topic_for_unknown_family():
    with pytest.raises(ValueError):
        topic_for("nope", "1")


def identity(sub: str = "u1", topics: tuple[str, ...] | None = None) -> Identity:
    return Identity(sub=sub, exp=time.time() + 60, topics=topics)


def test_user_topic_only_for_its_own_user():
    assert may_join(identity("u1"), parse_topic("user:u1"), False)
    assert may_join(identity("u1"), parse_topic("user:u1"), True)
    assert not may_join(identity("u1"), parse_topic("user:u2"), False)
    assert not may_join(identity("u1"), parse_topic("user:u10"), False)
    assert not may_join(identity("u10"), parse_topic("user:u1"), False)


def test_user_topic_of_another_user_refused_even_if_the_claim_lists_it():
    assert not may_join(identity("u1", ("user:u2", "user:*")), parse_topic("user:u2"), False)


def test_rooms_open_without_a_claim_unless_required():
    for name in ("room:lobby:1", "room:topic:2", "room:3"):
        assert may_join(identity(), parse_topic(name), False)
        assert not may_join(identity(), parse_topic(name), True)


def test_topics_claim_exact_and_prefix():
    allowed = identity(topics=("room:lobby:1", "room:topic:*", "room:c*"))
    assert may_join(allowed, parse_topic("room:lobby:1"), False)
    assert not may_join(allowed, parse_topic("room:lobby:10"), False)  # exact means exact
    assert not may_join(allowed, parse_topic("room:lobby:2"), False)
    assert may_join(allowed, parse_topic("room:topic:9"), False)
    assert may_join(allowed, parse_topic("room:topic:anything:at:all"), False)
    assert may_join(allowed, parse_topic("room:community"), False)
    assert not may_join(allowed, parse_topic("room:d"), False)
    # With REQUIRE_TOPICS_CLAIM the same claim decides the same way.
    assert may_join(allowed, parse_topic("room:lobby:1"), True)
    assert not may_join(allowed, parse_topic("room:lobby:2"), True)


def test_topics_claim_is_an_allowlist_for_the_user_topic_too():
    # When a claim is present it lists everything the token may join, its own user topic included.
    assert not may_join(identity("u1", ("room:*",)), parse_topic("user:u1"), False)
    assert may_join(identity("u1", ("user:u1",)), parse_topic("user:u1"), False)


def test_claim_allows():
    assert claim_allows(("*",), "room:lobby:1")
    assert claim_allows(("room:lobby:*",), "room:lobby:")  # a prefix match on the name itself
    assert not claim_allows(("room:lobby:*",), "room:lobby")
    assert not claim_allows((), "room:lobby:1")
    assert not claim_allows(("room:lobby:1*x",), "room:lobby:1")  # '*' only counts at the end


# --- origins


@pytest.mark.parametrize("origin, allowed", [
    ("https://app.example.com", True),
    ("https://app.example.com:443", True),   # the default port spelt out
    ("HTTPS://APP.EXAMPLE.COM", True),
    ("http://app.example.com", False),       # scheme mismatch
    ("https://app.example.com:8443", False),  # port mismatch
    ("https://example.com", False),
    ("https://evil.app.example.com", False),
    ("https://app.example.com.evil.com", False),
    ("wss://app.example.com", False),
])
def test_exact_origin(origin, allowed):
    assert OriginPolicy(("https://app.example.com",)).allows(origin) is allowed


@pytest.mark.parametrize("configured, origin, allowed", [
    ("http://localhost:3000", "http://localhost:3000", True),
    ("http://localhost:3000", "http://localhost:3001", False),
    ("http://localhost:3000", "http://localhost", False),
    ("http://example.com", "http://example.com:80", True),
    ("http://example.com", "http://example.com:8080", False),
    ("https://example.com:8443", "https://example.com:8443", True),
    ("https://example.com:8443", "https://example.com", False),
    ("//example.com:888", "https://example.com:888", True),
    ("//example.com:888", "http://example.com:888", True),
    ("//example.com:888", "http://example.com", False),
])
def test_origin_ports(configured, origin, allowed):
    assert OriginPolicy((configured,)).allows(origin) is allowed


@pytest.mark.parametrize("origin", ["http://example.com", "https://example.com", "https://example.com:8443",
                                    "chrome-extension://example.com"])
def test_scheme_less_origin_allows_any_scheme_and_port(origin):
    assert OriginPolicy(("//example.com",)).allows(origin)
    assert not OriginPolicy(("//example.com",)).allows(origin.replace("example.com", "example.org"))


@pytest.mark.parametrize("origin, allowed", [
    ("https://a.example.com", True),
    ("http://a.b.example.com", True),
    ("https://example.com", True),             # the bare domain too, as Phoenix
    ("https://example.com:9000", True),
    ("https://evilexample.com", False),
    ("https://example.com.evil.net", False),
    ("https://example.org", False),
    ("https://a.example.org", False),
])
def test_wildcard_origin(origin, allowed):
    assert OriginPolicy(("//*.example.com",)).allows(origin) is allowed


def test_wildcard_with_a_scheme():
    policy = OriginPolicy(("https://*.example.com",))
    assert policy.allows("https://a.example.com")
    assert not policy.allows("http://a.example.com")


def test_no_origin_header_passes():
    assert OriginPolicy(("https://app.example.com",)).allows(None)


def test_empty_list_allows_every_origin():
    policy = OriginPolicy(())
    for origin in ("https://anything.test", "null", "garbage", "", None):
        assert policy.allows(origin)


@pytest.mark.parametrize("origin", ["null", "", "garbage", "app.example.com", "https://", "https://[::1",
                                    "https://app.example.com:99999", "https://app.example.com:port", "://x",
                                    "file:///etc/passwd"])
def test_garbage_origin_refused(origin):
    assert OriginPolicy(("https://app.example.com", "//*.example.org")).allows(origin) is False


def test_several_allowed_origins():
    policy = OriginPolicy(("https://app.example.com", "//*.example.org", "http://localhost:3000"))
    assert policy.allows("https://app.example.com")
    assert policy.allows("http://x.example.org")
    assert policy.allows("http://localhost:3000")
    assert not policy.allows("http://localhost:3001")


@pytest.mark.parametrize("text, parsed", [
    ("https://app.example.com", AllowedOrigin("https", "app.example.com", 443)),
    ("http://app.example.com", AllowedOrigin("http", "app.example.com", 80)),
    ("https://App.Example.com:8443", AllowedOrigin("https", "app.example.com", 8443)),
    ("//example.com", AllowedOrigin(None, "example.com", None)),
    ("//example.com:888", AllowedOrigin(None, "example.com", 888)),
    ("//*.example.com", AllowedOrigin(None, "*.example.com", None)),
    ("example.com", AllowedOrigin(None, "example.com", None)),
])
def test_allowed_origin_parse(text, parsed):
    assert AllowedOrigin.parse(text) == parsed


@pytest.mark.parametrize("text", ["https://", "//", "", "https://host:notaport", "https://host:99999"])
def test_allowed_origin_parse_refuses_garbage(text):
    with pytest.raises(ValueError):
        OriginPolicy((text,))


@pytest.mark.parametrize("digest", ["sha256", "sha384", "sha512"])
def test_keyed_hash_is_hmac(digest):
    """The verifier's HMAC (RFC 2104 from hash states keyed once) equals the standard library's, for keys
    shorter than, as long as and longer than the hash's block, and for empty ones."""
    from push_service.auth import _KeyedHash

    for key_length in (0, 1, 32, 63, 64, 65, 127, 128, 129, 300):
        key = bytes(range(256)) * 2
        key = key[:key_length]
        keyed = _KeyedHash(key, digest)
        for message in (b"", b"a", b"header.payload" * 40):
            assert keyed.digest(message) == hmac.digest(key, message, digest), (key_length, message[:10])
