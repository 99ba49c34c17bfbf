"""Call ids (proxy_app/call_ids.py): UUIDv7, unique, ordered by time."""

from __future__ import annotations

import time
import uuid

from proxy_app.call_ids import new_call_id


def test_a_call_id_is_a_version_7_rfc_9562_uuid_of_now():
    before = time.time_ns() // 1_000_000
    text = new_call_id()
    after = time.time_ns() // 1_000_000
    parsed = uuid.UUID(text)
    assert str(parsed) == text  # canonical 8-4-4-4-12 lower-case form
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert before <= parsed.int >> 80 <= after


def test_call_ids_are_unique_and_later_ones_sort_later():
    first = [new_call_id() for _ in range(2000)]
    time.sleep(0.002)
    second = [new_call_id() for _ in range(2000)]
    assert len(set(first + second)) == 4000
    assert max(first) < min(second)
