"""Table-driven tests of the pure URL rules in proxy_app/urls.py."""

from __future__ import annotations

import pytest

from proxy_app.urls import build_query
from proxy_app.urls import has_dot_segment
from proxy_app.urls import join_path
from proxy_app.urls import request_target
from proxy_app.urls import split_request_target
from proxy_app.urls import subpath_rest

P = pytest.param


# -- split_request_target -------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        P("/sub/x?a=1", ("/sub/x", "a=1"), id="origin-form"),
        P("/sub/x", ("/sub/x", ""), id="origin-form-no-query"),
        P("/sub/x?", ("/sub/x", ""), id="origin-form-empty-query"),
        P("/", ("/", ""), id="root"),
        P("/sub/x?a=1?b=2", ("/sub/x", "a=1?b=2"), id="second-question-mark-is-query-data"),
        P("http://evil/sub/x?q", ("/sub/x", "q"), id="absolute-form"),
        P("https://evil:8443/sub/x?a=1&b=2", ("/sub/x", "a=1&b=2"), id="absolute-form-https-port"),
        P("HTTP://EVIL/sub/x", ("/sub/x", ""), id="absolute-form-upper-case-scheme"),
        P("http://user:pw@evil/sub/x", ("/sub/x", ""), id="absolute-form-userinfo"),
        P("http://evil?x", ("/", "x"), id="absolute-form-no-path-query"),
        P("http://evil?x/y", ("/", "x/y"), id="absolute-form-slash-only-in-query"),
        P("http://evil", ("/", ""), id="absolute-form-authority-only"),
        P("http://evil/", ("/", ""), id="absolute-form-root"),
        P("/sub/x#frag", ("/sub/x", ""), id="fragment-dropped"),
        P("/sub/x?a=1#frag", ("/sub/x", "a=1"), id="fragment-after-query-dropped"),
        P("/sub/x#frag?a=1", ("/sub/x", ""), id="question-mark-inside-fragment-dropped"),
        P("http://evil/sub/x?q#frag", ("/sub/x", "q"), id="absolute-form-fragment-dropped"),
        P("http://evil#/sub/x", ("/", ""), id="absolute-form-path-inside-fragment-dropped"),
        P(
            "/sub/a%2Fb%3Fc%23d%20e?x=%20&y=+&z=%2B",
            ("/sub/a%2Fb%3Fc%23d%20e", "x=%20&y=+&z=%2B"),
            id="raw-encodings-untouched",
        ),
        P("/sub/%2e%2e/%252e", ("/sub/%2e%2e/%252e", ""), id="encoded-dots-untouched"),
        P("//evil/x", ("//evil/x", ""), id="scheme-relative-stays-a-path"),
        P("/sub/http://evil/x", ("/sub/http://evil/x", ""), id="url-inside-path-stays-a-path"),
    ],
)
def test_split_request_target(raw, expected):
    assert split_request_target(raw) == expected


# -- subpath_rest -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw_path", "route", "expected"),
    [
        P("/sub/x", "/sub", "x", id="one-segment"),
        P("/sub/a/b/", "/sub", "a/b/", id="nested-trailing-slash-kept"),
        P("/sub/", "/sub", "", id="route-slash-is-empty-rest"),
        P("/sub", "/sub", None, id="exact-path-is-not-below"),
        P("/sub//x", "/sub", "/x", id="double-slash-keeps-empty-segment"),
        P("/sub/a%2Fb", "/sub", "a%2Fb", id="encoded-slash-in-rest-kept-raw"),
        P("/sub%2Fx", "/sub", None, id="encoded-slash-is-not-a-separator"),
        P("/sub%2fx", "/sub", None, id="encoded-slash-lower-case-is-not-a-separator"),
        P("/su%62/x", "/sub", None, id="encoded-route-character-not-matched"),
        P("/subway", "/sub", None, id="prefix-without-segment-boundary"),
        P("/subway/x", "/sub", None, id="prefix-without-segment-boundary-deeper"),
        P("/SUB/x", "/sub", None, id="case-sensitive"),
        P("/other/sub/x", "/sub", None, id="route-not-at-start"),
        P("/sub/x", "/sub/", "x", id="route-with-trailing-slash"),
        P("/v1/rerank/x/y", "/v1/rerank", "x/y", id="multi-segment-route"),
        P("/x", "/", "x", id="root-route"),
        P("/a/b/", "/", "a/b/", id="root-route-nested"),
        P("/", "/", "", id="root-route-root"),
    ],
)
def test_subpath_rest(raw_path, route, expected):
    assert subpath_rest(raw_path, route) == expected


# -- has_dot_segment ----------------------------------------------------------------

@pytest.mark.parametrize(
    "rest",
    [
        P("..", id="dotdot"),
        P(".", id="dot"),
        P("../x", id="dotdot-leading"),
        P("x/..", id="dotdot-trailing"),
        P("a/../b", id="dotdot-middle"),
        P("a/./b", id="dot-middle"),
        P("./", id="dot-slash"),
        P("%2e%2e", id="encoded-dotdot"),
        P("%2E%2e", id="encoded-dotdot-mixed-case"),
        P("%2E%2E/x", id="encoded-dotdot-upper-case"),
        P(".%2e", id="half-encoded-dotdot"),
        P("%2e", id="encoded-dot"),
        P("..%2f", id="dotdot-encoded-slash"),
        P("..%2Fx", id="dotdot-encoded-slash-upper-case"),
        P("a%2f..%2fb", id="dotdot-between-encoded-slashes"),
        P("..\\", id="dotdot-backslash"),
        P("a\\..\\b", id="dotdot-between-backslashes"),
        P("..%5c", id="dotdot-encoded-backslash"),
        P("..;/", id="dotdot-semicolon"),
        P("..;jsessionid=x/y", id="dotdot-matrix-params"),
        P(".;/", id="dot-semicolon"),
    ],
)
def test_has_dot_segment_true(rest):
    assert has_dot_segment(rest) is True


@pytest.mark.parametrize(
    "rest",
    [
        P("", id="empty"),
        P("x/y/", id="plain"),
        P("a//b", id="empty-segment"),
        P("%252e%252e", id="double-encoded-dotdot"),
        P("%252E%252E/x", id="double-encoded-dotdot-upper-case"),
        P("...", id="three-dots"),
        P("a/.../b", id="three-dots-segment"),
        P("%2e%2e%2e", id="encoded-three-dots"),
        P(".hidden", id="dotfile"),
        P("a/.well-known/x", id="dot-prefixed-segment"),
        P("a..b", id="dots-inside-segment"),
        P("..a", id="dotdot-prefix"),
        P("a..", id="dotdot-suffix"),
        P("file.json", id="extension"),
    ],
)
def test_has_dot_segment_false(rest):
    assert has_dot_segment(rest) is False


# -- join_path ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("target_path", "rest", "expected"),
    [
        P("/t", "x", "/t/x", id="plain"),
        P("/t/", "x", "/t/x", id="target-trailing-slash"),
        P("/t//", "x", "/t/x", id="target-several-trailing-slashes"),
        P("/t", "a/b/", "/t/a/b/", id="rest-trailing-slash-kept"),
        P("/t/", "a/b/", "/t/a/b/", id="both-trailing-slashes"),
        P("/t", "", "/t/", id="empty-rest-keeps-trailing-slash"),
        P("/t/", "", "/t/", id="empty-rest-target-trailing-slash"),
        P("", "x", "/x", id="empty-target-path"),
        P("/", "x", "/x", id="root-target-path"),
        P("", "", "/", id="empty-target-empty-rest"),
        P("/v1/a", "b/c", "/v1/a/b/c", id="multi-segment-target"),
        P("/t", "a%2Fb", "/t/a%2Fb", id="encoded-slash-stays-encoded"),
        P("/t", "a%3Fb", "/t/a%3Fb", id="encoded-question-mark-stays-encoded"),
        P("/t", "a%23b", "/t/a%23b", id="encoded-hash-stays-encoded"),
        P("/t", "a%20b", "/t/a%20b", id="encoded-space-stays-encoded"),
        P("/t", "%2F%3F%23%20%25", "/t/%2F%3F%23%20%25", id="all-encodings-together"),
    ],
)
def test_join_path(target_path, rest, expected):
    assert join_path(target_path, rest) == expected


@pytest.mark.parametrize("rest", ["x", "", "a/b/", "a%2Fb", "@evil/x", "evil.com/x", "%2F%2Fevil"])
def test_join_path_stays_below_target(rest):
    assert join_path("/v1/t", rest).startswith("/v1/t/")


# -- build_query ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("caller", "target", "merge", "defaults", "expected"),
    [
        # the caller's raw query, byte for byte
        P("b=2&a=1&b=3", "", False, (), "b=2&a=1&b=3", id="caller-repeated-keys-and-order-kept"),
        P("a=1+2&b=%20&c&d=&e=%2B", "", False, (), "a=1+2&b=%20&c&d=&e=%2B", id="caller-plus-percent-valueless-kept"),
        P("a=1&&b=2", "", False, (), "a=1&&b=2", id="caller-empty-pair-kept"),
        P("a=%zz&b=%E9", "", False, (), "a=%zz&b=%E9", id="caller-invalid-encodings-kept"),
        # target query only when the caller sends none
        P("a=1", "t=1", False, (), "a=1", id="caller-query-replaces-target-query"),
        P("", "t=1&t=2&u", False, (), "t=1&t=2&u", id="target-query-when-caller-sends-none"),
        P("", "t=1", True, (), "t=1", id="merge-target-only"),
        P("a=1", "", True, (), "a=1", id="merge-caller-only"),
        P("", "", False, (), "", id="no-query"),
        P("", "", True, (), "", id="merge-no-query"),
        # merge
        P("a=1", "t=1", True, (), "t=1&a=1", id="merge-disjoint-keys-both-kept"),
        P("a=2", "a=1&t=1", True, (), "t=1&a=2", id="merge-caller-replaces-target-key"),
        P("a=9", "a=1&a=2&t=1", True, (), "t=1&a=9", id="merge-caller-replaces-all-target-repeats"),
        P("c=1", "t=1&t=2", True, (), "t=1&t=2&c=1", id="merge-repeated-target-keys-kept"),
        P("a=1&a=2", "a=0&t=1", True, (), "t=1&a=1&a=2", id="merge-caller-repeats-kept"),
        P("a", "a=1&t=1", True, (), "t=1&a", id="merge-caller-valueless-key-replaces"),
        P("a%20b=2", "a+b=1&t=1", True, (), "t=1&a%20b=2", id="merge-keys-compared-decoded"),
        P("A=2", "a=1", True, (), "a=1&A=2", id="merge-keys-case-sensitive"),
        P("x=%20&y=+&x=1", "t=1", True, (), "t=1&x=%20&y=+&x=1", id="merge-caller-raw-kept-byte-for-byte"),
        # defaults
        P("a=1", "", False, (("d", "1"),), "a=1&d=1", id="default-fills-absent-key"),
        P("", "", False, (("d", "1"), ("e", "2")), "d=1&e=2", id="defaults-alone"),
        P("d=caller", "", False, (("d", "1"),), "d=caller", id="default-never-overrides-caller"),
        P("d", "", False, (("d", "1"),), "d", id="default-never-overrides-caller-valueless-key"),
        P("a+b=1", "", False, (("a b", "x"),), "a+b=1", id="default-never-overrides-caller-encoded-key"),
        P("", "d=t", False, (("d", "1"),), "d=t", id="default-never-overrides-target"),
        P("a=1", "d=t", True, (("d", "1"),), "d=t&a=1", id="default-never-overrides-merged-target"),
        P("d=c", "d=t", True, (("d", "1"),), "d=c", id="default-never-overrides-merged-caller"),
        P("a=1", "d=t", False, (("d", "1"),), "a=1&d=1", id="default-fills-key-absent-from-result"),
        P("", "", False, (("a b", "x&y=z/?#é"),), "a%20b=x%26y%3Dz%2F%3F%23%C3%A9", id="defaults-percent-encoded"),
        P("", "", False, (("k", ""),), "k=", id="default-empty-value"),
    ],
)
def test_build_query(caller, target, merge, defaults, expected):
    assert build_query(caller, target, merge, defaults) == expected


# -- request_target ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        P("/v1/rerank", "", "/v1/rerank", id="no-query"),
        P("/v1/rerank", "a=1&b", "/v1/rerank?a=1&b", id="query"),
        P("/t/a%2Fb/", "x=%20", "/t/a%2Fb/?x=%20", id="raw-path-and-query"),
        P("/", "", "/", id="root"),
    ],
)
def test_request_target(path, query, expected):
    assert request_target(path, query) == expected


# -- the rules together: a hostile request-target never changes host or leaves the target's path

@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        P("/sub/a/b?x=1", "https://up.example/base/a/b?x=1", id="origin-form"),
        P("http://evil/sub/a?x", "https://up.example/base/a?x", id="absolute-form-host-ignored"),
        P("/sub/@evil/x", "https://up.example/base/@evil/x", id="at-sign-stays-in-path"),
        P("/sub/evil.com%2Fx", "https://up.example/base/evil.com%2Fx", id="encoded-slash-stays-in-path"),
        P("/sub/", "https://up.example/base/", id="trailing-slash"),
    ],
)
def test_pipeline(raw, expected):
    path, query = split_request_target(raw)
    rest = subpath_rest(path, "/sub")
    assert rest is not None and not has_dot_segment(rest)
    assert "https://up.example" + request_target(join_path("/base", rest), build_query(query, "", False, ())) == expected


@pytest.mark.parametrize(
    "raw",
    [
        P("/sub/../admin", id="dotdot"),
        P("/sub/%2e%2e/admin", id="encoded-dotdot"),
        P("http://evil/sub/..%2fadmin", id="absolute-form-dotdot-encoded-slash"),
        P("/sub/a/..\\..\\admin", id="backslash-dotdot"),
    ],
)
def test_pipeline_dot_segments_detected(raw):
    path, _ = split_request_target(raw)
    assert has_dot_segment(subpath_rest(path, "/sub"))
