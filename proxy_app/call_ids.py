"""Call ids (``x-litellm-call-id``, the usage row's ``request_id``): time-ordered UUIDs.

A UUIDv7 (RFC 9562 §5.7): 48 bits of Unix milliseconds, then 74 random bits. Opaque to the
caller like LiteLLM's uuid4, but ids made later sort later, so each usage row lands at the
end of the ``request_id`` index instead of on a random page of it: a batch of rows dirties a
few index pages, not one per row (RFC 9562 §6.10 recommends v7 as a database key for this).
It is also about twice as quick to make as ``str(uuid.uuid4())``.
"""

from __future__ import annotations

import os
import time

_VERSION_7 = 0x7 << 76
_VARIANT = 0b10 << 62
_RAND_A = 0xFFF
_RAND_B = (1 << 62) - 1


def new_call_id() -> str:
    value = int.from_bytes(os.urandom(10), "big")
    bits = (time.time_ns() // 1_000_000) << 80 | _VERSION_7 | ((value >> 62) & _RAND_A) << 64 | _VARIANT | (value & _RAND_B)
    text = f"{bits:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
