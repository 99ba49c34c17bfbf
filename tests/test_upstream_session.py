"""The upstream call goes through requests.Session.send on the proxy's Session and
HTTPAdapter subclasses (proxy_app/upstream.py), with the settings that make it add nothing."""

from __future__ import annotations

import requests

from proxy_app import upstream as transport_module
from proxy_app.upstream import ProxyAdapter
from proxy_app.upstream import ProxySession
from proxy_app.upstream import RelayedResponse
from proxy_app.upstream import Transport
from tests.upstream import fixed


def test_relayed_response_has_exactly_requests_attributes():
    # RelayedResponse sets requests' attributes itself (no per-response cookie jar): a
    # requests release that adds or renames one must fail here.
    assert list(vars(RelayedResponse())) == list(vars(requests.Response()))


def test_session_is_the_proxys_own_and_adds_nothing():
    session = Transport(pool_maxsize=4).session
    assert type(session) is ProxySession
    assert session.trust_env is False and dict(session.headers) == {} and session.max_redirects == 0
    assert type(session.get_adapter("http://x")) is ProxyAdapter is type(session.get_adapter("https://x"))
    assert session.get_redirect_target(object()) is None


def test_every_request_goes_through_session_send(make_client, upstream, monkeypatch):
    calls = []
    real_send = requests.Session.send

    def spy(self, request, **kwargs):
        calls.append((type(self), type(request), request.url, kwargs))
        return real_send(self, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", spy)
    upstream.route("/t/a%2fb", fixed(302, [("Location", "http://elsewhere.invalid/"), ("Content-Length", "9")], b"moved-302"))
    client = make_client({"path": "/p", "target": upstream.url + "/t", "include_subpath": True})
    response = client.get("/p/a%2fb?x=%2f")
    # The redirect is relayed whole: requests neither followed it nor read its body.
    assert (response.status_code, response.headers["Location"], response.data) == (302, "http://elsewhere.invalid/", b"moved-302")
    ((session_type, request_type, url, kwargs),) = calls
    assert session_type is ProxySession and request_type is transport_module.UpstreamRequest
    assert url == upstream.url + "/t/a%2fb?x=%2f"
    assert kwargs["stream"] is True and kwargs["allow_redirects"] is False and kwargs["proxies"] == {}
    assert upstream.requests[0].target == "/t/a%2fb?x=%2f"
