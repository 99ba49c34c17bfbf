"""proxy_app/keys.py: the pure rules of virtual keys, as tables."""

from __future__ import annotations

import hashlib
from datetime import UTC
from datetime import datetime

import pytest

from proxy_app import keys
from proxy_app.key_store import KeyRecord
from proxy_app.keys import GENERATE_FIELDS
from proxy_app.keys import UPDATE_FIELDS
from proxy_app.keys import BadDuration
from proxy_app.keys import BadField

NOW = datetime(2026, 1, 31, 12, 0, tzinfo=UTC).timestamp()


def test_new_key_is_sk_and_256_random_bits():
    made = {keys.new_key() for _ in range(50)}
    assert len(made) == 50
    for key in made:
        assert key.startswith("sk-")
        assert len(key) == 3 + 43  # 32 bytes, url-safe base64 without padding
        assert set(key[3:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_token_of_is_sha256_hex_of_the_plaintext():
    assert keys.token_of("sk-1234") == hashlib.sha256(b"sk-1234").hexdigest()
    assert keys.is_token(keys.token_of("sk-1234"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a" * 64, True),
        ("0123456789abcdef" * 4, True),
        ("A" * 64, False),
        ("a" * 63, False),
        ("a" * 65, False),
        ("g" * 64, False),
        ("sk-" + "a" * 61, False),
        (None, False),
        (123, False),
    ],
)
def test_is_token(value, expected):
    assert keys.is_token(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a" * 64, "a" * 64),  # a token is taken as given
        ("sk-abc", hashlib.sha256(b"sk-abc").hexdigest()),  # a plaintext is hashed
        ("A" * 64, hashlib.sha256(b"A" * 64).hexdigest()),  # not a token: hashed, matches nothing
    ],
)
def test_token_for(value, expected):
    assert keys.token_for(value) == expected


def test_key_name_shows_the_last_four_characters():
    assert keys.key_name("sk-abcdefgh1234") == "sk-...1234"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("2h", 7200),
        ("7d", 7 * 86400),
        ("30d", 30 * 86400),
        ("2w", 14 * 86400),
        (" 1h ", 3600),
        ("hourly", 3600),
        ("Daily", 86400),
        ("weekly", 7 * 86400),
        ("monthly", 30 * 86400),
        # Calendar months from NOW (31 January): to 28 February, then to 31 March.
        ("1mo", 28 * 86400),
        ("2mo", (28 + 31) * 86400),
        ("12mo", 365 * 86400),
    ],
)
def test_parse_duration(text, seconds):
    assert keys.parse_duration(text, NOW) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "30", "s", "1.5h", "-1h", "0s", "0mo", "10x", "1y", "1 h", "1H", "1hh", "1e3s", "99999999d", "1201mo", "10000000000s", None, 5],
)
def test_parse_duration_refuses(text):
    with pytest.raises(BadDuration):
        keys.parse_duration(text, NOW)


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (NOW, "2026-01-31T12:00:00.000Z"),
        (NOW + 0.25, "2026-01-31T12:00:00.250Z"),
        (None, None),
    ],
)
def test_iso(moment, text):
    assert keys.iso(moment) == text


def test_iso_round_trips_through_fromisoformat():
    assert datetime.fromisoformat(keys.iso(NOW)).timestamp() == NOW


@pytest.mark.parametrize(("text", "moment"), [("2026-01-31", datetime(2026, 1, 31, tzinfo=UTC).timestamp()), ("1970-01-01", 0.0)])
def test_parse_day(text, moment):
    assert keys.parse_day(text) == moment


@pytest.mark.parametrize("text", ["2026-1-31", "2026-02-30", "31-01-2026", "2026-01-31T00:00", "", "today"])
def test_parse_day_refuses(text):
    with pytest.raises(ValueError):
        keys.parse_day(text)


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "The request body must be a JSON object."),
        ("x", "The request body must be a JSON object."),
        ({"nope": 1}, "unknown field nope"),
        ({"key_alias": 5}, "key_alias must be a string, got number"),
        ({"rpm_limit": "10"}, "rpm_limit must be an integer, got string"),
        ({"rpm_limit": 1.5}, "rpm_limit must be an integer, got number"),
        ({"rpm_limit": True}, "rpm_limit must be an integer, got boolean"),
        ({"max_budget": "1"}, "max_budget must be a number, got string"),
        ({"max_budget": float("nan")}, "max_budget must be a number, got number"),
        ({"blocked": "true"}, "blocked must be a boolean, got string"),
        ({"metadata": []}, "metadata must be an object, got list"),
        ({"allowed_routes": "/v1"}, "allowed_routes must be a list of strings, got string"),
        ({"allowed_routes": ["/v1", 2]}, "allowed_routes must be a list of strings, got list"),
        ({"allowed_passthrough_routes": {}}, "allowed_passthrough_routes must be a list of strings, got object"),
        ({"models": "gpt-4"}, "models must be a list, got string"),
        ({"tags": [1]}, "tags must be a list of strings, got list"),
        ({"team_id": 7}, "team_id must be a string, got number"),
        ({"tpm_limit": "x"}, "tpm_limit must be an integer, got string"),
        ({"denied_passthrough_routes": ["/x"]}, "denied_passthrough_routes is not supported by proxy_app"),
        ({"budget_limits": [{"x": 1}]}, "budget_limits is not supported by proxy_app"),
        ({"auto_rotate": True}, "auto_rotate is not supported by proxy_app"),
        ({"guardrails": ["g"]}, "guardrails is not supported by proxy_app"),
    ],
)
def test_validate_refuses_naming_the_field(body, message):
    with pytest.raises(BadField) as caught:
        keys.validate(body, GENERATE_FIELDS)
    assert caught.value.status == 400
    assert caught.value.message.startswith(message)


@pytest.mark.parametrize(
    ("body", "checked"),
    [
        ({}, {}),
        ({"rpm_limit": 5.0}, {"rpm_limit": 5}),
        ({"rpm_limit": None, "key_alias": None}, {"rpm_limit": None, "key_alias": None}),
        ({"max_budget": 1}, {"max_budget": 1}),
        # LiteLLM's defaults for fields proxy_app does not support ask for nothing: accepted, dropped.
        ({"auto_rotate": False, "guardrails": None, "budget_limits": [], "denied_passthrough_routes": []}, {}),
        ({"models": ["gpt-4"], "team_id": "t", "tags": ["a"], "tpm_limit": 5}, {"models": ["gpt-4"], "team_id": "t", "tags": ["a"], "tpm_limit": 5}),
    ],
)
def test_validate_accepts(body, checked):
    assert keys.validate(body, GENERATE_FIELDS) == checked


def test_every_table_field_has_a_kind_and_none_is_both_inert_and_effective():
    assert not set(keys.INERT_FIELDS) & set(keys.UNSUPPORTED_FIELDS)
    assert not set(keys.INERT_FIELDS) & {"key_alias", "duration", "allowed_routes", "rpm_limit", "max_parallel_requests", "max_budget"}
    for table in (GENERATE_FIELDS, UPDATE_FIELDS, keys.REGENERATE_FIELDS, keys.DELETE_FIELDS):
        assert all(kind in {keys.STRING, keys.INTEGER, keys.NUMBER, keys.BOOLEAN, keys.OBJECT, keys.LIST, keys.STRINGS} for kind in table.values())


# --- changes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "columns", "extra"),
    [
        ({}, {}, {}),
        ({"key_alias": "a", "rpm_limit": 3, "max_parallel_requests": 2}, {"key_alias": "a", "rpm_limit": 3, "max_parallel_requests": 2}, {}),
        ({"duration": "1h"}, {"expires": NOW + 3600}, {}),
        ({"budget_duration": "1d", "max_budget": 2.5}, {"budget_duration": "1d", "budget_reset_at": NOW + 86400, "max_budget": 2.5}, {}),
        ({"allowed_routes": ["/v1/a", "/v1/a"]}, {"allowed_routes": ["/v1/a"]}, {}),
        ({"allowed_passthrough_routes": ["/v1/a"]}, {"allowed_routes": ["/v1/a"]}, {}),
        ({"allowed_routes": [], "allowed_passthrough_routes": ["/v1/a"]}, {"allowed_routes": ["/v1/a"]}, {}),
        # [] is LiteLLM's default and means no restriction, as absent does.
        ({"allowed_routes": []}, {"allowed_routes": None}, {}),
        ({"metadata": {"team": "x"}, "blocked": True, "spend": 1.5}, {"metadata": {"team": "x"}, "blocked": True, "spend": 1.5}, {}),
        ({"models": ["m"], "team_id": "t"}, {}, {"models": ["m"], "team_id": "t"}),
        # null on generate is absent.
        ({"duration": None, "key_alias": None, "models": None, "rpm_limit": None}, {}, {}),
    ],
)
def test_changes_of_generate(fields, columns, extra):
    changes = keys.changes_of(fields, NOW, update=False)
    assert changes.columns == columns
    assert changes.extra == extra


@pytest.mark.parametrize(
    ("fields", "columns", "extra"),
    [
        # null on update clears.
        ({"duration": None}, {"expires": None}, {}),
        ({"key_alias": None, "rpm_limit": None}, {"key_alias": None, "rpm_limit": None}, {}),
        ({"budget_duration": None}, {"budget_duration": None, "budget_reset_at": None}, {}),
        ({"allowed_routes": None}, {"allowed_routes": None}, {}),
        ({"spend": None}, {"spend": 0.0}, {}),
        ({"models": None, "team_id": "t2"}, {}, {"models": None, "team_id": "t2"}),
        ({"duration": "30s"}, {"expires": NOW + 30}, {}),
    ],
)
def test_changes_of_update(fields, columns, extra):
    changes = keys.changes_of(fields, NOW, update=True)
    assert changes.columns == columns
    assert changes.extra == extra


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"duration": "1y"}, "duration must be a number and a unit"),
        ({"budget_duration": "soon"}, "budget_duration must be a number and a unit"),
        ({"duration": "0s"}, "duration must be longer than zero"),
        ({"rpm_limit": -1}, "rpm_limit must be at least 0"),
        ({"max_parallel_requests": 2**31}, "max_parallel_requests must be at most"),
        ({"max_budget": -0.5}, "max_budget must be at least 0"),
        ({"spend": -1}, "spend must be at least 0"),
        ({"key_alias": ""}, "key_alias must be a non-empty string"),
        ({"key_alias": "a" * 256}, "key_alias must be a non-empty string"),
        ({"allowed_routes": ["v1"]}, "allowed_routes must be a list of endpoint paths"),
        ({"allowed_passthrough_routes": ["/a b"]}, "allowed_passthrough_routes must be a list of endpoint paths"),
        ({"allowed_routes": ["/a"], "allowed_passthrough_routes": ["/b"]}, "allowed_routes and allowed_passthrough_routes"),
    ],
)
def test_changes_of_refuses_naming_the_field(fields, message):
    with pytest.raises(BadField) as caught:
        keys.changes_of(fields, NOW, update=False)
    assert caught.value.message.startswith(message)


@pytest.mark.parametrize("value", ["sk-", "pk-abcdef", "sk-with space", "sk-é", "sk-" + "a" * 510, "sk-\n1"])
def test_custom_key_refuses(value):
    with pytest.raises(BadField, match=r"^key must start with sk-"):
        keys.custom_key(value)


@pytest.mark.parametrize("value", ["sk-a", "sk-my-own-key_123", "sk-" + "a" * 509])
def test_custom_key_accepts(value):
    assert keys.custom_key(value) == value


@pytest.mark.parametrize(("value", "seconds"), [(None, 0), ("1h", 3600), ("90s", 90)])
def test_grace_seconds(value, seconds):
    assert keys.grace_seconds(value, NOW) == seconds


def test_grace_seconds_names_the_field():
    with pytest.raises(BadField, match=r"^grace_period must"):
        keys.grace_seconds("later", NOW)


def record(**fields) -> KeyRecord:
    values = {
        "token": "a" * 64,
        "key_alias": None,
        "key_name": "sk-...abcd",
        "expires": None,
        "allowed_routes": None,
        "rpm_limit": None,
        "max_parallel_requests": None,
        "max_budget": None,
        "budget_duration": None,
        "budget_reset_at": None,
        "spend": 0.0,
        "metadata": None,
        "blocked": False,
        "extra": None,
        "created_at": NOW,
        "updated_at": NOW,
        "previous_token": None,
        "previous_expires": None,
    }
    return KeyRecord(**{**values, **fields})


def test_describe_has_every_field_times_in_iso_and_extra_fields_as_given():
    info = keys.describe(record(expires=NOW + 60, allowed_routes=("/v1",), extra={"models": ["m"], "team_id": "t"}))
    assert info == {
        "token": "a" * 64,
        "key_name": "sk-...abcd",
        "key_alias": None,
        "spend": 0.0,
        "max_budget": None,
        "budget_duration": None,
        "budget_reset_at": None,
        "expires": "2026-01-31T12:01:00.000Z",
        "allowed_routes": ["/v1"],
        "rpm_limit": None,
        "max_parallel_requests": None,
        "metadata": {},
        "blocked": False,
        "created_at": "2026-01-31T12:00:00.000Z",
        "updated_at": "2026-01-31T12:00:00.000Z",
        "models": ["m"],
        "team_id": "t",
    }


def test_describe_usage_uses_litellm_names_and_iso_times():
    row = {
        "request_id": "r1",
        "api_key": "a" * 64,
        "key_alias": "k",
        "route": "/v1",
        "method": "POST",
        "status": 200,
        "request_bytes": 3,
        "response_bytes": 4,
        "duration_ms": 5.0,
        "ttfb_ms": 1.0,
        "spend": 0.01,
        "start_time": NOW,
        "end_time": NOW + 1,
        "upstream_error": None,
    }
    assert keys.describe_usage(row) == {
        "request_id": "r1",
        "api_key": "a" * 64,
        "key_alias": "k",
        "route": "/v1",
        "method": "POST",
        "status": 200,
        "request_bytes": 3,
        "response_bytes": 4,
        "duration_ms": 5.0,
        "ttfb_ms": 1.0,
        "spend": 0.01,
        "startTime": "2026-01-31T12:00:00.000Z",
        "endTime": "2026-01-31T12:00:01.000Z",
        "upstream_error": None,
    }
