"""Upstream URL rules as pure functions: raw target splitting, sub-path joining, queries.

The caller's path and query are used *raw*, still percent-encoded as they arrived
(``RAW_URI``): decoding would turn ``%2F`` into a path separator and ``%3F`` into a query
(LiteLLM does both, see reference §1.2). Scheme, host and port always come from the
configured target; only the path below the target's path and the query are the caller's.
"""

from __future__ import annotations

import re
from urllib.parse import quote
from urllib.parse import unquote
from urllib.parse import unquote_plus

# A path segment that is "." or ".." once percent-decoded, split on "/" and, because some
# servers treat it as one, "\" too; ";params" are ignored (Tomcat reads "..;" as "..").
_SEGMENT_SPLIT = re.compile(r"[/\\]")


def raw_request_target(environ) -> str:
    """The request-target as the caller sent it, still percent-encoded.

    gunicorn sets RAW_URI, Werkzeug's servers REQUEST_URI; PATH_INFO is already decoded.
    """
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return raw
    # Another WSGI server: re-encode the decoded path (an encoded "/" is lost there).
    query = environ.get("QUERY_STRING")
    path = quote(environ.get("PATH_INFO", "/").encode("latin-1"), safe="/:@!$&'()*+,;=-._~")
    return f"{path}?{query}" if query else path


def split_request_target(raw: str) -> tuple[str, str]:
    """Split a raw request-target into (path, query), accepting the absolute form.

    ``http://host/p?q`` (RFC 9112 §3.2.2) keeps only ``/p`` and ``q``: the host a caller
    names never matters. A fragment, which a client should not send, is dropped.
    """
    raw = raw.split("#", 1)[0]
    if not raw.startswith("/"):
        scheme_end = raw.find("://")
        if scheme_end > 0:
            slash = raw.find("/", scheme_end + 3)
            query_mark = raw.find("?", scheme_end + 3)
            if slash < 0 or (0 <= query_mark < slash):
                raw = "/" + (raw[query_mark:] if query_mark >= 0 else "")
            else:
                raw = raw[slash:]
    path, _, query = raw.partition("?")
    return path, query


def subpath_rest(raw_path: str, route_path: str) -> str | None:
    """The raw rest of ``raw_path`` below ``route_path`` + "/", or None when not below it.

    The route path is matched literally against the raw path: ``/sub%2Fx`` is not below
    ``/sub`` (RFC 3986 §2.2: an encoded "/" is data, not a separator).
    """
    prefix = route_path.rstrip("/") + "/"
    if not raw_path.startswith(prefix):
        return None
    return raw_path[len(prefix) :]


def has_dot_segment(raw_path: str) -> bool:
    """Whether any segment of the path decodes to "." or ".." (RFC 3986 §5.2.4)."""
    return any(segment.split(";", 1)[0] in (".", "..") for segment in _SEGMENT_SPLIT.split(unquote(raw_path)))


def join_path(target_path: str, rest: str) -> str:
    """Append a raw sub-path to the target's path with exactly one "/" between them.

    The caller's trailing slash is kept (``/sub/a/`` -> ``<target>/a/``). Leading slashes
    of the rest are collapsed: with a target path of "/", ``/sub//evil.example/x`` would
    otherwise become the request-target ``//evil.example/x``, which some servers read
    as scheme-relative (a different authority).
    """
    return target_path.rstrip("/") + "/" + rest.lstrip("/")


def _query_key(pair: str) -> str:
    return unquote_plus(pair.split("=", 1)[0])


def build_query(
    caller: str,
    target: str,
    merge: bool,
    defaults: tuple[tuple[str, str], ...],
) -> str:
    """The upstream query string (README, "Config reference": merge_query_params, default_query_params).

    The caller's raw query is kept byte for byte (order and repeated keys included). The
    target's own query is used when the caller sends none; with ``merge`` both are kept
    and the caller's keys replace the target's keys of the same name. ``defaults`` fill in
    keys that are in neither.
    """
    if merge and target and caller:
        caller_keys = {_query_key(p) for p in caller.split("&") if p}
        kept = [p for p in target.split("&") if p and _query_key(p) not in caller_keys]
        query = "&".join([*kept, caller])
    else:
        query = caller or target
    if defaults:
        present = {_query_key(p) for p in query.split("&") if p}
        extra = [
            f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in defaults if k not in present
        ]
        query = "&".join(p for p in [query, *extra] if p)
    return query


def request_target(path: str, query: str) -> str:
    """The origin-form request-target sent upstream (RFC 9112 §3.2.1)."""
    return f"{path}?{query}" if query else path
