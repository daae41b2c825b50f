"""Settings from env vars and CLI flags, every value parser, and the CLI as a real subprocess."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sys
import time

import aiohttp
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conftest import JWT_SECRET, PUBLISH_KEY, ROOT, make_token
from push_service import config
from push_service.config import OPTIONS, ConfigError, Settings, parse_duration

STRONG_SECRET = "s" * 40


def load(**env: str) -> Settings:
    return Settings.load(environ=env)


def config_error(**env: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(**env)
    return caught.value


def public_pem(key=None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# --- loading


def test_defaults():
    settings = load()
    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 4000
    assert settings.env == "development"
    assert settings.service_keys == ()
    assert settings.jwt_secret is None
    assert settings.jwt_public_key is None
    assert settings.jwt_algorithms == ()
    assert settings.jwt_leeway == 0.0
    assert settings.allowed_origins == ()
    assert settings.require_topics_claim is False
    assert settings.heartbeat_timeout == 60.0
    assert settings.max_frame_bytes == 64 * 1024
    assert settings.max_publish_bytes == 1024 * 1024
    assert settings.max_topics_per_connection == 100
    assert settings.send_buffer_bytes == 1024 * 1024
    assert settings.api_message_topic == "lobby"
    assert settings.log_level == "info"
    assert settings.log_format == "json"
    assert settings.dev_mode is False


def test_every_option_has_a_settings_field_and_a_flag():
    fields = {field.name for field in dataclasses.fields(Settings)}
    for option in OPTIONS:
        assert option.field in fields
        assert option.env.startswith("PUSH_")
        assert option.flag == "--" + option.env[len("PUSH_"):].lower().replace("_", "-")
    assert len({option.env for option in OPTIONS}) == len(OPTIONS)


def test_load_from_env():
    settings = load(PUSH_HOST="0.0.0.0", PUSH_PORT="8080", PUSH_SERVICE_KEY="k1, k2,,", PUSH_JWT_SECRET="secret",
                    PUSH_JWT_AUDIENCE="push", PUSH_JWT_ISSUER="backend", PUSH_JWT_LEEWAY="5s",
                    PUSH_ALLOWED_ORIGINS="https://a.example.com, //*.example.org",
                    PUSH_REQUIRE_TOPICS_CLAIM="yes", PUSH_HEARTBEAT_TIMEOUT="45s", PUSH_MAX_FRAME_BYTES="1KiB",
                    PUSH_MAX_PUBLISH_BYTES="2MiB", PUSH_MAX_TOPICS_PER_CONNECTION="7",
                    PUSH_SEND_BUFFER_BYTES="64KiB", PUSH_API_MESSAGE_TOPIC="thread", PUSH_LOG_LEVEL="DEBUG",
                    PUSH_LOG_FORMAT="text")
    assert settings.host == "0.0.0.0"
    assert settings.port == 8080
    assert settings.service_keys == ("k1", "k2")
    assert settings.jwt_secret == "secret"
    assert settings.jwt_audience == "push"
    assert settings.jwt_issuer == "backend"
    assert settings.jwt_leeway == 5.0
    assert settings.allowed_origins == ("https://a.example.com", "//*.example.org")
    assert settings.require_topics_claim is True
    assert settings.heartbeat_timeout == 45.0
    assert settings.max_frame_bytes == 1024
    assert settings.max_publish_bytes == 2 * 1024 * 1024
    assert settings.max_topics_per_connection == 7
    assert settings.send_buffer_bytes == 65536
    assert settings.api_message_topic == "thread"
    assert settings.log_level == "debug"
    assert settings.log_format == "text"


def test_overrides_win_over_env():
    settings = Settings.load(environ={"PUSH_PORT": "8080", "PUSH_HOST": "0.0.0.0", "PUSH_LOG_LEVEL": "error"},
                             overrides={"PUSH_PORT": "9090", "PUSH_LOG_LEVEL": "debug"})
    assert settings.port == 9090
    assert settings.log_level == "debug"
    assert settings.host == "0.0.0.0"  # not overridden: the env value stays


def test_bad_env_value_ignored_when_overridden():
    assert Settings.load(environ={"PUSH_PORT": "nope"}, overrides={"PUSH_PORT": "1234"}).port == 1234


def test_load_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("PUSH_MAX_TOPICS_PER_CONNECTION", "9")
    assert Settings.load().max_topics_per_connection == 9


def test_empty_values():
    settings = load(PUSH_JWT_SECRET="", PUSH_JWT_AUDIENCE="", PUSH_SERVICE_KEY="", PUSH_ALLOWED_ORIGINS="",
                    PUSH_JWT_PUBLIC_KEY="", PUSH_REQUIRE_TOPICS_CLAIM="")
    assert settings.jwt_secret is None
    assert settings.jwt_audience is None
    assert settings.service_keys == ()
    assert settings.allowed_origins == ()
    assert settings.jwt_public_key is None
    assert settings.require_topics_claim is False


# --- parsers


@pytest.mark.parametrize("raw, seconds", [("60", 60.0), ("45s", 45.0), ("500ms", 0.5), ("1m", 60.0), ("5m", 300.0),
                                          ("1h", 3600.0), ("0.5", 0.5), ("1.5s", 1.5), (" 10s ", 10.0),
                                          ("0", 0.0)])
def test_parse_duration(raw, seconds):
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["", "abc", "-1", "1d", "s", "1 minute", "1e3", "1,5s", "1s2"])
def test_parse_duration_refuses(raw):
    with pytest.raises(ValueError):
        parse_duration(raw)


@pytest.mark.parametrize("raw, seconds", [("60", 60.0), ("45s", 45.0), ("500ms", 0.5), ("1m", 60.0)])
def test_duration_settings(raw, seconds):
    assert load(PUSH_HEARTBEAT_TIMEOUT=raw).heartbeat_timeout == pytest.approx(seconds)
    assert load(PUSH_JWT_LEEWAY=raw).jwt_leeway == pytest.approx(seconds)
    assert load(PUSH_MAX_DELIVERY_LAG=raw).max_delivery_lag == pytest.approx(seconds)


def test_delivery_lag_is_one_second_by_default_and_zero_turns_it_off():
    assert load().max_delivery_lag == 1.0
    assert load(PUSH_MAX_DELIVERY_LAG="0").max_delivery_lag == 0.0
    assert config_error(PUSH_MAX_DELIVERY_LAG="-1s").variable == "PUSH_MAX_DELIVERY_LAG"


def test_leeway_may_be_zero_but_heartbeat_timeout_may_not():
    assert load(PUSH_JWT_LEEWAY="0").jwt_leeway == 0.0
    assert config_error(PUSH_HEARTBEAT_TIMEOUT="0").variable == "PUSH_HEARTBEAT_TIMEOUT"
    assert config_error(PUSH_HEARTBEAT_TIMEOUT="0ms").variable == "PUSH_HEARTBEAT_TIMEOUT"


@pytest.mark.parametrize("raw, size", [("65536", 65536), ("64KiB", 65536), ("1MiB", 1048576), ("64k", 65536),
                                       ("64kb", 64000), ("1mb", 1000000), ("1M", 1048576), ("1GiB", 1024**3),
                                       ("1g", 1024**3), ("1gb", 1000**3), ("100b", 100), (" 2 KiB ", 2048),
                                       ("1", 1)])
def test_size_settings(raw, size):
    assert load(PUSH_MAX_FRAME_BYTES=raw).max_frame_bytes == size
    assert load(PUSH_SEND_BUFFER_BYTES=raw).send_buffer_bytes == size
    assert load(PUSH_MAX_PUBLISH_BYTES=raw).max_publish_bytes == size


@pytest.mark.parametrize("raw", ["", "0", "0KiB", "-1", "1.5MiB", "abc", "64 KiBs", "1TB", "KiB"])
def test_size_refuses(raw):
    error = config_error(PUSH_MAX_FRAME_BYTES=raw)
    assert error.variable == "PUSH_MAX_FRAME_BYTES"
    assert "PUSH_MAX_FRAME_BYTES" in str(error)


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on", " True "])
def test_bool_true(raw):
    assert load(PUSH_REQUIRE_TOPICS_CLAIM=raw).require_topics_claim is True


@pytest.mark.parametrize("raw", ["0", "false", "FALSE", "no", "off", ""])
def test_bool_false(raw):
    assert load(PUSH_REQUIRE_TOPICS_CLAIM=raw).require_topics_claim is False


@pytest.mark.parametrize("raw", ["maybe", "2", "y", "enabled"])
def test_bool_refuses(raw):
    assert config_error(PUSH_REQUIRE_TOPICS_CLAIM=raw).variable == "PUSH_REQUIRE_TOPICS_CLAIM"


@pytest.mark.parametrize("raw, port", [("0", 0), ("65535", 65535), (" 80 ", 80)])
def test_port(raw, port):
    assert load(PUSH_PORT=raw).port == port


@pytest.mark.parametrize("raw", ["-1", "65536", "http", "", "80.0"])
def test_port_refuses(raw):
    assert config_error(PUSH_PORT=raw).variable == "PUSH_PORT"


@pytest.mark.parametrize("raw", ["0", "-3", "many", "1.5"])
def test_positive_int_refuses(raw):
    assert config_error(PUSH_MAX_TOPICS_PER_CONNECTION=raw).variable == "PUSH_MAX_TOPICS_PER_CONNECTION"


@pytest.mark.parametrize("variable, raw", [("PUSH_ENV", "staging"), ("PUSH_LOG_LEVEL", "trace"),
                                           ("PUSH_LOG_FORMAT", "xml"), ("PUSH_API_MESSAGE_TOPIC", "community")])
def test_choice_refuses(variable, raw):
    error = config_error(**{variable: raw})
    assert error.variable == variable
    assert str(error).startswith(f"{variable}: ")
    assert repr(raw) in str(error)  # not a secret: the bad value is shown


def test_algorithms():
    assert load(PUSH_JWT_ALGORITHMS="hs256, HS512", PUSH_JWT_SECRET="x").jwt_algorithms == ("HS256", "HS512")
    ed_key = ed25519.Ed25519PrivateKey.generate()
    assert load(PUSH_JWT_ALGORITHMS="eddsa", PUSH_JWT_PUBLIC_KEY=public_pem(ed_key)).jwt_algorithms == ("EdDSA",)
    assert load(PUSH_JWT_ALGORITHMS="es256", PUSH_JWT_PUBLIC_KEY=public_pem()).jwt_algorithms == ("ES256",)


@pytest.mark.parametrize("raw", ["none", "HS256,none", "HS1", "RSA"])
def test_algorithms_refuse_unknown_and_none(raw):
    error = config_error(PUSH_JWT_ALGORITHMS=raw, PUSH_JWT_SECRET="x")
    assert error.variable == "PUSH_JWT_ALGORITHMS"
    assert "'none' is never accepted" in str(error)


def test_public_key_inline_with_escaped_newlines():
    pem = public_pem()
    assert load(PUSH_JWT_PUBLIC_KEY=pem.replace("\n", "\\n")).jwt_public_key == pem
    assert load(PUSH_JWT_PUBLIC_KEY=pem).jwt_public_key == pem


def test_public_key_from_a_file(tmp_path):
    pem = public_pem()
    path = tmp_path / "key.pem"
    path.write_text(pem)
    assert load(PUSH_JWT_PUBLIC_KEY=str(path)).jwt_public_key == pem


def test_public_key_file_missing():
    error = config_error(PUSH_JWT_PUBLIC_KEY="/nonexistent/key.pem")
    assert error.variable == "PUSH_JWT_PUBLIC_KEY"


def test_public_key_that_is_not_a_pem_public_key():
    garbage = "-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n"
    error = config_error(PUSH_JWT_PUBLIC_KEY=garbage)
    assert error.variable == "PUSH_JWT_PUBLIC_KEY"


def test_private_key_in_the_public_key_variable_is_refused_without_echoing_it():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    error = config_error(PUSH_JWT_PUBLIC_KEY=private)
    assert error.variable == "PUSH_JWT_PUBLIC_KEY"
    body = private.splitlines()[1]
    assert body not in str(error)


def test_public_key_of_an_unsupported_type():
    from cryptography.hazmat.primitives.asymmetric import dsa
    pem = dsa.generate_private_key(key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert config_error(PUSH_JWT_PUBLIC_KEY=pem).variable == "PUSH_JWT_PUBLIC_KEY"


@pytest.mark.parametrize("algorithms", ["RS256", "PS256", "ES384", "EdDSA", "ES256,RS256"])
def test_algorithm_that_does_not_suit_the_key_type(algorithms):
    error = config_error(PUSH_JWT_PUBLIC_KEY=public_pem(), PUSH_JWT_ALGORITHMS=algorithms)  # a P-256 key
    assert error.variable == "PUSH_JWT_ALGORITHMS"
    assert "PUSH_JWT_PUBLIC_KEY" in str(error)


# --- validation


@pytest.mark.parametrize("origins", ["https://", "//", "https://host:port", "https://host:99999",
                                     "https://ok.example.com,https://"])
def test_bad_allowed_origins(origins):
    error = config_error(PUSH_ALLOWED_ORIGINS=origins)
    assert error.variable == "PUSH_ALLOWED_ORIGINS"


def test_production_requires_keys():
    assert config_error(PUSH_ENV="production").variable == "PUSH_SERVICE_KEY"
    assert config_error(PUSH_ENV="production", PUSH_JWT_SECRET=STRONG_SECRET).variable == "PUSH_SERVICE_KEY"
    assert config_error(PUSH_ENV="production", PUSH_SERVICE_KEY="k").variable == "PUSH_JWT_SECRET"
    settings = load(PUSH_ENV="production", PUSH_SERVICE_KEY="k", PUSH_JWT_SECRET=STRONG_SECRET)
    assert settings.env == "production"
    assert load(PUSH_ENV="production", PUSH_SERVICE_KEY="k", PUSH_JWT_PUBLIC_KEY=public_pem()).jwt_secret is None


def test_production_refuses_a_short_secret_without_echoing_it():
    secret = "short-but-secret-value"
    error = config_error(PUSH_ENV="production", PUSH_SERVICE_KEY="k", PUSH_JWT_SECRET=secret)
    assert error.variable == "PUSH_JWT_SECRET"
    assert secret not in str(error)
    # Development does not insist on the length.
    assert load(PUSH_JWT_SECRET=secret).jwt_secret == secret


def test_secret_values_are_redacted_when_their_parser_fails(monkeypatch):
    def refuse(raw: str) -> str:
        raise ValueError("unusable")

    options = tuple(dataclasses.replace(option, parse=refuse) if option.secret else option for option in OPTIONS)
    monkeypatch.setattr(config, "OPTIONS", options)
    for variable in ("PUSH_SERVICE_KEY", "PUSH_JWT_SECRET"):
        error = config_error(**{variable: "hunter2-very-secret"})
        assert error.variable == variable
        assert "hunter2" not in str(error)
        assert "<redacted>" in str(error)


def test_hmac_algorithm_needs_a_secret():
    error = config_error(PUSH_JWT_ALGORITHMS="HS256")
    assert error.variable == "PUSH_JWT_ALGORITHMS"
    assert "PUSH_JWT_SECRET" in str(error)
    error = config_error(PUSH_JWT_ALGORITHMS="HS256", PUSH_JWT_PUBLIC_KEY=public_pem())
    assert error.variable == "PUSH_JWT_ALGORITHMS"


def test_asymmetric_algorithm_needs_a_public_key():
    error = config_error(PUSH_JWT_ALGORITHMS="RS256", PUSH_JWT_SECRET=STRONG_SECRET)
    assert error.variable == "PUSH_JWT_ALGORITHMS"
    assert "PUSH_JWT_PUBLIC_KEY" in str(error)
    assert load(PUSH_JWT_ALGORITHMS="ES256", PUSH_JWT_PUBLIC_KEY=public_pem()).jwt_algorithms == ("ES256",)


def test_redacted_summary_hides_secrets():
    pem = public_pem()
    settings = load(PUSH_SERVICE_KEY="key-one,key-two", PUSH_JWT_SECRET="the-jwt-secret", PUSH_JWT_PUBLIC_KEY=pem)
    summary = settings.redacted()
    text = orjson.dumps(summary).decode()
    for secret in ("key-one", "key-two", "the-jwt-secret", pem.splitlines()[1]):
        assert secret not in text
    assert summary["service_keys"] == "<2 set>"
    assert summary["jwt_secret"] == "<set>"
    assert summary["jwt_public_key"] == "<set>"
    assert load().redacted()["jwt_secret"] == "<unset>"
    assert set(summary) == {option.field for option in OPTIONS} | {"dev_mode"}


def test_config_error_names_the_variable():
    error = ConfigError("PUSH_PORT", "bad")
    assert error.variable == "PUSH_PORT"
    assert str(error) == "PUSH_PORT: bad"
    assert isinstance(error, ValueError)


# --- the CLI, as a subprocess


def cli_env(**overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PUSH_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "push_service", *args, env=cli_env() if env is None else env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        process.kill()
        await process.wait()
        raise
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.mark.parametrize("args, env, variable", [
    (["serve", "--port", "abc"], {}, "PUSH_PORT"),
    (["serve"], {"PUSH_HEARTBEAT_TIMEOUT": "soon"}, "PUSH_HEARTBEAT_TIMEOUT"),
    (["serve"], {"PUSH_MAX_FRAME_BYTES": "lots"}, "PUSH_MAX_FRAME_BYTES"),
    (["serve", "--require-topics-claim", "maybe"], {}, "PUSH_REQUIRE_TOPICS_CLAIM"),
    (["serve", "--allowed-origins", "https://"], {}, "PUSH_ALLOWED_ORIGINS"),
    (["serve", "--jwt-algorithms", "none"], {}, "PUSH_JWT_ALGORITHMS"),
    (["token", "--sub", "1"], {"PUSH_JWT_SECRET": "x", "PUSH_JWT_LEEWAY": "x"}, "PUSH_JWT_LEEWAY"),
    (["publish", "--channel", "1"], {"PUSH_PORT": "99999"}, "PUSH_PORT"),
])
async def test_cli_bad_value_exits_2(args, env, variable):
    code, stdout, stderr = await run_cli(*args, env=cli_env(**env))
    assert code == 2, stderr
    assert variable in stderr
    assert "configuration error" in stderr
    assert "Traceback" not in stderr


async def test_cli_production_without_keys_exits_2():
    code, _, stderr = await run_cli("serve", "--port", "0", env=cli_env(PUSH_ENV="production"))
    assert code == 2
    assert "PUSH_SERVICE_KEY" in stderr
    code, _, stderr = await run_cli("serve", "--port", "0", "--env", "production")
    assert code == 2
    assert "PUSH_SERVICE_KEY" in stderr


async def test_cli_production_short_secret_is_not_echoed():
    secret = "tiny-secret-value"
    code, stdout, stderr = await run_cli("serve", env=cli_env(
        PUSH_ENV="production", PUSH_SERVICE_KEY="publish-key-value", PUSH_JWT_SECRET=secret))
    assert code == 2
    assert "PUSH_JWT_SECRET" in stderr
    assert secret not in stderr + stdout
    assert "publish-key-value" not in stderr + stdout


async def test_cli_bad_public_key_exits_2():
    code, _, stderr = await run_cli("serve", "--port", "0", env=cli_env(
        PUSH_JWT_PUBLIC_KEY="-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n"))
    assert code == 2, stderr
    assert "PUSH_JWT_PUBLIC_KEY" in stderr
    assert "Traceback" not in stderr


async def test_cli_serve_help_lists_every_variable():
    code, stdout, _ = await run_cli("serve", "--help", env=cli_env(COLUMNS="80"))
    assert code == 0
    for option in OPTIONS:
        assert option.env in stdout
        assert option.flag in stdout


async def test_cli_token():
    code, stdout, stderr = await run_cli(
        "token", "--sub", "42", "--topics", "room:lobby:*", "--ttl", "1h", "--info", '{"username":"ada"}',
        env=cli_env(PUSH_JWT_SECRET=JWT_SECRET))
    assert code == 0, stderr
    token = stdout.strip()
    assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", token)
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "42"
    assert claims["topics"] == ["room:lobby:*"]
    assert claims["info"] == {"username": "ada"}
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 60
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


async def test_cli_token_carries_audience_and_issuer():
    code, stdout, _ = await run_cli("token", "--sub", "7", env=cli_env(
        PUSH_JWT_SECRET=JWT_SECRET, PUSH_JWT_AUDIENCE="push", PUSH_JWT_ISSUER="backend"))
    assert code == 0
    claims = jwt.decode(stdout.strip(), JWT_SECRET, algorithms=["HS256"], audience="push", issuer="backend")
    assert claims["sub"] == "7"
    assert "topics" not in claims and "info" not in claims


@pytest.mark.parametrize("args, variable", [
    (["--info", "[1]"], "--info"),
    (["--info", "not json"], "--info"),
    (["--ttl", "forever"], "--ttl"),
])
async def test_cli_token_bad_arguments(args, variable):
    code, _, stderr = await run_cli("token", "--sub", "1", *args, env=cli_env(PUSH_JWT_SECRET=JWT_SECRET))
    assert code == 2
    assert variable in stderr


async def test_cli_token_without_a_secret():
    code, _, stderr = await run_cli("token", "--sub", "1")
    assert code == 2
    assert "PUSH_JWT_SECRET" in stderr


async def test_cli_publish(server):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{server.ws_url}?vsn=2.0.0&token={make_token()}") as ws:
            await ws.send_json(["1", "1", "room:lobby:42", "phx_join", {}])
            assert (await ws.receive_json(timeout=5))[4] == {"status": "ok", "response": {}}
            code, stdout, stderr = await run_cli("publish", "--channel", "42", "--data", '{"message":"hi"}',
                                                 "--url", server.http_url, "--key", PUBLISH_KEY)
            assert code == 0, stderr
            assert orjson.loads(stdout) == {"status": 200, "published": 1, "delivered": 1}
            assert await ws.receive_json(timeout=5) == [
                None, None, "room:lobby:42", "new_msg", {"message": "hi", "channel_id": "42"}]


async def test_cli_publish_key_from_env(server):
    code, stdout, stderr = await run_cli("publish", "--topic", "user:9", "--event", "ping", "--url",
                                         server.http_url, env=cli_env(PUSH_SERVICE_KEY=PUBLISH_KEY))
    assert code == 0, stderr
    assert orjson.loads(stdout)["published"] == 1


async def test_cli_publish_wrong_key(server):
    code, stdout, stderr = await run_cli("publish", "--channel", "42", "--data", '{"message":"hi"}',
                                         "--url", server.http_url, "--key", "wrong-key")
    assert code == 1
    assert "401" in stderr
    assert stdout == ""


async def test_cli_publish_unreachable():
    code, _, stderr = await run_cli("publish", "--channel", "1", "--url", "http://127.0.0.1:9", "--key", "k")
    assert code == 1
    assert "cannot reach" in stderr


async def test_cli_publish_bad_data():
    code, _, stderr = await run_cli("publish", "--channel", "1", "--data", "[1]", "--key", "k")
    assert code == 2
    assert "--data" in stderr


# --- dev mode


async def test_dev_mode_banner_and_generated_keys_work():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "push_service", "serve", "--host", "127.0.0.1", "--port", "0",
        env=cli_env(), cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stderr_reader = asyncio.create_task(process.stderr.read())
    try:
        lines: list[str] = []

        async def read_banner() -> None:
            while not any("curl" in line for line in lines):
                raw = await process.stdout.readline()
                if not raw:
                    raise AssertionError(f"server exited before its banner: {lines}")
                lines.append(raw.decode().rstrip("\n"))

        await asyncio.wait_for(read_banner(), 15)
        banner = "\n".join(lines)
        assert "DEV MODE" in banner
        key = re.search(r"^\s*export PUSH_SERVICE_KEY=(\S+)$", banner, re.M).group(1)
        secret = re.search(r"^\s*export PUSH_JWT_SECRET=(\S+)$", banner, re.M).group(1)
        assert len(key) >= 32 and len(secret) >= 32
        ws_url = re.search(r"(ws://127\.0\.0\.1:\d+/socket/websocket\?vsn=2\.0\.0&token=(\S+))", banner)
        token = ws_url.group(2)
        assert token in banner.split("client token", 1)[1].split("connect:", 1)[0]  # printed on its own, too
        curl = next(line for line in lines if "curl" in line)
        assert f"Authorization: Bearer {key}" in curl
        publish_url = re.search(r"(http://127\.0\.0\.1:\d+/api/message)", curl).group(1)

        assert jwt.decode(token, secret, algorithms=["HS256"])["sub"] == "dev"
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(ws_url.group(1)) as ws:
                await ws.send_json(["1", "1", "room:lobby:42", "phx_join", {}])
                reply = await ws.receive_json(timeout=5)
                # The defaults keep history: the reply carries the topic's position, broadcasts theirs.
                position = reply[4]["response"]["position"]
                assert reply == ["1", "1", "room:lobby:42", "phx_reply",
                                 {"status": "ok", "response": {"position": position}}]
                epoch, seq = position.split("~")
                response = await http.post(publish_url, json={"channel_id": "42", "message": "hello"},
                                           headers={"Authorization": f"Bearer {key}"})
                assert response.status == 200
                assert (await response.json())["delivered"] == 1
                assert await ws.receive_json(timeout=5) == [
                    None, f"{epoch}~{int(seq) + 1}", "room:lobby:42", "new_msg",
                    {"channel_id": "42", "message": "hello"}]
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except (TimeoutError, asyncio.TimeoutError):
            process.kill()
            await process.wait()
    logs = (await asyncio.wait_for(stderr_reader, 10)).decode()
    assert '"listening"' in logs  # the logs were captured
    for value in (key, secret, token):
        assert value not in logs
    assert '"dev_mode":true' in logs


@pytest.mark.parametrize(("url", "extra"), [("redis://127.0.0.1:6379/0", "redis"), ("nats://127.0.0.1:4222", "nats")])
def test_a_broker_without_its_client_names_the_extra(monkeypatch, url, extra):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("redis", "nats") else real(name, *args))
    with pytest.raises(ConfigError) as error:
        Settings.load({"PUSH_BROKER": url})
    assert error.value.variable == "PUSH_BROKER"
    assert f"pip install 'push-service[{extra}]'" in str(error.value)


@pytest.mark.parametrize(("url", "why"), [
    ("redis+cluster://127.0.0.1", "expected host:port for every seed"),
    ("redis+cluster://127.0.0.1:7000,:7001", "expected host:port for every seed"),
    ("redis+cluster://127.0.0.1:7000,127.0.0.1:70000", "expected host:port for every seed"),
    ("redis+cluster://127.0.0.1:7000/2", "database 0 only"),
])
def test_a_redis_cluster_url_names_what_is_wrong(url, why):
    with pytest.raises(ConfigError) as error:
        Settings.load({"PUSH_BROKER": url})
    assert error.value.variable == "PUSH_BROKER" and why in str(error.value)


def test_a_redis_cluster_url_takes_seeds_and_credentials():
    from push_service.values import parse_cluster_url

    assert Settings.load({"PUSH_BROKER": "redis+cluster://a:7000,b:7001"}).broker == "redis+cluster://a:7000,b:7001"
    parsed = parse_cluster_url("redis+cluster://user:p%40ss@10.0.0.1:7000,[::1]:7001")
    assert (parsed.seeds, parsed.username, parsed.password) == ((("10.0.0.1", 7000), ("::1", 7001)), "user", "p@ss")


def test_auth_callback_settings():
    url = "https://backend.example/api/jwt/who"
    settings = load(PUSH_AUTH_CONNECT_URL=url, PUSH_AUTH_JOIN_URL="http://backend:3000/can", PUSH_AUTH_MODE="callback",
                    PUSH_AUTH_TIMEOUT="500ms", PUSH_AUTH_CACHE_SECONDS="0", PUSH_AUTH_FORWARD_HEADERS="Cookie, X-Tenant",
                    PUSH_AUTH_MAX_CONCURRENCY="8")
    assert (settings.auth_connect_url, settings.auth_mode, settings.auth_timeout, settings.auth_cache_seconds,
            settings.auth_forward_headers, settings.auth_max_concurrency) == (url, "callback", 0.5, 0.0,
                                                                              ("cookie", "x-tenant"), 8)
    defaults = load()
    assert (defaults.auth_connect_url, defaults.auth_join_url, defaults.auth_mode, defaults.auth_timeout,
            defaults.auth_cache_seconds, defaults.auth_max_concurrency) == (None, None, "fallback", 2.0, 30.0, 64)
    assert load(PUSH_AUTH_JOIN_URL="http://backend/can").auth_join_url == "http://backend/can"  # JWTs + join checks
    assert config_error(PUSH_AUTH_CONNECT_URL="ftp://backend/who").variable == "PUSH_AUTH_CONNECT_URL"
    assert config_error(PUSH_AUTH_JOIN_URL="backend/can").variable == "PUSH_AUTH_JOIN_URL"
    assert config_error(PUSH_AUTH_MODE="callback").variable == "PUSH_AUTH_MODE"  # callback to nowhere
    assert config_error(PUSH_AUTH_MODE="sometimes").variable == "PUSH_AUTH_MODE"
    assert config_error(PUSH_AUTH_FORWARD_HEADERS="cookie").variable == "PUSH_AUTH_FORWARD_HEADERS"
    assert config_error(PUSH_AUTH_CONNECT_URL=url, PUSH_AUTH_FORWARD_HEADERS="bad header").variable == \
        "PUSH_AUTH_FORWARD_HEADERS"
    assert config_error(PUSH_AUTH_TIMEOUT="0").variable == "PUSH_AUTH_TIMEOUT"
    assert config_error(PUSH_AUTH_MAX_CONCURRENCY="0").variable == "PUSH_AUTH_MAX_CONCURRENCY"


def test_production_with_callback_auth_needs_no_jwt_key():
    url = "https://backend.example/who"
    assert load(PUSH_ENV="production", PUSH_SERVICE_KEY="k", PUSH_AUTH_CONNECT_URL=url,
                PUSH_AUTH_MODE="callback").jwt_secret is None
    # In fallback mode our JWTs still count: a key for them is still required.
    assert config_error(PUSH_ENV="production", PUSH_SERVICE_KEY="k",
                        PUSH_AUTH_CONNECT_URL=url).variable == "PUSH_JWT_SECRET"


def test_auth_urls_are_redacted_in_the_settings_summary():
    summary = load(PUSH_AUTH_CONNECT_URL="https://user:hunter2@backend/who").redacted()
    assert "hunter2" not in summary["auth_connect_url"]
