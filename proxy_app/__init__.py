"""proxy_app: a synchronous pass-through proxy for LiteLLM-style ``pass_through_endpoints``.

``create_app`` is resolved on first use (PEP 562 module ``__getattr__``) from
:mod:`proxy_app.factory`: importing this package, :mod:`proxy_app.cli` or
:mod:`proxy_app.config` must not import prometheus_client, which fixes its value storage
at import time, before the gunicorn settings have set PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# The version when no package metadata is found (running from a checkout that was never
# installed); pyproject.toml's version is the source of truth and a test keeps them equal.
__version__ = "0.1.0"

__all__ = ["__version__", "create_app", "package_version"]

if TYPE_CHECKING:
    from proxy_app.factory import create_app


def package_version() -> str:
    """The installed distribution's version, else :data:`__version__`."""
    from importlib import metadata

    try:
        return metadata.version("proxy-app")
    except metadata.PackageNotFoundError:
        return __version__


def __getattr__(name: str):
    if name == "create_app":
        from proxy_app.factory import create_app

        globals()["create_app"] = create_app  # later lookups skip this function
        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
