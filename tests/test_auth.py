"""Table-driven tests of the proxy-key rules in proxy_app/auth.py."""

from __future__ import annotations

import pytest

from proxy_app.auth import key_carriers

P = pytest.param
KEY = "sk-1234"
MASTER = KEY.encode()


@pytest.mark.parametrize(
    ("environ", "master", "key_header", "expected"),
    [
        # Authorization: Bearer <key>
        P({"HTTP_AUTHORIZATION": f"Bearer {KEY}"}, MASTER, None, {"authorization"}, id="bearer"),
        P({"HTTP_AUTHORIZATION": f"bearer {KEY}"}, MASTER, None, {"authorization"}, id="bearer-lower-case"),
        P({"HTTP_AUTHORIZATION": f"BEARER {KEY}"}, MASTER, None, {"authorization"}, id="bearer-upper-case"),
        P({"HTTP_AUTHORIZATION": f"bEaReR {KEY}"}, MASTER, None, {"authorization"}, id="bearer-mixed-case"),
        P({"HTTP_AUTHORIZATION": KEY}, MASTER, None, set(), id="authorization-without-bearer-refused"),
        P({"HTTP_AUTHORIZATION": f"Basic {KEY}"}, MASTER, None, set(), id="authorization-basic-refused"),
        P({"HTTP_AUTHORIZATION": f"Bearer{KEY}"}, MASTER, None, set(), id="bearer-without-space-refused"),
        P({"HTTP_AUTHORIZATION": "Bearer "}, MASTER, None, set(), id="bearer-empty"),
        P({"HTTP_AUTHORIZATION": ""}, MASTER, None, set(), id="authorization-empty"),
        P({"HTTP_AUTHORIZATION": "Bearer sk-12345"}, MASTER, None, set(), id="bearer-longer-key"),
        P({"HTTP_AUTHORIZATION": "Bearer sk-123"}, MASTER, None, set(), id="bearer-key-prefix"),
        P({"HTTP_AUTHORIZATION": "Bearer SK-1234"}, MASTER, None, set(), id="bearer-key-case-matters"),
        P({"HTTP_AUTHORIZATION": "Bearer sk-other"}, MASTER, None, set(), id="bearer-wrong-key"),
        # x-litellm-api-key, with and without Bearer
        P({"HTTP_X_LITELLM_API_KEY": KEY}, MASTER, None, {"x-litellm-api-key"}, id="litellm-header-plain"),
        P({"HTTP_X_LITELLM_API_KEY": f"Bearer {KEY}"}, MASTER, None, {"x-litellm-api-key"}, id="litellm-header-bearer"),
        P({"HTTP_X_LITELLM_API_KEY": f"bearer {KEY}"}, MASTER, None, {"x-litellm-api-key"}, id="litellm-header-bearer-lower-case"),
        P({"HTTP_X_LITELLM_API_KEY": "sk-other"}, MASTER, None, set(), id="litellm-header-wrong-key"),
        P({"HTTP_X_LITELLM_API_KEY": "Bearer sk-other"}, MASTER, None, set(), id="litellm-header-bearer-wrong-key"),
        P({"HTTP_X_LITELLM_API_KEY": ""}, MASTER, None, set(), id="litellm-header-empty"),
        # the litellm_user_api_key header (config.py passes its name lower-cased)
        P({"HTTP_X_MY_KEY": KEY}, MASTER, "x-my-key", {"x-my-key"}, id="custom-header-plain"),
        P({"HTTP_X_MY_KEY": f"Bearer {KEY}"}, MASTER, "x-my-key", {"x-my-key"}, id="custom-header-bearer"),
        P({"HTTP_API_KEY": KEY}, MASTER, "api-key", {"api-key"}, id="custom-header-api-key"),
        P({"HTTP_X_MY_KEY": "sk-other"}, MASTER, "x-my-key", set(), id="custom-header-wrong-key"),
        P({"HTTP_X_MY_KEY": KEY}, MASTER, None, set(), id="custom-header-not-configured"),
        P({"HTTP_X_OTHER": KEY}, MASTER, "x-my-key", set(), id="custom-header-absent"),
        P({"HTTP_API_KEY": KEY, "HTTP_X_API_KEY": KEY}, MASTER, None, set(), id="unrelated-headers-ignored"),
        # several carriers at once
        P(
            {"HTTP_AUTHORIZATION": f"Bearer {KEY}", "HTTP_X_LITELLM_API_KEY": KEY, "HTTP_X_MY_KEY": f"Bearer {KEY}"},
            MASTER,
            "x-my-key",
            {"authorization", "x-litellm-api-key", "x-my-key"},
            id="all-three-carriers",
        ),
        P(
            {"HTTP_AUTHORIZATION": f"Bearer {KEY}", "HTTP_X_LITELLM_API_KEY": "sk-other"},
            MASTER,
            None,
            {"authorization"},
            id="right-authorization-wrong-litellm-header",
        ),
        P(
            {"HTTP_AUTHORIZATION": "Bearer sk-other", "HTTP_X_MY_KEY": KEY},
            MASTER,
            "x-my-key",
            {"x-my-key"},
            id="wrong-authorization-right-custom-header",
        ),
        P(
            {"HTTP_AUTHORIZATION": KEY, "HTTP_X_LITELLM_API_KEY": KEY},
            MASTER,
            None,
            {"x-litellm-api-key"},
            id="bare-authorization-refused-litellm-header-accepted",
        ),
        # no master key: nothing is a carrier
        P(
            {"HTTP_AUTHORIZATION": f"Bearer {KEY}", "HTTP_X_LITELLM_API_KEY": KEY, "HTTP_X_MY_KEY": KEY},
            None,
            "x-my-key",
            set(),
            id="no-master-key",
        ),
        P({"HTTP_AUTHORIZATION": "Bearer ", "HTTP_X_LITELLM_API_KEY": ""}, b"", None, set(), id="empty-master-key"),
        P({}, MASTER, "x-my-key", set(), id="no-headers"),
        # WSGI values are latin-1-decoded bytes; a non-ASCII key compares on its UTF-8 bytes
        P(
            {"HTTP_AUTHORIZATION": "Bearer " + "sk-é".encode().decode("latin-1")},
            "sk-é".encode(),
            None,
            {"authorization"},
            id="non-ascii-key",
        ),
    ],
)
def test_key_carriers(environ, master, key_header, expected):
    assert key_carriers(environ, master, key_header) == frozenset(expected)
