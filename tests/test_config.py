"""Table-driven tests of proxy_app.config: validation, environment_variables and include.

Every call passes its own ``environ``; the real os.environ is never read.  Every test that
expects a ConfigError goes through :func:`errors_of`, which also checks that no value from
that environ (the secrets) appears anywhere in the error.
"""

from __future__ import annotations

import base64
import logging
import math
import os
from pathlib import Path

import pytest
import yaml

from proxy_app.config import DEFAULT_METHODS
from proxy_app.config import NO_ENDPOINTS
from proxy_app.config import ConfigError
from proxy_app.config import config_path
from proxy_app.config import load_config
from proxy_app.config import log_summary
from proxy_app.config import summary

SRC = "<config>"  # the source name of a config given as a mapping
PATH = "/x"
TARGET = "https://upstream.example/v1/x"
EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"

COHERE = "sk-cohere-SECRET-0001"
LF_PUBLIC = "pk-lf-PUBLIC-1111"
LF_SECRET = "sk-lf-SECRET-2222"
LF_BASIC = "Basic cGstbGYtUFVCTElDLTExMTE6c2stbGYtU0VDUkVULTIyMjI="  # base64("pk-lf-PUBLIC-1111:sk-lf-SECRET-2222")
UPSTREAM_URL = "https://env-upstream.example/v2/secret-route-3333"
QUERY_KEY = "qk-SECRET-4444"
MASTER = "sk-master-SECRET-5555"
ENV = {
    "COHERE_API_KEY": COHERE,
    "LANGFUSE_DEV_PUBLIC_KEY": LF_PUBLIC,
    "LANGFUSE_DEV_SK_KEY": LF_SECRET,
    "UPSTREAM_URL": UPSTREAM_URL,
    "QUERY_KEY": QUERY_KEY,
    "MASTER": MASTER,
    "EMPTY": "",
}
ALL_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
DROP = object()  # endpoint(path=DROP) removes the field


# -- helpers ---------------------------------------------------------------------------


def endpoint(**fields) -> dict:
    """One pass_through_endpoints entry: a valid path and target, overridden by ``fields``."""
    entry = {"path": PATH, "target": TARGET, **fields}
    return {k: v for k, v in entry.items() if v is not DROP}


def config(*endpoints: dict, **general) -> dict:
    return {"general_settings": {**general, "pass_through_endpoints": list(endpoints)}}


def one(**fields) -> dict:
    """A config with a single endpoint and no master key."""
    return config(endpoint(**fields))


def load(source, environ=None):
    return load_config(source, dict(ENV if environ is None else environ))


def errors_of(source, environ=None) -> list[str]:
    """The ConfigError's problems; asserts no environ value leaks into the error."""
    environ = dict(ENV if environ is None else environ)
    with pytest.raises(ConfigError) as info:
        load_config(source, environ)
    err = info.value
    assert err.problems, "a ConfigError must list at least one problem"
    assert str(err) == "\n".join(err.problems)
    text = str(err) + repr(err.problems) + repr(err.args)
    for name, value in environ.items():
        if value:
            assert value not in text, f"value of {name} leaked into the error: {text}"
    return err.problems


def at(field: str, index: int = 0, path: str | None = PATH, source: str = SRC) -> str:
    """The prefix of a problem about ``field`` of endpoint ``index``."""
    endpoint_ = f"pass_through_endpoints[{index}]" + (f" ({path})" if path is not None else "")
    return f"{source}: {endpoint_}.{field}: "


def assert_one_problem(problems: list[str], prefix: str, fragment: str) -> None:
    assert len(problems) == 1, problems
    assert_problem(problems, prefix, fragment)


def assert_problem(problems: list[str], prefix: str, fragment: str) -> None:
    matching = [p for p in problems if p.startswith(prefix) and fragment in p[len(prefix) :]]
    assert len(matching) == 1, f"expected one problem {prefix!r}...{fragment!r} in {problems}"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- path ------------------------------------------------------------------------------

PATH_CHARS = "may contain only letters, digits, '/' and -._~!$&'()*+,;=:@ (no '%', '<', '>')"
RESERVED = "paths under /health and /metrics are reserved for the proxy"
SEGMENTS = "must not contain empty ('//') or dot ('.', '..') segments"


@pytest.mark.parametrize(
    "path, fragment",
    [
        pytest.param("v1/rerank", "must start with '/'", id="no-leading-slash"),
        pytest.param("/v1/rerank/", "must not end with '/' (use include_subpath to serve sub-paths)", id="trailing-slash"),
        pytest.param("/v1//rerank", SEGMENTS, id="double-slash"),
        pytest.param("//v1", SEGMENTS, id="leading-double-slash"),
        pytest.param("/v1/./rerank", SEGMENTS, id="dot-segment"),
        pytest.param("/v1/../rerank", SEGMENTS, id="dot-dot-segment"),
        pytest.param("/v1/..", SEGMENTS, id="trailing-dot-dot"),
        pytest.param("/v1/%2e%2e/x", PATH_CHARS, id="percent-encoded-dots"),
        pytest.param("/v1/a%20b", PATH_CHARS, id="percent"),
        pytest.param("/v1/<name>", PATH_CHARS, id="angle-brackets"),
        pytest.param("/v1/a b", PATH_CHARS, id="space"),
        pytest.param("/v1?x=1", PATH_CHARS, id="query"),
        pytest.param("/health", RESERVED, id="health"),
        pytest.param("/health/liveliness", RESERVED, id="health-liveliness"),
        pytest.param("/health/readiness", RESERVED, id="health-readiness"),
        pytest.param("/metrics", RESERVED, id="metrics"),
        pytest.param("/metrics/custom", RESERVED, id="metrics-sub"),
    ],
)
def test_invalid_path(path, fragment):
    assert_one_problem(errors_of(one(path=path)), at("path", path=path), fragment)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(DROP, id="missing"),
        pytest.param(None, id="null"),
        pytest.param(42, id="number"),
        pytest.param(["/x"], id="list"),
    ],
)
def test_missing_or_non_string_path(path):
    # Without a usable path the endpoint is named by its index only.
    problems = errors_of(one(path=path))
    assert_one_problem(problems, at("path", path=None), "is required and must be a string starting with '/'")


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/v1/rerank", id="plain"),
        pytest.param("/", id="root"),
        pytest.param("/api/public/ingestion", id="nested"),
        pytest.param("/v1/models:generate", id="colon"),
        pytest.param("/a-b_c.d~e", id="unreserved"),
        pytest.param("/v1/...", id="three-dots-not-a-dot-segment"),
        pytest.param("/healthcare", id="health-prefix-not-a-segment"),
    ],
)
def test_valid_path(path):
    (ep,) = load(one(path=path)).endpoints
    assert ep.path == path


# -- target ----------------------------------------------------------------------------

NOT_HTTP = "must be an absolute http:// or https:// URL with a host"


@pytest.mark.parametrize(
    "target, fragment",
    [
        pytest.param(DROP, "is required and must be an http(s) URL", id="missing"),
        pytest.param("", "is required and must be an http(s) URL", id="empty"),
        pytest.param(None, "is required and must be an http(s) URL", id="null"),
        pytest.param(123, "is required and must be an http(s) URL", id="number"),
        pytest.param("ftp://files.example/x", NOT_HTTP, id="ftp-scheme"),
        pytest.param("file:///etc/passwd", NOT_HTTP, id="file-scheme"),
        pytest.param("upstream.example/v1", NOT_HTTP, id="no-scheme"),
        pytest.param("https:///v1/x", NOT_HTTP, id="no-host"),
        pytest.param("https://user:pw@upstream.example/x", "must not carry credentials (user:password@); use headers", id="user-password"),
        pytest.param("https://token@upstream.example/x", "must not carry credentials", id="user-only"),
        pytest.param("https://upstream.example/x#frag", "must not have a #fragment", id="fragment"),
        pytest.param("https://upstream.example/x#", "must not have a #fragment", id="empty-fragment"),
        pytest.param("https://upstream.example:99999/x", "has an invalid port", id="bad-port"),
        pytest.param("https://upstream.example/a b", "must not contain whitespace, control characters or backslashes", id="space"),
    ],
)
def test_invalid_target(target, fragment):
    assert_one_problem(errors_of(one(target=target)), at("target"), fragment)


@pytest.mark.parametrize(
    "target, scheme, netloc, target_path, query",
    [
        pytest.param("https://api.cohere.com/v1/rerank", "https", "api.cohere.com", "/v1/rerank", "", id="https"),
        pytest.param("http://127.0.0.1:8080", "http", "127.0.0.1:8080", "/", "", id="http-port-no-path"),
        pytest.param("https://h.example/v1/?api-version=2", "https", "h.example", "/v1/", "api-version=2", id="query"),
        pytest.param("http://[::1]:9000/x", "http", "[::1]:9000", "/x", "", id="ipv6"),
    ],
)
def test_valid_target_is_split(target, scheme, netloc, target_path, query):
    (ep,) = load(one(target=target)).endpoints
    assert (ep.target, ep.scheme, ep.netloc, ep.target_path, ep.target_query) == (target, scheme, netloc, target_path, query)
    assert ep.origin == f"{scheme}://{netloc}"


@pytest.mark.parametrize(
    "target, environ",
    [
        pytest.param("https://[::1/x", {}, id="literal"),
        pytest.param("os.environ/BAD_URL", {"BAD_URL": "https://[leak-SECRET-ipv6/x"}, id="from-env"),
    ],
)
def test_malformed_ipv6_target_is_a_config_error(target, environ):
    problems = errors_of(one(target=target), environ)
    assert_one_problem(problems, at("target"), "")


# -- unknown and unsupported fields ----------------------------------------------------


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        pytest.param("include_subpaths", True, "unknown field; did you mean 'include_subpath'?", id="include_subpaths"),
        pytest.param("forward_header", True, "unknown field; did you mean 'forward_headers'?", id="forward_header"),
        pytest.param("method", ["GET"], "unknown field; did you mean 'methods'?", id="method"),
        pytest.param("merge_query_param", True, "unknown field; did you mean 'merge_query_params'?", id="merge_query_param"),
        pytest.param("header", {}, "unknown field; did you mean 'headers'?", id="header"),
        pytest.param("zzqqxx", 1, "unknown field; known fields: path, target, headers, include_subpath", id="no-close-match"),
        pytest.param("guardrails", ["pii-mask"], "guardrails are not supported by proxy_app; remove the field", id="guardrails"),
        pytest.param(
            "custom_auth_parser",
            "langfuse",
            "custom auth parsers are not supported by proxy_app; remove the field",
            id="custom_auth_parser",
        ),
    ],
)
def test_unknown_or_unsupported_field(field, value, fragment):
    assert_one_problem(errors_of(one(**{field: value})), at(field), fragment)


# -- booleans --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        pytest.param("auth", "true", "must be a YAML boolean (true or false, unquoted), got str 'true'", id="auth-string-true"),
        pytest.param("auth", "false", "got str 'false'", id="auth-string-false"),
        pytest.param("auth", 1, "got int 1", id="auth-int"),
        pytest.param("auth", None, "must be a YAML boolean, got NoneType", id="auth-null"),
        pytest.param("include_subpath", "yes", "must be a YAML boolean (true or false, unquoted), got str 'yes'", id="include_subpath-yes"),
        pytest.param("forward_headers", "True", "got str 'True'", id="forward_headers-string"),
        pytest.param("merge_query_params", "no", "got str 'no'", id="merge_query_params-no"),
        pytest.param("include_subpath", [True], "must be a YAML boolean, got list", id="list"),
    ],
)
def test_string_booleans_are_rejected(field, value, fragment):
    assert_one_problem(errors_of(one(**{field: value})), at(field), fragment)


@pytest.mark.parametrize("field", ["include_subpath", "forward_headers", "merge_query_params", "auth"])
@pytest.mark.parametrize("value", [True, False], ids=["true", "false"])
def test_yaml_booleans_are_accepted(field, value):
    (ep,) = load(config(endpoint(**{field: value}), master_key="sk-1234")).endpoints
    assert getattr(ep, field) is value


def test_boolean_defaults():
    (ep,) = load(one()).endpoints
    assert (ep.include_subpath, ep.forward_headers, ep.merge_query_params, ep.auth) == (False, False, False, False)
    assert ep.cost_per_request == 0.0
    assert ep.default_query_params == ()
    assert ep.headers == ()
    assert ep.key_header is None


# -- methods ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "methods, expected",
    [
        pytest.param(DROP, ALL_METHODS, id="default-missing"),
        pytest.param(None, ALL_METHODS, id="default-null"),
        pytest.param([], ALL_METHODS, id="default-empty"),
        pytest.param(["GET", "POST"], {"GET", "POST"}, id="upper"),
        pytest.param(["get", "post"], {"GET", "POST"}, id="lower-upper-cased"),
        pytest.param(["Patch", "dElEtE"], {"PATCH", "DELETE"}, id="mixed-case"),
        pytest.param(["GET", "get"], {"GET"}, id="duplicates-collapse"),
    ],
)
def test_methods(methods, expected):
    (ep,) = load(one(methods=methods)).endpoints
    assert ep.methods == frozenset(expected)


def test_default_methods_constant():
    assert DEFAULT_METHODS == ALL_METHODS


@pytest.mark.parametrize(
    "methods, fragment",
    [
        pytest.param(["TRACE"], "TRACE is refused (it would expose or tunnel the injected credentials)", id="trace"),
        pytest.param(["trace"], "TRACE is refused", id="trace-lower"),
        pytest.param(["CONNECT"], "CONNECT is refused (it would expose or tunnel the injected credentials)", id="connect"),
        pytest.param(["GET", "FETCH"], "unknown method 'FETCH'; allowed: DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT", id="unknown"),
        pytest.param(["propfind"], "unknown method 'PROPFIND'", id="unknown-lower"),
        pytest.param("GET", "must be a list of HTTP method names", id="string-not-list"),
        pytest.param([1], "must be a list of HTTP method names", id="number-in-list"),
    ],
)
def test_invalid_methods(methods, fragment):
    assert_one_problem(errors_of(one(methods=methods)), at("methods"), fragment)


def test_trace_and_connect_are_both_reported():
    problems = errors_of(one(methods=["GET", "trace", "connect"]))
    assert len(problems) == 2
    assert_problem(problems, at("methods"), "TRACE is refused")
    assert_problem(problems, at("methods"), "CONNECT is refused")


# -- headers ---------------------------------------------------------------------------

FORBIDDEN = "is set by the proxy (framing, connection or Host) and cannot be configured"


@pytest.mark.parametrize(
    "headers, field, fragment",
    [
        pytest.param({"X-Key": None}, "headers.X-Key", "value must be a string or a number, got NoneType", id="none-value"),
        pytest.param({"X-Key": ["a", "b"]}, "headers.X-Key", "value must be a string or a number, got list", id="list-value"),
        pytest.param({"X-Key": {"a": 1}}, "headers.X-Key", "value must be a string or a number, got dict", id="dict-value"),
        pytest.param({"Host": "evil.example"}, "headers.Host", FORBIDDEN, id="host"),
        pytest.param({"host": "evil.example"}, "headers.host", FORBIDDEN, id="host-lower"),
        pytest.param({"Content-Length": 10}, "headers.Content-Length", FORBIDDEN, id="content-length"),
        pytest.param({"Transfer-Encoding": "chunked"}, "headers.Transfer-Encoding", FORBIDDEN, id="transfer-encoding"),
        pytest.param({"Connection": "close"}, "headers.Connection", FORBIDDEN, id="connection"),
        pytest.param({"Keep-Alive": "timeout=5"}, "headers.Keep-Alive", FORBIDDEN, id="keep-alive"),
        pytest.param({"Upgrade": "websocket"}, "headers.Upgrade", FORBIDDEN, id="upgrade"),
        pytest.param({"Proxy": "http://evil"}, "headers.Proxy", FORBIDDEN, id="proxy"),
        pytest.param(
            {"Authorization": "bearer a", "authorization": "bearer b"},
            "headers.authorization",
            "is configured twice (as 'Authorization' too)",
            id="same-header-different-case",
        ),
        pytest.param({"Bad Header": "v"}, "headers.Bad Header", "is not a valid header name", id="space-in-name"),
        pytest.param({"X-Key": "a\r\nX-Injected: 1"}, "headers.X-Key", "value contains CR, LF or NUL", id="crlf-in-value"),
        pytest.param({"litellm_user_api_key": "not a header"}, "headers.litellm_user_api_key", "must name a header", id="bad-key-header"),
    ],
)
def test_invalid_headers(headers, field, fragment):
    assert_one_problem(errors_of(one(headers=headers)), at(field), fragment)


@pytest.mark.parametrize("headers", [["Authorization: x"], "Authorization: x"], ids=["list", "string"])
def test_headers_must_be_a_mapping(headers):
    assert_one_problem(errors_of(one(headers=headers)), at("headers"), "must be a mapping of header name to value")


@pytest.mark.parametrize(
    "value, expected",
    [
        pytest.param(30, "30", id="int"),
        pytest.param(0, "0", id="zero"),
        pytest.param(1.5, "1.5", id="float"),
        pytest.param(True, "true", id="true"),
        pytest.param(False, "false", id="false"),
        pytest.param("text", "text", id="string"),
        pytest.param("", "", id="empty-string"),
    ],
)
def test_header_values_are_coerced_to_strings(value, expected):
    (ep,) = load(one(headers={"X-Value": value})).endpoints
    assert ep.headers == (("X-Value", expected),)


def test_headers_keep_their_names_and_order():
    (ep,) = load(one(headers={"Authorization": "bearer k", "content-type": "application/json", "X-Num": 7})).endpoints
    assert ep.headers == (("Authorization", "bearer k"), ("content-type", "application/json"), ("X-Num", "7"))
    assert ep.configured_names == {"authorization", "content-type", "x-num"}


# -- litellm_user_api_key --------------------------------------------------------------


def test_litellm_user_api_key_names_the_key_header_and_is_not_sent():
    (ep,) = load(one(headers={"litellm_user_api_key": "x-my-key", "Authorization": "bearer k"})).endpoints
    assert ep.key_header == "x-my-key"
    names = {name.lower() for name, _ in ep.headers}
    assert names == {"authorization"}
    assert "x-my-key" not in names and "litellm_user_api_key" not in names


# -- Langfuse key pair -----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(
            {"LANGFUSE_PUBLIC_KEY": "os.environ/LANGFUSE_DEV_PUBLIC_KEY", "LANGFUSE_SECRET_KEY": "os.environ/LANGFUSE_DEV_SK_KEY"},
            id="from-env",
        ),
        pytest.param({"LANGFUSE_PUBLIC_KEY": LF_PUBLIC, "LANGFUSE_SECRET_KEY": LF_SECRET}, id="literal"),
        pytest.param({"LANGFUSE_SECRET_KEY": LF_SECRET, "LANGFUSE_PUBLIC_KEY": LF_PUBLIC}, id="secret-first"),
    ],
)
def test_langfuse_pair_becomes_one_basic_authorization(headers):
    (ep,) = load(one(headers=headers)).endpoints
    assert ep.headers == (("Authorization", LF_BASIC),)
    assert "Basic " + base64.b64encode(f"{LF_PUBLIC}:{LF_SECRET}".encode()).decode() == LF_BASIC


def test_langfuse_pair_keeps_other_headers():
    headers = {"LANGFUSE_PUBLIC_KEY": LF_PUBLIC, "LANGFUSE_SECRET_KEY": LF_SECRET, "X-Extra": "1"}
    (ep,) = load(one(headers=headers)).endpoints
    assert sorted(ep.headers) == [("Authorization", LF_BASIC), ("X-Extra", "1")]


@pytest.mark.parametrize(
    "headers, fragment",
    [
        pytest.param(
            {"LANGFUSE_PUBLIC_KEY": "os.environ/LANGFUSE_DEV_PUBLIC_KEY"},
            "LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY must be given together",
            id="public-only",
        ),
        pytest.param(
            {"LANGFUSE_SECRET_KEY": "os.environ/LANGFUSE_DEV_SK_KEY"},
            "LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY must be given together",
            id="secret-only",
        ),
        pytest.param(
            {"LANGFUSE_PUBLIC_KEY": LF_PUBLIC, "LANGFUSE_SECRET_KEY": LF_SECRET, "Authorization": "bearer os.environ/COHERE_API_KEY"},
            "LANGFUSE_* keys and Authorization cannot both be set",
            id="with-authorization",
        ),
    ],
)
def test_langfuse_pair_errors(headers, fragment):
    assert_one_problem(errors_of(one(headers=headers)), at("headers"), fragment)


# -- os.environ/NAME -------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, read, expected",
    [
        pytest.param(
            one(headers={"Authorization": "os.environ/COHERE_API_KEY"}),
            lambda s: s.endpoints[0].headers,
            (("Authorization", COHERE),),
            id="header-whole",
        ),
        pytest.param(
            one(headers={"Authorization": "bearer os.environ/COHERE_API_KEY"}),
            lambda s: s.endpoints[0].headers,
            (("Authorization", f"bearer {COHERE}"),),
            id="header-embedded-at-end",
        ),
        pytest.param(one(target="os.environ/UPSTREAM_URL"), lambda s: s.endpoints[0].target, UPSTREAM_URL, id="target-whole"),
        pytest.param(
            one(target="os.environ/UPSTREAM_URL"),
            lambda s: (s.endpoints[0].netloc, s.endpoints[0].target_path),
            ("env-upstream.example", "/v2/secret-route-3333"),
            id="target-whole-is-split",
        ),
        pytest.param(
            one(target="https://upstream.example/v1?key=os.environ/QUERY_KEY"),
            lambda s: s.endpoints[0].target_query,
            f"key={QUERY_KEY}",
            id="target-embedded-at-end",
        ),
        pytest.param(
            one(default_query_params={"api_key": "os.environ/QUERY_KEY"}),
            lambda s: s.endpoints[0].default_query_params,
            (("api_key", QUERY_KEY),),
            id="default_query_params-whole",
        ),
        pytest.param(
            one(default_query_params={"auth": "token-os.environ/QUERY_KEY", "limit": 10, "flag": True}),
            lambda s: s.endpoints[0].default_query_params,
            (("auth", f"token-{QUERY_KEY}"), ("limit", "10"), ("flag", "true")),
            id="default_query_params-embedded-and-coerced",
        ),
        pytest.param(config(master_key="os.environ/MASTER"), lambda s: s.master_key, MASTER, id="master_key-whole"),
        pytest.param(config(master_key="sk-os.environ/MASTER"), lambda s: s.master_key, f"sk-{MASTER}", id="master_key-embedded"),
        pytest.param(config(master_key="sk-1234"), lambda s: s.master_key, "sk-1234", id="master_key-literal"),
    ],
)
def test_env_references_are_resolved(cfg, read, expected):
    assert read(load(cfg)) == expected


@pytest.mark.parametrize(
    "cfg, prefix, fragment",
    [
        pytest.param(
            one(headers={"Authorization": "bearer os.environ/MISSING_KEY"}),
            at("headers.Authorization"),
            "environment variable MISSING_KEY is not set",
            id="header-unset",
        ),
        pytest.param(one(target="os.environ/MISSING_URL"), at("target"), "environment variable MISSING_URL is not set", id="target-unset"),
        pytest.param(
            one(default_query_params={"api_key": "os.environ/MISSING_Q"}),
            at("default_query_params.api_key"),
            "environment variable MISSING_Q is not set",
            id="default_query_params-unset",
        ),
        pytest.param(
            config(master_key="os.environ/MISSING_MASTER"),
            f"{SRC}: general_settings.master_key: ",
            "environment variable MISSING_MASTER is not set",
            id="master_key-unset",
        ),
        pytest.param(
            one(headers={"X-Key": "os.environ/EMPTY"}),
            at("headers.X-Key"),
            "environment variable EMPTY is set but empty",
            id="header-empty",
        ),
        pytest.param(one(target="os.environ/EMPTY"), at("target"), "environment variable EMPTY is set but empty", id="target-empty"),
        pytest.param(
            config(master_key="os.environ/EMPTY"),
            f"{SRC}: general_settings.master_key: ",
            "environment variable EMPTY is set but empty",
            id="master_key-empty",
        ),
        pytest.param(
            one(headers={"X-Key": "os.environ/COHERE_API_KEY and more"}),
            at("headers.X-Key"),
            "os.environ/ must be followed by a variable name and nothing else",
            id="not-at-end",
        ),
        pytest.param(
            one(headers={"X-Key": "os.environ/"}), at("headers.X-Key"), "os.environ/ must be followed by a variable name", id="no-name"
        ),
    ],
)
def test_env_reference_errors(cfg, prefix, fragment):
    assert_one_problem(errors_of(cfg), prefix, fragment)


def test_unset_variable_names_the_endpoint_by_index_and_path():
    cfg = config(endpoint(path="/a"), endpoint(path="/b", headers={"x-api-key": "os.environ/NOPE"}))
    assert_one_problem(errors_of(cfg), at("headers.x-api-key", index=1, path="/b"), "environment variable NOPE is not set")


# -- secrets never appear in errors ----------------------------------------------------
# Each environ value below trips a validation after it was resolved; errors_of() checks
# that the value is nowhere in the ConfigError.


@pytest.mark.parametrize(
    "cfg, environ",
    [
        pytest.param(one(target="os.environ/T"), {"T": "ftp://leak-SECRET-a.example/"}, id="target-scheme"),
        pytest.param(one(target="os.environ/T"), {"T": "https://user:leak-SECRET-b@h.example/"}, id="target-credentials"),
        pytest.param(one(target="os.environ/T"), {"T": "https://h.example/#leak-SECRET-c"}, id="target-fragment"),
        pytest.param(one(target="os.environ/T"), {"T": "https://h.example:leakSECRETd/"}, id="target-port"),
        pytest.param(one(target="os.environ/T"), {"T": "https://h.example/leak SECRET e"}, id="target-whitespace"),
        pytest.param(one(target="https://h.example/os.environ/T"), {"T": "leak-SECRET-f#x"}, id="target-embedded"),
        pytest.param(one(headers={"X-Key": "os.environ/K"}), {"K": "leak-SECRET-g\r\nX-Injected: 1"}, id="header-crlf"),
        pytest.param(one(headers={"Host": "os.environ/K"}), {"K": "leak-SECRET-h.example"}, id="forbidden-header"),
        pytest.param(
            one(headers={"Authorization": "os.environ/K", "authorization": "os.environ/K2"}),
            {"K": "leak-SECRET-i", "K2": "leak-SECRET-j"},
            id="duplicate-header",
        ),
        pytest.param(one(headers={"litellm_user_api_key": "os.environ/K"}), {"K": "leak SECRET k"}, id="bad-key-header"),
        pytest.param(one(headers={"LANGFUSE_PUBLIC_KEY": "os.environ/K"}), {"K": "pk-leak-SECRET-l"}, id="langfuse-half"),
        pytest.param(
            one(headers={"LANGFUSE_PUBLIC_KEY": "os.environ/K", "LANGFUSE_SECRET_KEY": "os.environ/K2", "Authorization": "os.environ/K3"}),
            {"K": "pk-leak-SECRET-m", "K2": "sk-leak-SECRET-n", "K3": "leak-SECRET-o"},
            id="langfuse-and-authorization",
        ),
        pytest.param(
            config(endpoint(auth="true", headers={"Authorization": "os.environ/K"}), master_key="os.environ/M"),
            {"K": "leak-SECRET-p", "M": "leak-SECRET-master-q"},
            id="string-boolean-with-secrets-around",
        ),
        pytest.param(
            config(endpoint(path="v1", target="os.environ/T", headers={"X": "os.environ/K"}), master_key="os.environ/M"),
            {"T": "gopher://leak-SECRET-r", "K": "leak-SECRET-s", "M": "leak-SECRET-t"},
            id="several-problems",
        ),
    ],
)
def test_secrets_from_environ_never_appear_in_errors(cfg, environ):
    errors_of(cfg, environ)


def test_secrets_never_appear_in_the_startup_log(caplog):
    settings = load(one(headers={"Authorization": "bearer os.environ/COHERE_API_KEY"}, default_query_params={"k": "os.environ/QUERY_KEY"}))
    caplog.set_level(logging.DEBUG, logger="proxy_app")
    log_summary(settings)
    assert caplog.records
    for secret in (COHERE, QUERY_KEY):
        assert secret not in caplog.text


# -- auth and the master key -----------------------------------------------------------

NEEDS_MASTER = "auth: true needs general_settings.master_key (or LITELLM_MASTER_KEY)"


@pytest.mark.parametrize(
    "general, environ",
    [
        pytest.param({}, {}, id="no-master-key"),
        pytest.param({}, {"LITELLM_MASTER_KEY": ""}, id="empty-env-master-key"),
        pytest.param({"master_key": ""}, {}, id="empty-config-master-key"),
        pytest.param({"master_key": None}, {}, id="null-config-master-key"),
    ],
)
def test_auth_without_master_key_fails_closed(general, environ):
    problems = errors_of(config(endpoint(auth=True), **general), environ)
    assert_one_problem(problems, at("auth"), NEEDS_MASTER)


@pytest.mark.parametrize(
    "general, environ, expected",
    [
        pytest.param({}, {"LITELLM_MASTER_KEY": MASTER}, MASTER, id="env-LITELLM_MASTER_KEY"),
        pytest.param({"master_key": "sk-1234"}, {}, "sk-1234", id="config-literal"),
        pytest.param({"master_key": "os.environ/MASTER"}, {"MASTER": MASTER}, MASTER, id="config-os-environ"),
        pytest.param({"master_key": 1234}, {}, "1234", id="config-number"),
    ],
)
def test_auth_with_master_key(general, environ, expected):
    settings = load(config(endpoint(auth=True), **general), environ)
    assert settings.master_key == expected
    assert settings.endpoints[0].auth is True


def test_no_master_key_at_all_is_fine_for_open_endpoints():
    assert load(one(), {}).master_key is None


# -- several entries on one path -------------------------------------------------------


@pytest.mark.parametrize(
    "first, second, shared",
    [
        pytest.param(["GET"], ["get", "POST"], "GET", id="lower-case-overlap"),
        pytest.param(DROP, ["POST"], "POST", id="default-overlaps-everything"),
        pytest.param(["GET", "POST", "PUT"], ["PUT", "POST"], "POST, PUT", id="two-shared"),
        pytest.param(DROP, DROP, "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT", id="both-default"),
    ],
)
def test_same_path_with_overlapping_methods_is_an_error(first, second, shared):
    cfg = config(endpoint(methods=first), endpoint(methods=second))
    fragment = f"{shared} already served by pass_through_endpoints[0] on the same path; give entries sharing a path disjoint methods"
    assert_one_problem(errors_of(cfg), at("methods", index=1), fragment)


@pytest.mark.parametrize(
    "first, second",
    [
        pytest.param({"methods": ["GET"]}, {"methods": ["POST"]}, id="disjoint-methods"),
        pytest.param({"methods": ["get", "head"]}, {"methods": ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"]}, id="disjoint-covering-all"),
        pytest.param({}, {"path": "/y"}, id="different-paths"),
        pytest.param({"include_subpath": True}, {"path": "/x/sub"}, id="subpath-and-longer-path"),
    ],
)
def test_entries_that_do_not_overlap_are_fine(first, second):
    settings = load(config(endpoint(**first), endpoint(**second)))
    assert [e.index for e in settings.endpoints] == [0, 1]


# -- timeouts and cost -----------------------------------------------------------------


@pytest.mark.parametrize(
    "general_timeout, endpoint_timeout, expected",
    [
        pytest.param(DROP, DROP, 600.0, id="default-600"),
        pytest.param(120, DROP, 120.0, id="general-default"),
        pytest.param(120, 30, 30.0, id="endpoint-wins"),
        pytest.param(DROP, 30, 30.0, id="endpoint-only"),
        pytest.param(DROP, 0.5, 0.5, id="fractional"),
        pytest.param(None, None, 600.0, id="nulls-mean-default"),
    ],
)
def test_timeout_precedence(general_timeout, endpoint_timeout, expected):
    general = {} if general_timeout is DROP else {"pass_through_request_timeout": general_timeout}
    (ep,) = load(config(endpoint(timeout=endpoint_timeout), **general)).endpoints
    assert ep.timeout == expected
    assert isinstance(ep.timeout, float)


POSITIVE = "must be a positive number of seconds"


@pytest.mark.parametrize(
    "cfg, prefix, fragment",
    [
        pytest.param(one(timeout=0), at("timeout"), f"{POSITIVE}, got int", id="timeout-zero"),
        pytest.param(one(timeout=-1.5), at("timeout"), f"{POSITIVE}, got float", id="timeout-negative"),
        pytest.param(one(timeout="30"), at("timeout"), f"{POSITIVE}, got str", id="timeout-string"),
        pytest.param(one(timeout=True), at("timeout"), f"{POSITIVE}, got bool", id="timeout-bool"),
        pytest.param(one(timeout=[30]), at("timeout"), f"{POSITIVE}, got list", id="timeout-list"),
        pytest.param(
            config(pass_through_request_timeout=0),
            f"{SRC}: general_settings.pass_through_request_timeout: ",
            POSITIVE,
            id="general-timeout-zero",
        ),
        pytest.param(
            config(pass_through_request_timeout="600"),
            f"{SRC}: general_settings.pass_through_request_timeout: ",
            f"{POSITIVE}, got str",
            id="general-timeout-string",
        ),
        pytest.param(one(cost_per_request=-0.01), at("cost_per_request"), "must be a number >= 0", id="cost-negative"),
        pytest.param(one(cost_per_request="free"), at("cost_per_request"), "must be a number >= 0", id="cost-string"),
        pytest.param(one(cost_per_request=True), at("cost_per_request"), "must be a number >= 0", id="cost-bool"),
    ],
)
def test_invalid_timeout_and_cost(cfg, prefix, fragment):
    assert_one_problem(errors_of(cfg), prefix, fragment)


@pytest.mark.parametrize(
    "cfg, prefix",
    [
        pytest.param(one(timeout=math.nan), at("timeout"), id="timeout-nan"),
        pytest.param(one(timeout=math.inf), at("timeout"), id="timeout-inf"),
        pytest.param(
            config(pass_through_request_timeout=math.nan),
            f"{SRC}: general_settings.pass_through_request_timeout: ",
            id="general-timeout-nan",
        ),
        pytest.param(one(cost_per_request=math.nan), at("cost_per_request"), id="cost-nan"),
    ],
)
def test_non_finite_numbers_are_rejected(cfg, prefix):
    assert_one_problem(errors_of(cfg), prefix, "")


@pytest.mark.parametrize("cost, expected", [(DROP, 0.0), (None, 0.0), (0, 0.0), (0.002, 0.002), (3, 3.0)])
def test_cost_per_request(cost, expected):
    (ep,) = load(one(cost_per_request=cost)).endpoints
    assert ep.cost_per_request == expected


# -- structure and several problems ----------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        pytest.param(["general_settings"], f"{SRC}: the top level must be a mapping", id="top-level-list"),
        pytest.param({"general_settings": "text"}, f"{SRC}: general_settings: must be a mapping", id="general-not-mapping"),
        pytest.param(
            {"general_settings": {"pass_through_endpoints": {"path": "/x"}}},
            f"{SRC}: general_settings.pass_through_endpoints: must be a list",
            id="endpoints-not-list",
        ),
        pytest.param(
            config("/x"), f"{SRC}: pass_through_endpoints[0]: must be a mapping with at least path and target", id="entry-not-mapping"
        ),
        pytest.param(config(master_key=["sk"]), f"{SRC}: general_settings.master_key: must be a string", id="master_key-list"),
        pytest.param(config(master_key=True), f"{SRC}: general_settings.master_key: must be a string", id="master_key-bool"),
        pytest.param(
            one(default_query_params=["a=1"]), at("default_query_params") + "must be a mapping of name to value", id="dqp-not-mapping"
        ),
        pytest.param(
            one(default_query_params={"a": None}), at("default_query_params.a") + "value must be a string or a number", id="dqp-null-value"
        ),
    ],
)
def test_structural_errors(raw, expected):
    assert errors_of(raw) == [expected]


@pytest.mark.parametrize(
    "raw",
    [{}, {"general_settings": None}, {"general_settings": {}}, config()],
    ids=["empty", "null-general", "empty-general", "no-endpoints"],
)
def test_empty_configs_load(raw):
    settings = load(raw)
    assert settings.endpoints == ()
    assert settings.source == SRC


def test_several_problems_are_reported_together():
    cfg = config(
        endpoint(path="v1", target="ftp://files.example/x"),
        endpoint(path="/y", include_subpaths=True, auth="true", methods=["TRACE"]),
        endpoint(path="/z", headers={"Host": "h", "X": None}),
        pass_through_request_timeout=-1,
    )
    problems = errors_of(cfg)
    expected = [
        (f"{SRC}: general_settings.pass_through_request_timeout: ", POSITIVE),
        (at("path", 0, "v1"), "must start with '/'"),
        (at("target", 0, "v1"), NOT_HTTP),
        (at("include_subpaths", 1, "/y"), "did you mean 'include_subpath'?"),
        (at("methods", 1, "/y"), "TRACE is refused"),
        (at("auth", 1, "/y"), "must be a YAML boolean"),
        (at("headers.Host", 2, "/z"), FORBIDDEN),
        (at("headers.X", 2, "/z"), "got NoneType"),
    ]
    assert len(problems) == len(expected), problems
    for prefix, fragment in expected:
        assert_problem(problems, prefix, fragment)


# -- ignored sections and the startup log ----------------------------------------------

LITELLM_EXTRAS = {
    "model_list": [{"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o"}}],
    "litellm_settings": {"drop_params": True},
    "router_settings": {"routing_strategy": "simple-shuffle"},
}


@pytest.mark.parametrize(
    "raw, names",
    [
        pytest.param({**LITELLM_EXTRAS, **one()}, ["model_list", "litellm_settings", "router_settings"], id="top-level-sections"),
        pytest.param({"environment_variables": {"X": "y"}, **one()}, [], id="environment_variables-is-used"),
        pytest.param(
            config(endpoint(), alerting=["slack"], disable_spend_logs=True, store_model_in_db=True),
            ["general_settings.alerting", "general_settings.disable_spend_logs", "general_settings.store_model_in_db"],
            id="general-settings-keys",
        ),
        pytest.param({"model_list": [], **config(endpoint(), alerting=["slack"])}, ["model_list", "general_settings.alerting"], id="both"),
        pytest.param(one(), [], id="nothing-ignored"),
    ],
)
def test_unknown_sections_are_tolerated_and_listed(raw, names):
    settings = load(raw)
    assert len(settings.endpoints) == 1
    assert len(settings.ignored) == len(names)
    for name in names:
        assert sum(name in entry for entry in settings.ignored) == 1, (name, settings.ignored)


def test_log_summary_names_ignored_sections_in_one_info_line(caplog):
    settings = load({**LITELLM_EXTRAS, **config(endpoint(), alerting=["slack"])})
    caplog.set_level(logging.INFO, logger="proxy_app")
    log_summary(settings)
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1
    message = infos[0].getMessage()
    assert "\n" not in message
    for name in ["model_list", "litellm_settings", "router_settings", "general_settings.alerting"]:
        assert name in message


def test_log_summary_is_silent_when_nothing_is_ignored_or_open(caplog):
    caplog.set_level(logging.DEBUG, logger="proxy_app")
    log_summary(load(config(endpoint(auth=True, headers={"Authorization": "k"}), master_key="sk-1234")))
    assert caplog.records == []


# -- warnings for open endpoints that inject credentials -------------------------------


@pytest.mark.parametrize(
    "fields, warned",
    [
        pytest.param({"headers": {"Authorization": "bearer os.environ/COHERE_API_KEY"}}, True, id="open-authorization"),
        pytest.param({"headers": {"x-api-key": "k"}}, True, id="open-x-api-key"),
        pytest.param({"headers": {"LANGFUSE_PUBLIC_KEY": LF_PUBLIC, "LANGFUSE_SECRET_KEY": LF_SECRET}}, True, id="open-langfuse"),
        pytest.param({"headers": {"Authorization": "k"}, "auth": True}, False, id="auth-true"),
        pytest.param({"headers": {"content-type": "application/json"}}, False, id="open-no-credential"),
        pytest.param({}, False, id="open-no-headers"),
    ],
)
def test_open_endpoint_injecting_credentials_warns(fields, warned):
    settings = load(config(endpoint(**fields), master_key="sk-1234"))
    if warned:
        (warning,) = settings.warnings
        assert PATH in warning and "pass_through_endpoints[0]" in warning
        assert "authorization" in warning.lower() or "api-key" in warning.lower()
    else:
        assert settings.warnings == ()


def test_log_summary_logs_each_warning(caplog):
    settings = load(config(endpoint(path="/a", headers={"Authorization": "k"}), endpoint(path="/b", headers={"api-key": "k"})))
    caplog.set_level(logging.INFO, logger="proxy_app")
    log_summary(settings)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == list(settings.warnings)
    assert any("/a" in w for w in warnings) and any("/b" in w for w in warnings)


# -- YAML files ------------------------------------------------------------------------

VALID_YAML = """\
general_settings:
  pass_through_endpoints:
    - path: /x
      target: https://upstream.example/v1/x
"""


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        pytest.param(
            "general_settings:\n"
            "  pass_through_endpoints:\n"
            "    - path: /x\n"
            "      target: https://upstream.example/x\n"
            "      path: /y\n",
            5,
            "invalid YAML: duplicate key 'path'",
            id="duplicate-endpoint-field",
        ),
        pytest.param(
            "general_settings:\n"
            "  master_key: sk-1\n"
            "general_settings:\n"
            "  master_key: sk-2\n",
            3,
            "invalid YAML: duplicate key 'general_settings'",
            id="duplicate-top-level",
        ),
        pytest.param(
            "general_settings:\n"
            "  pass_through_endpoints:\n"
            "    - path: /x\n"
            "      target: https://upstream.example/x\n"
            "      headers:\n"
            "        Authorization: a\n"
            "        Authorization: b\n",
            7,
            "invalid YAML: duplicate key 'Authorization'",
            id="duplicate-header",
        ),
        pytest.param("general_settings:\n  master_key: [unclosed\n", 3, "invalid YAML: ", id="unclosed-flow"),
        pytest.param("general_settings:\n  a: 1\n b: 2\n", 3, "invalid YAML: ", id="bad-indentation"),
        pytest.param("general_settings:\n\tmaster_key: x\n", 2, "invalid YAML: ", id="tab"),
    ],
)
def test_yaml_errors_name_file_and_line(tmp_path, text, line, fragment):
    path = write(tmp_path, text)
    (problem,) = errors_of(str(path))
    assert problem.startswith(f"{path}:{line}:"), problem
    assert fragment in problem


@pytest.mark.parametrize("make", [lambda p: p / "missing.yaml", lambda p: p], ids=["missing-file", "directory"])
def test_unreadable_file(tmp_path, make):
    path = make(tmp_path)
    (problem,) = errors_of(str(path))
    assert problem.startswith(f"{path}: cannot read config file: ")


def test_missing_file_says_so(tmp_path):
    path = tmp_path / "nope.yaml"
    assert errors_of(str(path)) == [f"{path}: cannot read config file: No such file or directory"]


def test_errors_in_a_file_name_the_file(tmp_path):
    path = write(tmp_path, VALID_YAML.replace("https://upstream.example/v1/x", "ftp://x"))
    assert_one_problem(errors_of(str(path)), at("target", source=str(path)), NOT_HTTP)


@pytest.mark.parametrize("as_path", [str, Path], ids=["str", "pathlike"])
def test_file_loads(tmp_path, as_path):
    path = write(tmp_path, VALID_YAML)
    settings = load(as_path(path))
    assert settings.source == str(path)
    assert [e.path for e in settings.endpoints] == ["/x"]


@pytest.mark.parametrize("text", ["", "# only a comment\n"], ids=["empty", "comment"])
def test_empty_file_loads_with_no_endpoints(tmp_path, text):
    assert load(str(write(tmp_path, text))).endpoints == ()


def test_yaml_scalar_booleans_and_quoted_strings(tmp_path):
    path = write(tmp_path, VALID_YAML + '      auth: "true"\n', name="quoted.yaml")
    assert_one_problem(errors_of(str(path)), at("auth", source=str(path)), "got str 'true'")


def test_yaml_anchors_and_aliases_load(tmp_path):
    text = "h: &h\n  Authorization: k\n" + VALID_YAML + "      headers: *h\n"
    (ep,) = load(str(write(tmp_path, text))).endpoints
    assert ep.headers == (("Authorization", "k"),)


def test_yaml_merge_keys_load(tmp_path):
    text = (
        "base: &base\n"
        "  target: https://upstream.example/v1/x\n"
        "  methods: [POST]\n"
        "general_settings:\n"
        "  pass_through_endpoints:\n"
        "    - <<: *base\n"
        "      path: /x\n"
    )
    (ep,) = load(str(write(tmp_path, text))).endpoints
    assert (ep.path, ep.target, ep.methods) == ("/x", "https://upstream.example/v1/x", {"POST"})


def test_unhashable_yaml_key_is_a_config_error(tmp_path):
    path = write(tmp_path, "? [a, b]\n: 1\n")
    (problem,) = errors_of(str(path))
    assert problem.startswith(f"{path}:")


# -- the shipped example config --------------------------------------------------------

EXAMPLE_ENV = {"COHERE_API_KEY": COHERE, "LANGFUSE_DEV_PUBLIC_KEY": LF_PUBLIC, "LANGFUSE_DEV_SK_KEY": LF_SECRET}


def test_example_config_loads():
    settings = load(EXAMPLE_CONFIG, EXAMPLE_ENV)
    rerank, ingestion = settings.endpoints
    assert settings.master_key == "sk-1234"
    assert (rerank.path, rerank.target) == ("/v1/rerank", "https://api.cohere.com/v1/rerank")
    assert rerank.headers == (
        ("Authorization", f"bearer {COHERE}"),
        ("content-type", "application/json"),
        ("accept", "application/json"),
    )
    assert (ingestion.path, ingestion.target) == ("/api/public/ingestion", "https://us.cloud.langfuse.com/api/public/ingestion")
    assert ingestion.headers == (("Authorization", LF_BASIC),)
    for ep in settings.endpoints:
        assert (ep.auth, ep.include_subpath, ep.forward_headers, ep.methods, ep.timeout) == (False, False, False, ALL_METHODS, 600.0)
    # Both are open and inject credentials (as in the seed): one warning each.
    assert len(settings.warnings) == 2
    assert "/v1/rerank" in settings.warnings[0] and "/api/public/ingestion" in settings.warnings[1]


def test_example_config_without_env_names_every_missing_variable():
    problems = errors_of(EXAMPLE_CONFIG, {})
    src = str(EXAMPLE_CONFIG)
    assert problems == [
        at("headers.Authorization", 0, "/v1/rerank", src) + "environment variable COHERE_API_KEY is not set",
        at("headers.LANGFUSE_PUBLIC_KEY", 1, "/api/public/ingestion", src) + "environment variable LANGFUSE_DEV_PUBLIC_KEY is not set",
        at("headers.LANGFUSE_SECRET_KEY", 1, "/api/public/ingestion", src) + "environment variable LANGFUSE_DEV_SK_KEY is not set",
    ]


# -- where the config file is found ----------------------------------------------------


@pytest.mark.parametrize(
    "explicit, environ, expected",
    [
        pytest.param("cli.yaml", {"CONFIG_FILE_PATH": "env.yaml"}, "cli.yaml", id="explicit-wins"),
        pytest.param(None, {"CONFIG_FILE_PATH": "env.yaml"}, "env.yaml", id="env"),
        pytest.param(None, {}, "config.yaml", id="default"),
        pytest.param(None, {"CONFIG_FILE_PATH": ""}, "config.yaml", id="empty-env-means-default"),
        pytest.param("cli.yaml", {}, "cli.yaml", id="explicit-only"),
    ],
)
def test_config_path_precedence(explicit, environ, expected):
    assert config_path(explicit, environ) == expected


def test_load_config_without_source_reads_CONFIG_FILE_PATH(tmp_path):
    path = write(tmp_path, VALID_YAML, name="from-env.yaml")
    settings = load(None, {"CONFIG_FILE_PATH": str(path)})
    assert settings.source == str(path)
    assert [e.path for e in settings.endpoints] == ["/x"]


def test_load_config_without_source_or_env_reads_config_yaml_in_cwd(tmp_path, monkeypatch):
    write(tmp_path, VALID_YAML.replace("/x\n", "/from-cwd\n"))
    monkeypatch.chdir(tmp_path)
    settings = load(None, {})
    assert settings.source == "config.yaml"
    assert [e.path for e in settings.endpoints] == ["/from-cwd"]


# -- a config that serves nothing ------------------------------------------------------


@pytest.mark.parametrize(
    "raw", [{}, {"general_settings": {"master_key": "sk-1"}}, config()], ids=["empty", "no-endpoints-key", "empty-list"]
)
def test_no_endpoints_is_a_warning(raw, caplog):
    settings = load(raw)
    assert settings.warnings == (NO_ENDPOINTS,)
    caplog.set_level(logging.INFO, logger="proxy_app")
    log_summary(settings)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, NO_ENDPOINTS)]


def test_summary_is_what_log_summary_logs(caplog):
    settings = load({**LITELLM_EXTRAS, **config(endpoint(headers={"Authorization": "k"}))})
    caplog.set_level(logging.DEBUG, logger="proxy_app")
    log_summary(settings)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == summary(settings)
    assert [level for level, _ in summary(settings)] == [logging.INFO, logging.WARNING]


# -- environment_variables -------------------------------------------------------------


def with_env(variables, *endpoints, **general) -> dict:
    return {"environment_variables": variables, **config(*endpoints, **general)}


@pytest.mark.parametrize(
    "raw, environ, read, expected",
    [
        pytest.param(
            with_env({"NEW_KEY": "k-1"}, endpoint(headers={"X-Key": "os.environ/NEW_KEY"})),
            {},
            lambda s: s.endpoints[0].headers,
            (("X-Key", "k-1"),),
            id="defines-a-variable",
        ),
        pytest.param(
            with_env({"COHERE_API_KEY": "from-config"}, endpoint(headers={"X-Key": "os.environ/COHERE_API_KEY"})),
            ENV,
            lambda s: s.endpoints[0].headers,
            (("X-Key", "from-config"),),
            id="config-wins-over-process-env-as-in-litellm",
        ),
        pytest.param(
            with_env({"ALIAS": "os.environ/COHERE_API_KEY"}, endpoint(headers={"X-Key": "bearer os.environ/ALIAS"})),
            ENV,
            lambda s: s.endpoints[0].headers,
            (("X-Key", f"bearer {COHERE}"),),
            id="value-copies-another-variable",
        ),
        pytest.param(
            with_env({"UNUSED": "os.environ/NOT_SET_ANYWHERE"}, endpoint()),
            {},
            lambda s: len(s.endpoints),
            1,
            id="copy-of-unset-variable-is-skipped-if-unused",
        ),
        pytest.param(
            with_env(
                {"PORT_N": 8443, "RATE": 0.5, "ON": True, "OFF": False},
                endpoint(target="https://h.example:os.environ/PORT_N"),
                endpoint(path="/y", default_query_params={"r": "os.environ/RATE", "on": "os.environ/ON", "off": "os.environ/OFF"}),
            ),
            {},
            lambda s: (s.endpoints[0].netloc, s.endpoints[1].default_query_params),
            ("h.example:8443", (("r", "0.5"), ("on", "true"), ("off", "false"))),
            id="scalars-coerced-to-strings",
        ),
        pytest.param(
            with_env({"LITELLM_MASTER_KEY": "sk-from-config"}, endpoint(auth=True)),
            {},
            lambda s: s.master_key,
            "sk-from-config",
            id="litellm-master-key-fallback",
        ),
        pytest.param(
            with_env({"UPSTREAM": "https://env.example/v1"}, endpoint(target="os.environ/UPSTREAM")),
            {},
            lambda s: s.endpoints[0].target,
            "https://env.example/v1",
            id="target",
        ),
        pytest.param(with_env(None, endpoint()), {}, lambda s: len(s.endpoints), 1, id="empty-section"),
    ],
)
def test_environment_variables_apply_to_references(raw, environ, read, expected):
    assert read(load(raw, environ)) == expected


def test_environment_variables_are_not_exported_to_the_process(monkeypatch):
    monkeypatch.delenv("PROXY_APP_TEST_ONLY", raising=False)
    settings = load_config(with_env({"PROXY_APP_TEST_ONLY": "v"}, endpoint(headers={"X": "os.environ/PROXY_APP_TEST_ONLY"})))
    assert settings.endpoints[0].headers == (("X", "v"),)
    assert "PROXY_APP_TEST_ONLY" not in os.environ


ENV_SECRET = "env-SECRET-value-6666"


@pytest.mark.parametrize(
    "variables, prefix, fragment",
    [
        pytest.param(
            ["A=1"], f"{SRC}: environment_variables: ", "must be a mapping of variable name to value, got list", id="not-a-mapping"
        ),
        pytest.param(
            {"1BAD": ENV_SECRET}, f"{SRC}: environment_variables.1BAD: ", "is not a valid environment variable name", id="bad-name"
        ),
        pytest.param(
            {"A-B": ENV_SECRET}, f"{SRC}: environment_variables.A-B: ", "is not a valid environment variable name", id="dash-in-name"
        ),
        pytest.param({"A": None}, f"{SRC}: environment_variables.A: ", "must be a string, a number or a boolean, got NoneType", id="null"),
        pytest.param({"A": [ENV_SECRET]}, f"{SRC}: environment_variables.A: ", "got list", id="list"),
        pytest.param({"A": {"k": ENV_SECRET}}, f"{SRC}: environment_variables.A: ", "got dict", id="mapping"),
        pytest.param({"A": ENV_SECRET + "\x00"}, f"{SRC}: environment_variables.A: ", "value contains NUL", id="nul"),
        pytest.param(
            {"A": "os.environ/NOT VALID"}, f"{SRC}: environment_variables.A: ", "must be followed by a variable name", id="bad-copy"
        ),
    ],
)
def test_environment_variables_errors_name_the_field_never_the_value(variables, prefix, fragment):
    problems = errors_of(with_env(variables, endpoint()))
    assert_one_problem(problems, prefix, fragment)
    assert ENV_SECRET not in "\n".join(problems)


def test_environment_variables_values_never_appear_in_errors():
    # The value is resolved, then rejected as a target: the error must not show it.
    problems = errors_of(with_env({"T": "ftp://leak-" + ENV_SECRET}, endpoint(target="os.environ/T")))
    assert_one_problem(problems, at("target"), NOT_HTTP)
    assert ENV_SECRET not in "\n".join(problems)


def test_reference_to_an_unset_copy_says_why():
    problems = errors_of(with_env({"KEY": "os.environ/NOT_SET"}, endpoint(headers={"X": "os.environ/KEY"})), {})
    assert_one_problem(
        problems, at("headers.X"), "environment variable KEY is not set (environment_variables.KEY copies NOT_SET, which is not set)"
    )


# -- include ---------------------------------------------------------------------------


def yaml_file(directory: Path, name: str, data) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_include_adds_endpoints_after_the_including_files(tmp_path):
    main = yaml_file(
        tmp_path, "config.yaml", {"include": ["routes/a.yaml", "b.yaml"], **config(endpoint(path="/main"), master_key="sk-main")}
    )
    yaml_file(tmp_path, "routes/a.yaml", {"include": ["nested.yaml"], **config(endpoint(path="/a1"), endpoint(path="/a2"))})
    yaml_file(tmp_path, "routes/nested.yaml", config(endpoint(path="/nested")))  # relative to routes/
    yaml_file(tmp_path, "b.yaml", {"general_settings": {"pass_through_endpoints": [endpoint(path="/b", auth=True)]}})
    settings = load(main)
    assert [e.path for e in settings.endpoints] == ["/main", "/a1", "/a2", "/nested", "/b"]
    assert [e.index for e in settings.endpoints] == [0, 1, 2, 3, 4]
    assert settings.master_key == "sk-main"  # merged, not replaced by an included general_settings
    assert settings.source == str(main)
    assert not any("include" in entry for entry in settings.ignored)


def test_include_merges_mappings_and_sections(tmp_path):
    main = yaml_file(
        tmp_path, "config.yaml", {"include": ["secrets.yaml"], "model_list": [{"m": 1}], **one(headers={"X": "os.environ/FROM_INCLUDE"})}
    )
    yaml_file(
        tmp_path,
        "secrets.yaml",
        {
            "environment_variables": {"FROM_INCLUDE": "v"},
            "model_list": [{"m": 2}],
            "general_settings": {"master_key": "sk-inc", "pass_through_request_timeout": 5},
        },
    )
    settings = load(main, {})
    (ep,) = settings.endpoints
    assert ep.headers == (("X", "v"),) and ep.timeout == 5.0
    assert settings.master_key == "sk-inc"
    assert settings.ignored == ("top-level section 'model_list'",)


def test_the_same_value_in_two_files_is_fine(tmp_path):
    main = yaml_file(tmp_path, "config.yaml", {"include": ["other.yaml"], **config(endpoint(), master_key="sk-same")})
    yaml_file(tmp_path, "other.yaml", {"general_settings": {"master_key": "sk-same"}})
    assert load(main).master_key == "sk-same"


@pytest.mark.parametrize(
    "main_general, other, field, fragment",
    [
        pytest.param(
            {"master_key": "sk-" + ENV_SECRET},
            {"general_settings": {"master_key": "sk-other-" + ENV_SECRET}},
            "general_settings.master_key",
            "is also set in {main}, to a different value; set it in one file only",
            id="scalar",
        ),
        pytest.param({}, {"general_settings": ["x"]}, "general_settings", "is a list here and a mapping in {main}", id="list-vs-mapping"),
        pytest.param(
            {"pass_through_request_timeout": 5},
            {"general_settings": {"pass_through_request_timeout": "5"}},
            "general_settings.pass_through_request_timeout",
            "is also set in {main}, to a different value",
            id="same-text-other-type",
        ),
        pytest.param(
            {},
            {"general_settings": {"pass_through_endpoints": {"path": "/x"}}},
            "general_settings.pass_through_endpoints",
            "is a mapping here and a list in {main}",
            id="mapping-vs-list",
        ),
    ],
)
def test_conflicts_between_files_name_both_files_and_no_value(tmp_path, main_general, other, field, fragment):
    main = yaml_file(
        tmp_path, "config.yaml", {"include": ["other.yaml"], "general_settings": {**main_general, "pass_through_endpoints": [endpoint()]}}
    )
    included = yaml_file(tmp_path, "other.yaml", other)
    problems = errors_of(main)
    assert problems == [
        f"{included}: {field}: {fragment.format(main=main)}" + ("" if "one file only" in fragment else "; set it in one file only")
    ]
    assert ENV_SECRET not in problems[0]


def test_problems_in_an_included_file_name_that_file_and_its_own_index(tmp_path):
    main = yaml_file(
        tmp_path, "config.yaml", {"include": ["more.yaml"], **config(endpoint(path="/ok"), endpoint(path="/bad-main", methods=["TRACE"]))}
    )
    more = yaml_file(
        tmp_path, "more.yaml", config(endpoint(path="/fine"), endpoint(path="/bad", target="ftp://x", headers={"X": "os.environ/NOPE"}))
    )
    problems = errors_of(main)
    assert len(problems) == 3, problems
    assert_problem(problems, at("methods", 1, "/bad-main", str(main)), "TRACE is refused")
    assert_problem(problems, at("target", 1, "/bad", str(more)), NOT_HTTP)
    assert_problem(problems, at("headers.X", 1, "/bad", str(more)), "environment variable NOPE is not set")


def test_overlaps_and_warnings_name_the_other_file(tmp_path):
    main = yaml_file(tmp_path, "config.yaml", {"include": ["more.yaml"], **config(endpoint(path="/same", methods=["GET"]))})
    more = yaml_file(tmp_path, "more.yaml", config(endpoint(path="/same", methods=["GET", "POST"])))
    (problem,) = errors_of(main)
    assert problem == (
        f"{more}: pass_through_endpoints[0] (/same).methods: GET already served by {main}: pass_through_endpoints[0] "
        "on the same path; give entries sharing a path disjoint methods"
    )
    yaml_file(tmp_path, "more.yaml", config(endpoint(path="/open", headers={"Authorization": "k"})))
    (warning,) = load(main).warnings
    assert warning.startswith(f"endpoint /open ({more}: pass_through_endpoints[0]) is open")


@pytest.mark.parametrize(
    "files, expected",
    [
        pytest.param(
            {"config.yaml": {"include": "other.yaml"}}, ["{d}/config.yaml: include: must be a list of file paths"], id="not-a-list"
        ),
        pytest.param({"config.yaml": {"include": [3]}}, ["{d}/config.yaml: include[0]: must be a file path, got int"], id="not-a-path"),
        pytest.param(
            {"config.yaml": {"include": ["missing.yaml"]}},
            ["{d}/missing.yaml: cannot read config file: No such file or directory (from {d}/config.yaml: include[0])"],
            id="missing",
        ),
        pytest.param(
            {"config.yaml": {"include": ["bad.yaml"]}, "bad.yaml": "general_settings:\n  master_key: [unclosed\n"},
            ["{d}/bad.yaml:3:1: invalid YAML: "],  # ... (from {d}/config.yaml: include[0])
            id="bad-yaml-names-the-included-file",
        ),
        pytest.param(
            {"config.yaml": {"include": ["list.yaml"]}, "list.yaml": ["a"]},
            ["{d}/list.yaml: the top level of an included file must be a mapping"],
            id="included-top-level-not-mapping",
        ),
        pytest.param(
            {"config.yaml": {"include": ["a.yaml"]}, "a.yaml": {"include": ["config.yaml"]}},
            ["{d}/a.yaml: include[0]: {d}/config.yaml is already being read (include cycle)"],
            id="cycle",
        ),
        pytest.param(
            {"config.yaml": {"include": ["config.yaml"]}},
            ["{d}/config.yaml: include[0]: {d}/config.yaml is already being read (include cycle)"],
            id="self",
        ),
        pytest.param(
            {
                "config.yaml": {"include": ["a.yaml", "b.yaml"]},
                "a.yaml": {"include": ["c.yaml"]},
                "b.yaml": {"include": ["./c.yaml"]},
                "c.yaml": {},
            },
            ["{d}/b.yaml: include[0]: {d}/./c.yaml is already included by {d}/a.yaml; include each file once"],
            id="twice",
        ),
    ],
)
def test_include_errors(tmp_path, files, expected):
    for name, data in files.items():
        yaml_file(tmp_path, name, data)
    problems = errors_of(tmp_path / "config.yaml")
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start.format(d=tmp_path)), problem


def test_include_in_a_mapping_is_refused():
    assert errors_of({"include": ["x.yaml"]}) == [f"{SRC}: include: needs a config file (its paths are relative to the file's directory)"]


def test_include_is_read_again_on_every_load(tmp_path):
    # What a HUP reload does: the included files are read again too.
    main = yaml_file(tmp_path, "config.yaml", {"include": ["routes.yaml"]})
    yaml_file(tmp_path, "routes.yaml", config(endpoint(path="/one")))
    assert [e.path for e in load(main).endpoints] == ["/one"]
    yaml_file(tmp_path, "routes.yaml", config(endpoint(path="/two")))
    assert [e.path for e in load(main).endpoints] == ["/two"]


# -- check --allow-missing-env -----------------------------------------------------------


def test_allow_missing_env_lists_unset_variables_instead_of_failing():
    cfg = config(
        endpoint(
            path="/a",
            target="os.environ/UPSTREAM_URL_UNSET",
            headers={"Authorization": "bearer os.environ/KEY_UNSET", "X": "os.environ/COHERE_API_KEY"},
        ),
        endpoint(path="/b", auth=True, headers={"litellm_user_api_key": "os.environ/HEADER_NAME_UNSET"}),
        master_key="os.environ/MASTER_UNSET",
    )
    settings = load_config(cfg, dict(ENV), allow_missing_env=True)
    assert settings.unresolved == (
        f"{SRC}: general_settings.master_key: environment variable MASTER_UNSET is not set",
        f"{at('target', 0, '/a')}environment variable UPSTREAM_URL_UNSET is not set",
        f"{at('headers.Authorization', 0, '/a')}environment variable KEY_UNSET is not set",
        f"{at('headers.litellm_user_api_key', 1, '/b')}environment variable HEADER_NAME_UNSET is not set",
    )
    a, b = settings.endpoints
    assert a.target == "os.environ/UPSTREAM_URL_UNSET" and dict(a.headers)["X"] == COHERE
    assert b.auth and settings.master_key  # the master key is there, only unknown here
    assert not load_config(one(), {}, allow_missing_env=True).unresolved


@pytest.mark.parametrize(
    "cfg, prefix, fragment",
    [
        pytest.param(one(headers={"X": "os.environ/EMPTY"}), at("headers.X"), "is set but empty", id="empty-is-still-an-error"),
        pytest.param(
            one(path="v1", headers={"X": "os.environ/UNSET"}), at("path", path="v1"), "must start with '/'", id="other-errors-still-fail"
        ),
    ],
)
def test_allow_missing_env_still_fails_on_everything_else(cfg, prefix, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(cfg, dict(ENV), allow_missing_env=True)
    assert_one_problem(info.value.problems, prefix, fragment)


# -- the store settings (proxy_app/config.py _Validator.store) ---------------------------------


@pytest.mark.parametrize(
    "general, environ, expected",
    [
        pytest.param({}, {}, (None, None, 60.0, False), id="defaults-embedded-sqlite"),
        pytest.param({"database_url": "postgresql://u:p@db/x"}, {}, ("postgresql://u:p@db/x", None, 60.0, False), id="in-config"),
        pytest.param({}, {"DATABASE_URL": "postgres://db/x"}, ("postgres://db/x", None, 60.0, False), id="env-database-url"),
        pytest.param(
            {"database_url": "os.environ/DB"}, {"DB": "postgresql://db/y", "DATABASE_URL": "postgresql://db/z"},
            ("postgresql://db/y", None, 60.0, False), id="config-wins-over-env",
        ),
        pytest.param({}, {"REDIS_URL": "redis://r:6379/1"}, (None, "redis://r:6379/1", 60.0, False), id="redis-url"),
        pytest.param(
            {}, {"REDIS_HOST": "r", "REDIS_PORT": "6380", "REDIS_PASSWORD": "p@ss"},
            (None, "redis://:p%40ss@r:6380/0", 60.0, False), id="litellm-redis-host-port-password",
        ),
        pytest.param({}, {"REDIS_HOST": "r"}, (None, "redis://r:6379/0", 60.0, False), id="redis-host-default-port"),
        pytest.param(
            {"key_cache_ttl": 5, "allow_requests_on_db_unavailable": True}, {}, (None, None, 5.0, True), id="cache-and-outage-policy",
        ),
    ],
)
def test_store_settings(general, environ, expected):
    settings = load_config({"general_settings": {**general, "pass_through_endpoints": [endpoint()]}}, environ)
    assert (settings.database_url, settings.redis_url, settings.key_cache_ttl, settings.allow_requests_on_db_unavailable) == expected


@pytest.mark.parametrize(
    "general, message",
    [
        ({"database_url": "mysql://db/x"}, "general_settings.database_url: must be a postgresql:// URL"),
        ({"database_url": 5}, "general_settings.database_url: must be a string, got int"),
        ({"database_url": "os.environ/NOPE"}, "general_settings.database_url"),
        ({"key_cache_ttl": 0}, "general_settings.key_cache_ttl: must be a positive number"),
        ({"allow_requests_on_db_unavailable": "yes"}, "general_settings.allow_requests_on_db_unavailable: must be a YAML boolean"),
    ],
)
def test_bad_store_settings_name_the_field(general, message):
    with pytest.raises(ConfigError) as caught:
        load_config({"general_settings": {**general, "pass_through_endpoints": [endpoint()]}}, {})
    assert any(message in problem for problem in caught.value.problems), caught.value.problems
