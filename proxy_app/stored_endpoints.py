"""A stored endpoint as this instance serves it: resolved from its own environment and salt key.

Used by the workers (proxy_app/endpoint_table.py) and by ``proxy-app check``
(proxy_app/cli.py), so it imports nothing of the request path (no prometheus_client).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from proxy_app.config import Endpoint
from proxy_app.config import Settings
from proxy_app.config import check_entry
from proxy_app.endpoint_rules import join_secrets
from proxy_app.endpoint_secrets import SecretsUnavailable
from proxy_app.endpoint_secrets import unseal
from proxy_app.endpoint_store import StoredEndpoint


class Unservable:
    """A stored endpoint this instance cannot serve (a variable or the salt key is missing
    here): its route answers 503 with ``message``, which names what is missing, never a value."""

    def __init__(self, path: str, methods: frozenset[str], include_subpath: bool, message: str) -> None:
        self.path = path
        self.methods = methods
        self.include_subpath = include_subpath
        self.message = message


STORED_SOURCE = "stored endpoint"


def stored_label(endpoint_id: str) -> str:
    return f"endpoint {endpoint_id}"


def resolve(stored: StoredEndpoint, settings: Settings, environ: Mapping[str, str], fernet) -> Endpoint | Unservable:
    """``stored`` as this instance serves it: an Endpoint, or an Unservable saying what is missing."""
    entry = stored.entry
    try:
        literals = unseal(stored.sealed, fernet) if stored.sealed else {}
    except SecretsUnavailable as exc:
        return _unservable(entry, str(exc))
    checked = check_entry(
        join_secrets(entry, literals),
        environ,
        master_key=settings.master_key,
        source=STORED_SOURCE,
        label=stored_label(stored.id),
        default_timeout=settings.default_timeout,
    )
    if checked.problems:
        # Valid when stored; no longer (the config lost its master key, for one). The problem
        # names fields and never a value.
        return _unservable(entry, "; ".join(checked.problems))
    if checked.missing:
        names = ", ".join(checked.missing)
        return _unservable(entry, f"environment variable {names} {'is' if len(checked.missing) == 1 else 'are'} not set here")
    return replace(checked.endpoint, id=stored.id)


def _unservable(entry: Mapping, reason: str) -> Unservable:
    path = entry["path"]
    methods = frozenset(entry.get("methods") or ())
    return Unservable(path, methods, bool(entry.get("include_subpath")), f"endpoint {path} cannot be served by this instance: {reason}")
