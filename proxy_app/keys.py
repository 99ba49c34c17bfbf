"""Virtual keys: the pure rules of the admin API (proxy_app/admin.py).

- A key is ``sk-`` and 32 random bytes, url-safe base64 (256 bits; SPEC asks for 128 at
  least). Only its SHA-256 hex digest, the ``token``, is stored: a key is looked up by
  hashing what the caller presents, so a stored token is never itself a credential.
- Request bodies are checked against a table per route (field name -> JSON type), with
  LiteLLM's field names. An unknown field is a 400 naming it; a wrong type is a 400 naming
  the field and the type expected. ``null`` means "absent" on generate and "clear" on update.
- LiteLLM fields that mean nothing for pass-through routes are stored in the key's
  ``extra`` and returned unchanged (:data:`INERT_FIELDS`); LiteLLM fields whose effect an
  operator would rely on and that proxy_app does not have are refused, saying what to use
  instead (:data:`UNSUPPORTED_FIELDS`), rather than accepted and silently ignored.
- Times are epoch seconds inside, ISO 8601 UTC on the wire.
"""

from __future__ import annotations

import calendar
import hashlib
import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime

KEY_PREFIX = "sk-"
_TOKEN_RE = re.compile(r"[0-9a-f]{64}")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def token_of(key: str) -> str:
    """The stored form of a key: SHA-256 of its UTF-8 bytes, lower-case hex (LiteLLM's ``token``)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def is_token(value: object) -> bool:
    return isinstance(value, str) and _TOKEN_RE.fullmatch(value) is not None


def token_for(value: str) -> str:
    """The token an admin call names: a token as given, else the hash of a plaintext key.

    A generated or custom key starts with ``sk-``, so it is never mistaken for a token.
    """
    return value if is_token(value) else token_of(value)


def key_name(key: str) -> str:
    """What an operator sees of a key: ``sk-...`` and its last four characters (LiteLLM's ``key_name``)."""
    return "sk-..." + key[-4:]


# --- durations ----------------------------------------------------------------------------

# LiteLLM's duration_in_seconds (litellm/litellm_core_utils/duration_parser.py) takes
# "<n>s|m|h|d|w|mo" and the words below. It matches only a prefix ("10x" is 10 seconds,
# "10" too); here the whole string must match and the unit is required.
_DURATION_RE = re.compile(r"(\d{1,9})(mo|s|m|h|d|w)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_WORDS = {"hourly": "1h", "daily": "24h", "weekly": "7d", "monthly": "30d"}
# Far enough for any real key; keeps the arithmetic (and datetime formatting) in range.
MAX_DURATION_SECONDS = 100 * 366 * 86400


class BadDuration(ValueError):
    pass


def parse_duration(text: str, now: float | None = None) -> int:
    """Seconds in ``text``: "30s", "15m", "2h", "7d", "2w", "1mo", or hourly/daily/weekly/monthly.

    "<n>mo" is n calendar months from ``now`` (default: the current time), as in LiteLLM:
    from 31 January, one month ends on the last day of February.

    :raises BadDuration: not a duration, zero, or longer than a hundred years.
    """
    if not isinstance(text, str):
        raise BadDuration("must be a string")
    spelled = _DURATION_WORDS.get(text.strip().lower(), text.strip())
    match = _DURATION_RE.fullmatch(spelled)
    if match is None:
        raise BadDuration('must be a number and a unit: "30s", "15m", "2h", "7d", "2w" or "1mo"')
    value, unit = int(match.group(1)), match.group(2)
    if unit == "mo":
        seconds = _months_seconds(time.time() if now is None else now, value) if value <= 1200 else MAX_DURATION_SECONDS + 1
    else:
        seconds = value * _UNIT_SECONDS[unit]
    if seconds <= 0:
        raise BadDuration("must be longer than zero")
    if seconds > MAX_DURATION_SECONDS:
        raise BadDuration("must be at most 100 years")
    return seconds


def _months_seconds(start: float, months: int) -> int:
    moment = datetime.fromtimestamp(start, UTC)
    index = moment.year * 12 + moment.month - 1 + months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return int((moment.replace(year=year, month=month + 1, day=day) - moment).total_seconds())


# --- times on the wire --------------------------------------------------------------------


def iso(moment: float | None) -> str | None:
    """ISO 8601 UTC with milliseconds ("2026-12-03T13:00:00.000Z"); None stays None."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_day(text: str) -> float:
    """Midnight UTC of a ``YYYY-MM-DD`` day, in epoch seconds; ValueError otherwise."""
    if not isinstance(text, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise ValueError(text)
    return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()


# --- body validation ------------------------------------------------------------------------


class BadField(Exception):
    """A request the admin API refuses: 400 unless said otherwise; the message names the field."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


STRING = "string"
INTEGER = "integer"
NUMBER = "number"
BOOLEAN = "boolean"
OBJECT = "object"
LIST = "list"
STRINGS = "list of strings"
ANY = "any JSON value"


def _is_kind(value: object, kind: str) -> bool:
    if kind == ANY:
        return True
    if kind == STRING:
        return isinstance(value, str)
    if kind == BOOLEAN:
        return isinstance(value, bool)
    if kind == INTEGER:
        # JSON has one number type: 5.0 is accepted as 5; True is not a number.
        return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
    if kind == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == OBJECT:
        return isinstance(value, dict)
    if kind == LIST:
        return isinstance(value, list)
    if kind == STRINGS:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    raise AssertionError(kind)


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


# LiteLLM /key/generate fields (GenerateKeyRequest in litellm/types/proxy/management_endpoints)
# that only act on LiteLLM's model routes, or only label the key, and so mean nothing for a
# pass-through endpoint (LiteLLM does not apply them to pass-through routes either: per-model
# budgets and limits, token limits, teams, users, tags). They are stored in the key's
# ``extra`` and returned unchanged, with no effect; the README lists them.
INERT_FIELDS: dict[str, str] = {
    "models": LIST,
    "aliases": OBJECT,
    "config": OBJECT,
    "permissions": OBJECT,
    "model_max_budget": OBJECT,
    "model_rpm_limit": OBJECT,
    "model_tpm_limit": OBJECT,
    "tpm_limit": INTEGER,
    "tpd_limit": INTEGER,
    "rpm_limit_type": STRING,
    "tpm_limit_type": STRING,
    "user_id": STRING,
    "team_id": STRING,
    "agent_id": STRING,
    "organization_id": STRING,
    "project_id": STRING,
    "budget_id": STRING,
    "end_user_budget_id": STRING,
    "tags": STRINGS,
    "key_type": STRING,
    "soft_budget": NUMBER,
    "send_invite_email": BOOLEAN,
    "allowed_cache_controls": LIST,
    "enforced_params": STRINGS,
    "default_estimated_output_tokens": INTEGER,
    "default_estimated_output_tokens_per_model": OBJECT,
    "enable_prompt_caching": BOOLEAN,
    "disable_global_guardrails": BOOLEAN,
    "object_permission": OBJECT,
    "allowed_vector_store_indexes": LIST,
    "mcp_rpm_limit": OBJECT,
    "access_group_ids": STRINGS,
    "router_settings": OBJECT,
    "budget_fallbacks": OBJECT,
    "prompts": STRINGS,
}

# LiteLLM fields an operator would rely on and that proxy_app cannot honour: refused (400)
# unless the value asks for nothing (null, false, empty), so that a client sending
# LiteLLM's defaults still works.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "denied_passthrough_routes": "list the routes the key may call in allowed_routes instead",
    "budget_limits": "use max_budget with budget_duration",
    "temp_budget_increase": "raise max_budget with /key/update",
    "temp_budget_expiry": "raise max_budget with /key/update",
    "auto_rotate": "rotate a key with /key/regenerate",
    "rotation_interval": "rotate a key with /key/regenerate",
    "guardrails": "guardrails are not supported by proxy_app",
    "policies": "guardrail policies are not supported by proxy_app",
    "tag_rpm_limit": "use rpm_limit",
    "throttle_on_budget_exceeded": "a key over its budget is refused",
    "new_master_key": "the master key is set in general_settings.master_key",
}

# The fields with an effect (columns of schema.keys), and their JSON types.
_KEY_FIELDS: dict[str, str] = {
    "key_alias": STRING,
    "duration": STRING,
    "allowed_routes": STRINGS,
    # LiteLLM's name for the pass-through routes a key may call; the same list here.
    "allowed_passthrough_routes": STRINGS,
    "rpm_limit": INTEGER,
    "max_parallel_requests": INTEGER,
    "max_budget": NUMBER,
    "budget_duration": STRING,
    "metadata": OBJECT,
    "blocked": BOOLEAN,
    # The key's spend so far (LiteLLM: generate may start it above zero, update may reset it).
    "spend": NUMBER,
}

GENERATE_FIELDS = {**_KEY_FIELDS, "key": STRING, **INERT_FIELDS}
UPDATE_FIELDS = {**_KEY_FIELDS, "key": STRING, **INERT_FIELDS}
# /key/regenerate: the key named in the body or the path, a new plaintext of the caller's
# choosing or a random one, how long the old one keeps working, and changes as /key/update.
REGENERATE_FIELDS = {**UPDATE_FIELDS, "new_key": STRING, "grace_period": STRING}
KEY_FIELD = {"key": STRING}
DELETE_FIELDS = {"keys": STRINGS, "key_aliases": STRINGS}


def validate(body: object, table: Mapping[str, str]) -> dict:
    """``body`` checked against ``table``; nulls kept (the caller decides what they mean).

    :raises BadField: not an object, an unknown field, a wrong type, or an unsupported
        LiteLLM field asking for something.
    """
    if not isinstance(body, dict):
        raise BadField("The request body must be a JSON object.")
    checked = {}
    for name, value in body.items():
        if name in UNSUPPORTED_FIELDS:
            if value not in (None, False, [], {}):
                raise BadField(f"{name} is not supported by proxy_app: {UNSUPPORTED_FIELDS[name]}.")
            continue
        kind = table.get(name)
        if kind is None:
            raise BadField(f"unknown field {name}")
        if value is not None and not _is_kind(value, kind):
            raise BadField(f"{name} must be {_a(kind)}, got {_json_type(value)}")
        checked[name] = int(value) if kind == INTEGER and value is not None else value
    return checked


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


# --- from a checked body to column values --------------------------------------------------


@dataclass
class Changes:
    """What a generate, update or regenerate writes.

    ``columns``: schema.keys columns -> value (None clears, on update). ``extra``: inert
    LiteLLM fields -> value (None removes the field, on update).
    """

    columns: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def changes_of(fields: Mapping, now: float, *, update: bool) -> Changes:
    """The column values for the checked ``fields`` of a generate (``update=False``) or update.

    On generate a null is the same as leaving the field out; on update it clears the field
    (the key never expires, has no alias, no limit...; spend goes back to 0, blocked to false).

    :raises BadField: a value of the right type that is still not acceptable.
    """
    given = {name: value for name, value in fields.items() if update or value is not None}
    changes = Changes()
    for name, value in given.items():
        if name in INERT_FIELDS:
            changes.extra[name] = value
    routes = _routes(given)
    if routes is not _ABSENT:
        changes.columns["allowed_routes"] = routes
    if "key_alias" in given:
        changes.columns["key_alias"] = _alias(given["key_alias"])
    if "duration" in given:
        changes.columns["expires"] = None if given["duration"] is None else now + _duration(given["duration"], "duration", now)
    if "budget_duration" in given:
        duration = given["budget_duration"]
        changes.columns["budget_duration"] = duration
        # The first budget period starts now (proxy_app/usage.py resets spend when it ends).
        changes.columns["budget_reset_at"] = None if duration is None else now + _duration(duration, "budget_duration", now)
    for name in ("rpm_limit", "max_parallel_requests"):
        if name in given:
            changes.columns[name] = _at_least(given[name], name, 0)
            if given[name] is not None and given[name] > MAX_INTEGER:
                raise BadField(f"{name} must be at most {MAX_INTEGER}")
    for name in ("max_budget", "spend"):
        if name in given:
            changes.columns[name] = _at_least(given[name], name, 0)
    if "spend" in changes.columns and changes.columns["spend"] is None:
        changes.columns["spend"] = 0.0
    if "metadata" in given:
        changes.columns["metadata"] = given["metadata"]
    if "blocked" in given:
        changes.columns["blocked"] = bool(given["blocked"])
    return changes


_ABSENT = object()
# The integer columns are 32-bit on PostgreSQL.
MAX_INTEGER = 2**31 - 1


def _routes(given: Mapping):
    """``allowed_routes`` or its LiteLLM alias ``allowed_passthrough_routes``.

    An empty list is LiteLLM's default for ``allowed_routes`` and means "no restriction"
    there, so it means the same here (every ``auth: true`` endpoint), as null does.
    """
    found = {name: given[name] for name in ("allowed_routes", "allowed_passthrough_routes") if name in given}
    if not found:
        return _ABSENT
    lists = [routes for routes in found.values() if routes]
    if len(lists) == 2 and lists[0] != lists[1]:
        raise BadField("allowed_routes and allowed_passthrough_routes are the same list: give one of them")
    routes = lists[0] if lists else None
    if routes is None:
        return None
    for route in routes:
        if not route.startswith("/") or any(ch.isspace() or ord(ch) < 0x20 for ch in route):
            name = "allowed_routes" if "allowed_routes" in found else "allowed_passthrough_routes"
            raise BadField(f"{name} must be a list of endpoint paths starting with /")
    return list(dict.fromkeys(routes))


def _alias(alias: str | None) -> str | None:
    if alias is None:
        return None
    if not alias.strip() or len(alias) > 255:
        raise BadField("key_alias must be a non-empty string of at most 255 characters")
    return alias


def _duration(text: str, name: str, now: float) -> int:
    try:
        return parse_duration(text, now)
    except BadDuration as exc:
        raise BadField(f"{name} {exc}") from None


def _at_least(value, name: str, minimum: float):
    if value is not None and value < minimum:
        raise BadField(f"{name} must be at least {minimum}")
    return value


def custom_key(value: str, name: str = "key") -> str:
    """A caller-chosen plaintext key: ``sk-`` and printable ASCII, no spaces (it travels in a header)."""
    if not (value.startswith(KEY_PREFIX) and 4 <= len(value) <= 512 and all(0x21 <= ord(ch) <= 0x7E for ch in value)):
        raise BadField(f"{name} must start with sk- and be printable ASCII without spaces (at most 512 characters)")
    return value


def grace_seconds(value: str | None, now: float) -> int:
    """``grace_period`` of /key/regenerate: how long the old key keeps working (None: not at all)."""
    return 0 if value is None else _duration(value, "grace_period", now)


# --- answers ----------------------------------------------------------------------------------


def describe(record) -> dict:
    """A key as /key/info, /key/list and /key/generate show it: every field, never the plaintext."""
    info = {
        "token": record.token,
        "key_name": record.key_name,
        "key_alias": record.key_alias,
        "spend": record.spend,
        "max_budget": record.max_budget,
        "budget_duration": record.budget_duration,
        "budget_reset_at": iso(record.budget_reset_at),
        "expires": iso(record.expires),
        "allowed_routes": None if record.allowed_routes is None else list(record.allowed_routes),
        "rpm_limit": record.rpm_limit,
        "max_parallel_requests": record.max_parallel_requests,
        "metadata": record.metadata if record.metadata is not None else {},
        "blocked": record.blocked,
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
    }
    for name, value in (record.extra or {}).items():
        info.setdefault(name, value)
    return info


def describe_usage(row: Mapping) -> dict:
    """A /spend/logs row: LiteLLM's startTime/endTime names, ISO 8601 UTC times."""
    return {
        "request_id": row["request_id"],
        "api_key": row["api_key"],
        "key_alias": row["key_alias"],
        "route": row["route"],
        "method": row["method"],
        "status": row["status"],
        "request_bytes": row["request_bytes"],
        "response_bytes": row["response_bytes"],
        "duration_ms": row["duration_ms"],
        "ttfb_ms": row["ttfb_ms"],
        "spend": row["spend"],
        "startTime": iso(row["start_time"]),
        "endTime": iso(row["end_time"]),
        "upstream_error": row["upstream_error"],
    }
