"""The endpoint API (proxy_app/endpoint_admin.py) through Flask's test client, on real SQLite
and PostgreSQL, with the recording upstream behind the endpoints it makes.

Two apps on one store stand for two workers: a change made through one is served by the
other after its reload (the change watcher calls it in production; tests/test_endpoints_e2e.py
and tests/test_endpoints_cluster.py prove the timing across real processes).
"""

from __future__ import annotations

import json
import logging

import pytest
from sqlalchemy import select

from proxy_app import create_app
from proxy_app.schema import endpoints as endpoints_table
from tests.conftest import MASTER_KEY
from tests.conftest import config_for

AS_MASTER = {"Authorization": f"Bearer {MASTER_KEY}"}
API = "/config/pass_through_endpoint"
SALT = "endpoint-api-test-salt"
LITERAL = "bearer sk-literal-SECRET-4711"
ENV_VALUE = "env-resolved-SECRET-0815"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_env(request, tmp_path):
    env = {"STATE_DIRECTORY": str(tmp_path), "LITELLM_SALT_KEY": SALT, "UPSTREAM_TOKEN": ENV_VALUE}
    if request.param == "postgresql":
        env["DATABASE_URL"] = request.getfixturevalue("pg_url")
    return env


class Api:
    """A test client that keeps every answer, to check that no secret is ever in one."""

    def __init__(self, app):
        self.app = app
        self.client = app.test_client(use_cookies=False)
        self.answers: list[str] = []

    def call(self, method, path, body=None, headers=AS_MASTER):
        kwargs = {"data": json.dumps(body)} if body is not None else {}
        response = self.client.open(path, method=method, headers=headers, **kwargs)
        self.answers.append(response.get_data(as_text=True))
        return response

    def create(self, body, status=200):
        response = self.call("POST", API, body)
        assert response.status_code == status, response.get_json()
        return response.get_json()


@pytest.fixture
def make_api(store_env, upstream):
    apps = []

    def build(*config_endpoints, env=None, **general):
        app = create_app(config_for(*config_endpoints, **general), environ={**store_env, **(env or {})})
        apps.append(app)
        return Api(app)

    yield build
    for app in apps:
        app.extensions["proxy_app.stores"].stop()


def stored_rows(api) -> list[dict]:
    engine = api.app.extensions["proxy_app.stores"].engine
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(select(endpoints_table))]


def target(upstream, path="/v1/rerank"):
    return f"{upstream.url}{path}"


def test_create_serves_at_once_and_injects_the_literal_and_the_env_value(make_api, upstream):
    api = make_api()
    made = api.create(
        {
            "path": "/v1/new",
            "target": target(upstream),
            "headers": {"Authorization": LITERAL, "X-Token": "os.environ/UPSTREAM_TOKEN"},
        }
    )
    assert made["path"] == "/v1/new" and made["is_from_config"] is False and made["id"]
    assert made["headers"] == {"Authorization": "<redacted>", "X-Token": "os.environ/UPSTREAM_TOKEN"}
    answer = api.client.post("/v1/new?q=1", data=b'{"a":1}')
    assert answer.status_code == 200
    seen = upstream.requests[-1]
    assert seen.target == "/v1/rerank?q=1"
    assert seen.header("authorization") == LITERAL
    assert seen.header("x-token") == ENV_VALUE
    # Only the sealed token is stored: the literal value is nowhere in the row.
    (row,) = stored_rows(api)
    assert LITERAL not in json.dumps(row["entry"]) and "sk-literal" not in (row["sealed"] or "") and row["sealed"]
    assert not any("SECRET" in answer for answer in api.answers)


def test_list_shows_config_and_stored_endpoints_redacted(make_api, upstream):
    api = make_api(
        {"path": "/cfg", "target": target(upstream), "headers": {"Authorization": "bearer os.environ/UPSTREAM_TOKEN", "X-Lit": "lit-SECRET"}},
    )
    made = api.create({"id": "mine", "path": "/mine", "target": target(upstream), "methods": ["post"], "headers": {"X-Lit": LITERAL}})
    listed = api.call("GET", API).get_json()["endpoints"]
    assert [(e["id"], e["is_from_config"]) for e in listed] == [("config-0", True), ("mine", False)]
    assert listed[0]["headers"] == {"Authorization": "bearer os.environ/UPSTREAM_TOKEN", "X-Lit": "<redacted>"}
    assert listed[1] == made
    assert listed[1]["methods"] == ["POST"] and listed[1]["timeout"] is None and listed[1]["include_subpath"] is False
    assert api.call("GET", f"{API}?endpoint_id=mine").get_json() == {"endpoints": [made]}
    assert api.call("GET", f"{API}?endpoint_id=config-0").get_json()["endpoints"][0]["path"] == "/cfg"
    assert api.call("GET", f"{API}?endpoint_id=nope").status_code == 404
    assert not any("SECRET" in answer for answer in api.answers)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"target": "http://127.0.0.1:1/x"}, 400, "request body: endpoint.path: is required"),
        ({"path": "v1", "target": "http://127.0.0.1:1/x"}, 400, "endpoint (v1).path: must start with '/'"),
        ({"path": "/x", "target": "ftp://h/x"}, 400, "endpoint (/x).target: must be an absolute http:// or https:// URL"),
        ({"path": "/x", "target": "http://h/x", "include_subpaths": True}, 400, "endpoint (/x).include_subpaths: unknown field; did you mean 'include_subpath'?"),
        ({"path": "/x", "target": "http://h/x", "auth": "true"}, 400, "endpoint (/x).auth: must be a YAML boolean"),
        ({"path": "/x", "target": "http://h/x", "methods": ["TRACE"]}, 400, "endpoint (/x).methods: TRACE is refused"),
        ({"path": "/x", "target": "http://h/x", "guardrails": {"a": 1}}, 400, "endpoint (/x).guardrails: guardrails are not supported"),
        ({"path": "/x", "target": "http://h/x", "headers": {"Host": "h"}}, 400, "endpoint (/x).headers.Host: is set by the proxy"),
        ({"path": "/x", "target": "http://h/x", "headers": {"A": "<redacted>"}}, 400, "headers.A: <redacted> is a placeholder"),
        ({"path": "/x", "target": "http://h/x", "timeout": -1}, 400, "endpoint (/x).timeout: must be a positive number"),
        ({"path": "/health/x", "target": "http://h/x"}, 400, "reserved for the proxy"),
        ({"id": "config-3", "path": "/x", "target": "http://h/x"}, 400, "name config-file endpoints"),
        ({"id": "a b", "path": "/x", "target": "http://h/x"}, 400, "id must be"),
        ([1, 2], 400, "must be a JSON object"),
        ("not json", 400, "not valid JSON"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(make_api, body, status, says):
    api = make_api()
    response = api.call("POST", API, body) if body != "not json" else api.client.post(API, data="{nope", headers=AS_MASTER)
    assert response.status_code == status
    error = response.get_json()["error"]
    assert says in error["message"], error["message"]
    assert error["type"] == "invalid_request_error"
    assert stored_rows(api) == []


def test_a_literal_header_value_needs_the_salt_key(make_api, upstream):
    api = make_api(env={"LITELLM_SALT_KEY": ""})
    response = api.call("POST", API, {"path": "/x", "target": target(upstream), "headers": {"Authorization": LITERAL}})
    assert response.status_code == 400
    assert "headers.Authorization: a literal header value is stored encrypted with LITELLM_SALT_KEY, which is not set" in response.get_json()["error"]["message"]
    assert "sk-literal" not in response.get_data(as_text=True)
    # A reference needs no salt key.
    api.create({"path": "/x", "target": target(upstream), "headers": {"Authorization": "bearer os.environ/UPSTREAM_TOKEN"}})


def test_conflicts_are_409(make_api, upstream):
    api = make_api({"path": "/cfg", "target": target(upstream), "methods": ["GET"]})
    clash = api.call("POST", API, {"path": "/cfg", "target": target(upstream), "methods": ["get", "post"]})
    assert clash.status_code == 409
    assert clash.get_json()["error"]["message"].startswith("/cfg GET is already served by the config file's pass_through_endpoints[0] (id config-0)")
    api.create({"path": "/cfg", "target": target(upstream), "methods": ["POST"]})  # disjoint methods share a path
    api.create({"id": "one", "path": "/one", "target": target(upstream)})
    assert api.call("POST", API, {"path": "/one", "target": target(upstream)}).status_code == 409
    api.create({"id": "two", "path": "/two", "target": target(upstream)})
    moved = api.call("POST", f"{API}/two", {"path": "/one"})
    assert moved.status_code == 409 and "stored endpoint one" in moved.get_json()["error"]["message"]
    for method, path, body in (("POST", f"{API}/config-0", {"timeout": 3}), ("DELETE", f"{API}?endpoint_id=config-0", None)):
        refused = api.call(method, path, body)
        assert refused.status_code == 409
        assert "comes from the config file: edit the file and reload" in refused.get_json()["error"]["message"]
    # Only the three accepted creates are stored; every refused call left the table as it was.
    assert sorted((row["path"], row["entry"]["methods"]) for row in stored_rows(api)) == [
        ("/cfg", ["POST"]),
        ("/one", ["DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"]),
        ("/two", ["DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"]),
    ]


def test_the_same_id_and_body_again_is_a_no_op(make_api, upstream):
    api = make_api()
    body = {"id": "retry-me", "path": "/r", "target": target(upstream), "headers": {"A": LITERAL}, "methods": ["POST", "GET"]}
    first = api.create(body)
    before = stored_rows(api)
    # LiteLLM's clients send absent fields as null; the defaults spelled out are the same body.
    again = api.create({**body, "auth": None, "timeout": None, "include_subpath": False, "methods": ["get", "post"]})
    assert again == first
    assert stored_rows(api) == before  # not rewritten: same updated_at, same sealed token
    other = api.call("POST", API, {**body, "target": target(upstream, "/other")})
    assert other.status_code == 409 and "exists with other fields" in other.get_json()["error"]["message"]


def test_update_changes_fields_and_null_resets_one(make_api, upstream):
    api = make_api()
    api.create({"id": "u", "path": "/u", "target": target(upstream), "headers": {"Authorization": LITERAL}, "auth": False, "timeout": 7})
    changed = api.call("POST", f"{API}/u", {"include_subpath": True, "timeout": None, "headers": {"Authorization": "<redacted>", "X-New": "n"}})
    assert changed.status_code == 200, changed.get_json()
    shown = changed.get_json()
    assert shown["include_subpath"] is True and shown["timeout"] is None
    assert shown["headers"] == {"Authorization": "<redacted>", "X-New": "<redacted>"}
    assert api.client.get("/u/deeper/path").status_code == 200
    seen = upstream.requests[-1]
    assert seen.path == "/v1/rerank/deeper/path"
    assert seen.header("authorization") == LITERAL  # "<redacted>" kept the stored value
    assert seen.header("x-new") == "n"
    # What GET lists can be posted back to the update route as it is: nothing changes.
    (listed,) = api.call("GET", f"{API}?endpoint_id=u").get_json()["endpoints"]
    before = stored_rows(api)
    assert api.call("POST", f"{API}/u", listed).get_json() == listed
    assert stored_rows(api) == before
    assert api.call("POST", f"{API}/u", {"is_from_config": True}).status_code == 400
    gone = api.call("POST", f"{API}/u", {"headers": None})
    assert gone.get_json()["headers"] == {}
    api.client.get("/u")
    assert upstream.requests[-1].header("authorization") is None
    assert stored_rows(api)[0]["sealed"] is None
    assert api.call("POST", f"{API}/nope", {"timeout": 1}).status_code == 404
    assert api.call("POST", f"{API}/u", {"id": "other"}).status_code == 400
    assert api.call("POST", f"{API}/u", {"target": "ftp://x"}).status_code == 400


def test_delete_stops_serving_and_unknown_is_404(make_api, upstream):
    api = make_api()
    api.create({"id": "d", "path": "/d", "target": target(upstream)})
    assert api.client.get("/d").status_code == 200
    deleted = api.call("DELETE", f"{API}?endpoint_id=d")
    assert deleted.status_code == 200 and deleted.get_json()["endpoints"][0]["id"] == "d"
    assert api.client.get("/d").status_code == 404
    assert api.call("DELETE", f"{API}?endpoint_id=d").status_code == 404
    assert api.call("DELETE", API).status_code == 400
    assert stored_rows(api) == []


def test_another_worker_serves_the_change_after_its_reload(make_api, upstream):
    first, second = make_api(), make_api()
    first.create({"id": "w", "path": "/w", "target": target(upstream), "headers": {"A": LITERAL}})
    second.app.extensions["proxy_app.endpoints"].reload()
    assert second.client.get("/w").status_code == 200
    assert upstream.requests[-1].header("a") == LITERAL
    first.call("DELETE", f"{API}?endpoint_id=w")
    second.app.extensions["proxy_app.endpoints"].reload()
    assert second.client.get("/w").status_code == 404


def test_stored_endpoints_are_served_after_a_restart(make_api, upstream):
    make_api().create({"id": "p", "path": "/p", "target": target(upstream)})
    later = make_api()
    assert later.client.get("/p").status_code == 200


def test_an_instance_without_the_variable_or_the_salt_key_answers_503_naming_it(make_api, upstream, caplog):
    maker = make_api()
    maker.create({"id": "needs-env", "path": "/e", "target": target(upstream), "headers": {"X": "os.environ/ONLY_THERE"}}, status=200)
    maker.create({"id": "sealed", "path": "/s", "target": target(upstream), "headers": {"X": LITERAL}})
    with caplog.at_level(logging.ERROR, logger="proxy_app"):
        other = make_api(env={"LITELLM_SALT_KEY": "another-salt"})
    answer = other.client.get("/e")
    assert answer.status_code == 503
    assert "environment variable ONLY_THERE is not set here" in answer.get_json()["error"]["message"]
    sealed = other.client.get("/s")
    assert sealed.status_code == 503 and "LITELLM_SALT_KEY" in sealed.get_json()["error"]["message"]
    assert "sk-literal" not in sealed.get_data(as_text=True)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("needs-env" in line and "ONLY_THERE" in line for line in errors), errors
    assert any("sealed" in line and "LITELLM_SALT_KEY" in line for line in errors), errors
    requests_before = len(upstream.requests)
    assert other.client.get("/health/liveliness").status_code == 200
    assert len(upstream.requests) == requests_before


def test_only_the_master_key_may_call_it(make_api, upstream):
    api = make_api()
    assert api.call("GET", API, headers={}).status_code == 401
    assert api.call("GET", API, headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
    key = api.call("POST", "/key/generate", {}).get_json()["key"]
    as_key = {"Authorization": f"Bearer {key}"}
    assert api.call("POST", API, {"path": "/k", "target": target(upstream)}, headers=as_key).status_code == 403
    assert stored_rows(api) == []


def test_every_change_is_logged_with_path_id_and_call(make_api, upstream, caplog):
    api = make_api()
    with caplog.at_level(logging.INFO, logger="proxy_app"):
        api.create({"id": "logged", "path": "/l", "target": target(upstream), "headers": {"A": LITERAL}})
        api.call("POST", f"{API}/logged", {"timeout": 3})
        api.call("DELETE", f"{API}?endpoint_id=logged")
    lines = [r.getMessage() for r in caplog.records if "admin: endpoint" in r.getMessage()]
    assert lines == [
        f"admin: endpoint /l (id logged) created by POST {API}",
        f"admin: endpoint /l (id logged) updated (timeout) by POST {API}/logged",
        f"admin: endpoint /l (id logged) deleted by DELETE {API}",
    ]
    assert not any("sk-literal" in r.getMessage() for r in caplog.records)
