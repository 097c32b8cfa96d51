"""Markdown for the generated blocks: tables within 80 columns, wrapped captions, figures, and
the result files they are read from (each block says its file and the commit of its figures)."""

from __future__ import annotations

import functools
import json
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

Json = dict[str, Any]


# ---- reading result files ------------------------------------------------------------------------

def load(root: Path, rel: str) -> Json | None:
    """The JSON document at ROOT/REL, or None when the file does not exist (not measured yet)."""
    path = root / rel
    if not path.is_file():
        return None
    document: Json = json.loads(path.read_text())
    return document


def commit_of(*documents: Mapping[str, Any]) -> str:
    """The first `commit` found (a row's own before its file's), as a short hash or 'not recorded'."""
    for document in documents:
        commit = document.get("commit")
        if isinstance(commit, str) and commit:
            return f"`{commit[:10]}`"
    return "not recorded"


def rows_carry_commits(rows: Iterable[Mapping[str, Any]], top: Mapping[str, Any]) -> bool:
    """Whether some row was measured at another commit than its file says (then a column shows it)."""
    return any(row.get("commit") and row.get("commit") != top.get("commit") for row in rows)


def result_table(rows: Iterable[Mapping[str, Any]], document: Mapping[str, Any], header: Sequence[str],
                 align: str, cells: Callable[[Any], list[str]]) -> str:
    """A table of one result file's rows; a `commit` column when some row was measured at another
    commit than its file says."""
    rows = list(rows)
    by_row = rows_carry_commits(rows, document)
    body = [cells(row) + ([commit_of(row, document)] if by_row else []) for row in rows]
    return table([*header, *(["commit"] if by_row else [])], body, align + ("l" if by_row else ""))


def file_commit(rows: Iterable[Mapping[str, Any]], document: Mapping[str, Any], per_row: str = "per row") -> str:
    """The caption's commit: the file's, or where rows carry their own, where to find them."""
    return per_row if rows_carry_commits(rows, document) else commit_of(document)


def source(files: Sequence[str], commit: str, *extra: str) -> str:
    """The caption under a table: where the figures come from and which code they belong to."""
    names = ", ".join(f"`{name}`" for name in files)
    parts = [f"From {names}", f"commit {commit}", *extra]
    return wrap("*" + "; ".join(parts) + ".*")


def missing(rel: str, command: str) -> str:
    return wrap(f"*No `{rel}` yet: `{command}` writes it.*")


def from_result(rel: str, command: str) -> Callable[[Callable[[Json, str], str]], Callable[[Path], str]]:
    """A generated block built from one result file `rel`; where the file is missing, the block
    says which `command` writes it."""
    def block(build: Callable[[Json, str], str]) -> Callable[[Path], str]:
        @functools.wraps(build)
        def from_root(root: Path) -> str:
            document = load(root, rel)
            return missing(rel, command) if document is None else build(document, rel)
        return from_root
    return block


# ---- formatting ----------------------------------------------------------------------------------

def num(value: float | None, digits: int = 1) -> str:
    """A figure with thousands separators; `—` for a missing one."""
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def rate(value: float) -> str:
    """Items or samples a second: whole numbers from 1,000 up, one decimal below."""
    return num(value, 0 if abs(value) >= 1000 else 1)


WIDTH = 80
LINE_START = re.compile(r"^([-+*>]|#+|\d+[.)])$")  # what would start a list, quote or heading


def wrap(text: str, indent: str = "") -> str:
    """TEXT as lines of at most 80 characters (a longer word stands alone), continuation lines
    indented by INDENT; never starts a line with a word Markdown would read as a list or heading."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > WIDTH and not LINE_START.match(word):
            lines.append(line)
            line = indent + word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n".join(lines)


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> str:
    """A Markdown table; `align` is one letter per column (l or r), right for figures by default."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


