"""``--detailed_debug`` request traces: enough to see what went where, never a secret.

Logged per request: the outgoing method and URL without its query (query *names* only:
a default_query_params value may be a key), each outgoing header with its value masked
unless the header is known to carry no credential, then the upstream status and the
upstream response header names.
"""

from __future__ import annotations

import logging

log = logging.getLogger("proxy_app.debug")

# Values safe to show: they describe the body or the client, never a credential.
SHOWN_VALUES = frozenset(
    {"content-type", "content-length", "content-encoding", "accept", "accept-encoding", "transfer-encoding", "user-agent"}
)
MASK = "***"


def masked(headers) -> str:
    return ", ".join(f"{n}: {v if n.lower() in SHOWN_VALUES else MASK}" for n, v in headers)


def debug_request(call_id: str, method: str, origin: str, path: str, query: str, headers) -> None:
    names = [pair.split("=", 1)[0] for pair in query.split("&") if pair]
    log.debug(
        "call %s -> %s %s%s query names %s headers [%s]",
        call_id, method, origin, path, names, masked(headers),
    )


def debug_response(call_id: str, raw) -> None:
    log.debug("call %s <- %s header names %s", call_id, raw.status, [n for n, _ in raw.headers.items()])
