"""The docs stay true to the result files: generated tables are never stale, the README stays a
front page, and its links lead somewhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from docs import chart, generate, markdown, results

ROOT = generate.ROOT
README = ROOT / "README.md"


def test_no_committed_page_differs_from_what_the_generator_makes() -> None:
    stale = [str(page.relative_to(ROOT)) for page in generate.stale()]
    assert not stale, f"stale generated pages {stale}: run `make docs`"


def test_the_chart_readme_and_the_figure_pages_hold_generated_blocks() -> None:
    pages = {str(page.relative_to(ROOT)) for page in generate.pages(ROOT)}
    assert "helm/README.md" in pages
    assert generate.blocks_used() == set(generate.BLOCKS), "a block nobody shows, or a page naming an unknown one"


def test_a_changed_result_file_makes_its_page_stale(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    for rel in ("docs", "bench/results", "reports", "helm"):
        source = ROOT / rel
        for path in source.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                target = copy / path.relative_to(ROOT)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    assert generate.stale(copy) == []

    results = copy / "bench/results/train_throughput.json"
    measured = json.loads(results.read_text())
    measured["rows"][0]["ray_samples_per_s"] = 12345.6
    measured["rows"][0]["commit"] = "abcdef0123456789"
    results.write_text(json.dumps(measured))
    values = copy / "helm/values.yaml"
    values.write_text(re.sub(r"# -- .*", "# -- A description changed in values.yaml.", values.read_text(), count=1))
    assert [page.relative_to(copy) for page in generate.stale(copy)] == [Path("docs/benchmarks.md"),
                                                                         Path("helm/README.md")]
    assert generate.main(["--check"]) == 0  # the real checkout is untouched

    generate.write(copy)
    assert generate.stale(copy) == []
    benchmarks = (copy / "docs/benchmarks.md").read_text()
    assert "12,346" in benchmarks and "`abcdef0123`" in benchmarks  # a row's own commit gets a column
    assert "A description changed in values.yaml." in (copy / "helm/README.md").read_text()


def test_every_documented_chart_value_has_a_row() -> None:
    text = (ROOT / "helm/values.yaml").read_text()
    documented = len(re.findall(r"^\s*# --", text, re.MULTILINE))
    keys = [value.key for value in chart.chart_values(ROOT)]
    assert len(keys) == documented == len(set(keys))
    assert "workerGroups.gpu.tolerations" in keys and "extraEnv.name" not in keys


def test_a_broken_marker_is_an_error_not_a_silent_pass() -> None:
    with pytest.raises(generate.StalePage, match="no END"):
        generate.render("<!-- BEGIN GENERATED: reliability -->\n", ROOT)
    with pytest.raises(generate.StalePage, match="unknown generated block"):
        generate.render("<!-- BEGIN GENERATED: nope -->\n<!-- END GENERATED: nope -->\n", ROOT)


def test_a_figure_without_a_commit_says_so_and_one_with_a_commit_shows_it() -> None:
    assert markdown.commit_of({}) == "not recorded"
    assert markdown.commit_of({"commit": "0123456789abcdef"}, {"commit": "ffff"}) == "`0123456789`"


def test_explained_answers_are_listed_per_class_within_80_columns() -> None:
    report = {"domain": "events", "version": "v3", "profile": "full", "commit": "0123456789abcdef",
              "explained": [{"label": "water_sewer", "confidence": 0.934, "words": [
                  {"word": "gushing", "weight": 0.41}, {"word": "hydrant", "weight": -0.052}],
                  "text": "hydrant on the corner of 5th and Main has been gushing water since this morning, the "
                          "whole street is flooded and cars are driving through it"}]}
    block = results.explained(report, "reports/events.json", "handwritten")
    assert block.startswith("- **water_sewer** (0.93): “hydrant on the corner")
    assert "`gushing` +0.41, `hydrant` -0.05" in block and "`0123456789`" in block
    assert max(len(line) for line in block.splitlines()) <= 80
    assert "cityserve evaluate events" in results.explained({**report, "explained": []}, "r.json", "handwritten")


def test_generated_tables_fit_80_columns() -> None:
    wide = []
    for name, block in generate.BLOCKS.items():
        if name == "helm-values":  # a helm-docs reference table: its descriptions wrap when rendered
            continue
        wide += [f"{name}: {line}" for line in block(ROOT).splitlines() if len(line) > 80]
    assert not wide, "\n".join(wide)


def test_the_readme_is_a_front_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; detail belongs in docs/"
    text = "\n".join(lines)
    assert "make run" in text and "make test" in text


def test_every_docs_link_in_the_readme_resolves_and_every_page_is_linked() -> None:
    text = README.read_text()
    links = set(re.findall(r"\]\((docs/[^)#\s]+\.md)(?:#[^)]*)?\)", text))
    missing = sorted(link for link in links if not (ROOT / link).is_file())
    assert not missing, f"README links to missing pages: {missing}"
    unlinked = sorted(str(page.relative_to(ROOT)) for page in (ROOT / "docs").glob("*.md")
                      if str(page.relative_to(ROOT)) not in links)
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
