"""Upstream TLS for real: a throwaway CA and server certificate, a fake upstream on HTTPS.

Verification is on by default (the system CAs), `ca_bundle` trusts a private CA, and
`verify_tls: false` turns it off with a warning at start-up.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.app import build_state
from gateway.config import ConfigError, parse_config
from gateway.testing.fake_upstream import FakeUpstream
from gateway.testing.harness import run_gateway
from tests.integration._support import BOUND, CHAT, DONE, chat_body, config_for, json_error


@dataclass
class Pki:
    """A CA, and a server certificate it signed, as PEM files."""

    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_pki(directory: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Pki:
    """A fresh CA and a server certificate for `hosts` (IP addresses or DNS names)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Sluice test CA"))
        .issuer_name(_name("Sluice test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


class TlsUpstream(FakeUpstream):
    """FakeUpstream served over HTTPS with the given certificate."""

    def __init__(self, pki: Pki) -> None:
        super().__init__()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki.cert_pem, pki.key_pem)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/v1"

    async def start(self) -> TlsUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


async def _post(
    http: aiohttp.ClientSession, config: dict[str, Any], stream: bool = True
) -> tuple[int, bytes]:
    async with (
        run_gateway(config) as gw,
        asyncio.timeout(BOUND),
        http.post(gw.v1 + CHAT, json=chat_body(stream=stream)) as resp,
    ):
        return resp.status, await resp.read()


@pytest.mark.parametrize("stream", [True, False])
async def test_an_unknown_ca_is_refused_by_default_with_a_clear_502(
    pki: Pki, http: aiohttp.ClientSession, stream: bool
) -> None:
    async with TlsUpstream(pki) as upstream:
        status, raw = await _post(http, config_for(upstream), stream)
        assert upstream.exchanges == []
    assert status == 502
    error = json_error(raw)
    assert error["code"] == "upstream_tls_error"
    assert "TLS verification of upstream 'fake' failed" in error["message"]
    assert "certificate" in error["message"]
    assert "ca_bundle" in error["message"]
    assert b"Traceback" not in raw


async def test_ca_bundle_trusts_the_private_ca(pki: Pki, http: aiohttp.ClientSession) -> None:
    async with TlsUpstream(pki) as upstream:
        status, raw = await _post(http, config_for(upstream, ca_bundle=str(pki.ca_pem)))
        (exchange,) = upstream.exchanges
    assert status == 200
    assert raw.endswith(DONE)
    assert exchange.path == "/v1/chat/completions"


async def test_ca_bundle_still_checks_the_host_name(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    pki = make_pki(tmp_path, hosts=("upstream.internal.example",))
    async with TlsUpstream(pki) as upstream:
        status, raw = await _post(http, config_for(upstream, ca_bundle=str(pki.ca_pem)))
        assert upstream.exchanges == []
    assert status == 502
    error = json_error(raw)
    assert error["code"] == "upstream_tls_error"
    assert "127.0.0.1" in error["message"]


async def test_verify_tls_false_connects_and_warns_once_at_start_up(
    pki: Pki, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sluice")
    async with TlsUpstream(pki) as upstream:
        config = config_for(upstream, verify_tls=False)
        async with run_gateway(config) as gw:
            for _ in range(2):
                async with (
                    asyncio.timeout(BOUND),
                    http.post(gw.v1 + CHAT, json=chat_body()) as resp,
                ):
                    assert resp.status == 200
                    assert (await resp.read()).endswith(DONE)
    warnings = [r for r in caplog.records if "verify_tls" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "'fake'" in warnings[0].getMessage()


@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
def test_an_unreadable_ca_bundle_is_a_config_error_naming_the_key(
    tmp_path: Path, kind: str
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    for bundle, reason in ((tmp_path / "missing.pem", "No such file"), (garbage, "")):
        config = parse_config(
            {
                "upstreams": {
                    "u": {"kind": kind, "base_url": "https://127.0.0.1:1", "ca_bundle": str(bundle)}
                },
                "routes": [{"model": "m", "upstream": "u"}],
            },
            {},
        )
        with pytest.raises(ConfigError) as info:
            build_state(config, registry={})
        assert str(info.value).startswith(f"upstreams.u.ca_bundle: cannot load '{bundle}'")
        assert reason in str(info.value)
