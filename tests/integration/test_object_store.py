"""Everything on object storage at once, as on Kubernetes: the registry, Ray Train's checkpoints,
a Tune sweep's results and batch files in an S3 bucket (a real S3 server: the `s3` fixture).

The session cluster's workers reach the bucket through the AWS_* variables: inherited when the
server started before the cluster (tests/conftest.py sees to that), and passed in the job's
runtime_env by `cluster.local.connect` for workers on other nodes.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from core.settings import Settings
from core.storage import Location
from domains import get_domain
from domains.base import request_example
from services.batch import score_file, write_table
from training.loop import TRAIN_STATE
from training.trainer import train
from training.tune import FIGURE_FILE, TRIALS_FILE, SweepOptions, sweep
from training.workspace import Workspace

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_train_sweep_and_batch_keep_everything_in_the_bucket(s3: str, settings: Settings) -> None:
    import ray

    bucket = f"{s3}/object-store"
    on_s3 = settings.model_copy(update={"registry_uri": f"{bucket}/registry", "storage_path": f"{bucket}/ray_results"})
    workspace = Workspace.from_settings(on_s3)
    storage = Location.of(on_s3.storage_uri())
    energy = get_domain("energy")
    # Every worker of the job, whatever node it starts on, sets the driver's AWS_* variables first.
    assert ray.get_runtime_context().runtime_env.get("worker_process_setup_hook") == "set_storage_env"

    # [1] Ray Train: checkpoints in the bucket, the best one registered from there.
    trained = train(energy, workspace, profile="smoke", num_workers=1, cpus_per_worker=1)
    checkpoint = trained.record["lineage"]["checkpoint"]
    assert checkpoint.startswith(f"{bucket}/ray_results/{trained.record['lineage']['run']}/checkpoint_")
    assert Location.of(checkpoint).join(TRAIN_STATE).is_file()  # the resume state stays with the run
    assert TRAIN_STATE not in trained.record["files"]

    # [2] A Tune sweep whose trials train into the bucket; its table and figure land beside its state.
    options = SweepOptions(num_samples=2, scheduler="fifo", search="random", max_concurrent=2, cpus_per_trial=0.9,
                           profile="smoke")
    sweep_id, trials, swept = sweep(energy, workspace, options)
    out = storage.join(sweep_id)
    assert len(trials) == 2 and trials["error"].isna().all()
    with out.join(TRIALS_FILE).reading() as path:
        assert pd.read_parquet(path)["trial_id"].tolist() == trials["trial_id"].tolist()
    assert out.join(FIGURE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert swept is not None and swept.record["lineage"]["sweep"] == sweep_id
    assert swept.record["lineage"]["checkpoint"].startswith(f"{bucket}/ray_results/")
    assert swept.metrics["val_mape"] == pytest.approx(trials["val_mape"].min())

    # [3] The registry in the bucket: both versions listed, promotion checks the files it downloads.
    registry = workspace.registry
    assert [v.version for v in registry.versions("energy")] == [trained.version, swept.version]
    registry.promote("energy", swept.version, verify=lambda path: energy.load_predictor(path, swept.version))
    assert registry.get("energy").version == swept.version
    assert json.loads(Location.of(f"{bucket}/registry/energy/stages.json").read_bytes())["production"] == swept.version

    # [4] `cityserve tune --resume` finds the sweep in the bucket; its trials had ended, so none reruns.
    resumed_id, resumed, again = sweep(energy, workspace, options, resume=sweep_id)
    assert resumed_id == sweep_id and sorted(resumed["trial_id"]) == sorted(trials["trial_id"])
    assert again is not None and again.metrics["val_mape"] == pytest.approx(swept.metrics["val_mape"])

    # [5] Batch scoring from the bucket into the bucket; the scoring actor loads production from there.
    example = request_example(energy.request_model)
    example["start"] = datetime.fromisoformat(example["start"])  # a Parquet timestamp column
    rows = [example, {**example, "demand": example["demand"][:10]}]
    write_table(pa.Table.from_pylist(rows), f"{bucket}/batch/in.parquet")
    report = score_file(energy, workspace, f"{bucket}/batch/in.parquet", f"{bucket}/batch/scored.parquet",
                        batch_size=2)
    assert (report.version, report.rows, report.scored, report.failed_count) == (swept.version, 2, 1, 1)
    assert report.output == f"{bucket}/batch/scored.parquet"
    with Location.of(report.output).reading() as path:
        scored = pd.read_parquet(path)
    assert scored["error"].isna().tolist() == [True, False]
    energy.response_model.model_validate(json.loads(scored["result"][0]))

    # Nothing went to a local folder named after the URI.
    assert not Path("s3:").exists()

    # Ray logs every runtime env it creates (runtime_env_agent.log), so the job passes no secret
    # in one. Ray Tune itself copies the driver's AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into each
    # trial actor's env (ray/tune/execution/class_cache.py), marked by its PL_DISABLE_FORK: that
    # line is Ray's, and the reason keys are better given to every pod (or a role) than to a driver.
    assert settings.ray_temp_dir is not None
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    logs = [p for p in settings.ray_temp_dir.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")]
    leaks = [line for p in logs for line in p.read_text(errors="ignore").splitlines() if secret in line]
    assert logs and [line[:200] for line in leaks if "PL_DISABLE_FORK" not in line] == []
