"""The checks a virtual key must pass on an ``auth: true`` endpoint: pure functions.

In the order a caller is told about them, the first failure answers (the limits, which need
the shared counters, come after these in proxy_app/key_gate.py):

1. blocked, expired, or an old key whose regeneration grace period is over: 401;
2. the request path is outside the key's ``allowed_routes``: 403;
3. ``spend >= max_budget`` in the current budget period: 400 ``budget_exceeded``.
"""

from __future__ import annotations

from proxy_app.errors import Refusal

UNKNOWN_KEY = "Authentication Error, invalid proxy key."
BLOCKED_KEY = "Authentication Error, this key is blocked."
EXPIRED_KEY = "Authentication Error, this key has expired."


def route_allowed(allowed_routes, path: str) -> bool:
    """Whether ``path`` (the raw request path) is one of ``allowed_routes`` or below one.

    None or empty means every ``auth: true`` endpoint (LiteLLM's default). "/v1/a" allows
    "/v1/a" and "/v1/a/b", never "/v1/ab". The raw path is compared, so an encoded "%2F" never reaches below an allowed
    route it does not literally start with; dot segments were refused before this.
    """
    if not allowed_routes:
        return True
    for route in allowed_routes:
        base = route.rstrip("/")
        if path in (route, base) or path.startswith(base + "/"):
            return True
    return False


def current_spend(record, now: float) -> float:
    """The key's spend in the running budget period: nothing yet once the period is over."""
    if record.budget_reset_at is not None and record.budget_reset_at <= now:
        return 0.0
    return record.spend or 0.0


def key_refusal(record, token: str, path: str, now: float) -> Refusal | None:
    """Why the key whose SHA-256 is ``token`` may not call ``path`` now (None: it may).

    :param record: the key's row (proxy_app.key_store.KeyRecord), found by ``token``
        either as its current token or as its previous one (regenerated with a grace period).
    """
    if record.blocked:
        return Refusal(401, BLOCKED_KEY, "auth_error")
    if record.expires is not None and record.expires <= now:
        return Refusal(401, EXPIRED_KEY, "auth_error")
    if token != record.token and (record.previous_expires is None or record.previous_expires <= now):
        return Refusal(401, EXPIRED_KEY, "auth_error")
    if not route_allowed(record.allowed_routes, path):
        return Refusal(403, f"This key is not allowed to call {path}.", "auth_error")
    if record.max_budget is not None:
        spend = current_spend(record, now)
        if spend >= record.max_budget:
            return Refusal(
                400, f"Budget has been exceeded! Current cost: {spend}, Max budget: {record.max_budget}", "budget_exceeded"
            )
    return None


def rate_limit_headers(admission) -> list[tuple[str, str]]:
    """``x-ratelimit-*`` for an admitted request of a key with an ``rpm_limit`` (OpenAI's names)."""
    if admission.rpm_limit is None:
        return []
    return [
        ("x-ratelimit-limit-requests", str(admission.rpm_limit)),
        ("x-ratelimit-remaining-requests", str(admission.rpm_remaining)),
        ("x-ratelimit-reset-requests", f"{max(0, round(admission.reset_seconds or 0))}s"),
    ]


def limit_refusal(admission, record) -> Refusal:
    """The 429 for a request the limiter refused, with ``Retry-After``."""
    if admission.reason == "rpm":
        message = f"Rate limit reached: this key may make {record.rpm_limit} requests per minute."
        headers = [("Retry-After", str(admission.retry_after)), *rate_limit_headers(admission)]
    else:
        message = f"Max parallel request limit reached: this key may have {record.max_parallel_requests} requests in flight."
        headers = [("Retry-After", str(admission.retry_after))]
    return Refusal(429, message, "rate_limit_error", headers)
