"""Header rules, both directions, as pure functions over lists of ``(name, value)`` pairs.

Headers are multi-valued and ordered, so they are never kept in a plain dict keyed by
name: two upstream ``Set-Cookie`` lines must reach the caller as two lines.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from collections.abc import Mapping

from proxy_app.logs import truthy

# RFC 9110 §7.6.1 plus the non-standard Proxy-Connection that libcurl still sends (as in
# Go's httputil.ReverseProxy): these describe one hop, never the end-to-end message.
# HTTP2-Settings carries the settings of an h2c upgrade of the immediate connection
# (RFC 7540 §3.2.1); a client must name it in Connection, but one that does not must not
# get it forwarded either.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "http2-settings",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The caller's Connection header as the front (deploy/nginx.conf) received it. nginx removes
# Connection before it proxies (it must, to keep its pooled connections to gunicorn open),
# so without this the app would never learn which headers the caller declared hop-by-hop.
# The site sets it with proxy_set_header, which replaces any header of that name the caller
# sent. It is honoured only with PROXY_TRUST_CLIENT_CONNECTION set (see client_hop_names)
# and never forwarded upstream.
CLIENT_CONNECTION = "x-client-connection"
# Honour CLIENT_CONNECTION: set it only when every request reaches gunicorn through the
# shipped nginx site (gunicorn bound to 127.0.0.1). Read once, at import, like body.py's limits.
TRUST_CLIENT_CONNECTION = truthy(os.environ.get("PROXY_TRUST_CLIENT_CONNECTION"))
# Headers deploy/nginx.conf itself sets (proxy_set_header): they are the front's, not the
# caller's, so a caller naming them in its Connection header must not make the app drop the
# front's values (the real client address would then never reach the upstream). Host and
# X-Forwarded-Proto, which the front sets too, are never forwarded anyway.
FRONT_SET = frozenset({"x-forwarded-for", "x-real-ip"})
# Sent upstream even without forward_headers: they describe the body and what the caller
# can read back, and the bytes pass through untouched in both directions.
ALWAYS_FORWARDED = frozenset({"content-type", "content-encoding", "accept", "accept-encoding"})
# Never forwarded from the caller, with or without forward_headers:
# - Host and Content-Length are the target's and the body's own (set by the transport);
# - Proxy: httpoxy (CVE-2016-5385);
# - Expect: the 100-continue handshake is answered by gunicorn on this hop;
# - x-litellm-api-key carries the proxy's own key;
# - X-Forwarded-Host/-Proto and Forwarded describe this hop, and a caller could forge them;
# - X-Client-Connection is the front's note to the app about the hop before it.
NEVER_FORWARDED = HOP_BY_HOP | {
    CLIENT_CONNECTION,
    "host",
    "content-length",
    "proxy",
    "expect",
    "x-litellm-api-key",
    "x-forwarded-host",
    "x-forwarded-proto",
    "forwarded",
}
PASS_PREFIX = "x-pass-"
# x-pass-<name> may not set these: credentials the config owns, framing, and the AWS
# signature headers (LiteLLM PR #25916, #37058).
PASS_PROTECTED = NEVER_FORWARDED | {
    "authorization",
    "api-key",
    "x-api-key",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
    "accept-encoding",
    "x-forwarded-for",
}
# Header names that carry a credential: an open endpoint injecting one is worth a warning.
CREDENTIAL_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "api-key",
        "x-api-key",
        "x-goog-api-key",
        "ocp-apim-subscription-key",
        "cookie",
    }
)

# Control characters other than HTAB are invalid in a field value (RFC 9110 §5.5).
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def is_token(name: str) -> bool:
    """Whether ``name`` is a valid header field name (RFC 9110 §5.1 token)."""
    return bool(_TOKEN_RE.fullmatch(name))


def connection_tokens(values: Iterable[str]) -> frozenset[str]:
    """Header names listed in Connection values: hop-by-hop too (RFC 9110 §7.6.1)."""
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    )


def client_hop_names(caller: Iterable[tuple[str, str]], trust_front: bool) -> frozenset[str]:
    """Lower-case names the caller's Connection header declares hop-by-hop (RFC 9110 §7.6.1).

    Directly against gunicorn these come from the caller's own Connection header(s). Behind
    the shipped nginx site they arrive in ``X-Client-Connection`` instead, which counts only
    with ``trust_front``, and never for the headers the front sets itself (FRONT_SET).

    Without the front, a caller could send X-Client-Connection itself; even when trusted it
    can only remove headers that the same caller sent, never a configured header (those are
    added after the caller's are filtered), a key check, or the front's FRONT_SET headers:
    nothing it could not do by leaving those headers out.
    """
    own = []
    relayed = []
    for name, value in caller:
        lower = name.lower()
        if lower == "connection":
            own.append(value)
        elif lower == CLIENT_CONNECTION:
            relayed.append(value)
    names = connection_tokens(own) if own else frozenset()
    if trust_front and relayed:
        names = names | (connection_tokens(relayed) - FRONT_SET)
    return names


def caller_headers(environ: Mapping[str, object]) -> list[tuple[str, str]]:
    """The caller's request headers from a WSGI environ, names in ``Title-Case``.

    WSGI servers join repeated request header lines with ", " into one variable, so each
    name appears once here.
    """
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").title(), value))
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            headers.append((key.replace("_", "-").title(), value))
    return headers


def outbound_headers(
    caller: list[tuple[str, str]],
    configured: tuple[tuple[str, str], ...],
    configured_names: frozenset[str],
    forward_all: bool,
    peer: str | None,
    consumed: frozenset[str] = frozenset(),
    trust_front: bool | None = None,
) -> list[tuple[str, str]]:
    """The headers to send upstream, in order.

    :param caller: the caller's headers.
    :param configured: the endpoint's resolved headers; they win over any caller header.
    :param forward_all: the endpoint's ``forward_headers``.
    :param peer: the caller's address, appended to X-Forwarded-For when forwarding all.
    :param consumed: lower-case names of headers that carried the proxy key, or name the
        endpoint's key header: never sent upstream.
    :param trust_front: honour X-Client-Connection (client_hop_names); None: the
        PROXY_TRUST_CLIENT_CONNECTION setting.
    """
    if trust_front is None:
        trust_front = TRUST_CLIENT_CONNECTION
    drop = NEVER_FORWARDED | consumed | configured_names
    hop = client_hop_names(caller, trust_front)
    if hop:
        drop = drop | hop
    chosen: dict[str, tuple[str, str]] = {}
    renamed: dict[str, tuple[str, str]] = {}
    forwarded_for = None
    for name, value in caller:
        lower = name.lower()
        if lower in drop:
            # Checked before the x-pass- rename: a key header named x-pass-<x> must not
            # reach the upstream renamed to <x>.
            continue
        if lower.startswith(PASS_PREFIX):
            bare = lower[len(PASS_PREFIX) :]
            if bare and bare not in PASS_PROTECTED and bare not in drop and not bare.startswith("x-amz-"):
                renamed[bare] = (name[len(PASS_PREFIX) :], value)
        elif lower == "x-forwarded-for":
            forwarded_for = value
        elif forward_all or lower in ALWAYS_FORWARDED:
            chosen[lower] = (name, value)
    chosen.update(renamed)
    if forward_all and peer:
        # Never trust a caller's X-Forwarded-For as it is: append who really connected.
        chosen["x-forwarded-for"] = ("X-Forwarded-For", f"{forwarded_for}, {peer}" if forwarded_for else peer)
    return [*chosen.values(), *configured]


class InvalidUpstreamHeaders(ValueError):
    """The upstream's response head cannot be relayed faithfully (answer 502 instead)."""


def response_headers(upstream: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Upstream response headers to relay: all of them, repeats kept, minus hop-by-hop.

    Content-Length and Content-Encoding stay: the body is relayed byte for byte, undecoded.
    A head whose framing is ambiguous is refused (RFC 9112 §6.3: Content-Length with
    Transfer-Encoding, a coding other than chunked, a Content-Length that is not one
    number), as is any name or value that could not be written back as it came.

    :raises InvalidUpstreamHeaders: naming what was wrong (never a value).
    """
    items = list(upstream)
    lengths = []
    codings = []
    connection = []
    for name, value in items:
        if not is_token(name) or _BAD_VALUE.search(value):
            raise InvalidUpstreamHeaders(f"invalid header {name!r}")
        lower = name.lower()
        if lower == "content-length":
            lengths.extend(v.strip() for v in value.split(","))
        elif lower == "transfer-encoding":
            codings.extend(v.strip().lower() for v in value.split(","))
        elif lower == "connection":
            connection.append(value)
    if codings and (lengths or codings != ["chunked"]):
        raise InvalidUpstreamHeaders("ambiguous Transfer-Encoding framing")
    if lengths and (len(set(lengths)) != 1 or not lengths[0].isdigit()):
        raise InvalidUpstreamHeaders("invalid Content-Length")
    drop = HOP_BY_HOP | connection_tokens(connection) if connection else HOP_BY_HOP
    relayed = []
    length_sent = False
    for name, value in items:
        lower = name.lower()
        if lower in drop:
            continue
        if lower == "content-length":
            # One line with one number, even where the upstream repeated an identical
            # value ("5, 5" or two lines, RFC 9110 §8.6): gunicorn needs a single integer.
            if length_sent:
                continue
            value, length_sent = lengths[0], True
        relayed.append((name, value))
    return relayed
