"""Generates every table of figures in docs/ and the chart's values reference, so none is typed by hand.

    .venv/bin/python -m docs.generate            # rewrite the generated blocks that are stale
    .venv/bin/python -m docs.generate --check    # exit 1 naming each stale page; write nothing

The pages are hand-written. A generated block sits between two markers,

    <!-- BEGIN GENERATED: name -->
    <!-- END GENERATED: name -->

and only what lies between them is replaced, from `bench/results/*.json`, `reports/*.json` (in the
shapes of their result schemas) or `helm/values.yaml` (its `# --` comments, the way helm-docs reads a chart).
Every block names the file it comes from and the commit its figures were measured at, where the file
records one. Tables stay within 80 columns: one idea per table, the columns that matter.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from docs import chart, results

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- BEGIN GENERATED: {} -->"
END = "<!-- END GENERATED: {} -->"
BLOCK = re.compile(r"<!-- BEGIN GENERATED: (?P<name>[a-z0-9-]+) -->\n?(?P<body>.*?)<!-- END GENERATED: (?P=name) -->",
                   re.DOTALL)
MARKER = re.compile(r"<!-- (BEGIN|END) GENERATED: ([^ ]+) -->")

class StalePage(Exception):
    """A page whose markers are broken (unknown name, unpaired BEGIN/END)."""


# ---- pages ---------------------------------------------------------------------------------------

BLOCKS: dict[str, Callable[[Path], str]] = {
    "eval-traffic": results.eval_traffic,
    "eval-energy": results.eval_energy,
    "eval-events": results.eval_events,
    "eval-sentiment": results.eval_sentiment,
    "eval-energy-sweep": results.eval_energy_sweep,
    "explained-events": results.explained_events,
    "explained-sentiment": results.explained_sentiment,
    "chinese-path": results.chinese_path,
    "pii": results.pii,
    "train-throughput": results.train_throughput,
    "tune-efficiency": results.tune_efficiency,
    "inference": results.inference,
    "serve-throughput": results.serve_throughput,
    "serve-latency": results.serve_latency,
    "serve-targets": results.serve_targets,
    "serve-gpu": results.serve_gpu,
    "autoscale": results.autoscale,
    "reliability": results.reliability,
    "learning-loop": results.learning_loop,
    "cluster": results.cluster,
    "helm-values": chart.helm_values,
    "readme-values": chart.readme_values,
}


def pages(root: Path) -> list[Path]:
    """The pages that may hold generated blocks: docs/*.md and the chart's README."""
    found = sorted((root / "docs").glob("*.md"))
    chart = root / "helm" / "README.md"
    return found + ([chart] if chart.is_file() else [])


def render(text: str, root: Path, where: str = "page") -> str:
    """TEXT with every generated block rebuilt; raises StalePage on a broken or unknown marker."""
    names = MARKER.findall(text)
    opened: list[str] = []
    for kind, name in names:
        if name not in BLOCKS:
            raise StalePage(f"{where}: unknown generated block {name!r} (known: {', '.join(sorted(BLOCKS))})")
        if kind == "BEGIN":
            if opened:
                raise StalePage(f"{where}: block {name!r} begins inside {opened[-1]!r}")
            opened.append(name)
        elif not opened or opened.pop() != name:
            raise StalePage(f"{where}: END of block {name!r} without its BEGIN")
    if opened:
        raise StalePage(f"{where}: block {opened[-1]!r} has no END marker")

    def rebuild(match: re.Match[str]) -> str:
        name = match["name"]
        return f"{BEGIN.format(name)}\n{BLOCKS[name](root).rstrip()}\n{END.format(name)}"

    return BLOCK.sub(rebuild, text)


def stale(root: Path = ROOT) -> list[Path]:
    """The pages whose committed text differs from what this script generates."""
    return [page for page in pages(root) if render(page.read_text(), root, str(page)) != page.read_text()]


def blocks_used(root: Path = ROOT) -> set[str]:
    """Names of the generated blocks the pages hold."""
    return {name for page in pages(root) for kind, name in MARKER.findall(page.read_text()) if kind == "BEGIN"}


def write(root: Path = ROOT) -> list[Path]:
    """Rewrites the stale pages; returns them."""
    changed = stale(root)
    for page in changed:
        page.write_text(render(page.read_text(), root, str(page)))
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 naming each stale page; write nothing")
    args = parser.parse_args(argv)
    try:
        if args.check:
            out_of_date = stale()
            for page in out_of_date:
                print(f"stale: {page.relative_to(ROOT)} (run `.venv/bin/python -m docs.generate`)", file=sys.stderr)
            return 1 if out_of_date else 0
        for page in write():
            print(f"wrote {page.relative_to(ROOT)}")
    except StalePage as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
