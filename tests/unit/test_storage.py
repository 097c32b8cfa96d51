"""Files kept on a local disk or in object storage, against a real S3 server (the `s3` fixture):
the shared helpers, evaluation reports, batch files and what Ray workers are told."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cluster.local import with_storage_env
from core.errors import DataError
from core.settings import Settings
from core.storage import Location, join, uri_of
from domains import get_domain
from services.batch import read_table, write_table
from tests.schemas import validate_report
from training.evaluate import evaluate
from training.workspace import Workspace


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A folder for one test, on the disk or in the bucket."""
    return request.getfixturevalue("s3_dir") if request.param == "s3" else str(tmp_path / "root")


# ---- naming ------------------------------------------------------------------------------------
def test_a_relative_path_is_resolved_against_the_working_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    at = Location.of("reports")
    assert at.local and at.path == str(tmp_path / "reports") and str(at) == str(tmp_path / "reports")
    assert join("reports", "energy.json") == str(tmp_path / "reports" / "energy.json")
    assert Location.of(tmp_path / "x").path == str(tmp_path / "x")


def test_a_uri_keeps_its_scheme_and_options_when_joined(s3: str) -> None:
    # Path("s3://bucket/x") / "y" is "s3:/bucket/x/y": the defect these helpers replace.
    at = Location.of(f"{s3}/sweeps/")
    assert not at.local and str(at) == f"{s3}/sweeps"
    assert join(f"{s3}/sweeps", "sweep-1", "trials.parquet") == f"{s3}/sweeps/sweep-1/trials.parquet"
    assert at.join("a/b").path == at.path + "/a/b"
    with_options = Location.of(f"{s3}/x?region=us-east-1")
    assert str(with_options.join("y")) == f"{s3}/x/y?region=us-east-1"
    assert uri_of(at.fs, at.path) == str(at) and uri_of(pafs.LocalFileSystem(), "/tmp/x") == "/tmp/x"


# ---- reading and writing -------------------------------------------------------------------------
def test_bytes_round_trip_and_a_missing_file_says_so(root: str) -> None:
    at = Location.of(root).join("a", "b.json")
    assert not at.exists()
    with pytest.raises(FileNotFoundError):
        at.read_bytes()
    at.write_bytes(b"one")
    at.write_json({"n": 2})
    assert at.is_file() and json.loads(at.read_bytes()) == {"n": 2}
    assert [i.base_name for i in Location.of(root).join("a").children()] == ["b.json"]


def test_a_writer_that_fails_leaves_the_old_file(root: str) -> None:
    at = Location.of(root).join("scored.parquet")
    at.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="halfway"), at.writing() as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("halfway")
    assert at.read_bytes() == b"old"
    with at.writing() as tmp:
        tmp.write_bytes(b"new")
    assert at.read_bytes() == b"new"
    assert [i.base_name for i in Location.of(root).children()] == ["scored.parquet"]  # no temporary left


def test_folders_upload_and_download_file_by_file(root: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model.pt").write_bytes(b"weights")
    (src / "train_state.pt").write_bytes(b"optimizer")
    (src / "sub" / "vocab.txt").write_text("a b")
    at = Location.of(root).join("model")
    at.upload_dir(src)
    back = tmp_path / "back"
    at.download_dir(back, skip=["train_state.pt"])
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) == ["model.pt",
                                                                                              "sub/vocab.txt"]
    assert (back / "sub" / "vocab.txt").read_text() == "a b"
    with at.join("model.pt").reading() as local:
        assert local.read_bytes() == b"weights"


def test_the_lock_admits_one_holder_at_a_time(root: str) -> None:
    lock = Location.of(root).join(".lock")
    inside: list[int] = []
    overlaps: list[int] = []
    start = threading.Barrier(3)

    def hold(i: int) -> None:
        start.wait()
        for _ in range(2):
            with lock.lock(wait_s=60):
                inside.append(i)
                if len(inside) > 1:
                    overlaps.append(i)
                time.sleep(0.05)
                inside.remove(i)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []


# ---- evaluation reports ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def energy_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Smoke data and a model trained on it in this process (no Ray): (data dir, model dir)."""
    from training.loop import fit_plain

    root = tmp_path_factory.mktemp("energy")
    energy = get_domain("energy")
    energy.prepare(root / "data", smoke=True)
    fit_plain(energy, energy.default_config("smoke"), root / "data", root / "model")
    return root / "data", root / "model"


def test_an_evaluation_report_and_figure_are_written_to_s3(s3_dir: str, energy_model: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    # `reports_dir` was a Path: Path("s3://bucket/reports") is a local folder "s3:/bucket/reports".
    data_dir, model_dir = energy_model
    settings = Settings(data_dir=data_dir, registry_uri=f"{s3_dir}/registry", reports_dir=f"{s3_dir}/reports",
                        storage_path=str(tmp_path / "ray_results"))
    workspace = Workspace.from_settings(settings)
    energy = get_domain("energy")
    record = {"profile": "smoke", "config": {"data_dir": str(data_dir)},
              "data": {"manifest_sha256": "x", "sources": []}}
    version = workspace.registry.register("energy", model_dir, record)
    workspace.registry.promote("energy", version.version)

    report, evaluation = evaluate(energy, workspace)

    reports = Location.of(f"{s3_dir}/reports")
    assert json.loads(reports.join("energy.json").read_bytes()) == report
    validate_report(report)
    assert reports.join("energy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert evaluation.figure is None  # no local file is left to point at
    assert not Path("s3:").exists()  # nothing landed in a local folder named after the URI


def test_an_evaluation_report_stays_local_for_a_local_folder(tmp_path: Path, energy_model: tuple[Path, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, model_dir = energy_model
    monkeypatch.chdir(tmp_path)
    settings = Settings(data_dir=data_dir, registry_uri="registry", reports_dir="reports")
    workspace = Workspace.from_settings(settings)
    record = {"profile": "smoke", "config": {"data_dir": str(data_dir)}}
    version = workspace.registry.register("energy", model_dir, record)
    report, evaluation = evaluate(get_domain("energy"), workspace, version.version)
    assert json.loads((tmp_path / "reports" / "energy.json").read_text()) == report
    assert evaluation.figure == tmp_path / "reports" / "energy.png" and evaluation.figure.stat().st_size > 10_000


# ---- batch files -------------------------------------------------------------------------------
def test_batch_input_is_read_from_s3_as_parquet_or_csv(s3_dir: str, tmp_path: Path) -> None:
    frame = pd.DataFrame({"case": [1, 2], "text": ["pothole on 5th", "loud party"]})
    parquet, csv = Location.of(f"{s3_dir}/in.parquet"), Location.of(f"{s3_dir}/in.csv")
    parquet.write_bytes(_parquet_bytes(pa.Table.from_pandas(frame, preserve_index=False), tmp_path))
    csv.write_bytes(frame.to_csv(index=False).encode())
    assert read_table(str(parquet)).to_pandas().equals(frame)
    assert read_table(str(csv)).to_pandas().equals(frame)
    with pytest.raises(DataError, match=r"in\.json: no such file"):
        read_table(f"{s3_dir}/in.json")
    Location.of(f"{s3_dir}/in.json").write_bytes(b"{}")
    with pytest.raises(DataError, match=r"expected a \.parquet or \.csv file"):
        read_table(f"{s3_dir}/in.json")


def test_batch_output_is_written_to_s3_whole(s3_dir: str) -> None:
    table = pa.table({"row": [0, 1], "result": ['{"x": 1}', None]})
    write_table(table, f"{s3_dir}/out/scored.parquet")
    at = Location.of(f"{s3_dir}/out/scored.parquet")
    assert pq.read_table(at.path, filesystem=at.fs).equals(table)
    assert [i.base_name for i in Location.of(f"{s3_dir}/out").children()] == ["scored.parquet"]


def _parquet_bytes(table: pa.Table, tmp_path: Path) -> bytes:
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    return path.read_bytes()


# ---- Ray workers -------------------------------------------------------------------------------
def test_workers_are_given_the_drivers_object_storage_variables_without_logging_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.storage:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWSOME", "not ours")
    runtime_env = with_storage_env({"env_vars": {"A": "1", "AWS_REGION": "eu-west-1"}, "pip": []})
    # Ray writes a job's env_vars into every node's runtime_env_agent.log: no secret goes there.
    assert runtime_env["env_vars"] == {"A": "1", "AWS_REGION": "eu-west-1"} and runtime_env["pip"] == []

    # What each worker process runs when it starts (Ray's worker_process_setup_hook).
    for name in ("AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWSOME"):
        monkeypatch.delenv(name)
    runtime_env["worker_process_setup_hook"]()
    assert os.environ["AWS_ENDPOINT_URL"] == "http://minio.storage:9000"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert "AWS_REGION" not in os.environ  # the caller's env_vars set it, and Ray sets those
    assert "AWSOME" not in os.environ


def test_without_storage_variables_the_runtime_env_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    assert with_storage_env({"env_vars": {"A": "1"}}) == {"env_vars": {"A": "1"}}
