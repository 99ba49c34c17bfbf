"""Load and validate a LiteLLM-style ``config.yaml`` into frozen settings.

Everything that can be decided once is decided here, at start-up: ``os.environ/NAME``
references are resolved, header values are coerced to strings, the Langfuse key pair is
folded into one ``Authorization`` header, and the target URL is split into the parts the
request path needs. The request path never looks at the raw YAML again.

The files are read by :mod:`proxy_app.config_files` (YAML, LiteLLM's ``include:``) and the
``environment_variables:`` section is evaluated by :mod:`proxy_app.config_env`.

Every problem found is collected (not just the first) into one :class:`ConfigError`, each
line naming the file (the included file a field came from, if any), the endpoint (index in
that file, and path) and the field, and never a value that came from the environment.
"""

from __future__ import annotations

import base64
import difflib
import logging
import math
import os
import re
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from urllib.parse import quote
from urllib.parse import urlsplit

from proxy_app.config_env import ENV_NAME_RE
from proxy_app.config_env import ENV_PREFIX
from proxy_app.config_env import SECTION as ENV_SECTION
from proxy_app.config_env import config_environment
from proxy_app.config_env import scalar_text
from proxy_app.config_files import ConfigError
from proxy_app.config_files import Tree
from proxy_app.config_files import dotted
from proxy_app.config_files import read_tree
from proxy_app.config_files import read_yaml
from proxy_app.config_files import tree_of_mapping
from proxy_app.headers import CREDENTIAL_HEADERS
from proxy_app.headers import HOP_BY_HOP
from proxy_app.headers import is_token
from proxy_app.urls import has_dot_segment

__all__ = [
    "ConfigError",
    "Endpoint",
    "EntryCheck",
    "Settings",
    "check_entry",
    "config_path",
    "load_config",
    "log_summary",
    "print_problems",
    "read_yaml",
    "summary",
]

log = logging.getLogger("proxy_app")

DEFAULT_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# TRACE would reflect the injected secret headers back to the caller; CONNECT would turn
# the proxy into a tunnel to anywhere.
REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})
DEFAULT_TIMEOUT = 600.0
CONNECT_TIMEOUT = 10.0
RESERVED_PREFIXES = ("/health", "/metrics")

ENDPOINT_FIELDS = (
    "path",
    "target",
    "headers",
    "include_subpath",
    "forward_headers",
    "merge_query_params",
    "default_query_params",
    "methods",
    "auth",
    "timeout",
    "cost_per_request",
    "id",
)
# LiteLLM fields proxy_app deliberately does not implement: silently dropping a guardrail
# or a custom auth parser would weaken security without anyone noticing.
UNSUPPORTED_FIELDS = {
    "guardrails": "guardrails are not supported by proxy_app; remove the field",
    "custom_auth_parser": "custom auth parsers are not supported by proxy_app; remove the field",
}
GENERAL_FIELDS = (
    "master_key",
    "pass_through_endpoints",
    "pass_through_request_timeout",
    "database_url",
    "key_cache_ttl",
    "allow_requests_on_db_unavailable",
)
# How long a worker keeps serving a virtual key it verified while the database is unreachable.
DEFAULT_KEY_CACHE_TTL = 60.0
# Header names that describe the message framing or the connection: the proxy sets them
# from the caller's request and the target URL, a configured value would corrupt framing.
FORBIDDEN_CONFIG_HEADERS = HOP_BY_HOP | {"host", "content-length", "proxy"}
LANGFUSE_PUBLIC = "langfuse_public_key"
LANGFUSE_SECRET = "langfuse_secret_key"
KEY_HEADER_FIELD = "litellm_user_api_key"
# A route path is matched literally against the raw request target, so it may hold only
# characters that never need percent-encoding (RFC 3986 pchar without "%"), and no "<"
# or ">" (Werkzeug's rule syntax).
PATH_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")
ENDPOINTS_AT = ("general_settings", "pass_through_endpoints")
# Top-level sections proxy_app reads; "include" is consumed while the files are read.
TOP_LEVEL = ("general_settings", ENV_SECTION)
NO_ENDPOINTS = (
    "no endpoints: general_settings.pass_through_endpoints is empty or missing, "
    "so the proxy answers only /health and /metrics"
)


@dataclass(frozen=True)
class Endpoint:
    """One validated ``pass_through_endpoints`` entry, ready for the request path."""

    index: int
    path: str
    target: str
    scheme: str
    netloc: str
    target_path: str
    target_query: str
    headers: tuple[tuple[str, str], ...]
    key_header: str | None
    include_subpath: bool
    forward_headers: bool
    merge_query_params: bool
    default_query_params: tuple[tuple[str, str], ...]
    methods: frozenset[str]
    auth: bool
    timeout: float
    cost_per_request: float
    configured_names: frozenset[str] = field(default=frozenset())
    # The target came from os.environ/: its path or query may itself be a secret.
    target_is_secret: bool = False
    # The entry as written (os.environ/ references unresolved): what the endpoint API lists,
    # header values redacted (proxy_app/endpoint_rules.py).
    written: Mapping = field(default_factory=dict, compare=False, repr=False)
    # Set for an endpoint stored through the endpoint API; None for the config file's.
    id: str | None = None

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.netloc}"


@dataclass(frozen=True)
class Settings:
    source: str
    master_key: str | None
    endpoints: tuple[Endpoint, ...]
    connect_timeout: float = CONNECT_TIMEOUT
    # pass_through_request_timeout: the timeout of an endpoint that sets none (stored ones too).
    default_timeout: float = DEFAULT_TIMEOUT
    ignored: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    # check --allow-missing-env only: os.environ/ references left unresolved. Settings
    # with any are for reporting, never for serving.
    unresolved: tuple[str, ...] = ()
    # The store (proxy_app/store.py): None is the embedded SQLite file.
    database_url: str | None = None
    # Limit counters, slots and change notices in Redis; None: in the database.
    redis_url: str | None = None
    key_cache_ttl: float = DEFAULT_KEY_CACHE_TTL
    allow_requests_on_db_unavailable: bool = False


class _Unresolved(str):
    """An os.environ/ reference kept as written (check --allow-missing-env)."""


def config_path(explicit: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """The config file to read: ``--config``, else ``CONFIG_FILE_PATH``, else ``./config.yaml``."""
    return explicit or environ.get("CONFIG_FILE_PATH") or "config.yaml"


# PostgreSQL URLs as LiteLLM users write them; SQLAlchemy's psycopg 3 spelling is accepted too.
DATABASE_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


def redis_url(environ: Mapping[str, str]) -> str | None:
    """``REDIS_URL``, else one built from LiteLLM's ``REDIS_HOST``/``REDIS_PORT``/``REDIS_PASSWORD``."""
    if environ.get("REDIS_URL"):
        return environ["REDIS_URL"]
    host = environ.get("REDIS_HOST")
    if not host:
        return None
    password = environ.get("REDIS_PASSWORD")
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{environ.get('REDIS_PORT') or 6379}/0"


def load_config(
    source: str | os.PathLike | Mapping | None = None,
    environ: Mapping[str, str] = os.environ,
    *,
    allow_missing_env: bool = False,
) -> Settings:
    """Return validated :class:`Settings` from a file path or an already-parsed mapping.

    A file's ``include:`` files are read and merged in (:mod:`proxy_app.config_files`), and
    its ``environment_variables:`` apply to its ``os.environ/`` references
    (:mod:`proxy_app.config_env`). With ``allow_missing_env`` an unset variable is listed in
    ``Settings.unresolved`` instead of being an error: for validating a file on a machine
    that lacks the secrets (``check --allow-missing-env``); such Settings must not be served.

    :raises ConfigError: listing every problem found.
    """
    if source is None or isinstance(source, (str, os.PathLike)):
        tree = read_tree(os.fspath(config_path(source, environ)))
    else:
        tree = tree_of_mapping(source)
    return _Validator(tree, environ, allow_missing_env).settings(tree.raw)


class _Validator:
    """Collects problems while turning the raw YAML tree into Settings.

    Each problem names the file it is in: the main file, or the included file the field came
    from (``self.file`` while one part is being checked).
    """

    def __init__(self, tree: Tree, environ: Mapping[str, str], allow_missing_env: bool = False):
        self.tree = tree
        self.source = tree.source
        self.file = tree.source
        self.environ = environ
        self.allow_missing_env = allow_missing_env
        self.unset_aliases: dict[str, str] = {}
        self.problems: list[str] = []
        self.unresolved: list[str] = []
        self.missing: list[str] = []  # the names of the unset variables behind ``unresolved``
        self.labels: dict[int, tuple[str, str]] = {}  # endpoint index -> (file, "pass_through_endpoints[i]")

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{self.file}: {where}: {message}")

    @contextmanager
    def reading(self, place: tuple):
        """Name the file ``place`` came from in the problems found meanwhile."""
        outer, self.file = self.file, self.tree.file_of(place)
        try:
            yield
        finally:
            self.file = outer

    def settings(self, raw: object) -> Settings:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError([f"{self.source}: the top level must be a mapping"])
        self.environment(raw.get(ENV_SECTION))
        ignored = [f"top-level section {k!r}" for k in raw if k not in TOP_LEVEL]
        general = raw.get("general_settings") or {}
        if not isinstance(general, Mapping):
            with self.reading(("general_settings",)):
                self.problem("general_settings", "must be a mapping")
            general = {}
        ignored += [f"general_settings.{k}" for k in general if k not in GENERAL_FIELDS]
        with self.reading(("general_settings", "master_key")):
            master_key = self.master_key(general)
        default_timeout = DEFAULT_TIMEOUT
        if general.get("pass_through_request_timeout") is not None:
            with self.reading(("general_settings", "pass_through_request_timeout")):
                default_timeout = self.positive_number(
                    general["pass_through_request_timeout"],
                    "general_settings.pass_through_request_timeout",
                )
        store = self.store(general)
        entries = general.get("pass_through_endpoints") or []
        if not isinstance(entries, list):
            with self.reading(ENDPOINTS_AT):
                self.problem("general_settings.pass_through_endpoints", "must be a list")
            entries = []
        endpoints = []
        for index, entry in enumerate(entries):
            file, local = self.tree.item_of((*ENDPOINTS_AT, index))
            self.labels[index] = (file, f"pass_through_endpoints[{local}]")
            with self.reading((*ENDPOINTS_AT, index)):
                endpoint = self.endpoint(index, entry, default_timeout, master_key)
            if endpoint is not None:
                endpoints.append(endpoint)
        self.check_overlaps(endpoints)
        if self.problems:
            raise ConfigError(self.problems)
        warnings = [
            f"endpoint {e.path} ({self.label(e.index)}) is open (auth: false) and "
            f"injects credential header(s) {', '.join(sorted(e.configured_names & CREDENTIAL_HEADERS))}: "
            "anyone who can reach the proxy can use them"
            for e in endpoints
            if not e.auth and e.configured_names & CREDENTIAL_HEADERS
        ]
        if not endpoints:
            warnings.append(NO_ENDPOINTS)
        return Settings(
            source=self.source,
            master_key=master_key,
            endpoints=tuple(endpoints),
            default_timeout=default_timeout,
            ignored=tuple(ignored),
            warnings=tuple(warnings),
            unresolved=tuple(self.unresolved),
            **store,
        )

    def label(self, index: int, seen_from: str | None = None) -> str:
        """``pass_through_endpoints[i]``, prefixed by its file unless that is ``seen_from``."""
        file, label = self.labels[index]
        return label if file == (seen_from or self.source) else f"{file}: {label}"

    def environment(self, raw: object) -> None:
        """Lay ``environment_variables`` over the environment the references resolve in."""
        values, self.unset_aliases, problems = config_environment(raw, self.environ)
        for place, message in problems:
            with self.reading(place):
                self.problem(dotted(place), message)
        if values:
            self.environ = {**self.environ, **values}

    # -- scalars ---------------------------------------------------------------------

    def resolve(self, value: str, where: str) -> str | None:
        """Resolve ``os.environ/NAME`` as a whole value or at the end of a value."""
        at = value.find(ENV_PREFIX)
        if at < 0:
            return value
        name = value[at + len(ENV_PREFIX) :]
        if not ENV_NAME_RE.fullmatch(name):
            self.problem(where, f"{ENV_PREFIX} must be followed by a variable name and nothing else")
            return None
        if name not in self.environ:
            message = f"environment variable {name} is not set"
            if name in self.unset_aliases:
                message += f" ({ENV_SECTION}.{name} copies {self.unset_aliases[name]}, which is not set)"
            if self.allow_missing_env:
                self.unresolved.append(f"{self.file}: {where}: {message}")
                self.missing.append(name)
                return _Unresolved(value)
            self.problem(where, message)
            return None
        if self.environ[name] == "":
            self.problem(where, f"environment variable {name} is set but empty")
            return None
        return value[:at] + self.environ[name]

    def master_key(self, general: Mapping) -> str | None:
        raw = general.get("master_key")
        if raw is None:
            return self.environ.get("LITELLM_MASTER_KEY") or None
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            self.problem("general_settings.master_key", "must be a string")
            return None
        return self.resolve(str(raw), "general_settings.master_key")

    def store(self, general: Mapping) -> dict:
        """The store settings: general_settings first, then LiteLLM's environment variables."""
        found = {}
        raw = general.get("database_url")
        with self.reading(("general_settings", "database_url")):
            if raw is not None and not isinstance(raw, str):
                self.problem("general_settings.database_url", f"must be a string, got {type(raw).__name__}")
            elif raw:
                found["database_url"] = self.resolve(raw, "general_settings.database_url")
            elif self.environ.get("DATABASE_URL"):
                found["database_url"] = self.environ["DATABASE_URL"]
        url = found.get("database_url")
        if url and not isinstance(url, _Unresolved) and not url.startswith(DATABASE_SCHEMES):
            self.problem(
                "general_settings.database_url",
                "must be a postgresql:// URL (leave it unset for the embedded SQLite database)",
            )
        found["redis_url"] = redis_url(self.environ)
        if general.get("key_cache_ttl") is not None:
            with self.reading(("general_settings", "key_cache_ttl")):
                found["key_cache_ttl"] = self.positive_number(general["key_cache_ttl"], "general_settings.key_cache_ttl")
        if general.get("allow_requests_on_db_unavailable") is not None:
            with self.reading(("general_settings", "allow_requests_on_db_unavailable")):
                found["allow_requests_on_db_unavailable"] = self.boolean(
                    general, "allow_requests_on_db_unavailable", "general_settings"
                )
        return found

    def positive_number(self, value: object, where: str) -> float:
        if not _is_number(value) or value <= 0:
            self.problem(where, f"must be a positive number of seconds, got {type(value).__name__}")
            return DEFAULT_TIMEOUT
        return float(value)

    def boolean(self, entry: Mapping, key: str, where: str) -> bool:
        value = entry.get(key, False)
        if not isinstance(value, bool):
            # LiteLLM treats the string "true" as false for `auth`: refuse the ambiguity.
            self.problem(
                f"{where}.{key}",
                f"must be a YAML boolean (true or false, unquoted), got {type(value).__name__} {value!r}"
                if isinstance(value, (str, int, float))
                else f"must be a YAML boolean, got {type(value).__name__}",
            )
            return False
        return value

    # -- one endpoint ----------------------------------------------------------------

    def endpoint(self, index: int, entry: object, default_timeout: float, master_key) -> Endpoint | None:
        where = self.labels[index][1]
        if not isinstance(entry, Mapping):
            self.problem(where, "must be a mapping with at least path and target")
            return None
        path = entry.get("path")
        if isinstance(path, str):
            where = f"{where} ({path})"
        before = len(self.problems)
        self.unknown_fields(entry, where)
        path = self.route_path(path, where)
        target = self.target(entry.get("target"), where)
        headers, key_header = self.headers(entry.get("headers"), where)
        methods = self.methods(entry.get("methods"), where)
        auth = self.boolean(entry, "auth", where)
        if auth and not master_key:
            self.problem(f"{where}.auth", "auth: true needs general_settings.master_key (or LITELLM_MASTER_KEY)")
        timeout = default_timeout
        if entry.get("timeout") is not None:
            timeout = self.positive_number(entry["timeout"], f"{where}.timeout")
        cost = entry.get("cost_per_request", 0.0)
        if cost is None:
            cost = 0.0
        if not _is_number(cost) or cost < 0:
            self.problem(f"{where}.cost_per_request", "must be a number >= 0")
            cost = 0.0
        flags = {k: self.boolean(entry, k, where) for k in ("include_subpath", "forward_headers", "merge_query_params")}
        defaults = self.default_query_params(entry.get("default_query_params"), where)
        if len(self.problems) > before:
            return None
        parts = urlsplit(target)
        return Endpoint(
            index=index,
            path=path,
            target=target,
            scheme=parts.scheme,
            netloc=parts.netloc,
            target_path=parts.path or "/",
            target_query=parts.query,
            headers=headers,
            key_header=key_header,
            methods=methods,
            auth=auth,
            timeout=timeout,
            cost_per_request=float(cost),
            default_query_params=defaults,
            configured_names=frozenset(name.lower() for name, _ in headers),
            target_is_secret=ENV_PREFIX in entry.get("target", ""),
            written=dict(entry),
            **flags,
        )

    def unknown_fields(self, entry: Mapping, where: str) -> None:
        for key in entry:
            if key in ENDPOINT_FIELDS:
                continue
            if key in UNSUPPORTED_FIELDS:
                self.problem(f"{where}.{key}", UNSUPPORTED_FIELDS[key])
                continue
            close = difflib.get_close_matches(str(key), ENDPOINT_FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(ENDPOINT_FIELDS)}"
            self.problem(f"{where}.{key}", f"unknown field{hint}")

    def route_path(self, path: object, where: str) -> str:
        if not isinstance(path, str) or not path:
            self.problem(f"{where}.path", "is required and must be a string starting with '/'")
            return "/"
        if not path.startswith("/"):
            self.problem(f"{where}.path", "must start with '/'")
        elif not PATH_RE.fullmatch(path):
            self.problem(f"{where}.path", "may contain only letters, digits, '/' and -._~!$&'()*+,;=:@ (no '%', '<', '>')")
        elif "//" in path or has_dot_segment(path):
            self.problem(f"{where}.path", "must not contain empty ('//') or dot ('.', '..') segments")
        elif path != "/" and path.endswith("/"):
            self.problem(f"{where}.path", "must not end with '/' (use include_subpath to serve sub-paths)")
        elif any(path == p or path.startswith(p + "/") for p in RESERVED_PREFIXES):
            self.problem(f"{where}.path", "paths under /health and /metrics are reserved for the proxy")
        return path

    def target(self, target: object, where: str) -> str:
        if not isinstance(target, str) or not target:
            self.problem(f"{where}.target", "is required and must be an http(s) URL")
            return ""
        resolved = self.resolve(target, f"{where}.target")
        if resolved is None:
            return ""
        if isinstance(resolved, _Unresolved):
            return resolved  # nothing to check until the variable is set
        try:
            parts = urlsplit(resolved)
        except ValueError:
            self.problem(f"{where}.target", "is not a valid URL")
            return ""
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.problem(f"{where}.target", "must be an absolute http:// or https:// URL with a host")
        elif parts.username is not None or parts.password is not None:
            self.problem(f"{where}.target", "must not carry credentials (user:password@); use headers")
        elif parts.fragment or "#" in resolved:
            self.problem(f"{where}.target", "must not have a #fragment")
        elif any(c in resolved for c in " \t\r\n\x00\\"):
            self.problem(f"{where}.target", "must not contain whitespace, control characters or backslashes")
        else:
            try:
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                self.problem(f"{where}.target", "has an invalid port")
        return resolved

    def headers(self, raw: object, where: str) -> tuple[tuple[tuple[str, str], ...], str | None]:
        if raw is None:
            return (), None
        if not isinstance(raw, Mapping):
            self.problem(f"{where}.headers", "must be a mapping of header name to value")
            return (), None
        result: dict[str, tuple[str, str]] = {}
        langfuse: dict[str, str] = {}
        key_header = None
        for name, value in raw.items():
            field_where = f"{where}.headers.{name}"
            if not isinstance(name, str) or not is_token(name):
                self.problem(field_where, "is not a valid header name")
                continue
            text = self.header_value(value, field_where)
            if text is None:
                continue
            lower = name.lower()
            if lower in (LANGFUSE_PUBLIC, LANGFUSE_SECRET):
                langfuse[lower] = text
            elif lower == KEY_HEADER_FIELD:
                if isinstance(text, _Unresolved):
                    continue
                if not is_token(text):
                    self.problem(field_where, "must name a header")
                else:
                    key_header = text.lower()
            elif lower in FORBIDDEN_CONFIG_HEADERS:
                self.problem(field_where, "is set by the proxy (framing, connection or Host) and cannot be configured")
            elif lower in result:
                self.problem(field_where, f"is configured twice (as {result[lower][0]!r} too)")
            else:
                result[lower] = (name, text)
        if langfuse:
            if len(langfuse) != 2:
                self.problem(f"{where}.headers", "LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY must be given together")
            elif "authorization" in result:
                self.problem(f"{where}.headers", "LANGFUSE_* keys and Authorization cannot both be set")
            else:
                pair = f"{langfuse[LANGFUSE_PUBLIC]}:{langfuse[LANGFUSE_SECRET]}".encode()
                result["authorization"] = ("Authorization", "Basic " + base64.b64encode(pair).decode("ascii"))
        return tuple(result.values()), key_header

    def header_value(self, value: object, where: str) -> str | None:
        text = scalar_text(value)
        if text is None:
            self.problem(where, f"value must be a string or a number, got {type(value).__name__}")
            return None
        resolved = self.resolve(text, where)
        if resolved is not None and any(c in resolved for c in "\r\n\x00"):
            self.problem(where, "value contains CR, LF or NUL")
            return None
        return resolved

    def methods(self, raw: object, where: str) -> frozenset[str]:
        if raw is None or raw == []:
            return DEFAULT_METHODS
        if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
            self.problem(f"{where}.methods", "must be a list of HTTP method names")
            return DEFAULT_METHODS
        methods = frozenset(m.upper() for m in raw)
        for method in sorted(methods):
            if method in REFUSED_METHODS:
                self.problem(f"{where}.methods", f"{method} is refused (it would expose or tunnel the injected credentials)")
            elif method not in DEFAULT_METHODS:
                self.problem(f"{where}.methods", f"unknown method {method!r}; allowed: {', '.join(sorted(DEFAULT_METHODS))}")
        return methods

    def default_query_params(self, raw: object, where: str) -> tuple[tuple[str, str], ...]:
        if raw is None:
            return ()
        if not isinstance(raw, Mapping):
            self.problem(f"{where}.default_query_params", "must be a mapping of name to value")
            return ()
        pairs = []
        for key, value in raw.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            if not isinstance(value, (str, int, float)):
                self.problem(f"{where}.default_query_params.{key}", "value must be a string or a number")
                continue
            text = self.resolve(str(value), f"{where}.default_query_params.{key}")
            if text is not None:
                pairs.append((str(key), text))
        return tuple(pairs)

    def check_overlaps(self, endpoints: list[Endpoint]) -> None:
        for i, first in enumerate(endpoints):
            for second in endpoints[i + 1 :]:
                shared = first.methods & second.methods
                if first.path == second.path and shared:
                    file, label = self.labels[second.index]
                    self.problems.append(
                        f"{file}: {label} ({second.path}).methods: {', '.join(sorted(shared))} already served by "
                        f"{self.label(first.index, seen_from=file)} on the same path; give entries sharing a path disjoint methods"
                    )


@dataclass(frozen=True)
class EntryCheck:
    """What :func:`check_entry` found: the endpoint (None if there were problems), the
    problems, and the variables this environment lacks (their values left unresolved)."""

    endpoint: Endpoint | None
    problems: tuple[str, ...]
    missing: tuple[str, ...]


def check_entry(
    entry: object,
    environ: Mapping[str, str],
    *,
    master_key: str | None,
    source: str,
    label: str,
    default_timeout: float = DEFAULT_TIMEOUT,
) -> EntryCheck:
    """Validate one ``pass_through_endpoints`` entry from outside the config file (the endpoint
    API, the store) with the config file's checks and messages: each problem names ``source``
    and the field, as ``{source}: {label} ({path}).{field}: {message}``.

    An unset ``os.environ/`` variable is not a problem here: it is listed in ``missing`` and
    the endpoint is built with the reference unresolved (each instance resolves a stored
    endpoint from its own environment; one that lacks a variable cannot serve it).
    """
    validator = _Validator(Tree({}, source), environ, allow_missing_env=True)
    validator.labels[-1] = (source, label)
    endpoint = validator.endpoint(-1, entry, default_timeout, master_key)
    return EntryCheck(endpoint if not validator.problems else None, tuple(validator.problems), tuple(dict.fromkeys(validator.missing)))


def _is_number(value: object) -> bool:
    """A finite int or float, not a bool (YAML's .nan and .inf are floats too)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def print_problems(exc: ConfigError, file=None) -> None:
    """Write every problem of ``exc`` as one ``config error:`` line (stderr by default)."""
    for line in exc.problems:
        print(f"config error: {line}", file=file or sys.stderr)


def summary(settings: Settings) -> list[tuple[int, str]]:
    """The start-up report, as (logging level, line): what was ignored, then each warning.

    Logged by :func:`log_summary` when the proxy starts and printed by ``check``, so both say
    the same thing.
    """
    lines = []
    if settings.ignored:
        lines.append((logging.INFO, f"ignored (not used by proxy_app): {', '.join(settings.ignored)}"))
    lines += [(logging.WARNING, warning) for warning in settings.warnings]
    return lines


def log_summary(settings: Settings) -> None:
    """Log, once at start-up, what was ignored and every warning (open credentials, no endpoints)."""
    for level, line in summary(settings):
        log.log(level, "%s", line)
