"""The key admin API (proxy_app/admin.py) through Flask's test client, on real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import insert

from proxy_app import admin
from proxy_app import errors
from proxy_app import key_store
from proxy_app import migrate
from proxy_app.app import ProxyFlask
from proxy_app.config import load_config
from proxy_app.keys import token_of
from proxy_app.schema import spend_logs
from proxy_app.store import make_engine
from tests.servers import open_store
from tests.test_key_store import usage_row

MASTER = "sk-admin-master-0123456789"
AS_MASTER = {"Authorization": f"Bearer {MASTER}"}
DAY = 86400


def build_app(engine, master_key: str | None = MASTER):
    general = {"master_key": master_key} if master_key else {}
    settings = load_config({"general_settings": general}, environ={})
    app = ProxyFlask("t")
    errors.init_app(app)
    admin.init_app(app, settings, engine)
    return app


class Admin:
    """A test client that remembers every answer, to check no plaintext key leaks into one."""

    def __init__(self, app):
        self.client = app.test_client(use_cookies=False)
        self.answers: list[str] = []

    def call(self, method, path, body=None, headers=AS_MASTER, **kwargs):
        if body is not None:
            kwargs["data"] = body if isinstance(body, (str, bytes)) else json.dumps(body)
        response = self.client.open(path, method=method, headers=headers, **kwargs)
        self.answers.append(response.get_data(as_text=True))
        return response

    def post(self, path, body=None, **kwargs):
        return self.call("POST", path, body, **kwargs)

    def get(self, path, **kwargs):
        return self.call("GET", path, **kwargs)

    def generate(self, **fields):
        response = self.post("/key/generate", fields)
        assert response.status_code == 200, response.get_json()
        return response.get_json()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    engine = open_store(request.param, tmp_path, request)
    yield engine
    engine.dispose()


@pytest.fixture
def api(engine):
    return Admin(build_app(engine))


def error_of(response):
    body = response.get_json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == str(response.status_code)
    assert body["error"]["param"] is None
    return body["error"]["message"]


# --- who may call it -------------------------------------------------------------------------


ROUTES = [
    ("POST", "/key/generate"),
    ("POST", "/key/update"),
    ("GET", "/key/info?key=sk-x"),
    ("GET", "/key/list"),
    ("POST", "/key/delete"),
    ("POST", "/key/block"),
    ("POST", "/key/unblock"),
    ("POST", "/key/regenerate"),
    ("POST", "/key/sk-x/regenerate"),
    ("GET", "/spend/logs"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_without_a_master_key_configured_every_route_is_403_saying_so(engine, method, path):
    client = Admin(build_app(engine, master_key=None))
    response = client.call(method, path, {}, headers={"Authorization": "Bearer anything"})
    assert response.status_code == 403
    assert error_of(response) == "The admin API needs general_settings.master_key to be set."


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sk-wrong"}, {"x-litellm-api-key": "sk-wrong"}, {"Authorization": MASTER}, {"Authorization": f"Basic {MASTER}"}],
)
def test_no_key_or_a_wrong_one_is_401(api, method, path, headers):
    response = api.call(method, path, {}, headers=headers)
    assert response.status_code == 401
    assert error_of(response).startswith("Authentication Error")
    assert response.get_json()["error"]["type"] == "auth_error"


@pytest.mark.parametrize("headers", [AS_MASTER, {"x-litellm-api-key": MASTER}, {"x-litellm-api-key": f"Bearer {MASTER}"}, {"authorization": f"bearer {MASTER}"}])
def test_the_master_key_in_each_carrier(api, headers):
    assert api.get("/key/list", headers=headers).status_code == 200


@pytest.mark.parametrize(("method", "path"), [route for route in ROUTES if not route[1].startswith("/key/info")])
def test_a_virtual_key_is_403(api, method, path):
    key = api.generate()["key"]
    response = api.call(method, path, {}, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 403
    assert error_of(response) == "Only the master key may call the admin API."


def test_a_virtual_key_may_read_its_own_info_only(api):
    mine = api.generate(key_alias="mine")
    other = api.generate(key_alias="other")
    as_mine = {"x-litellm-api-key": mine["key"]}
    for query in ("", f"?key={mine['key']}", f"?key={mine['token']}"):
        response = api.get("/key/info" + query, headers=as_mine)
        assert response.status_code == 200, query
        assert response.get_json()["key"] == mine["token"]
    for query in (f"?key={other['key']}", f"?key={other['token']}"):
        assert api.get("/key/info" + query, headers=as_mine).status_code == 403


def test_a_blocked_or_expired_virtual_key_or_a_stored_token_is_401(api, engine):
    blocked = api.generate(blocked=True)
    assert api.get("/key/info", headers={"Authorization": f"Bearer {blocked['key']}"}).status_code == 401
    # No pass-the-hash: the stored token is not a credential.
    live = api.generate()
    assert api.get("/key/info", headers={"Authorization": f"Bearer {live['token']}"}).status_code == 401
    expired = api.generate(duration="1s")
    key_store.update_key(engine, expired["token"], {"expires": 1.0}, {}, 1.0)
    assert api.get("/key/info", headers={"Authorization": f"Bearer {expired['key']}"}).status_code == 401


def test_the_master_key_without_a_key_param_on_info_is_400(api):
    response = api.get("/key/info")
    assert response.status_code == 400
    assert error_of(response) == "key is required"


# --- generate ----------------------------------------------------------------------------------


def test_generate_answers_the_key_once_and_every_field(api):
    body = api.generate(
        key_alias="app-1",
        duration="7d",
        allowed_routes=["/v1/chat"],
        rpm_limit=10,
        max_parallel_requests=2,
        max_budget=5.5,
        budget_duration="30d",
        metadata={"owner": "me"},
        models=["gpt-4"],
        team_id="team-a",
        user_id="u1",
        tags=["x"],
        tpm_limit=1000,
    )
    key = body["key"]
    assert key.startswith("sk-") and len(key) >= 3 + 22
    assert body["token"] == token_of(key)
    assert body["key_name"] == "sk-..." + key[-4:]
    assert body["key_alias"] == "app-1"
    assert body["spend"] == 0.0
    assert body["allowed_routes"] == ["/v1/chat"]
    assert (body["rpm_limit"], body["max_parallel_requests"], body["max_budget"], body["budget_duration"]) == (10, 2, 5.5, "30d")
    assert body["metadata"] == {"owner": "me"}
    assert body["blocked"] is False
    assert (body["models"], body["team_id"], body["user_id"], body["tags"], body["tpm_limit"]) == (["gpt-4"], "team-a", "u1", ["x"], 1000)
    for name in ("expires", "created_at", "budget_reset_at"):
        assert body[name].endswith("Z"), name
    info = api.get(f"/key/info?key={key}").get_json()
    assert info["key"] == body["token"]
    assert {name: value for name, value in body.items() if name != "key"} == info["info"]


def test_generate_with_nulls_is_the_same_as_without(api):
    body = api.generate(key_alias=None, duration=None, rpm_limit=None, models=None, metadata=None, allowed_routes=None)
    assert body["expires"] is None
    assert body["key_alias"] is None
    assert body["allowed_routes"] is None
    assert body["metadata"] == {}
    assert "models" not in body


def test_generate_with_an_empty_body(api):
    response = api.post("/key/generate", "")
    assert response.status_code == 200
    assert response.get_json()["key"].startswith("sk-")


def test_allowed_passthrough_routes_is_allowed_routes(api):
    assert api.generate(allowed_passthrough_routes=["/v1/a"])["allowed_routes"] == ["/v1/a"]


def test_a_custom_key(api):
    body = api.generate(key="sk-my-custom-key-1")
    assert body["key"] == "sk-my-custom-key-1"
    assert body["token"] == token_of("sk-my-custom-key-1")
    response = api.post("/key/generate", {"key": "sk-my-custom-key-1"})
    assert response.status_code == 409
    assert "sk-my-custom-key-1" not in response.get_data(as_text=True)


def test_a_duplicate_alias_is_409(api):
    api.generate(key_alias="dup")
    response = api.post("/key/generate", {"key_alias": "dup"})
    assert response.status_code == 409
    assert error_of(response) == "A key with this key_alias already exists."
    assert response.get_json()["error"]["type"] == "conflict_error"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "The request body is not valid JSON."),
        (b"\xff\xfe", "The request body is not valid JSON."),
        ("[1]", "The request body must be a JSON object."),
        ({"nope": 1}, "unknown field nope"),
        ({"rpm_limit": "5"}, "rpm_limit must be an integer, got string"),
        ({"metadata": "x"}, "metadata must be an object, got string"),
        ({"duration": "forever"}, "duration must be a number and a unit"),
        ({"budget_duration": "1y"}, "budget_duration must be a number and a unit"),
        ({"key": "pk-123"}, "key must start with sk-"),
        ({"denied_passthrough_routes": ["/a"]}, "denied_passthrough_routes is not supported by proxy_app"),
    ],
)
def test_generate_refuses_a_bad_body_naming_the_field(api, body, message):
    response = api.post("/key/generate", body)
    assert response.status_code == 400
    assert error_of(response).startswith(message)
    assert response.get_json()["error"]["type"] == "invalid_request_error"


def test_a_body_too_large_is_413(api):
    response = api.post("/key/generate", json.dumps({"metadata": {"x": "a" * (1 << 20)}}))
    assert response.status_code == 413


def test_get_on_a_post_route_is_405_in_the_envelope(api):
    response = api.get("/key/generate")
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    error_of(response)


# --- update, info, list -------------------------------------------------------------------------


def test_update_sets_and_null_clears(api):
    made = api.generate(key_alias="u", rpm_limit=5, duration="1h", models=["m"], team_id="t")
    response = api.post("/key/update", {"key": made["key"], "rpm_limit": None, "duration": None, "max_budget": 3, "models": None})
    assert response.status_code == 200
    body = response.get_json()
    assert body["key"] == made["token"]
    assert (body["rpm_limit"], body["expires"], body["max_budget"], body["key_alias"]) == (None, None, 3, "u")
    assert "models" not in body and body["team_id"] == "t"
    # By token too, and by key_alias alone (LiteLLM's other way to name the key).
    assert api.post("/key/update", {"key": made["token"], "rpm_limit": 9}).get_json()["rpm_limit"] == 9
    assert api.post("/key/update", {"key_alias": "u", "max_parallel_requests": 4}).get_json()["max_parallel_requests"] == 4


def test_update_of_an_unknown_key_is_404_without_echoing_it(api):
    response = api.post("/key/update", {"key": "sk-secret-unknown", "rpm_limit": 1})
    assert response.status_code == 404
    assert error_of(response) == "key not found"
    assert "sk-secret-unknown" not in response.get_data(as_text=True)
    assert api.post("/key/update", {"rpm_limit": 1}).status_code == 400


def test_update_to_a_taken_alias_is_409(api):
    api.generate(key_alias="a")
    b = api.generate(key_alias="b")
    assert api.post("/key/update", {"key": b["key"], "key_alias": "a"}).status_code == 409


def test_info_by_key_or_token_and_404(api):
    made = api.generate(key_alias="i")
    for value in (made["key"], made["token"]):
        body = api.get(f"/key/info?key={value}").get_json()
        assert body["key"] == made["token"]
        assert body["info"]["key_alias"] == "i"
    response = api.get("/key/info?key=sk-not-a-key")
    assert response.status_code == 404
    assert "sk-not-a-key" not in response.get_data(as_text=True)


def test_list_pages_filters_and_full_objects(api):
    made = [api.generate(key_alias=f"k{n}", team_id="even" if n % 2 == 0 else "odd") for n in range(5)]
    body = api.get("/key/list?page=2&size=2").get_json()
    assert body == {"keys": [made[2]["token"], made[3]["token"]], "total_count": 5, "current_page": 2, "total_pages": 3}
    assert api.get("/key/list?key_alias=k4").get_json()["keys"] == [made[4]["token"]]
    assert api.get("/key/list?team_id=odd").get_json()["keys"] == [made[1]["token"], made[3]["token"]]
    assert api.get(f"/key/list?key_hash={made[0]['token']}").get_json()["keys"] == [made[0]["token"]]
    full = api.get("/key/list?return_full_object=true&size=1").get_json()
    assert full["keys"][0]["token"] == made[0]["token"]
    assert full["keys"][0]["key_alias"] == "k0"
    assert api.get("/key/list").get_json()["total_pages"] == 1


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("page=0", "page must be an integer from 1"),
        ("size=101", "size must be an integer from 1 to 100"),
        ("size=x", "size must be an integer"),
        ("return_full_object=yes", "return_full_object must be true or false"),
        ("kye_alias=a", "unknown query parameter kye_alias"),
    ],
)
def test_list_refuses_bad_parameters(api, query, message):
    response = api.get("/key/list?" + query)
    assert response.status_code == 400
    assert error_of(response).startswith(message)


# --- delete, block, regenerate ---------------------------------------------------------------------


def test_delete_by_keys_then_again_is_harmless(api):
    a, b = api.generate(), api.generate()
    body = {"keys": [a["key"], b["token"], "sk-never-made"]}
    answer = api.post("/key/delete", body).get_json()
    assert answer == {"deleted_keys": [a["token"], b["token"]], "not_found": [token_of("sk-never-made")]}
    again = api.post("/key/delete", body).get_json()
    assert again["deleted_keys"] == []
    assert api.get(f"/key/info?key={a['token']}").status_code == 404


def test_delete_by_aliases(api):
    api.generate(key_alias="x")
    assert api.post("/key/delete", {"key_aliases": ["x", "y"], "keys": None}).get_json() == {"deleted_keys": ["x"], "not_found": ["y"]}


@pytest.mark.parametrize(
    ("body", "message"),
    [({}, "keys or key_aliases is required"), ({"keys": None, "key_aliases": None}, "keys or key_aliases is required"), ({"keys": ["sk-a"], "key_aliases": ["b"]}, "give keys or key_aliases, not both"), ({"keys": "sk-a"}, "keys must be a list of strings")],
)
def test_delete_refuses(api, body, message):
    response = api.post("/key/delete", body)
    assert response.status_code == 400
    assert error_of(response).startswith(message)


def test_block_and_unblock(api, engine):
    made = api.generate()
    as_key = {"Authorization": f"Bearer {made['key']}"}
    assert api.post("/key/block", {"key": made["key"]}).get_json()["blocked"] is True
    assert api.get("/key/info", headers=as_key).status_code == 401
    assert key_store.get_key(engine, made["token"]).blocked is True
    assert api.post("/key/unblock", {"key": made["token"]}).get_json()["blocked"] is False
    assert api.get("/key/info", headers=as_key).status_code == 200
    assert api.post("/key/block", {"key": "sk-nope"}).status_code == 404
    assert api.post("/key/block", {}).status_code == 400


def test_regenerate_keeps_the_record_and_honours_the_grace_period(api, engine):
    made = api.generate(key_alias="r", rpm_limit=3)
    response = api.post("/key/regenerate", {"key": made["key"], "grace_period": "1h"})
    assert response.status_code == 200
    new = response.get_json()
    assert new["key"] != made["key"] and new["key"].startswith("sk-")
    assert new["token"] == token_of(new["key"])
    assert (new["key_alias"], new["rpm_limit"], new["created_at"]) == ("r", 3, made["created_at"])
    # Both keys work during the grace period; the admin API names the key by its new token.
    for key in (made["key"], new["key"]):
        assert api.get("/key/info", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert api.get(f"/key/info?key={made['token']}").status_code == 404
    # Without a grace period the old key stops at once; the path form; changes with it.
    newer = api.post(f"/key/{new['key']}/regenerate", {"rpm_limit": 8}).get_json()
    assert newer["rpm_limit"] == 8
    assert api.get("/key/info", headers={"Authorization": f"Bearer {new['key']}"}).status_code == 401
    assert api.get("/key/info", headers={"Authorization": f"Bearer {made['key']}"}).status_code == 401
    custom = api.post(f"/key/{newer['token']}/regenerate", {"new_key": "sk-chosen-new"}).get_json()
    assert (custom["key"], custom["token"]) == ("sk-chosen-new", token_of("sk-chosen-new"))


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/key/regenerate", {}, 400, "key is required"),
        ("/key/regenerate", {"key": "sk-unknown-1"}, 404, "key not found"),
        ("/key/sk-unknown-2/regenerate", {}, 404, "key not found"),
        ("/key/regenerate", {"key": "sk-x", "grace_period": "soon"}, 400, "grace_period must"),
        ("/key/regenerate", {"key": "sk-x", "new_key": "nope"}, 400, "new_key must start with sk-"),
        ("/key/sk-a/regenerate", {"key": "sk-b"}, 400, "the key in the path and the key in the body differ"),
        ("/key/regenerate", {"key": "sk-x", "new_master_key": "sk-m"}, 400, "new_master_key is not supported"),
    ],
)
def test_regenerate_refuses(api, path, body, status, message):
    response = api.post(path, body)
    assert response.status_code == status
    assert error_of(response).startswith(message)


def test_regenerate_by_path_keeps_the_plaintext_out_of_the_access_line(api):
    made = api.generate()
    seen = {}
    app = api.client.application
    inner = app.wsgi_app

    def capture(environ, start_response):
        result = inner(environ, start_response)
        seen.update(environ)
        return result

    app.wsgi_app = capture
    assert api.post(f"/key/{made['key']}/regenerate", {}).status_code == 200
    assert made["key"] not in json.dumps({k: v for k, v in seen.items() if isinstance(v, str)})


# --- spend logs -------------------------------------------------------------------------------------


def test_spend_logs(api, engine):
    made = api.generate(key_alias="s")
    base = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    rows = [
        usage_row("r0", base + 10, api_key=made["token"], key_alias="s"),
        usage_row("r1", base + DAY + 10, api_key=made["token"], key_alias="s"),
        usage_row("r2", base + 2 * DAY + 10, api_key="master", key_alias=None),
        usage_row("r3", base + 3 * DAY - 1, api_key=None, key_alias=None),
    ]
    with engine.begin() as conn:
        conn.execute(insert(spend_logs), rows)
    logs = api.get("/spend/logs").get_json()
    assert [row["request_id"] for row in logs] == ["r3", "r2", "r1", "r0"]
    assert logs[3] == {
        "request_id": "r0",
        "api_key": made["token"],
        "key_alias": "s",
        "route": "/v1",
        "method": "POST",
        "status": 200,
        "request_bytes": 1,
        "response_bytes": 2,
        "duration_ms": 3.0,
        "ttfb_ms": None,
        "spend": 0.5,
        "startTime": "2026-01-01T00:00:10.000Z",
        "endTime": "2026-01-01T00:00:11.000Z",
        "upstream_error": None,
    }

    def ids(query):
        response = api.get("/spend/logs?" + query)
        assert response.status_code == 200, response.get_json()
        return [row["request_id"] for row in response.get_json()]

    assert ids(f"api_key={made['key']}") == ["r1", "r0"]
    assert ids(f"api_key={made['token']}") == ["r1", "r0"]
    assert ids("api_key=master") == ["r2"]
    assert ids("key_alias=s") == ["r1", "r0"]
    assert ids("start_date=2026-01-02&end_date=2026-01-03") == ["r3", "r2", "r1"]
    assert ids("end_date=2026-01-01") == ["r0"]
    assert ids("limit=1&page=2") == ["r2"]
    assert ids("limit=2&page=3") == []


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("start_date=2026-13-01", "start_date must be a date, YYYY-MM-DD"),
        ("end_date=yesterday", "end_date must be a date"),
        ("limit=0", "limit must be an integer from 1 to 1000"),
        ("page=-1", "page must be an integer"),
        ("user_id=x", "unknown query parameter user_id"),
    ],
)
def test_spend_logs_refuses_bad_parameters(api, query, message):
    response = api.get("/spend/logs?" + query)
    assert response.status_code == 400
    assert error_of(response).startswith(message)


# --- secrets and failures ------------------------------------------------------------------------------


def test_a_plaintext_key_is_only_ever_in_its_generate_or_regenerate_answer(api, engine, caplog):
    caplog.set_level(logging.DEBUG)
    made = api.generate(key_alias="p", key="sk-plaintext-marker-1")
    api.answers.clear()
    with engine.begin() as conn:
        conn.execute(insert(spend_logs), [usage_row("r", 1.0, api_key=made["token"], key_alias="p")])
    api.get(f"/key/info?key={made['key']}")
    api.get("/key/list?return_full_object=true")
    api.get(f"/spend/logs?api_key={made['key']}")
    api.post("/key/update", {"key": made["key"], "rpm_limit": 1})
    api.post("/key/block", {"key": made["key"]})
    api.post("/key/unblock", {"key": made["key"]})
    api.post("/key/generate", {"key": made["key"]})  # 409
    api.post("/key/update", {"key": "sk-plaintext-marker-2"})  # 404
    regenerated = api.post(f"/key/{made['key']}/regenerate", {"grace_period": "1h"}).get_json()["key"]
    api.post("/key/delete", {"keys": [regenerated, made["key"]]})
    answers = "\n".join(api.answers[:-2] + api.answers[-1:])
    assert "sk-plaintext-marker" not in answers
    assert regenerated not in answers
    assert "sk-plaintext-marker" not in caplog.text
    assert regenerated not in caplog.text
    assert made["token"] in caplog.text  # the log names keys by token


def store_errors() -> float:
    return REGISTRY.get_sample_value("proxy_store_errors_total", {"store": "database", "operation": "admin"}) or 0.0


def check_unavailable(client: Admin, key: str | None = None):
    before = store_errors()
    for method, path in [("GET", "/key/list"), ("POST", "/key/generate"), ("GET", "/spend/logs"), ("GET", "/key/info?key=sk-x")]:
        response = client.call(method, path, {})
        assert response.status_code == 503, path
        assert error_of(response) == "The key store is unavailable; try again shortly."
        assert response.headers["Retry-After"] == "5"
    if key is not None:
        # A virtual key cannot be told from a wrong key without the database.
        assert client.get("/key/info", headers={"Authorization": f"Bearer {key}"}).status_code == 503
    assert store_errors() >= before + 4


def test_sqlite_unreachable_is_503(tmp_path):
    engine = make_engine(None, {"STATE_DIRECTORY": str(tmp_path / "missing" / "dir")})
    check_unavailable(Admin(build_app(engine)), "sk-some-key")


def test_postgresql_stopped_is_503_and_recovers(tmp_path, postgres, pg_url):
    engine = make_engine(pg_url, {})
    migrate.upgrade(engine)
    client = Admin(build_app(engine))
    made = client.generate()
    postgres.stop()
    try:
        check_unavailable(client, made["key"])
    finally:
        postgres.start()
    assert client.get("/key/list").status_code == 200
    engine.dispose()
