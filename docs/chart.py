"""The chart's values reference: every key of `helm/values.yaml` with its `# --` comment, type and
default, the way helm-docs reads a chart."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from docs.markdown import Json, table

# ---- the chart's values reference (helm/values.yaml) ---------------------------------------------

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?:\s|$)")


@dataclass(frozen=True)
class Value:
    """One documented key of values.yaml."""

    key: str
    type: str
    default: str
    description: str


def documented_keys(text: str) -> list[tuple[str, str]]:
    """(dotted key, description) for each key preceded by a `# --` comment, in file order. A comment
    block starts at `# --`, goes on over the `#` lines after it and belongs to the next key; lines of
    list items (`- ...` and what is indented under them) are values, never keys."""
    out: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] | None = None
    list_indent: int | None = None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if not stripped:
            comment = None
            continue
        if stripped.startswith("#"):
            body = stripped.lstrip("#").strip()
            if stripped.startswith("# --"):
                comment = [stripped[4:].strip()]
            elif comment is not None:
                comment.append(body)
            continue
        if list_indent is not None and (indent > list_indent or (indent == list_indent and stripped.startswith("-"))):
            continue
        list_indent = None
        if stripped.startswith("-"):
            list_indent = indent
            continue
        match = KEY_LINE.match(line)
        if match is None:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if comment is not None:
            out.append((".".join(key for _, key in stack), " ".join(part for part in comment if part)))
            comment = None
    return out


def lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def schema_at(schema: Json, dotted: str) -> Json:
    node: Json = schema
    for part in dotted.split("."):
        node = node.get("properties", {}).get(part, {})
    return node


def type_name(value: Any, schema: Json) -> str:
    """The value's type as helm-docs writes it; the schema decides for a null default."""
    names = {"string": "string", "integer": "int", "number": "float", "boolean": "bool", "array": "list",
             "object": "object", "null": "null", "str": "string"}
    declared = schema.get("type")
    if value is None and declared:
        kinds = [str(kind) for kind in (declared if isinstance(declared, list) else [declared])]
        return " or ".join(names.get(kind, kind) for kind in kinds)
    if value is None and "enum" in schema:
        kinds = sorted({type(v).__name__ for v in schema["enum"] if v is not None})
        return " or ".join([names.get(kind, kind) for kind in kinds] + ["null"])
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object" if isinstance(value, dict) else "null"


def chart_values(root: Path) -> list[Value]:
    text = (root / "helm/values.yaml").read_text()
    values = yaml.safe_load(text)
    schema_path = root / "helm/values.schema.json"
    schema: Json = json.loads(schema_path.read_text()) if schema_path.is_file() else {}
    keys = documented_keys(text)
    names = [key for key, _ in keys]
    out = []
    for key, description in keys:
        value = lookup(values, key)
        children = [name[len(key) + 1:] for name in names if name.startswith(key + ".")]
        default = "`" + json.dumps(without(value, children), separators=(",", ":"), ensure_ascii=False) + "`"
        if children:  # documented in rows of their own: the default shows only what they leave out
            default = "keys below" if default == "`{}`" else f"{default} and keys below"
        out.append(Value(key, type_name(value, schema_at(schema, key)), default, description))
    return out


def without(tree: Any, dotted: Iterable[str]) -> Any:
    """TREE less the DOTTED keys (and what is left empty by removing them)."""
    if not isinstance(tree, dict):
        return tree
    drop = list(dotted)
    out = {}
    for key, value in tree.items():
        if key in drop:
            continue
        below = [name[len(key) + 1:] for name in drop if name.startswith(key + ".")]
        if below:
            value = without(value, below)
            if value == {}:
                continue
        out[key] = value
    return out


def helm_values(root: Path) -> str:
    rows = [[f"`{v.key}`", v.type, v.default, v.description] for v in chart_values(root)]
    return "\n\n".join([table(["key", "type", "default", "description"], rows, "llll"),
                        "*From the `# --` comments of `helm/values.yaml`; types from `helm/values.schema.json` "
                        "where the default is null.*"])




# ---- the deployment example (helm/ci/readme-values.yaml) -----------------------------------------

def readme_values(root: Path) -> str:
    """The values example of the Kubernetes page, from the file the chart's tests render, so the page
    shows what was tested (its leading comment, which says why the file exists, is left out)."""
    lines = (root / "helm" / "ci" / "readme-values.yaml").read_text().splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    body = "\n".join(lines)
    return f"```yaml\n# my-values.yaml\n{body}\n```"
