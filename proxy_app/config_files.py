"""The files a config is made of: YAML parsing and LiteLLM's top-level ``include:``.

``include:`` is a list of YAML files, each relative to the directory of the file that names
it, whose top-level mappings are merged into the including file (LiteLLM's
``ProxyConfig._process_includes`` in litellm/proxy/proxy_server.py). LiteLLM extends a
top-level list and lets the included file replace anything else, so an included
``general_settings`` there silently drops the main file's ``master_key``. Here the merge is
deep and never silent:

- mappings are merged key by key, at every depth;
- lists are concatenated, the including file's items first, then each include in order
  (so ``pass_through_endpoints`` from several files add up);
- the same scalar in two files is fine if both say the same; anything else is an error
  naming both files and the field, never the values.

Included files may include others, each relative to its own directory. A file that
includes one of its includers (a cycle) or a file included twice is an error.

Every part of the merged tree remembers the file it came from (:class:`Tree`), so that a
problem found later by the validator names the file the user has to open.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field

import yaml

INCLUDE = "include"
MAPPING_SOURCE = "<config>"


class ConfigError(Exception):
    """The configuration cannot be served; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" merges; its keys may be overridden on purpose
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be plain scalars", key_node.start_mark
                ) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> object:
    """Parse a YAML file, turning I/O and syntax problems into a ConfigError naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError([f"{where}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None


Place = tuple  # a place in the tree: mapping keys and list indexes, ("general_settings", "pass_through_endpoints", 2)


@dataclass
class Tree:
    """The merged top level, and for every place in it the file (and list index) it came from.

    ``origins`` maps a path to its file, or, for a list item, to ``(file, index in that file)``;
    a path not recorded takes the origin of its nearest recorded parent.
    """

    raw: object
    source: str
    origins: dict[Place, str | tuple[str, int]] = field(default_factory=dict)

    def file_of(self, path: Place) -> str:
        for end in range(len(path), 0, -1):
            origin = self.origins.get(path[:end])
            if origin is not None:
                return origin if isinstance(origin, str) else origin[0]
        return self.source

    def item_of(self, path: Place) -> tuple[str, int]:
        """(file, index in that file) of the list item at ``path``."""
        origin = self.origins.get(path)
        if isinstance(origin, tuple):
            return origin
        return self.file_of(path), path[-1]


def dotted(path: Place) -> str:
    """("general_settings", "pass_through_endpoints", 2) -> general_settings.pass_through_endpoints[2]"""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def tree_of_mapping(raw: object) -> Tree:
    """A config given as an already-parsed mapping: one source, includes refused."""
    tree = Tree(raw, MAPPING_SOURCE)
    if isinstance(raw, Mapping) and INCLUDE in raw:
        raise ConfigError([f"{MAPPING_SOURCE}: {INCLUDE}: needs a config file (its paths are relative to the file's directory)"])
    _record(tree.origins, (), raw, MAPPING_SOURCE)
    return tree


def read_tree(path: str) -> Tree:
    """Read ``path`` and everything it includes into one Tree.

    :raises ConfigError: listing every problem found in every file.
    """
    reader = _Reader()
    raw, origins = reader.read(path, ())
    if reader.problems:
        raise ConfigError(reader.problems)
    return Tree(raw, path, origins)


class _Reader:
    def __init__(self):
        self.problems: list[str] = []
        self.included_by: dict[str, str] = {}  # realpath of every file read -> who included it

    def read(self, path: str, chain: tuple[str, ...], via: str = "") -> tuple[object, dict]:
        """One file with its includes merged in; ``chain`` holds the real paths of its includers
        and ``via`` names the include that led here."""
        try:
            raw = read_yaml(path)
        except ConfigError as exc:
            self.problems += [f"{problem} (from {via})" if via else problem for problem in exc.problems]
            return {}, {}
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            if not chain:
                return raw, {}  # the validator says the top level must be a mapping
            self.problems.append(f"{path}: the top level of an included file must be a mapping")
            return {}, {}
        merged = {k: v for k, v in raw.items() if k != INCLUDE}
        origins: dict = {}
        _record(origins, (), merged, path)
        includes = raw.get(INCLUDE)
        if includes is None:
            return merged, origins
        if not isinstance(includes, list):
            self.problems.append(f"{path}: {INCLUDE}: must be a list of file paths (relative to this file's directory)")
            return merged, origins
        chain = (*chain, os.path.realpath(path))
        for index, name in enumerate(includes):
            where = f"{path}: {INCLUDE}[{index}]"
            if not isinstance(name, str) or not name:
                self.problems.append(f"{where}: must be a file path, got {type(name).__name__}")
                continue
            included = os.path.join(os.path.dirname(path), name)
            real = os.path.realpath(included)
            if real in chain:
                self.problems.append(f"{where}: {included} is already being read (include cycle); remove one of the includes")
                continue
            if real in self.included_by:
                self.problems.append(f"{where}: {included} is already included by {self.included_by[real]}; include each file once")
                continue
            self.included_by[real] = path
            sub, sub_origins = self.read(included, chain, via=where)
            if isinstance(sub, Mapping):
                _merge(merged, origins, sub, sub_origins, (), self.problems)
        return merged, origins


def _record(origins: dict, path: Place, value: object, file: str) -> None:
    """Note ``file`` as the origin of ``value`` and everything in it."""
    origins[path] = file
    if isinstance(value, Mapping):
        for key, item in value.items():
            _record(origins, (*path, key), item, file)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _record(origins, (*path, index), item, file)
            origins[(*path, index)] = (file, index)


def _file(origins: dict, path: Place) -> str:
    origin = origins[path]
    return origin if isinstance(origin, str) else origin[0]


def _kind(value: object) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "a value"


def _merge(dst: dict, dst_origins: dict, src: Mapping, src_origins: dict, path: Place, problems: list[str]) -> None:
    """Merge ``src`` into ``dst`` (a fresh dict owned by the caller) at ``path``."""
    for key, value in src.items():
        here = (*path, key)
        if key not in dst:
            dst[key] = value
            _move(src_origins, here, dst_origins, here, 0)
            continue
        old = dst[key]
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            dst[key] = dict(old)
            _merge(dst[key], dst_origins, value, src_origins, here, problems)
        elif isinstance(old, list) and isinstance(value, list):
            dst[key] = [*old, *value]
            _move(src_origins, here, dst_origins, here, len(old), items_only=True)
        elif type(old) is type(value) and old == value:
            continue
        else:
            new_file, old_file = _file(src_origins, here), _file(dst_origins, here)
            detail = (
                f"is {_kind(value)} here and {_kind(old)} in {old_file}"
                if _kind(value) != _kind(old)
                else f"is also set in {old_file}, to a different value"
            )
            problems.append(f"{new_file}: {dotted(here)}: {detail}; set it in one file only")


def _move(src: dict, src_at: Place, dst: dict, dst_at: Place, offset: int, items_only: bool = False) -> None:
    """Copy the origins under ``src_at`` to ``dst_at``, shifting list item ``src_at[i]`` by ``offset``."""
    depth = len(src_at)
    for path, origin in src.items():
        if path[:depth] != src_at or (items_only and len(path) == depth):
            continue
        rest = path[depth:]
        if rest and offset:
            rest = (rest[0] + offset, *rest[1:])
        dst[dst_at + rest] = origin
