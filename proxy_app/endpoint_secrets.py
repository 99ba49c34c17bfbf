"""Literal header values of stored endpoints, encrypted with a key derived from ``LITELLM_SALT_KEY``.

SPEC §10: a literal header value posted to the endpoint API is a secret the database must
not hold in clear. It is sealed with Fernet (``cryptography``: AES-128-CBC with an
HMAC-SHA256, https://cryptography.io/en/latest/fernet/) under a key derived from env
``LITELLM_SALT_KEY`` (LiteLLM's name for the same job; any string) with HKDF-SHA256, so
every instance that has the same salt key can open what another one stored. An
``os.environ/NAME`` reference is not a secret and is stored as written.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping

from cryptography.fernet import Fernet
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SALT_KEY_ENV = "LITELLM_SALT_KEY"
# HKDF's salt and info: fixed, so that the one secret (the salt key) gives the same Fernet key
# everywhere, and a key derived for another purpose from the same secret is a different key.
_KDF_SALT = b"proxy_app"
_KDF_INFO = b"proxy_app pass-through endpoint header values v1"


class SecretsUnavailable(Exception):
    """The sealed values cannot be opened here; the message names the variable, never a value."""


def cipher(environ: Mapping[str, str] = os.environ) -> Fernet | None:
    """The Fernet for this instance's ``LITELLM_SALT_KEY``; None when it is unset or empty."""
    salt_key = environ.get(SALT_KEY_ENV)
    if not salt_key:
        return None
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=_KDF_SALT, info=_KDF_INFO).derive(salt_key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def seal(values: Mapping[str, str], fernet: Fernet) -> str:
    """One Fernet token holding every literal header value of an endpoint (name -> value)."""
    return fernet.encrypt(json.dumps(dict(values), separators=(",", ":")).encode()).decode("ascii")


def unseal(token: str, fernet: Fernet | None) -> dict[str, str]:
    """The header values sealed in ``token``.

    :raises SecretsUnavailable: no salt key here, or not the one they were sealed with.
    """
    if fernet is None:
        raise SecretsUnavailable(f"its header values are encrypted with {SALT_KEY_ENV}, which is not set on this instance")
    try:
        return json.loads(fernet.decrypt(token.encode("ascii")))
    except (InvalidToken, ValueError):
        raise SecretsUnavailable(
            f"its header values cannot be decrypted with this instance's {SALT_KEY_ENV} (not the one they were stored with)"
        ) from None
