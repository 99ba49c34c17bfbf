"""Every change proxy_app makes to a library's internals, in one place, applied explicitly.

Nothing here runs on import: importing any proxy_app module leaves http.client, urllib3
and gunicorn as they are. The gunicorn worker applies the patches when it starts
(``worker.ProxyThreadWorker.init_process``); the test suite applies them for its
in-process tests (``tests/conftest.py``).

Each patch replaces one attribute that the library's own code looks up at call time.
:func:`apply` checks that the attribute still exists before replacing it, so a release
that renames or removes it stops the worker with a message naming the library and the
attribute, instead of leaving the patch silently without effect.

Two kinds:

- **correctness**: the proxy is wrong without it. Each names the test that fails without it.
- **speed**: the proxy does the same thing without it, only slower or with more memory.
  ``PROXY_SPEEDUPS=0`` leaves every speed patch (and the other speed-only departures:
  the one-write upstream connection, the worker's keep-alive linger) unapplied; CI runs
  the end-to-end and attack tests in that mode too.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass

# Which side of the proxy a patch belongs to: the worker applies both, the in-process
# tests (Flask's test client, no gunicorn) only the upstream side.
UPSTREAM = "upstream"
SERVER = "server"


def speedups_enabled(environ=os.environ) -> bool:
    """False when ``PROXY_SPEEDUPS`` is 0/false/no/off: run on the libraries' own code."""
    return environ.get("PROXY_SPEEDUPS", "1").strip().lower() not in ("0", "false", "no", "off")


def _identity_target(target: str) -> str:
    return target


def _plain_head_parser():
    from proxy_app import wire

    return wire.parse_headers


def _one_write_response():
    from proxy_app.worker import OneWriteResponse

    return OneWriteResponse


def _body_recv_size():
    from proxy_app.body import MAX_BODY_RECV

    return MAX_BODY_RECV


@dataclass(frozen=True)
class Patch:
    name: str
    side: str
    module: str
    # "name" or "Class.name" inside module.
    attribute: str
    replacement: Callable[[], object]
    correctness: bool
    why: str
    # The test that fails when this patch is not applied (correctness patches).
    needed_by: str = ""

    def owner(self):
        """The object that holds the attribute (the module, or a class in it)."""
        target = importlib.import_module(self.module)
        *path, _ = self.attribute.split(".")
        for part in path:
            target = getattr(target, part)
        return target

    @property
    def leaf(self) -> str:
        return self.attribute.rsplit(".", 1)[-1]


PATCHES = (
    Patch(
        "raw_request_target",
        UPSTREAM,
        "urllib3.connectionpool",
        "_encode_target",
        lambda: _identity_target,
        correctness=True,
        why=(
            "urllib3 re-encodes every request target in HTTPConnectionPool.urlopen: it "
            "upper-cases escapes (%2f -> %2F) and, when one escape in a component is "
            "invalid, encodes every '%' of that component again (/a%2Fb/%zz -> "
            "/a%252Fb/%25zz, another path). The caller's raw target, already validated by "
            "gunicorn's request-line parser, must reach the upstream byte for byte."
        ),
        needed_by="tests/test_attack_routing.py::test_accepted_target_reaches_the_upstream_byte_for_byte",
    ),
    Patch(
        "plain_head_parser",
        UPSTREAM,
        "http.client",
        "parse_headers",
        _plain_head_parser,
        correctness=False,
        why="plain response heads without the email feed parser: 3.6 us instead of 13 (wire.py)",
    ),
    Patch(
        "one_write_response",
        SERVER,
        "gunicorn.http.wsgi",
        "Response",
        _one_write_response,
        correctness=False,
        why="the response head leaves with the first body bytes, one sendall (worker.OneWriteResponse)",
    ),
    Patch(
        "body_recv_size",
        SERVER,
        "gunicorn.http.unreader",
        "SocketUnreader.max_body_chunk",
        _body_recv_size,
        correctness=False,
        why="request bodies are received 256 KiB at a time instead of 1 MiB: less copying, less memory (body.py)",
    ),
)

_originals: dict[str, object] = {}


class PatchTargetMissing(RuntimeError):
    """A library no longer has what a patch replaces (renamed or removed in a release)."""


def selected(sides: Iterable[str] = (UPSTREAM, SERVER), speedups: bool | None = None) -> list[Patch]:
    """The patches for ``sides``: the correctness ones always, the speed ones unless switched off."""
    if speedups is None:
        speedups = speedups_enabled()
    return [p for p in PATCHES if p.side in sides and (p.correctness or speedups)]


def apply(sides: Iterable[str] = (UPSTREAM, SERVER), speedups: bool | None = None) -> list[str]:
    """Apply the selected patches (idempotent); return their names.

    :raises PatchTargetMissing: a library no longer has an attribute a patch replaces.
    """
    return apply_patches(selected(tuple(sides), speedups))


def apply_patches(chosen: list[Patch]) -> list[str]:
    """Apply ``chosen`` after checking that every attribute they replace exists."""
    for patch in chosen:  # check all before changing any
        try:
            present = hasattr(patch.owner(), patch.leaf)
        except (ImportError, AttributeError):
            present = False
        if not present:
            raise PatchTargetMissing(
                f"patch {patch.name!r}: {patch.module}.{patch.attribute} no longer exists; "
                "the installed library differs from the pinned one (see requirements.txt)"
            )
    for patch in chosen:
        owner = patch.owner()
        replacement = patch.replacement()
        current = getattr(owner, patch.leaf)
        if current is not replacement:
            _originals.setdefault(patch.name, current)
            setattr(owner, patch.leaf, replacement)
    return [p.name for p in chosen]


def revert() -> None:
    """Put back everything :func:`apply` replaced (tests)."""
    for patch in PATCHES:
        if patch.name in _originals:
            setattr(patch.owner(), patch.leaf, _originals.pop(patch.name))


def applied() -> dict[str, bool]:
    """Whether each patch is in place now, by name."""
    return {p.name: getattr(p.owner(), p.leaf) is p.replacement() for p in PATCHES}


def original(name: str) -> object:
    """What a patch replaced (the library's own object), whether or not it is applied now."""
    if name in _originals:
        return _originals[name]
    patch = next(p for p in PATCHES if p.name == name)
    return getattr(patch.owner(), patch.leaf)
