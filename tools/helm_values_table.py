"""Write the values table of helm/sluice/README.md from values.yaml and values.schema.json.

    python3 tools/helm_values_table.py           # rewrite the table in the README
    python3 tools/helm_values_table.py --check   # exit 1 if the README's table is stale

One row per value: the chart's own keys are followed down (schema objects with
`additionalProperties: false`); anything free-form (resources, probes, `config`, lists) is
one row whose default is the whole value. The description is the value's `# --` comment in
values.yaml (with the comment lines after it); the type comes from the schema.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

CHART: Final = Path(__file__).resolve().parents[1] / "helm" / "sluice"
START: Final = "<!-- values-table:start -->"
END: Final = "<!-- values-table:end -->"
_KEY: Final = re.compile(r"^( *)([A-Za-z_][A-Za-z0-9_]*):(?: |$)")
_JSON_TYPES: Final = {"integer": "int", "number": "number", "boolean": "bool", "array": "list"}


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    key: str
    type: str
    default: str
    description: str


def descriptions(text: str) -> dict[str, str]:
    """Key path -> its `# --` comment, from the lines of values.yaml (block style)."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    in_list: int | None = None  # indent of the key whose list value is being skipped
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if stripped.startswith("#"):
            comment = stripped[1:].strip()
            if comment.startswith("--"):
                pending = [comment[2:].strip()]
            elif pending is not None:
                pending.append(comment)
            continue
        if not stripped:
            pending = None
            continue
        if in_list is not None and (indent > in_list or stripped.startswith("-")):
            continue
        in_list = None
        if stripped.startswith("-"):
            in_list = stack[-1][0] if stack else 0
            continue
        match = _KEY.match(line)
        if match is None:
            raise ValueError(f"values.yaml: cannot read the line {line!r}")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        if pending is not None:
            found[".".join(key for _, key in stack)] = " ".join(pending).strip()
            pending = None
    return found


def _type(schema: Mapping[str, Any], value: Any) -> str:
    if "enum" in schema:
        return "string"
    kinds = schema.get("type")
    if kinds is None and "oneOf" in schema:
        kinds = [option.get("type") for option in schema["oneOf"]]
    if kinds is None:
        return {bool: "bool", int: "int", float: "number", str: "string", list: "list"}.get(
            type(value), "object"
        )
    names = [kinds] if isinstance(kinds, str) else list(kinds)
    return " or ".join(_JSON_TYPES.get(name, name) for name in names)


def _default(value: Any) -> str:
    return "`" + json.dumps(value, separators=(", ", ": ")) + "`"


def leaves(values: Any, schema: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(key path, value) of every value: the chart's own objects are followed down."""
    properties = schema.get("properties", {})
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in properties:
            raise ValueError(f"values.schema.json does not describe {path}")
        sub = properties[key]
        yield path, value
        if isinstance(value, dict) and sub.get("additionalProperties") is False:
            yield from leaves(value, sub, f"{path}.")


def rows(chart: Path = CHART) -> list[Row]:
    """The table: every value of values.yaml, in file order."""
    text = (chart / "values.yaml").read_text()
    values = yaml.safe_load(text)
    schema = json.loads((chart / "values.schema.json").read_text())
    described = descriptions(text)
    result = []
    for path, value in leaves(values, schema):
        node: Mapping[str, Any] = schema
        for part in path.split("."):
            node = node["properties"][part]
        parent = isinstance(value, dict) and node.get("additionalProperties") is False
        if path not in described:
            if parent:
                continue
            raise ValueError(f"values.yaml: {path} has no `# --` description")
        default = "" if parent else _default(value)
        result.append(Row(path, _type(node, value), default, described[path]))
    return result


def table(chart: Path = CHART) -> str:
    """The Markdown table."""
    lines = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for row in rows(chart):
        cells = [f"`{row.key}`", row.type, row.default, row.description]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def with_table(readme: str, chart: Path = CHART) -> str:
    """The README text with the table between its markers replaced."""
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"README.md needs the markers {START} and {END}")
    return f"{head}{START}\n{table(chart)}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    args = parser.parse_args(argv)
    readme = CHART / "README.md"
    current = readme.read_text()
    wanted = with_table(current)
    if current == wanted:
        return 0
    if args.check:
        print(f"{readme} is stale: run python3 tools/helm_values_table.py", file=sys.stderr)
        return 1
    readme.write_text(wanted)
    print(f"wrote the values table of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
