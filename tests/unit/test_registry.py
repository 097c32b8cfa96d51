"""Registry semantics: numbering, stages, promotion checks, rollback, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.errors import RegistryError
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


def test_a_removed_versions_number_is_not_given_again(registry: Registry, model_dir: Path) -> None:
    registry.register("energy", model_dir, {})
    removed = registry.register("energy", model_dir, {})
    shutil.rmtree(Path(registry.root) / "energy" / removed.version)
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


def _stages_file(registry: Registry, domain: str) -> bytes:
    return (Path(registry.root) / domain / "stages.json").read_bytes()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "swap"])
def test_promotion_refused_when_a_file_changed_since_registration(registry: Registry, model_dir: Path,
                                                                   damage: str) -> None:
    # A flipped byte inside a tensor still loads (torch checks no CRC): only a checksum notices.
    registry.register("energy", model_dir, {})
    registry.register("energy", model_dir, {})
    registry.promote("energy", "v1")
    before = _stages_file(registry, "energy")
    weights = Path(registry.root) / "energy" / "v2" / "model.pt"
    if damage == "flip":
        weights.write_bytes(b"weighTs")
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:3])
    elif damage == "delete":
        weights.unlink()
    else:
        weights.write_bytes(b"other weights")

    words = "model.pt is missing" if damage == "delete" else "model.pt does not match its recorded sha256"
    with pytest.raises(RegistryError, match=f"{words}.*promotion refused, production is unchanged"):
        registry.promote("energy", "v2", verify=lambda path: None)
    assert _stages_file(registry, "energy") == before


def test_versions_record_their_files_checksums(registry: Registry, model_dir: Path) -> None:
    import hashlib

    version = registry.register("energy", model_dir, {})
    assert version.record["files"] == {"config.json": hashlib.sha256(b"{}").hexdigest(),
                                       "model.pt": hashlib.sha256(b"weights").hexdigest()}


def test_a_corrupt_record_hides_neither_production_nor_the_others(registry: Registry, model_dir: Path) -> None:
    for _ in range(3):
        registry.register("traffic", model_dir, {})
    registry.promote("traffic", "v1")
    (Path(registry.root) / "traffic" / "v2" / "version.json").write_text("{not json")

    assert registry.get("traffic").version == "v1"
    assert [v.version for v in registry.versions("traffic")] == ["v1", "v3"]
    with pytest.raises(RegistryError, match=r"v2/version.json is corrupt"):
        registry.get("traffic", "v2")
    with pytest.raises(RegistryError, match=r"v2/version.json is corrupt.*production is unchanged"):
        registry.promote("traffic", "v2")
    assert registry.get("traffic").version == "v1" and registry.generation("traffic") == 1


def test_a_record_naming_another_version_is_corrupt(registry: Registry, model_dir: Path) -> None:
    registry.register("events", model_dir, {})
    registry.register("events", model_dir, {})
    root = Path(registry.root) / "events"
    (root / "v2" / "version.json").write_text((root / "v1" / "version.json").read_text())
    with pytest.raises(RegistryError, match=r"corrupt \(it names 'events' 'v1'\)"):
        registry.promote("events", "v2")


def test_load_predictor_refuses_files_changed_since_registration(registry: Registry, model_dir: Path) -> None:
    class Loader:
        name = "energy"

        def load_predictor(self, path: Path, version: str) -> str:
            return version

    registry.register("energy", model_dir, {})
    registry.promote("energy", "v1")
    assert registry.load_predictor(Loader()) == "v1"  # type: ignore[arg-type]
    (Path(registry.root) / "energy" / "v1" / "config.json").write_text('{"hidden": 1}')
    with pytest.raises(RegistryError, match=r"config\.json does not match"):
        registry.load_predictor(Loader())  # type: ignore[arg-type]


def test_versions_registered_before_checksums_still_load(registry: Registry, model_dir: Path) -> None:
    registry.register("energy", model_dir, {})
    record_file = Path(registry.root) / "energy" / "v1" / "version.json"
    record = json.loads(record_file.read_text())
    del record["files"]
    record_file.write_text(json.dumps(record))
    assert registry.promote("energy", "v1").stage == "production"
