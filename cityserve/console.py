"""What every CLI command shares: the console, one-line errors, tables with a --json twin."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any, TypeVar

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.errors import CityServeError, Interrupted
from core.settings import get_settings
from domains import DOMAINS

console = Console()
F = TypeVar("F", bound=Callable[..., Any])
DOMAIN = click.Choice(sorted(DOMAINS))


def friendly_errors(func: F) -> F:
    """Prints the platform's own errors as one clear line (exit 2; 130 when interrupted), never a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CityServeError as exc:
            # soft_wrap: one line even when piped (rich would break it at 80 columns); escape:
            # a message quoting "[...]" is text, not markup.
            console.print(f"[red]error[/red] ({exc.code}): {escape(exc.message)}", soft_wrap=True)
            sys.exit(130 if isinstance(exc, Interrupted) else 2)

    return wrapper  # type: ignore[return-value]


def workspace() -> Any:
    """The configured settings and model registry, resolved once per command and passed down."""
    from training.workspace import Workspace

    return Workspace.from_settings(get_settings())


def open_store() -> Any:
    """The configured tenants database and usage ledger."""
    from services.tenants import Store

    return Store(get_settings().ledger_location())


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], as_json: bool) -> None:
    """A table for people, or JSON (a list of objects) for machines."""
    if as_json:
        click.echo(json.dumps([dict(zip(columns, row, strict=True)) for row in rows], indent=2, default=str))
        return
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    # A column empty in every row (a forecaster's label, a classifier's horizon) is left out: at 80
    # columns it costs the width another needs. --json keeps it.
    shown = [i for i in range(len(columns)) if not rows or any(cell[i] for cell in cells)]
    # No vertical rules: at 80 columns the borders of a seven-column table cost more than a column.
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for n, i in enumerate(shown):
        # The first column names the row: kept whole where it is short enough. Any cell too long
        # for its column wraps rather than ending in "…" ("template_disj…" named no subset).
        whole = n == 0 and all(len(cell[i]) <= 24 for cell in cells)
        table.add_column(columns[i], no_wrap=whole, overflow="fold")
    for cell in cells:
        table.add_row(*[cell[i] for i in shown])
    console.print(table)


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], low: float, high: float) -> str:
    """One character a value, its height from `low` to `high` (clipped); a gap for None."""
    span = (high - low) or 1.0
    return "".join(" " if v is None else SPARKS[round(min(max((v - low) / span, 0.0), 1.0) * (len(SPARKS) - 1))]
                   for v in values)
