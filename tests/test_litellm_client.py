"""LiteLLM's own key-management client (``litellm.proxy.client``) against the admin API.

The app is served by a real HTTP server (werkzeug's, in a thread, on a port picked at run
time) and the client talks to it over loopback exactly as it would to LiteLLM's proxy: the
field names, methods and query parameters below are the ones its code sends.
"""

from __future__ import annotations

import threading

import pytest
import requests
from werkzeug.serving import WSGIRequestHandler
from werkzeug.serving import make_server

from proxy_app.keys import token_of
from tests.servers import open_store
from tests.test_admin_api import MASTER
from tests.test_admin_api import build_app


class QuietHandler(WSGIRequestHandler):
    # The development server's request line holds the query string (?key=...): not logged.
    def log_request(self, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def litellm_client():
    """litellm.proxy.client, imported with LiteLLM's offline switch (no model price download)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        from litellm.proxy import client

    return client


@pytest.fixture(params=["sqlite", "postgresql"])
def base_url(request, tmp_path):
    engine = open_store(request.param, tmp_path, request)
    server = make_server("127.0.0.1", 0, build_app(engine), threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)
    server.server_close()
    engine.dispose()


def test_generate_info_list_update_delete(base_url, litellm_client):
    client = litellm_client.Client(base_url=base_url, api_key=MASTER, timeout=10)
    made = client.keys.generate(models=["gpt-4o"], duration="1h", key_alias="client-app", team_id="team-1", user_id="user-1", aliases={}, config={}, spend=0.0)
    key = made["key"]
    assert key.startswith("sk-")
    assert made["token"] == token_of(key)
    assert (made["key_alias"], made["models"], made["team_id"], made["user_id"]) == ("client-app", ["gpt-4o"], "team-1", "user-1")
    assert made["expires"] is not None

    info = client.keys.info(key=key)
    assert info["key"] == made["token"]
    assert info["info"]["key_alias"] == "client-app"
    assert key not in str(info)
    assert client.keys.info(key=made["token"])["key"] == made["token"]

    listed = client.keys.list(page=1, size=10, key_alias="client-app", return_full_object=True, include_team_keys=True, team_id="team-1", user_id="user-1")
    assert listed["total_count"] == 1
    assert listed["keys"][0]["token"] == made["token"]
    assert client.keys.list(key_hash=made["token"])["keys"] == [made["token"]]
    assert client.keys.list()["keys"] == [made["token"]]

    updated = client.keys.update(key=key, models=["gpt-4o-mini"], duration="2h", key_alias="client-app-2", team_id="team-2", user_id="user-2", spend=0.5, aliases={"a": "b"})
    assert updated["key"] == made["token"]
    assert (updated["key_alias"], updated["models"], updated["team_id"], updated["spend"]) == ("client-app-2", ["gpt-4o-mini"], "team-2", 0.5)
    assert key not in str(updated)

    # delete sends {"keys": [...], "key_aliases": null}: the null is absent.
    assert client.keys.delete(keys=[key]) == {"deleted_keys": [made["token"]], "not_found": []}
    with pytest.raises(requests.HTTPError) as caught:
        client.keys.info(key=key)
    assert caught.value.response.status_code == 404

    second = client.keys.generate(key_alias="second")
    assert client.keys.delete(key_aliases=["second"]) == {"deleted_keys": ["second"], "not_found": []}
    assert client.keys.list(key_hash=second["token"])["total_count"] == 0


def test_nulls_from_the_client_are_absent(base_url, litellm_client):
    client = litellm_client.Client(base_url=base_url, api_key=MASTER, timeout=10)
    made = client.http.request(
        "POST",
        "/key/generate",
        json={"key_alias": None, "duration": None, "models": None, "team_id": None, "metadata": None, "max_budget": None, "rpm_limit": None, "spend": None},
    )
    assert made["expires"] is None
    assert made["key_alias"] is None
    assert made["max_budget"] is None
    assert made["spend"] == 0.0
    assert "models" not in made and "team_id" not in made


def test_a_wrong_key_raises_the_clients_unauthorized_error(base_url, litellm_client):
    Client = litellm_client.Client  # noqa: N806 - the library's class
    with pytest.raises(litellm_client.UnauthorizedError):
        Client(base_url=base_url, api_key="sk-not-the-master", timeout=10).keys.list()
    made = Client(base_url=base_url, api_key=MASTER, timeout=10).keys.generate()
    # A virtual key is refused (403) on the admin API, but may read its own info.
    own = Client(base_url=base_url, api_key=made["key"], timeout=10).keys
    with pytest.raises(requests.HTTPError) as caught:
        own.generate()
    assert caught.value.response.status_code == 403
    assert own.info(key=made["key"])["key"] == made["token"]
