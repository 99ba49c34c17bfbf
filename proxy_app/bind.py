"""Where the proxy listens: ``PROXY_BIND``, and the CLI's ``--host`` / ``--port`` over it.

``PROXY_BIND`` is gunicorn's bind address, ``HOST:PORT`` (default ``0.0.0.0:4000``, as
LiteLLM). The CLI flags each replace only their own half of it: with
``PROXY_BIND=127.0.0.1:4000``, ``--port 4100`` listens on 127.0.0.1:4100, not on every
interface. ``PORT`` (set by many platforms, and LiteLLM's ``--port`` fallback) counts as
``--port`` when that flag is absent. A bind that is not HOST:PORT (``unix:PATH``,
``fd://N``) is kept as it is, and combining one with a flag is an error.
"""

from __future__ import annotations

from collections.abc import Mapping

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 4000
DEFAULT_BIND = f"{DEFAULT_HOST}:{DEFAULT_PORT}"


class BindError(ValueError):
    """The flags and the environment do not make one listening address."""


def split_bind(bind: str) -> tuple[str, str | None]:
    """``"h:p"`` -> ``("h", "p")``; ``"[::1]:4000"`` -> ``("::1", "4000")``; no port -> ``(host, None)``.

    :raises BindError: not a HOST[:PORT] address.
    """
    if bind.startswith(("unix:", "fd://")) or "/" in bind:
        raise BindError(f"{bind!r} is not a HOST:PORT address")
    if bind.startswith("["):
        host, sep, rest = bind[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise BindError(f"{bind!r}: an IPv6 address must be written [ADDRESS]:PORT")
        return host, rest[1:] or None
    if bind.count(":") > 1:
        return bind, None  # a bare IPv6 address, no port
    host, sep, port = bind.partition(":")
    return host, (port if sep else None) or None


def join_bind(host: str, port: str | None) -> str:
    """The inverse of :func:`split_bind`; an IPv6 host gets its brackets."""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}" if port is not None else host


def parse_port(text: str | int, origin: str) -> str:
    """A TCP port as text, or BindError naming where it came from."""
    try:
        port = int(str(text).strip())
    except ValueError:
        raise BindError(f"{origin} must be a port number, got {str(text)!r}") from None
    if not 0 < port < 65536:
        raise BindError(f"{origin} must be between 1 and 65535, got {port}")
    return str(port)


def bind_address(host: str | None, port: str | int | None, environ: Mapping[str, str]) -> str:
    """The address to listen on for the CLI's ``--host`` / ``--port`` (None when not given).

    :raises BindError: a flag cannot apply to ``PROXY_BIND``, or a port is not a port.
    """
    base = environ.get("PROXY_BIND") or DEFAULT_BIND
    if port is not None:
        port = parse_port(port, "--port")
    elif environ.get("PORT"):
        port = parse_port(environ["PORT"], "PORT")
    if host is None and port is None:
        return base
    try:
        base_host, base_port = split_bind(base)
    except BindError as exc:
        raise BindError(f"PROXY_BIND={base!r} cannot take --host or --port (or PORT): {exc}") from None
    if host is not None:
        host = host.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or any(c in host for c in "[]/ "):
            raise BindError(f"--host must be a host name or an IP address, got {host!r}")
    return join_bind(host if host is not None else base_host, port if port is not None else base_port)
