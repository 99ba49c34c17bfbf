"""The endpoint API's rules, as pure functions (tested as tables in tests/test_endpoint_rules.py).

An endpoint entry here is a dict of the config file's fields. Its *effective* form
(:func:`effective`) has every field, each at its default when absent or null, so that two
entries that serve the same way compare equal: a create retried with the same body is a
no-op, and an entry listed by ``GET`` can be posted back to its update route as it is. Header values are kept as
written: an ``os.environ/NAME`` reference is not a secret; a literal value is one, listed
as :data:`REDACTED` and stored sealed (proxy_app/endpoint_secrets.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from collections.abc import Mapping

from proxy_app.config import DEFAULT_METHODS
from proxy_app.config import KEY_HEADER_FIELD
from proxy_app.config_env import ENV_PREFIX
from proxy_app.config_env import scalar_text

REDACTED = "<redacted>"
CONFIG_ID_PREFIX = "config-"
# An id travels in a URL path and a log line: a short run of characters that need no quoting.
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
# Every field of a stored endpoint and its default (the config file's). ``timeout`` None is the
# general default (pass_through_request_timeout, else 600 s).
DEFAULTS: dict[str, object] = {
    "path": None,
    "target": None,
    "headers": {},
    "include_subpath": False,
    "forward_headers": False,
    "merge_query_params": False,
    "default_query_params": {},
    "methods": sorted(DEFAULT_METHODS),
    "auth": False,
    "timeout": None,
    "cost_per_request": 0.0,
}


def config_id(index: int) -> str:
    """The id a config-file endpoint is listed with: its index in the file's list."""
    return f"{CONFIG_ID_PREFIX}{index}"


def id_problem(value: object) -> str | None:
    """Why ``value`` cannot be a stored endpoint's id, or None."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        return "id must be 1 to 64 letters, digits or . _ : - (starting with a letter or digit)"
    if value.startswith(CONFIG_ID_PREFIX):
        return f"ids starting with {CONFIG_ID_PREFIX!r} name config-file endpoints"
    return None


def is_secret(name: str, value: object) -> bool:
    """A header value that must not be listed nor stored in clear: a literal one.

    ``litellm_user_api_key`` names a caller header (a header name, not a secret)."""
    text = scalar_text(value)
    return name.lower() != KEY_HEADER_FIELD and not (text is not None and ENV_PREFIX in text)


def effective(entry: Mapping) -> dict:
    """Every field of ``entry`` (a valid one), absent and null ones at their default, in one
    spelling: methods upper-cased and sorted, header values and numbers as the config reads them."""
    result = {}
    for name, default in DEFAULTS.items():
        value = entry.get(name)
        if value is None:
            value = default
        elif name == "methods":
            value = sorted({str(m).upper() for m in value}) or default
        elif name == "headers":
            value = {str(k): scalar_text(v) for k, v in value.items()}
        elif name == "default_query_params":
            value = dict(value)
        elif name in ("timeout", "cost_per_request"):
            value = float(value)
        result[name] = value
    return result


def null_to_absent(body: Mapping) -> dict:
    """A create's fields: LiteLLM's clients send optional fields as null, meaning absent."""
    return {name: value for name, value in body.items() if value is not None}


def merge(current: Mapping, changes: Mapping) -> tuple[dict, list[str]]:
    """A partial update: ``changes`` over ``current`` (both with header values in clear); a null
    resets a field to its default. In a ``headers`` change a value of :data:`REDACTED` keeps the
    value the header has now (an entry listed by GET can be edited and posted back).

    :returns: the merged entry, and the problems (a placeholder for a header that has no value).
    """
    merged = dict(current)
    problems = []
    for name, value in changes.items():
        if value is None:
            merged.pop(name, None)
            continue
        if name == "headers" and isinstance(value, Mapping):
            old = {str(k).lower(): v for k, v in (current.get("headers") or {}).items()}
            value = dict(value)
            for header, text in value.items():
                if text == REDACTED:
                    if str(header).lower() in old:
                        value[header] = old[str(header).lower()]
                    else:
                        problems.append(f"headers.{header}: {REDACTED} keeps a header's stored value; this endpoint has no such header")
        merged[name] = value
    return merged, problems


def placeholder_problems(entry: Mapping) -> list[str]:
    """A create cannot keep a stored value: :data:`REDACTED` is not a header value."""
    headers = entry.get("headers")
    if not isinstance(headers, Mapping):
        return []
    return [
        f"headers.{name}: {REDACTED} is a placeholder for a stored value, not a value"
        for name, value in headers.items()
        if value == REDACTED
    ]


def split_secrets(entry: Mapping) -> tuple[dict, dict[str, str]]:
    """``entry`` with its literal header values replaced by :data:`REDACTED`, and those values
    (header name -> value): what is stored in clear, and what is sealed."""
    headers = entry.get("headers") or {}
    literals = {name: scalar_text(value) for name, value in headers.items() if is_secret(name, value)}
    written = dict(entry)
    if headers:
        written["headers"] = {name: REDACTED if name in literals else value for name, value in headers.items()}
    return written, literals


def join_secrets(written: Mapping, literals: Mapping[str, str]) -> dict:
    """The inverse of :func:`split_secrets`."""
    entry = dict(written)
    if literals:
        entry["headers"] = {name: literals.get(name, value) for name, value in (written.get("headers") or {}).items()}
    return entry


def redacted(entry: Mapping) -> dict:
    """The effective ``entry`` as the API lists it: literal header values as :data:`REDACTED`."""
    shown = effective(entry)
    shown["headers"] = {name: REDACTED if is_secret(name, value) else value for name, value in shown["headers"].items()}
    return shown


def overlap(path: str, methods: Iterable[str], others: Iterable[tuple[str, str, Iterable[str]]]) -> tuple[str, list[str]] | None:
    """The first of ``others`` ((label, path, methods)) that already serves ``path`` with one of
    ``methods``: its label and the methods both would serve; None if there is none."""
    wanted = set(methods)
    for label, other_path, other_methods in others:
        shared = sorted(wanted & set(other_methods))
        if other_path == path and shared:
            return label, shared
    return None
