"""Proxy-key checks: which caller headers carry the master key.

The key may come in ``Authorization: Bearer <key>``, in ``x-litellm-api-key`` (with or
without ``Bearer ``) or in the endpoint's ``litellm_user_api_key`` header. Comparison is
constant-time (``hmac.compare_digest``) so response timing does not leak the key.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def environ_key(header: str) -> str:
    """The WSGI environ key of a request header (``x-my-key`` -> ``HTTP_X_MY_KEY``)."""
    return "HTTP_" + header.upper().replace("-", "_")


def _bearer(value: str) -> str:
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return value.strip()


def key_carriers(environ: Mapping[str, object], master_key: bytes | None, key_header: str | None) -> frozenset[str]:
    """Lower-case names of the caller headers that carry the master key (empty: none).

    Checked on every request, open endpoints included, so that a caller's master key is
    never forwarded upstream, even with ``forward_headers``.
    """
    if not master_key:
        return frozenset()
    carriers = []
    authorization = environ.get("HTTP_AUTHORIZATION")
    if authorization and authorization[:7].lower() == "bearer " and _matches(authorization[7:].strip(), master_key):
        carriers.append("authorization")
    litellm_key = environ.get("HTTP_X_LITELLM_API_KEY")
    if litellm_key and _matches(_bearer(litellm_key), master_key):
        carriers.append("x-litellm-api-key")
    if key_header:
        custom = environ.get(environ_key(key_header))
        if custom and _matches(_bearer(custom), master_key):
            carriers.append(key_header)
    return frozenset(carriers)


def _matches(candidate: str, master_key: bytes) -> bool:
    # WSGI header values are latin-1 decoded; compare the bytes as they came in.
    return hmac.compare_digest(candidate.encode("latin-1", "replace"), master_key)


def presented_key(environ: Mapping[str, object], key_header: str | None) -> tuple[str | None, str | None]:
    """The key a caller presents and the lower-case name of the header that carried it.

    LiteLLM's precedence: ``x-litellm-api-key``, then ``Authorization: Bearer``, then the
    endpoint's ``litellm_user_api_key`` header. (None, None) when there is none.
    """
    litellm_key = environ.get("HTTP_X_LITELLM_API_KEY")
    if litellm_key and _bearer(litellm_key):
        return _bearer(litellm_key), "x-litellm-api-key"
    authorization = environ.get("HTTP_AUTHORIZATION")
    if authorization and authorization[:7].lower() == "bearer " and authorization[7:].strip():
        return authorization[7:].strip(), "authorization"
    if key_header:
        custom = environ.get(environ_key(key_header))
        if custom and _bearer(custom):
            return _bearer(custom), key_header
    return None, None
