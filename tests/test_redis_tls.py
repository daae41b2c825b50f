"""rediss:// URLs against a real redis-server with TLS on a loopback port (issue 14: no third-party private
internals). The broker's own connections build their TLS context from the URL's `ssl_*` options with the
stdlib; each URL must connect, or be refused, exactly as redis-py (which serves the broker's other commands)
connects or refuses with the same URL.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from brokers import BrokerProcess, free_port, require_binary
from push_service.broker.redis_connection import RedisConnection, endpoint, tls_context

ON_MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")

TIMEOUT = 5.0


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
           names: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
    if issuer is None:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                        critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


class Pki:
    """A throwaway CA; a server certificate for 127.0.0.1 only, and a client certificate."""

    def __init__(self, folder: Path) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _issue("push-service test CA", ca_key, None)
        self.ca, _ = _write(folder / "ca", ca, ca_key)
        server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        self.server_cert, self.server_key = _write(folder / "server", _issue(
            "redis", server_key, (ca.subject, ca_key), [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            server_key)
        self.client_cert, self.client_key = _write(folder / "client", _issue(
            "push-service", client_key, (ca.subject, ca_key)), client_key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def _tls_redis(pki: Pki, auth_clients: str) -> BrokerProcess:
    binary = require_binary("redis-server")
    port = free_port()
    return await BrokerProcess(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--tls-cert-file", pki.server_cert, "--tls-key-file", pki.server_key, "--tls-ca-cert-file", pki.ca,
         "--tls-auth-clients", auth_clients], "Ready to accept connections", port).start()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tls_redis(pki: Pki) -> AsyncIterator[BrokerProcess]:
    """Client certificates optional."""
    server = await _tls_redis(pki, "optional")
    yield server
    await server.kill()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mutual_tls_redis(pki: Pki) -> AsyncIterator[BrokerProcess]:
    """Client certificates required."""
    server = await _tls_redis(pki, "yes")
    yield server
    await server.kill()


async def ours(url: str) -> bool:
    try:
        connection = await RedisConnection.open(endpoint(url), TIMEOUT)
    except (ConnectionError, ssl.SSLError, OSError):
        return False
    try:  # in TLS 1.3 a server refuses a client certificate after the handshake: at the first command
        return await asyncio.wait_for(connection.call([("PING",)]), TIMEOUT) == b"PONG"
    except ConnectionError:
        return False
    finally:
        connection.close()


async def redis_py(url: str) -> bool:
    client = redis.asyncio.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    try:
        return bool(await client.ping())
    except (redis.exceptions.ConnectionError, ssl.SSLError, OSError):
        return False
    finally:
        await client.aclose()


# (query, whether it connects to the server whose certificate names 127.0.0.1, signed by our CA)
CASES = {
    "our CA": ("ssl_ca_certs={ca}", True),
    "system CAs only (the default)": ("", False),
    "certificates not checked": ("ssl_cert_reqs=none", True),
    "certificate checked, optional": ("ssl_cert_reqs=optional&ssl_ca_certs={ca}", True),
    "host name checked (the default) on a name the certificate lacks": ("ssl_ca_certs={ca}", False),
    "host name not checked": ("ssl_ca_certs={ca}&ssl_check_hostname=false", True),
    "TLS 1.3 at least": ("ssl_ca_certs={ca}&ssl_min_version=772", True),
    "a client certificate it need not send": ("ssl_ca_certs={ca}&ssl_certfile={cert}&ssl_keyfile={key}", True),
}


@ON_MODULE_LOOP
@pytest.mark.parametrize("case", list(CASES))
async def test_a_rediss_url_connects_or_is_refused_as_redis_py_would(pki: Pki, tls_redis: BrokerProcess,
                                                                     case: str) -> None:
    query, connects = CASES[case]
    # "localhost" resolves to the server too, but its certificate names 127.0.0.1 only.
    host = "localhost" if "lacks" in case else "127.0.0.1"
    url = f"rediss://{host}:{tls_redis.port}/0?" + query.format(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    assert await ours(url) is connects
    assert await redis_py(url) is connects


@ON_MODULE_LOOP
async def test_a_server_that_requires_a_client_certificate_gets_the_one_the_url_names(
        pki: Pki, mutual_tls_redis: BrokerProcess) -> None:
    base = f"rediss://127.0.0.1:{mutual_tls_redis.port}/0?ssl_ca_certs={pki.ca}"
    with_certificate = f"{base}&ssl_certfile={pki.client_cert}&ssl_keyfile={pki.client_key}"
    assert await ours(with_certificate) and await redis_py(with_certificate)
    assert not await ours(base)


def test_each_ssl_option_sets_the_context_as_redis_py_documents_it(pki: Pki) -> None:
    default = tls_context({})
    assert (default.verify_mode, default.check_hostname) == (ssl.CERT_REQUIRED, True)
    unchecked = tls_context({"ssl_cert_reqs": "none"})
    assert (unchecked.verify_mode, unchecked.check_hostname) == (ssl.CERT_NONE, False)
    assert tls_context({"ssl_cert_reqs": "optional"}).verify_mode == ssl.CERT_OPTIONAL
    assert not tls_context({"ssl_check_hostname": False}).check_hostname
    assert tls_context({"ssl_min_version": 772}).minimum_version == ssl.TLSVersion.TLSv1_3
    assert len(tls_context({"ssl_ca_certs": pki.ca}).get_ca_certs()) >= 1
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        tls_context({"ssl_cert_reqs": "sometimes"})
    assert endpoint("redis://127.0.0.1").tls is None
    assert endpoint("rediss://127.0.0.1?ssl_check_hostname=false").tls.check_hostname is False  # type: ignore[union-attr]
