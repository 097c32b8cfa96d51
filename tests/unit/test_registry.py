"""Registry semantics: numbering, stages, promotion checks, rollback, atomic writes, on a local
folder and on S3 (a real S3 server: the `s3` fixture)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from core.errors import RegistryError
from core.storage import Location
from training.registry import Registry, check_files, code_revision


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.pt").write_bytes(b"weights")
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture(params=["local", "s3"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Registry:
    if request.param == "s3":
        return Registry(f"{request.getfixturevalue('s3_dir')}/registry")
    return Registry(str(tmp_path / "registry"))


def _file(registry: Registry, *parts: str) -> Location:
    """A file in the registry, wherever it is kept (to damage it as a disk or a bucket might)."""
    return registry.location.join(*parts)


def test_versions_number_up_and_start_as_candidates(registry: Registry, model_dir: Path) -> None:
    a = registry.register("energy", model_dir, {"metrics": {"val_mape": 0.1}})
    b = registry.register("energy", model_dir, {"metrics": {"val_mape": 0.2}})
    assert [a.version, b.version] == ["v1", "v2"]
    assert [v.stage for v in registry.versions("energy")] == ["candidate", "candidate"]
    assert b.record["code_revision"] and b.record["created"]
    assert registry.get("energy", "latest").version == "v2"
    assert _file(registry, "energy", "v1", "model.pt").read_bytes() == b"weights"


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
    upload = Location.upload_file
    uploaded: list[Path] = []

    def explode(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    def upload_one_then_explode(self: Location, source: Path) -> None:
        # On an object store the files go one by one: the crash comes with some of them there.
        if uploaded:
            explode()
        uploaded.append(source)
        upload(self, source)

    monkeypatch.setattr(shutil, "copytree", explode)
    monkeypatch.setattr(Location, "upload_file", upload_one_then_explode)
    with pytest.raises(OSError, match="disk full"):
        registry.register("sentiment", model_dir, {})
    assert [v.version for v in registry.versions("sentiment")] == ["v1"]
    assert [i.base_name for i in _file(registry, "sentiment").children() if i.base_name.startswith(".incoming")] == []
    monkeypatch.undo()
    assert registry.register("sentiment", model_dir, {}).version == "v3"


def test_folder_without_version_file_is_not_a_version(registry: Registry, model_dir: Path) -> None:
    registry.register("energy", model_dir, {})
    _file(registry, "energy", "v2", "model.pt").write_bytes(b"half")  # e.g. a copy cut short
    assert [v.version for v in registry.versions("energy")] == ["v1"]
    assert registry.register("energy", model_dir, {}).version == "v3"


def test_a_removed_versions_number_is_not_given_again(registry: Registry, model_dir: Path) -> None:
    registry.register("energy", model_dir, {})
    removed = registry.register("energy", model_dir, {})
    registry.fs.delete_dir(_file(registry, "energy", removed.version).path)
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
    return _file(registry, domain, "stages.json").read_bytes()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "swap"])
def test_promotion_refused_when_a_file_changed_since_registration(registry: Registry, model_dir: Path,
                                                                   damage: str) -> None:
    # A flipped byte inside a tensor still loads (torch checks no CRC): only a checksum notices.
    registry.register("energy", model_dir, {})
    registry.register("energy", model_dir, {})
    registry.promote("energy", "v1")
    before = _stages_file(registry, "energy")
    weights = _file(registry, "energy", "v2", "model.pt")
    if damage == "flip":
        weights.write_bytes(b"weighTs")
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:3])
    elif damage == "delete":
        weights.delete()
    else:
        weights.write_bytes(b"other weights")

    words = "model.pt is missing" if damage == "delete" else "model.pt does not match its recorded sha256"
    with pytest.raises(RegistryError, match=f"{words}.*promotion refused, production is unchanged"):
        registry.promote("energy", "v2", verify=lambda path: None)
    assert _stages_file(registry, "energy") == before


def test_versions_record_their_files_checksums(registry: Registry, model_dir: Path) -> None:
    version = registry.register("energy", model_dir, {})
    assert version.record["files"] == {"config.json": hashlib.sha256(b"{}").hexdigest(),
                                       "model.pt": hashlib.sha256(b"weights").hexdigest()}


def test_a_corrupt_record_hides_neither_production_nor_the_others(registry: Registry, model_dir: Path) -> None:
    for _ in range(3):
        registry.register("traffic", model_dir, {})
    registry.promote("traffic", "v1")
    _file(registry, "traffic", "v2", "version.json").write_bytes(b"{not json")

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
    v1_record = _file(registry, "events", "v1", "version.json").read_bytes()
    _file(registry, "events", "v2", "version.json").write_bytes(v1_record)
    with pytest.raises(RegistryError, match=r"corrupt \(it names 'events' 'v1'\)"):
        registry.promote("events", "v2")


def test_load_predictor_refuses_files_changed_since_registration(registry: Registry, model_dir: Path) -> None:
    class Loader:
        name = "energy"
        backends = ("auto", "torch")

        def load_predictor(self, path: Path, version: str, device: str, backend: str) -> str:
            return f"{version} {(path / 'model.pt').read_bytes().decode()} on {device}"

    registry.register("energy", model_dir, {})
    registry.promote("energy", "v1")
    assert registry.load_predictor(Loader()) == "v1 weights on cpu"  # type: ignore[arg-type]
    _file(registry, "energy", "v1", "config.json").write_bytes(b'{"hidden": 1}')
    with pytest.raises(RegistryError, match=r"config\.json does not match"):
        registry.load_predictor(Loader())  # type: ignore[arg-type]


def test_versions_registered_before_checksums_still_load(registry: Registry, model_dir: Path) -> None:
    registry.register("energy", model_dir, {})
    record_file = _file(registry, "energy", "v1", "version.json")
    record = json.loads(record_file.read_bytes())
    del record["files"]
    record_file.write_bytes(json.dumps(record).encode())
    assert registry.promote("energy", "v1").stage == "production"


def test_concurrent_registrations_get_distinct_versions(registry: Registry, tmp_path: Path) -> None:
    # Two sweeps (or a sweep and `cityserve train`) finishing at once, on different machines: on an
    # object store there is no file lock, and without one each took the same number and wrote
    # into the same folder, the last record hiding the others' models.
    models = []
    for i in range(4):
        d = tmp_path / f"model{i}"
        d.mkdir()
        (d / "model.pt").write_bytes(f"weights {i}".encode() * 100)
        models.append(d)
    start = threading.Barrier(len(models))
    registered: dict[int, str] = {}

    def register(i: int) -> None:
        start.wait()
        registered[i] = registry.register("traffic", models[i], {"trial": i}).version

    threads = [threading.Thread(target=register, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(registered.values()) == ["v1", "v2", "v3", "v4"]
    for i, version in registered.items():
        record = registry.get("traffic", version).record
        assert record["trial"] == i
        assert record["files"]["model.pt"] == hashlib.sha256(f"weights {i}".encode() * 100).hexdigest()
        assert registry.promote("traffic", version).stage == "production"  # its files match its record


def test_a_crashed_writers_lock_is_taken_over(s3_dir: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.storage

    registry = Registry(f"{s3_dir}/registry")
    _file(registry, "energy", ".lock", "claim-of-a-dead-writer").write_bytes(b"{}")
    monkeypatch.setattr(core.storage, "LOCK_WAIT_S", 0.5)
    with pytest.raises(RegistryError, match="held by another writer"):
        registry.register("energy", model_dir, {})
    time.sleep(1.1)  # the store dates objects to the second
    monkeypatch.setattr(core.storage, "STALE_CLAIM_S", 0.5)
    assert registry.register("energy", model_dir, {}).version == "v1"
    assert [i.base_name for i in _file(registry, "energy", ".lock").children()] == []


def test_added_files_get_checksums_and_replaced_ones_leave_the_record_before_they_change(
        registry: Registry, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry.register("energy", model_dir, {"note": "kept"})
    extra = tmp_path / "extra.bin"
    extra.write_bytes(b"one")
    added = registry.add_files("energy", "v1", {"extra.bin": extra}, {"inference": {"x": 1}})
    assert added.record["files"]["extra.bin"] == hashlib.sha256(b"one").hexdigest()
    assert added.record["note"] == "kept" and added.record["inference"] == {"x": 1}

    extra.write_bytes(b"two")
    monkeypatch.setattr(Location, "upload_file", lambda self, source: (_ for _ in ()).throw(OSError("gone")))
    with pytest.raises(OSError, match="gone"):  # the copy fails midway: the version still loads, without it
        registry.add_files("energy", "v1", {"extra.bin": extra}, {})
    monkeypatch.undo()
    midway = registry.get("energy", "v1")
    assert "extra.bin" not in midway.record["files"] and "model.pt" in midway.record["files"]
    with registry.model_dir("energy", "v1") as path:
        check_files(midway, path)

    replaced = registry.add_files("energy", "v1", {"extra.bin": extra}, {"inference": None})
    assert replaced.record["files"]["extra.bin"] == hashlib.sha256(b"two").hexdigest()
    assert "inference" not in replaced.record
    removed = registry.add_files("energy", "v1", {"extra.bin": None}, {})
    assert "extra.bin" not in removed.record["files"] and not _file(registry, "energy", "v1", "extra.bin").is_file()


def test_a_report_written_into_the_checkout_leaves_its_code_clean(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for rel in ("domains/model.py", "reports/events.json"):
        (tmp_path / rel).parent.mkdir(parents=True)
        (tmp_path / rel).write_text("1")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    (tmp_path / "reports/events.json").write_text("2")
    clean = code_revision(tmp_path)
    assert len(clean) == 40 and not clean.endswith("+dirty")
    (tmp_path / "domains/model.py").write_text("2")
    assert code_revision(tmp_path) == clean + "+dirty"
