"""Upstream failures before the response began: the caller is told the class of failure,
the access line and the metric name it, and one WARNING says why, never a secret."""

from __future__ import annotations

import http.client
import logging
import socket
import ssl

import pytest
import requests
from urllib3 import exceptions as u3

from proxy_app import errors
from proxy_app.wire import UnparsableHead
from tests.conftest import SECRET
from tests.upstream import close_without_response
from tests.upstream import stall


def refused_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: a connect is refused at once
    return port


def raw_head(head: bytes):
    def handler(req, w):
        w.send_raw(head)
        w.close()

    return handler


def wrapped(cause: BaseException) -> BaseException:
    """The chain requests and urllib3 build around a socket-level failure in urlopen."""
    try:
        raise u3.MaxRetryError(None, "/t", cause)
    except u3.MaxRetryError as exc:
        return requests.exceptions.ConnectionError(exc)


def new_connection(cause: OSError) -> BaseException:
    conn_error = u3.NewConnectionError(None, f"Failed to establish a new connection: {cause}")
    conn_error.__cause__ = cause
    return wrapped(conn_error)


# Chains as requests raises them (adapters.HTTPAdapter.send) -> the kind.
CHAINS = [
    pytest.param(new_connection(socket.gaierror(-2, "Name or service not known")), "dns_error", id="dns"),
    pytest.param(new_connection(ConnectionRefusedError(111, "Connection refused")), "connection_refused", id="refused"),
    pytest.param(new_connection(OSError(113, "No route to host")), "connection_error", id="unreachable"),
    pytest.param(wrapped(u3.ConnectTimeoutError(None, "timed out")), "connect_timeout", id="connect-timeout"),
    pytest.param(requests.exceptions.ReadTimeout(u3.ReadTimeoutError(None, "/t", "timed out")), "read_timeout", id="read-timeout"),
    pytest.param(wrapped(u3.SSLError(ssl.SSLCertVerificationError(1, "certificate verify failed"))), "tls_untrusted", id="tls-untrusted"),
    pytest.param(wrapped(u3.SSLError(ssl.SSLError(1, "wrong version number"))), "tls_error", id="tls-other"),
    pytest.param(
        requests.exceptions.ConnectionError(u3.ProtocolError("Connection aborted.", http.client.RemoteDisconnected("closed"))),
        "connection_reset", id="remote-disconnected",
    ),
    pytest.param(
        requests.exceptions.ConnectionError(u3.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))),
        "connection_reset", id="reset",
    ),
    pytest.param(
        requests.exceptions.ConnectionError(u3.ProtocolError("Connection aborted.", UnparsableHead("bad"))),
        "invalid_response", id="unparsable-head",
    ),
    pytest.param(u3.HTTPError("something else"), "protocol_error", id="other"),
]


@pytest.mark.parametrize(("exc", "kind"), CHAINS)
def test_failure_kind(exc, kind):
    assert errors.failure_kind(errors.causes(exc)) == kind
    status, _ = errors.UPSTREAM_FAILURES[kind]
    assert errors.upstream_failure(exc).status == status


def test_causes_stops_at_cycles():
    a = OSError("a")
    b = OSError("b")
    a.__context__, b.__context__ = b, a
    assert errors.causes(a) == [a, b]


@pytest.fixture
def access_lines(caplog):
    caplog.set_level(logging.INFO)
    return caplog


def failure_cases(upstream):
    """(endpoint fields, upstream handler or None, status, kind, cause in the WARNING)."""
    return {
        "dns": ({"target": "http://no-such-host.invalid/t"}, None, 502, "dns_error", "no-such-host.invalid"),
        "refused": ({"target": f"http://127.0.0.1:{refused_port()}/t"}, None, 502, "connection_refused", "Connection refused"),
        "closed": ({"target": upstream.url + "/t"}, close_without_response(), 502, "connection_reset", "closed connection without response"),
        "timeout": ({"target": upstream.url + "/t", "timeout": 0.5}, stall(3), 504, "read_timeout", "timed out"),
        "bad-head": (
            {"target": upstream.url + "/t"}, raw_head(b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nhi"), 502, "invalid_response", "UnparsableHead",
        ),
    }


@pytest.mark.parametrize("case", ["dns", "refused", "closed", "timeout", "bad-head"])
def test_each_failure_class_is_told_logged_and_counted(upstream, make_client, access_lines, case):
    fields, handler, status, kind, cause = failure_cases(upstream)[case]
    if handler is not None:
        upstream.route("/t", handler)
    client = make_client({"path": "/p", "headers": {"Authorization": "bearer os.environ/SECRET"}, **fields})
    response = client.post("/p", data=b'{"a":1}', headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json["error"]
    assert error["message"] == errors.UPSTREAM_FAILURES[kind][1]
    assert error["type"] == ("upstream_timeout" if status == 504 else "upstream_error")
    assert response.headers["x-litellm-call-id"]
    warnings = [r.getMessage() for r in access_lines.records if r.levelno == logging.WARNING and "upstream failure" in r.getMessage()]
    assert len(warnings) == 1, warnings
    (warning,) = warnings
    host = fields["target"].split("/")[2]
    assert f"endpoint /p -> {host}: " in warning and warning.endswith(f"({kind})")
    if kind != "dns_error":
        assert cause in warning
    assert SECRET not in warning and SECRET not in response.get_data(as_text=True)


def test_a_secret_target_is_not_named_in_the_warning(make_client, access_lines):
    port = refused_port()
    client = make_client({"path": "/p", "target": "os.environ/HIDDEN_TARGET"}, env={"HIDDEN_TARGET": f"http://127.0.0.1:{port}/secret-path"})
    response = client.get("/p")
    assert response.status_code == 502
    (warning,) = [r.getMessage() for r in access_lines.records if "upstream failure" in r.getMessage()]
    assert "(secret target)" in warning and str(port) not in warning and "secret-path" not in warning
