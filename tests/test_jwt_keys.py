"""Key settings that cannot work are refused at start (exit 2, the variable named), never echoed."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from test_config import cli_env, run_cli


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem() -> str:
    return _rsa().public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def private_pem() -> str:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def key_material(pem: str) -> list[str]:
    """The base64 lines of a PEM: what must never reach a terminal or a log."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


@pytest.mark.parametrize("make_pem", [public_pem, private_pem], ids=["public", "private"])
async def test_a_pem_key_as_the_jwt_secret_is_refused_at_start(make_pem):
    pem = make_pem()
    env = cli_env(PUSH_JWT_SECRET=pem, PUSH_SERVICE_KEY="k" * 32)
    code, stdout, stderr = await run_cli("serve", "--port", "0", env=env, timeout=20)
    assert code == 2, stderr
    assert "configuration error" in stderr and "PUSH_JWT_SECRET" in stderr
    assert "PUSH_JWT_PUBLIC_KEY" in stderr  # where a public key belongs
    assert "Traceback" not in stderr
    for line in key_material(pem):
        assert line not in stdout + stderr


@pytest.mark.parametrize("value", [
    "".join(key_material(public_pem())),                    # the PEM's body without its armour
    base64.b64encode(b"\x30\x82" + b"k" * 200).decode(),    # any bare base64
    "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\\nline-two",
])
async def test_a_bad_public_key_is_refused_without_echoing_it(value):
    env = cli_env(PUSH_JWT_PUBLIC_KEY=value, PUSH_SERVICE_KEY="k" * 32)
    code, stdout, stderr = await run_cli("serve", "--port", "0", env=env, timeout=20)
    assert code == 2, stderr
    assert "configuration error" in stderr and "PUSH_JWT_PUBLIC_KEY" in stderr
    assert "Traceback" not in stderr
    assert value[:24] not in stdout + stderr
