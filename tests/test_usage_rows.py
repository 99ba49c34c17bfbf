"""Usage rows (proxy_app/observe.py ``usage_row``) through the Flask app and the recording upstream.

Each pass-through request yields one row in ``GET /spend/logs`` once its response is closed:
Flask's test client closes it only when asked (``response.close()``), which is when gunicorn
would, after the last byte. The app writes to the session's SQLite database in
STATE_DIRECTORY (tests/conftest.py), shared with other tests: rows are found by request id,
or by a key made for the test. The writer flushes every 0.5 s; every wait is bounded.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import MASTER_KEY
from tests.servers import free_port
from tests.upstream import fixed

AS_MASTER = {"Authorization": f"Bearer {MASTER_KEY}"}
COST = 0.25  # cost_per_request of /paid
ROW_SECONDS = 10.0  # a closed response's row is in /spend/logs within this
BODY = b"hello-usage"
SENT = b"x" * 123


def paid(upstream, **fields):
    return {"path": "/paid", "target": upstream.url + "/t", "auth": True, "cost_per_request": COST, **fields}


def open_endpoint(upstream):
    return {"path": "/open", "target": upstream.url + "/o", "cost_per_request": COST}


def answer(upstream, path="/t", status=200, cost: str | None = None, body=BODY):
    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    if cost is not None:
        headers.append(("x-litellm-response-cost", cost))
    upstream.route(path, fixed(status, headers, body))


def send(client, method, path, headers=None, data=SENT):
    """One request, its body read through and its response closed (which writes the row)."""
    response = client.open(path, method=method, headers=headers or {}, data=data)
    response.get_data()
    response.close()
    return response


def spend_rows(client, **query) -> list[dict]:
    params = "&".join(f"{k}={v}" for k, v in {"limit": 1000, **query}.items())
    response = client.get(f"/spend/logs?{params}", headers=AS_MASTER)
    assert response.status_code == 200, response.get_json()
    rows = response.get_json()
    response.close()
    return rows


def wait_rows(client, call_ids: list[str], timeout: float = ROW_SECONDS, **query) -> dict[str, dict]:
    """The rows of ``call_ids`` by request id, once all are there (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {row["request_id"]: row for row in spend_rows(client, **query) if row["request_id"] in call_ids}
        if len(found) == len(set(call_ids)) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    missing = set(call_ids) - set(found)
    assert not missing, f"no row within {timeout} s for {sorted(missing)}"
    return found


def generate(client, **fields) -> dict:
    response = client.post("/key/generate", json=fields, headers=AS_MASTER)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    response.close()
    return body


@pytest.mark.parametrize("method", ["POST", "GET", "PUT", "DELETE"])
def test_master_key_row(upstream, make_client, method):
    answer(upstream, cost="0.5")
    client = make_client(paid(upstream, methods=[method]))
    response = send(client, method, "/paid", AS_MASTER)
    assert response.status_code == 200
    call_id = response.headers["x-litellm-call-id"]
    row = wait_rows(client, [call_id], api_key="master")[call_id]
    assert row["api_key"] == "master"
    assert row["key_alias"] is None
    assert row["route"] == "/paid"
    assert row["method"] == method
    assert row["status"] == 200
    assert row["request_bytes"] == len(SENT)
    assert row["response_bytes"] == len(BODY)
    assert row["spend"] == 0.5
    assert row["upstream_error"] is None
    assert row["ttfb_ms"] is not None and row["duration_ms"] >= row["ttfb_ms"]


def test_open_endpoint_row_has_no_key(upstream, make_client):
    answer(upstream, "/o")
    client = make_client(open_endpoint(upstream))
    response = send(client, "POST", "/open")
    assert response.status_code == 200
    call_id = response.headers["x-litellm-call-id"]
    row = wait_rows(client, [call_id])[call_id]
    assert row["api_key"] is None
    assert (row["route"], row["status"], row["spend"]) == ("/open", 200, COST)
    assert (row["request_bytes"], row["response_bytes"]) == (len(SENT), len(BODY))


@pytest.mark.parametrize(
    ("cost", "spend"),
    [
        pytest.param("0.5", 0.5, id="upstream-cost"),
        pytest.param(" 0.125 ", 0.125, id="upstream-cost-padded"),
        pytest.param("1e-3", 0.001, id="upstream-cost-exponent"),
        pytest.param("0", 0.0, id="upstream-says-free"),
        pytest.param(None, COST, id="no-header"),
        pytest.param("", COST, id="empty"),
        pytest.param("abc", COST, id="not-a-number"),
        pytest.param("-1", COST, id="negative"),
        pytest.param("nan", COST, id="nan"),
        pytest.param("inf", COST, id="inf"),
        pytest.param("1e999", COST, id="overflows-to-inf"),
        pytest.param("1_0", COST, id="python-only-number"),
    ],
)
def test_virtual_key_rows_with_their_spend(upstream, make_client, cost, spend):
    answer(upstream, cost=cost)
    client = make_client(paid(upstream))
    made = generate(client)
    headers = {"Authorization": f"Bearer {made['key']}"}
    call_ids = []
    for _ in range(3):
        response = send(client, "POST", "/paid", headers)
        assert response.status_code == 200
        call_ids.append(response.headers["x-litellm-call-id"])
    rows = wait_rows(client, call_ids, api_key=made["token"])
    assert {row["spend"] for row in rows.values()} == {spend}
    assert {row["api_key"] for row in rows.values()} == {made["token"]}
    # Exactly one row per request: nothing more turns up after another flush.
    time.sleep(0.6)
    assert sorted(row["request_id"] for row in spend_rows(client, api_key=made["token"])) == sorted(call_ids)
    # The key's spend is the sum of its rows.
    info = client.get(f"/key/info?key={made['token']}", headers=AS_MASTER)
    assert info.get_json()["info"]["spend"] == pytest.approx(3 * spend)
    info.close()


def test_a_key_alias_is_on_its_rows(upstream, make_client):
    answer(upstream)
    client = make_client(paid(upstream))
    alias = f"usage-rows-{time.time_ns()}"
    made = generate(client, key_alias=alias)
    response = send(client, "POST", "/paid", {"Authorization": f"Bearer {made['key']}"})
    call_id = response.headers["x-litellm-call-id"]
    row = wait_rows(client, [call_id], key_alias=alias)[call_id]
    assert (row["api_key"], row["key_alias"]) == (made["token"], alias)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-key"),
        pytest.param({"Authorization": "Bearer sk-not-a-key"}, id="unknown-key"),
    ],
)
def test_a_request_refused_with_401_costs_nothing(upstream, make_client, headers):
    answer(upstream, cost="0.5")
    client = make_client(paid(upstream))
    response = send(client, "POST", "/paid", headers)
    assert response.status_code == 401
    call_id = response.headers["x-litellm-call-id"]
    row = wait_rows(client, [call_id])[call_id]
    assert (row["status"], row["spend"], row["api_key"], row["route"]) == (401, 0.0, None, "/paid")
    assert row["ttfb_ms"] is None and row["response_bytes"] == len(response.data)
    assert upstream.requests == []


def test_a_known_key_refused_is_named_by_its_token_and_costs_nothing(upstream, make_client):
    answer(upstream, cost="0.5")
    client = make_client(paid(upstream))
    made = generate(client, rpm_limit=1)
    headers = {"Authorization": f"Bearer {made['key']}"}
    first = send(client, "POST", "/paid", headers)
    second = send(client, "POST", "/paid", headers)
    assert (first.status_code, second.status_code) == (200, 429)
    blocked = client.post("/key/block", json={"key": made["token"]}, headers=AS_MASTER)
    assert blocked.status_code == 200
    blocked.close()
    # The app's own watcher drops the cache within a poll; bounded.
    deadline = time.monotonic() + 5.0
    while True:
        third = send(client, "POST", "/paid", headers)
        if third.status_code == 401 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert third.status_code == 401
    ids = [r.headers["x-litellm-call-id"] for r in (first, second, third)]
    rows = wait_rows(client, ids, api_key=made["token"])
    assert [(rows[i]["status"], rows[i]["spend"]) for i in ids] == [(200, 0.5), (429, 0.0), (401, 0.0)]
    assert {rows[i]["api_key"] for i in ids} == {made["token"]}
    assert made["key"] not in repr(list(rows.values()))


def test_an_unreachable_upstream_costs_nothing(make_client):
    client = make_client({"path": "/paid", "target": f"http://127.0.0.1:{free_port()}/t", "cost_per_request": COST})
    response = send(client, "POST", "/paid")
    assert response.status_code == 502
    call_id = response.headers["x-litellm-call-id"]
    row = wait_rows(client, [call_id])[call_id]
    assert (row["status"], row["spend"]) == (502, 0.0)
    assert row["upstream_error"]


def test_no_row_until_the_response_is_closed(upstream, make_client):
    answer(upstream, cost="0.5")
    client = make_client(paid(upstream))
    made = generate(client)
    response = client.post("/paid", headers={"Authorization": f"Bearer {made['key']}"}, data=SENT)
    assert response.status_code == 200
    call_id = response.headers["x-litellm-call-id"]
    time.sleep(1.2)  # more than two flushes of the writer
    assert spend_rows(client, api_key=made["token"]) == []
    response.get_data()
    response.close()
    assert wait_rows(client, [call_id], api_key=made["token"])[call_id]["spend"] == 0.5


def test_the_parallel_slot_comes_back_when_the_response_is_closed(upstream, make_client):
    answer(upstream)
    client = make_client(paid(upstream))
    made = generate(client, max_parallel_requests=1)
    headers = {"Authorization": f"Bearer {made['key']}"}
    held = client.post("/paid", headers=headers, data=SENT)
    assert held.status_code == 200
    refused = send(client, "POST", "/paid", headers)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    held.get_data()
    held.close()
    assert send(client, "POST", "/paid", headers).status_code == 200
    assert send(client, "POST", "/paid", headers).status_code == 200


def test_rate_limit_headers_reach_the_caller(upstream, make_client):
    answer(upstream)
    client = make_client(paid(upstream))
    made = generate(client, rpm_limit=3)
    headers = {"Authorization": f"Bearer {made['key']}"}
    remaining = [send(client, "POST", "/paid", headers).headers["x-ratelimit-remaining-requests"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    refused = send(client, "POST", "/paid", headers)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.get_json()["error"]["type"] == "rate_limit_error"
