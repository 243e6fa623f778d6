"""A config file's YAML tree: safe loading, duplicate keys refused, errors naming file, line
and column; `${VAR}` expansion that reports every missing variable."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Final

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node

_MERGE_TAG: Final = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    (Plain YAML loading keeps the last value silently: a second `routes:` would replace the
    first.) Keys merged in with `<<: *anchor` may still be overridden, as YAML intends.
    """

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=False)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class says what is wrong
                continue
            if first is not key_node:
                raise ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given at line {first.start_mark.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """The YAML document in `text` (None when empty); yaml.YAMLError when it is not valid."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _at(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def describe_yaml_error(err: yaml.YAMLError, source: str) -> str:
    """One line naming the file, the line and column, and what is wrong."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return f"{source}: not valid YAML: {err}"
    mark = err.problem_mark or err.context_mark
    where = f"{source}, {_at(mark)}" if mark is not None else source
    problem = err.problem or err.context or "invalid"
    if err.problem and err.context:
        context = err.context
        if err.context_mark is not None and err.context_mark is not mark:
            context += f" at {_at(err.context_mark)}"
        problem += f" ({context})"
    return f"{where}: not valid YAML: {problem}"


_ENV_REF: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, path: str, env: Mapping[str, str], missing: dict[str, str]) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string of a YAML tree.

    A variable that is not set (and has no default) stays as written and is recorded in
    `missing` (key path -> problem), so every missing variable is reported in one run.
    """
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            missing[path] = f"{path}: environment variable {name} is not set"
            return match.group(0)

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {
            k: _expand(v, f"{path}.{k}" if path else str(k), env, missing) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]", env, missing) for i, v in enumerate(value)]
    return value


def expand_env(data: Any, env: Mapping[str, str] | None = None) -> tuple[Any, dict[str, str]]:
    """The tree with `${VAR}` references expanded, and the problems of the missing ones."""
    missing: dict[str, str] = {}
    return _expand(data, "", os.environ if env is None else env, missing), missing


def placeholder_consequence(loc: str, line: str, missing: Mapping[str, str]) -> bool:
    """Whether a problem at `loc` is only a consequence of an unexpanded `${VAR}` placeholder
    (it sits at or above a missing variable's key), which its own problem already reports.
    An unknown key is always its own problem."""
    if line.endswith(": unknown key"):
        return False
    return any(p == loc or p.startswith((loc + ".", loc + "[")) for p in missing)
