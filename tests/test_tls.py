"""Upstreams over TLS: the proxy's own connection class (wire.UpstreamHTTPSConnection, via
upstream.Transport) against a real TLS server on loopback, certificate verified.

The test's certificates come from the openssl command line. The proxy verifies with
requests' CA bundle; the tests point that bundle at their own certificate, as a machine's
bundle holds the public CAs that sign real upstreams' certificates.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import subprocess

import pytest
import requests.adapters

from tests.upstream import Upstream


@pytest.fixture(scope="module", autouse=True)
def _openssl():
    if shutil.which("openssl") is None:
        if "CI" in os.environ:
            pytest.fail("the openssl command is missing; CI must install it", pytrace=False)
        pytest.skip("needs the openssl command (apt-get install openssl)")


def self_signed(directory, name: str):
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    return {"trusted": self_signed(directory, "trusted"), "untrusted": self_signed(directory, "untrusted")}


def tls_server(cert_and_key) -> Upstream:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*cert_and_key)
    return Upstream(tls=context)


@pytest.fixture
def trusting(monkeypatch, certs):
    """The proxy's CA bundle holds the test's trusted certificate (read when a pool is made)."""
    monkeypatch.setattr(requests.adapters, "DEFAULT_CA_BUNDLE_PATH", str(certs["trusted"][0]))


@pytest.mark.parametrize("size", [7, 64 * 1024, 64 * 1024 + 1, 3 * 1024 * 1024], ids=["small", "one_write_max", "streamed", "3mib"])
def test_body_and_headers_cross_tls_exactly(make_client, certs, trusting, size):
    body = (b'{"q":"' + b"x" * size + b'"}')[:size] if size > 7 else b'{"a":1}'
    with tls_server(certs["trusted"]) as up:
        client = make_client({"path": "/p", "target": up.url + "/v1/rerank?v=1", "headers": {"Authorization": "bearer os.environ/SECRET"}})
        for _ in range(2):  # the second request reuses the pooled TLS connection
            response = client.post("/p", data=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 200
            assert json.loads(response.data) == {"method": "POST", "target": "/v1/rerank?v=1", "body_len": size, "sha256": hashlib.sha256(body).hexdigest()}
        first, second = up.wait_for_requests(2)
        assert first.conn_id == second.conn_id
        assert [name.lower() for name, _ in first.headers] == ["host", "content-type", "authorization", "content-length"]
        assert first.header("Host") == f"127.0.0.1:{up.port}"
        assert first.header("Authorization") == "bearer secret-upstream-key-42"
        assert (first.body_len, first.chunked) == (size, False)


def test_untrusted_certificate_is_a_tls_error_and_nothing_is_sent(make_client, certs, trusting):
    with tls_server(certs["untrusted"]) as up:
        client = make_client({"path": "/p", "target": up.url + "/t", "headers": {"Authorization": "bearer os.environ/SECRET"}})
        response = client.post("/p", data=b'{"a":1}', headers={"Content-Type": "application/json"})
        assert response.status_code == 502
        assert response.json["error"]["type"] == "upstream_error"
        assert response.json["error"]["message"] == "The upstream's TLS certificate is not trusted."
        assert up.requests == []  # the secret never left: verification failed before any request byte
