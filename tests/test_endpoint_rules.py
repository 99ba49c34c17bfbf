"""The endpoint API's pure rules (proxy_app/endpoint_rules.py) and secrets (proxy_app/endpoint_secrets.py), as tables."""

from __future__ import annotations

import pytest

from proxy_app.endpoint_rules import DEFAULTS
from proxy_app.endpoint_rules import REDACTED
from proxy_app.endpoint_rules import effective
from proxy_app.endpoint_rules import id_problem
from proxy_app.endpoint_rules import is_secret
from proxy_app.endpoint_rules import join_secrets
from proxy_app.endpoint_rules import merge
from proxy_app.endpoint_rules import null_to_absent
from proxy_app.endpoint_rules import overlap
from proxy_app.endpoint_rules import placeholder_problems
from proxy_app.endpoint_rules import redacted
from proxy_app.endpoint_rules import split_secrets
from proxy_app.endpoint_secrets import SecretsUnavailable
from proxy_app.endpoint_secrets import cipher
from proxy_app.endpoint_secrets import seal
from proxy_app.endpoint_secrets import unseal

BASE = {"path": "/v1/x", "target": "http://127.0.0.1:1/x"}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("abc", None),
        ("3f2a-uuid_like.1:2", None),
        ("a" * 64, None),
        ("a" * 65, "id must be"),
        ("", "id must be"),
        ("-leading", "id must be"),
        ("has space", "id must be"),
        ("has/slash", "id must be"),
        (12, "id must be"),
        ("config-0", "name config-file endpoints"),
    ],
)
def test_id_problem(value, problem):
    found = id_problem(value)
    assert found is None if problem is None else problem in found


@pytest.mark.parametrize(
    ("name", "value", "secret"),
    [
        ("Authorization", "bearer sk-live", True),
        ("Authorization", "bearer os.environ/COHERE_KEY", False),
        ("X-Key", "os.environ/X", False),
        ("X-Number", 12, True),
        ("litellm_user_api_key", "x-my-key", False),
        ("LITELLM_USER_API_KEY", "x-my-key", False),
        ("LANGFUSE_SECRET_KEY", "sk-lf", True),
    ],
)
def test_is_secret(name, value, secret):
    assert is_secret(name, value) is secret


def test_effective_fills_every_default_and_spells_values_one_way():
    assert effective(BASE) == {**DEFAULTS, **BASE}
    assert effective({**BASE, "methods": ["post", "get", "POST"], "timeout": 5, "cost_per_request": 1, "headers": {"X": 3}}) == {
        **DEFAULTS,
        **BASE,
        "methods": ["GET", "POST"],
        "timeout": 5.0,
        "cost_per_request": 1.0,
        "headers": {"X": "3"},
    }
    # Explicit defaults and nulls are the same endpoint as absent fields: a retried create
    # with either spelling is the same body.
    spelled_out = {**BASE, "headers": {}, "include_subpath": False, "methods": [], "auth": False, "timeout": None}
    assert effective(spelled_out) == effective(BASE)


@pytest.mark.parametrize(
    ("current", "changes", "merged", "problems"),
    [
        ({**BASE, "auth": True}, {"auth": None}, BASE, []),
        (BASE, {"timeout": 9}, {**BASE, "timeout": 9}, []),
        ({**BASE, "headers": {"A": "1"}}, {"headers": None}, BASE, []),
        ({**BASE, "headers": {"A": "1", "B": "2"}}, {"headers": {"B": REDACTED, "C": "3"}}, {**BASE, "headers": {"B": "2", "C": "3"}}, []),
        ({**BASE, "headers": {"a": "1"}}, {"headers": {"A": REDACTED}}, {**BASE, "headers": {"A": "1"}}, []),
        (BASE, {"headers": {"Z": REDACTED}}, {**BASE, "headers": {"Z": REDACTED}}, ["headers.Z: <redacted> keeps"]),
        (BASE, {"ghost": None}, BASE, []),
    ],
)
def test_merge(current, changes, merged, problems):
    result, found = merge(current, changes)
    assert result == merged
    assert len(found) == len(problems) and all(p in f for p, f in zip(problems, found, strict=True))


def test_null_to_absent_and_placeholders():
    assert null_to_absent({**BASE, "auth": None, "timeout": 3}) == {**BASE, "timeout": 3}
    assert placeholder_problems({**BASE, "headers": {"A": REDACTED, "B": "x"}}) == ["headers.A: <redacted> is a placeholder for a stored value, not a value"]
    assert placeholder_problems({**BASE, "headers": "not a mapping"}) == []


def test_split_and_join_secrets_round_trip():
    entry = {**BASE, "headers": {"Authorization": "bearer sk-1", "X-Ref": "os.environ/REF", "litellm_user_api_key": "x-k"}}
    written, literals = split_secrets(entry)
    assert written["headers"] == {"Authorization": REDACTED, "X-Ref": "os.environ/REF", "litellm_user_api_key": "x-k"}
    assert literals == {"Authorization": "bearer sk-1"}
    assert "sk-1" not in repr(written)
    assert join_secrets(written, literals) == entry
    assert split_secrets(BASE) == (BASE, {})


def test_redacted_lists_references_as_written_and_literals_hidden():
    shown = redacted({**BASE, "headers": {"A": "bearer secret", "B": "bearer os.environ/B"}})
    assert shown["headers"] == {"A": REDACTED, "B": "bearer os.environ/B"}
    assert set(shown) == set(DEFAULTS)


@pytest.mark.parametrize(
    ("path", "methods", "others", "found"),
    [
        ("/a", ["GET"], [], None),
        ("/a", ["GET"], [("x", "/a", ["POST"])], None),
        ("/a", ["GET", "POST"], [("x", "/a", ["POST", "PUT"])], ("x", ["POST"])),
        ("/a", ["GET"], [("x", "/b", ["GET"])], None),
        ("/a", ["GET"], [("x", "/a/b", ["GET"]), ("y", "/a", ["GET"])], ("y", ["GET"])),
    ],
)
def test_overlap(path, methods, others, found):
    assert overlap(path, methods, others) == found


def test_sealed_values_open_with_the_same_salt_key_only():
    fernet = cipher({"LITELLM_SALT_KEY": "salt-one"})
    token = seal({"Authorization": "bearer sk-secret"}, fernet)
    assert "sk-secret" not in token
    # Another instance with the same salt key opens it (the key is derived, not random).
    assert unseal(token, cipher({"LITELLM_SALT_KEY": "salt-one"})) == {"Authorization": "bearer sk-secret"}
    with pytest.raises(SecretsUnavailable, match="not the one they were stored with"):
        unseal(token, cipher({"LITELLM_SALT_KEY": "salt-two"}))
    with pytest.raises(SecretsUnavailable, match="LITELLM_SALT_KEY, which is not set"):
        unseal(token, cipher({}))
    assert cipher({"LITELLM_SALT_KEY": ""}) is None
