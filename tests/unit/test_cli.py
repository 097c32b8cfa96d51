"""The CLI's registry verbs and its errors: one clear line, exit 2, no traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cityserve import cli
from core.settings import get_settings
from training.registry import Registry


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    monkeypatch.setenv("CITYSERVE_REGISTRY_URI", str(tmp_path / "registry"))
    get_settings.cache_clear()
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.pt").write_bytes(b"x")
    reg = Registry(str(tmp_path / "registry"))
    reg.register("energy", model, {"metric": "val_mape", "metrics": {"val_mape": 0.05}, "profile": "quick"})
    yield reg
    get_settings.cache_clear()


def test_models_list_json(registry: Registry) -> None:
    out = CliRunner().invoke(cli.main, ["models", "list", "energy", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert rows[0]["version"] == "v1" and rows[0]["stage"] == "candidate" and rows[0]["value"] == 0.05


def test_unknown_version_is_a_clear_error(registry: Registry) -> None:
    out = CliRunner().invoke(cli.main, ["models", "show", "energy", "v7"])
    assert out.exit_code == 2
    assert "no version 'v7'" in out.output and "Traceback" not in out.output


def test_a_long_error_stays_one_line(registry: Registry) -> None:
    # Piped, rich would break it at 80 columns; scripts and logs read errors line by line.
    (Path(registry.root) / "energy" / "v1" / "model.pt").write_bytes(b"y")
    out = CliRunner().invoke(cli.main, ["models", "promote", "energy", "v1", "--yes"])
    assert out.exit_code == 2
    [line] = out.output.strip().splitlines()
    assert len(line) > 80 and line.startswith("error (registry): energy v1: model.pt does not match")


def test_optimize_refuses_a_domain_without_optimised_artifacts(registry: Registry) -> None:
    out = CliRunner().invoke(cli.main, ["models", "optimize", "energy", "v1"])
    assert out.exit_code == 2
    assert out.output.strip() == "error (bad_config): energy has no optimised artifacts: its models serve with PyTorch"


def test_promote_asks_for_confirmation(registry: Registry) -> None:
    out = CliRunner().invoke(cli.main, ["models", "rollback", "energy"], input="n\n")
    assert out.exit_code == 1 and "Aborted" in out.output


def test_unknown_domain_is_refused() -> None:
    out = CliRunner().invoke(cli.main, ["train", "weather"])
    assert out.exit_code == 2 and "weather" in out.output


def test_an_unknown_placement_is_refused_naming_the_choices() -> None:
    out = CliRunner().invoke(cli.main, ["train", "energy", "--placement", "SPRED"])
    assert out.exit_code == 2 and "'SPRED' is not one of" in out.output and "SPREAD" in out.output


def test_new_key_prints_a_fresh_key_and_its_tenants_file_entry_which_key_entry_repeats() -> None:
    import yaml

    from services.tenants import split_key

    outputs = [CliRunner().invoke(cli.main, ["tenants", "new-key"]).output.splitlines() for _ in range(2)]
    keys, entries = [o[1] for o in outputs], [yaml.safe_load(o[3])[0] for o in outputs]
    assert keys[0] != keys[1] and [split_key(k) for k in keys] == [(e["id"], e["sha256"]) for e in entries]
    assert json.loads(CliRunner().invoke(cli.main, ["tenants", "new-key", "--json"]).output).keys() == {
        "key", "id", "sha256"}
    converted = CliRunner().invoke(cli.main, ["tenants", "key-entry"], input=f"{keys[0]}\n\n{keys[1]}\n")
    assert converted.exit_code == 0 and yaml.safe_load(converted.output) == entries
    secret = keys[0].split("_", 2)[2]
    typo = CliRunner().invoke(cli.main, ["tenants", "key-entry"], input=f"{keys[1]}\ncsk{secret}\n")
    assert typo.exit_code == 2 and "line 2" in typo.output and secret not in typo.output


def test_the_cli_refuses_to_change_a_tenant_the_tenants_file_manages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.tenants import KeyEntry, Store, TenantEntry, new_key

    monkeypatch.setenv("CITYSERVE_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    get_settings.cache_clear()
    store = Store(get_settings().ledger_location())
    store.sync_tenants([TenantEntry(name="grid", grants=["energy"], requests_per_minute=5, items_per_minute=5,
                                    max_concurrent=1, keys=[KeyEntry.of(new_key()[0])])])
    out = CliRunner().invoke(cli.main, ["tenants", "revoke", "grid", "--yes"])
    assert out.exit_code == 2 and "managed by the tenants file" in out.output and "remove the tenant" in out.output
    listed = json.loads(CliRunner().invoke(cli.main, ["tenants", "list", "--json"]).output)
    assert [(t["tenant"], t["state"], t["managed by"]) for t in listed] == [("grid", "active", "file")]
    get_settings.cache_clear()


def test_evaluate_prints_how_far_the_confidence_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    from domains.base import Evaluation, MetricRow
    from training import evaluate

    calibration = {"temperature": 0.78, "uncertain_below": 0.61, "subsets": {
        "handwritten": {"ece_before": 0.098, "ece_after": 0.047, "share": 0.12, "accuracy_flagged": 0.57,
                        "accuracy_rest": 0.965},
        "holdout_templates": {"ece_before": 0.03, "ece_after": 0.02, "share": 0.0, "accuracy_flagged": None,
                              "accuracy_rest": 0.92}}}
    rows = [MetricRow(subset, "priority_macro_f1", 0.84, {"tfidf_logreg": 0.79})
            for subset in ("handwritten", "template_disjoint")]
    evaluation = Evaluation(rows, calibration=calibration)
    monkeypatch.setattr(evaluate, "evaluate", lambda *args: ({"version": "v1"}, evaluation))
    out = CliRunner().invoke(cli.main, ["evaluate", "events"], env={"COLUMNS": "80"})
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert "temperature 0.78, uncertain below 0.61" in out.output
    assert all(len(line) <= 80 for line in lines) and "…" not in out.output  # names wrap, never cut
    # a classifier's rows have no horizon and no label: those columns are left out
    assert next(line for line in lines if "subset" in line and "metric" in line).split() == [
        "subset", "metric", "v1", "baselines"]
    assert next(line for line in lines if "template_disjoint" in line).split()[:3] == [
        "template_disjoint", "priority_macro_f1", "0.84"]
    row = next(line for line in lines if "12%" in line)
    assert row.split() == ["handwritten", "0.098", "0.047", "12%", "0.57", "0.965"]
    row = next(line for line in lines if "holdout_templates" in line)
    assert row.split() == ["holdout_templates", "0.03", "0.02", "0%", "—", "0.92"]  # nothing flagged


def test_keeping_personal_data_is_a_choice_of_the_text_domains_only() -> None:
    out = CliRunner().invoke(cli.main, ["data", "prepare", "energy", "--keep-personal-data"])
    assert out.exit_code == 2 and "applies to the text domains (events, sentiment)" in out.output
