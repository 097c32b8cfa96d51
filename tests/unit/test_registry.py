"""Registry semantics: numbering, stages, promotion checks, rollback, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from domains.errors import RegistryError
from training.registry import Registry


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.pt").write_bytes(b"weights")
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "registry"))


def test_versions_number_up_and_start_as_candidates(registry: Registry, model_dir: Path) -> None:
    a = registry.register("energy", model_dir, {"metrics": {"val_mape": 0.1}})
    b = registry.register("energy", model_dir, {"metrics": {"val_mape": 0.2}})
    assert [a.version, b.version] == ["v1", "v2"]
    assert [v.stage for v in registry.versions("energy")] == ["candidate", "candidate"]
    assert b.record["code_revision"] and b.record["created"]
    assert registry.get("energy", "latest").version == "v2"
    assert (Path(registry.root) / "energy" / "v1" / "model.pt").read_bytes() == b"weights"


def test_no_production_is_a_clear_error(registry: Registry, model_dir: Path) -> None:
    registry.register("energy", model_dir, {})
    with pytest.raises(RegistryError, match="no production version"):
        registry.get("energy", "production")
    with pytest.raises(RegistryError, match="no version 'v9'"):
        registry.get("energy", "v9")


def test_promote_and_rollback_move_the_production_pointer(registry: Registry, model_dir: Path) -> None:
    for _ in range(3):
        registry.register("traffic", model_dir, {})
    registry.promote("traffic", "v1")
    registry.promote("traffic", "v3")
    assert registry.get("traffic").version == "v3"
    assert {v.version: v.stage for v in registry.versions("traffic")} == {
        "v1": "archived", "v2": "candidate", "v3": "production"}
    assert registry.rollback("traffic").version == "v1"
    assert registry.get("traffic", "production").version == "v1"
    with pytest.raises(RegistryError, match="no earlier production"):
        registry.rollback("traffic")


def test_promotion_refused_when_files_do_not_load(registry: Registry, model_dir: Path) -> None:
    registry.register("events", model_dir, {})
    registry.register("events", model_dir, {})
    registry.promote("events", "v1")

    def verify(path: Path) -> None:
        json.loads((path / "config.json").read_text())
        (path / "meta.json").read_text()  # v2 lacks it

    with pytest.raises(RegistryError, match=r"does not load.*production is unchanged"):
        registry.promote("events", "v2", verify=verify)
    assert registry.get("events").version == "v1"


def test_crash_mid_register_leaves_no_version(registry: Registry, model_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    registry.register("sentiment", model_dir, {})

    def explode(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", explode)
    with pytest.raises(OSError, match="disk full"):
        registry.register("sentiment", model_dir, {})
    assert [v.version for v in registry.versions("sentiment")] == ["v1"]
    leftovers = [p.name for p in (Path(registry.root) / "sentiment").iterdir() if p.name.startswith(".incoming")]
    assert leftovers == []


def test_folder_without_version_file_is_not_a_version(registry: Registry, model_dir: Path) -> None:
    registry.register("energy", model_dir, {})
    (Path(registry.root) / "energy" / "v2").mkdir()  # e.g. a copy to object storage cut short
    assert [v.version for v in registry.versions("energy")] == ["v1"]
    assert registry.register("energy", model_dir, {}).version == "v3"


def test_promote_and_rollback_bump_the_generation_replicas_reload_on(registry: Registry, model_dir: Path) -> None:
    a = registry.register("energy", model_dir, {})
    b = registry.register("energy", model_dir, {})
    assert registry.generation("energy") == 0
    registry.promote("energy", a.version)
    registry.promote("energy", b.version)
    assert registry.generation("energy") == 2
    registry.rollback("energy")
    assert registry.generation("energy") == 3
    assert registry.get("energy").version == a.version
