"""A real client: the ``openai`` SDK with a virtual key as its ``api_key``.

``base_url`` points at an ``auth: true`` pass-through endpoint of the production stack
(gunicorn, 3 workers, the embedded SQLite store) that forwards to a local OpenAI-style
upstream and puts the real upstream credential in ``Authorization``. The SDK's own requests
must work unchanged: a chat completion, a streamed one (server-sent events ending with
``data: [DONE]``), and a 429 from the key's ``rpm_limit`` raised as ``openai.RateLimitError``.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import SECRET
from tests.conftest import config_for
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import wait_until
from tests.gunicorn_proc import write_config
from tests.test_keys_e2e import generate
from tests.test_keys_e2e import instance_env
from tests.test_keys_e2e import wait_rows
from tests.upstream import Upstream

WORKERS = 3
MODEL = "gpt-test-mini"
PIECES = ["Hel", "lo", " from", " upstream"]


def chat_completions(req, w):
    """A small OpenAI-compatible /v1/chat/completions: JSON, or SSE when ``stream`` is true."""
    request = json.loads(req.body or b"{}")
    model = request.get("model", MODEL)
    if request.get("stream"):
        w.start_chunked(200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
        for index, piece in enumerate(PIECES):
            delta = {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
            w.chunk(b"data: " + json.dumps(_chunk(model, delta, None)).encode() + b"\n\n")
        w.chunk(b"data: " + json.dumps(_chunk(model, {}, "stop")).encode() + b"\n\n")
        w.chunk(b"data: [DONE]\n\n")
        w.end_chunks()
        return
    answer = {
        "id": "chatcmpl-test-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(PIECES)}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
    }
    w.respond(200, [("Content-Type", "application/json"), ("x-litellm-response-cost", "0.002")], json.dumps(answer).encode())


def _chunk(model: str, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": "chatcmpl-test-2",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


@pytest.fixture(scope="module")
def openai_upstream():
    with Upstream() as server:
        server.route("/v1/chat/completions", chat_completions)
        yield server


@pytest.fixture(scope="module")
def proxy(openai_upstream, tmp_path_factory):
    base = tmp_path_factory.mktemp("openai-sdk")
    endpoint = {
        "path": "/openai",
        "target": openai_upstream.url + "/v1",
        "include_subpath": True,
        "auth": True,
        "headers": {"Authorization": "Bearer os.environ/SECRET"},
    }
    with run_gunicorn(write_config(base, config_for(endpoint)), instance_env(base / "state"), workers=WORKERS) as server:
        wait_until(lambda: len(server.worker_pids()) == WORKERS, 20, "three workers")
        yield server


def client(proxy, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"{proxy.url}/openai", max_retries=0, timeout=20)


def test_sdk_version_is_recorded():
    print(f"openai SDK {openai.__version__}")
    assert openai.__version__


def test_chat_completion_with_a_virtual_key(proxy, openai_upstream):
    made = generate(proxy, key_alias="sdk-plain")
    raw = client(proxy, made["key"]).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "".join(PIECES)
    assert completion.usage.total_tokens == 9
    seen = openai_upstream.requests[-1]
    assert seen.path == "/v1/chat/completions" and seen.method == "POST"
    assert seen.header_all("authorization") == [f"Bearer {SECRET}"], seen.headers
    assert made["key"] not in " ".join(value for _, value in seen.headers)
    assert json.loads(seen.body)["messages"] == [{"role": "user", "content": "hi"}]
    # The usage row of the call, with the upstream's own price.
    call_id = raw.headers["x-litellm-call-id"]
    (row,) = wait_rows(proxy, {call_id}, api_key=made["token"])
    assert row["route"] == "/openai" and row["status"] == 200 and row["spend"] == 0.002, row


def test_streamed_chat_completion_with_a_virtual_key(proxy, openai_upstream):
    key = generate(proxy, key_alias="sdk-stream")["key"]
    stream = client(proxy, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
    pieces, finish = [], None
    with stream:
        for chunk in stream:
            choice = chunk.choices[0]
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert pieces == PIECES and finish == "stop"
    assert json.loads(openai_upstream.requests[-1].body)["stream"] is True


def test_rate_limit_error_on_429(proxy, openai_upstream):
    key = generate(proxy, key_alias="sdk-rpm", rpm_limit=1)["key"]
    sdk = client(proxy, key)
    before = len(openai_upstream.requests)
    assert sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "one"}]).choices
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "two"}])
    error = caught.value
    assert error.status_code == 429
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    assert error.body["code"] == "429" and error.body["type"] == "rate_limit_error", error.body
    with pytest.raises(openai.RateLimitError):  # streamed calls are refused the same way
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "three"}], stream=True)
    assert len(openai_upstream.requests) == before + 1
