"""LiteLLM's top-level ``environment_variables:`` section, as a pure rule.

LiteLLM copies each ``NAME: value`` of this mapping into ``os.environ`` while it loads the
config (``ProxyConfig._load_environment_variables`` in litellm/proxy/proxy_server.py), so
``os.environ/NAME`` references resolved afterwards see them, and a config value wins over
the process environment. A value that is itself ``os.environ/OTHER`` copies that variable
(resolved against the process environment) and is skipped when OTHER is not set.

proxy_app applies the section to the ``os.environ/`` references (and the
``LITELLM_MASTER_KEY`` fallback) of the same config, with the same precedence, but does not
export it into the process environment: the config stays a pure function of (files,
environment), so ``check``, tests and a HUP reload all see exactly what the file says, and a
variable removed from the file does not linger in the master after a reload. Settings the
process itself reads (``PROXY_THREADS``, ``WEB_CONCURRENCY``, ...) are read before any config
is, so they could not come from here anyway.

Values are strings; numbers are written as YAML spelled them (``str()``) and booleans as
``true``/``false``, the same coercion as header values. A null, a list or a mapping is an
error. No message ever carries a value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

SECTION = "environment_variables"
ENV_PREFIX = "os.environ/"
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def scalar_text(value: object) -> str | None:
    """A YAML scalar as the string an environment variable or a header would carry."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def config_environment(
    raw: object, environ: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str], list[tuple[tuple, str]]]:
    """Evaluate an ``environment_variables`` section against the process ``environ``.

    Returns ``(values, unset_aliases, problems)``: the variables to lay over ``environ``;
    the names whose value was ``os.environ/OTHER`` with OTHER unset (name -> OTHER), so a
    reference to them can say why; and problems as ``(place, message)``, ``place`` being
    the field's path in the config tree.
    """
    if raw is None:
        return {}, {}, []
    if not isinstance(raw, Mapping):
        return {}, {}, [((SECTION,), f"must be a mapping of variable name to value, got {type(raw).__name__}")]
    values: dict[str, str] = {}
    unset: dict[str, str] = {}
    problems: list[tuple[tuple, str]] = []
    for name, value in raw.items():
        place = (SECTION, name)
        if not isinstance(name, str) or not ENV_NAME_RE.fullmatch(name):
            problems.append((place, "is not a valid environment variable name (letters, digits and _, not starting with a digit)"))
            continue
        text = scalar_text(value)
        if text is None:
            problems.append((place, f"must be a string, a number or a boolean, got {type(value).__name__}"))
            continue
        if "\x00" in text:
            problems.append((place, "value contains NUL"))
            continue
        if text.startswith(ENV_PREFIX):
            other = text[len(ENV_PREFIX) :]
            if not ENV_NAME_RE.fullmatch(other):
                problems.append((place, f"{ENV_PREFIX} must be followed by a variable name and nothing else"))
            elif other in environ:
                values[name] = environ[other]
            else:
                unset[name] = other
            continue
        values[name] = text
    return values, unset, problems
