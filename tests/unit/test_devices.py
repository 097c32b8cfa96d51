"""Where a model runs: a serving replica (and a batch scoring actor) loads its model on the device
Ray assigned it; the text models answer in bf16 on a GPU, as closely as fp32 answers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError

from cityserve import cli
from core.errors import ConfigError
from core.settings import Settings, get_settings
from domains import get_domain
from domains.text import TextClassifier, TextDomain, TextPredictor, inference_dtype
from services import batch
from services.config import ModelConfig
from services.model import replica_device
from tests.unit.conftest import SmokeRun
from training.registry import Registry
from training.workspace import Workspace


def test_a_replica_without_gpus_runs_on_the_cpu() -> None:
    assert replica_device("auto") == "cpu" and replica_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_forcing_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        replica_device("cuda")


def test_an_unknown_device_is_refused_in_the_user_config() -> None:
    with pytest.raises(ValidationError, match="device"):
        ModelConfig.model_validate({"device": "tpu"})


def test_the_registry_loads_a_version_on_the_device_it_is_asked_for(tmp_path: Path) -> None:
    energy = type(get_domain("energy"))
    seen: list[str] = []

    class Recording(energy):  # type: ignore[misc, valid-type]
        def load_predictor(self, model_dir: Path, version: str, device: str = "cpu", backend: str = "auto") -> Any:
            seen.append(device)
            return None

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights")
    registry = Registry(str(tmp_path / "registry"))
    version = registry.register("energy", model, {"metric": "val_mape", "metrics": {}}).version
    registry.load_predictor(Recording(), version, device="cuda:1")
    assert seen == ["cuda:1"]


# ---- bf16 text models ----------------------------------------------------------------------------
def test_text_models_answer_in_bf16_on_cuda_and_fp32_on_the_cpu() -> None:
    assert inference_dtype("cuda") == inference_dtype("cuda:1") == torch.bfloat16
    assert inference_dtype("cpu") == inference_dtype(torch.device("cpu")) == torch.float32


# How far bf16 answers may stray from fp32's. bf16 keeps 8 significant bits (a relative rounding of
# 2^-9, ~0.2 %, per operation); through MiniLM's 6 layers the smoke models' probabilities moved by
# at most 0.0011 (events) and 0.0010 (sentiment), the sentiment score by 0.0032, measured on this
# machine's CPU (torch's bf16 kernels; CUDA's round the same way, though not bit for bit). The
# bounds leave ~10x room for that difference, and are still far below what changes an answer: a
# class whose fp32 probability leads the runner-up by more than twice PROB_TOL cannot be overtaken
# when each moves by at most PROB_TOL, so every such item must keep its class. Near-ties (a barely
# trained smoke model has many) may flip; they must still be rare (CLASS_AGREEMENT).
PROB_TOL = 0.01
SCORE_TOL = 0.03  # sentiment's tanh score in [-1, 1]
CLASS_AGREEMENT = 0.95


@pytest.mark.parametrize("name", ["events", "sentiment"])
def test_a_text_predictor_in_bf16_answers_as_fp32_does(smoke: Callable[[str], SmokeRun], name: str) -> None:
    run = smoke(name)
    domain = run.domain
    assert isinstance(domain, TextDomain)
    fp32 = run.predictor
    assert isinstance(fp32, TextPredictor) and fp32.backend == "torch-fp32"  # the CPU default
    bf16 = domain.load_predictor(run.model_dir, "smoke-v1", "cpu", dtype=torch.bfloat16)
    assert bf16.backend == "torch-bf16" and isinstance(bf16.model, TextClassifier)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    texts = domain.splits(run.data_dir)["test"]["text"].tolist()
    want, got = fp32.run(texts), bf16.run(texts)
    assert set(got) == set(want)
    for output, expected in want.items():
        answered = got[output]
        assert answered.dtype == np.float32 and answered.shape == expected.shape  # cast back before softmax
        if expected.ndim == 1:  # the score
            assert np.abs(answered - expected).max() <= SCORE_TOL, output
            continue
        assert np.allclose(answered.sum(1), 1.0, atol=1e-5)
        assert np.abs(answered - expected).max() <= PROB_TOL, output
        top2 = np.sort(expected, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * PROB_TOL
        same = answered.argmax(1) == expected.argmax(1)
        assert same[clear].all(), f"{output}: bf16 changed {int((~same[clear]).sum())} clear-cut classes"
        assert same.mean() >= CLASS_AGREEMENT, f"{output}: {same.mean():.3f} of classes agree"
    # The served path answers in bf16 with the same response items (probabilities checked above).
    items = [domain.request_model.model_validate({"text": t}) for t in texts[:16]]
    answers = bf16.predict(items)
    assert [type(a) for a in answers] == [domain.response_model] * len(items)


# ---- batch scoring on GPUs -----------------------------------------------------------------------
class InProcessData:
    """`ray.data.from_arrow(table).map_batches(...)` run in this process, as Ray Data runs it: one
    scoring actor built from the class and its constructor args, called batch by batch. Records the
    resources each actor was asked for."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.asked: dict[str, Any] = {}
        self.parts: list[pa.Table] = []

    def map_batches(self, fn: Any, *, fn_constructor_args: tuple[Any, ...], batch_size: int, batch_format: str,
                    concurrency: int, **resources: Any) -> InProcessData:
        assert batch_format == "pandas"
        self.asked = {"concurrency": concurrency, **resources}
        self.scorer = fn(*fn_constructor_args)
        frame = self.table.to_pandas()
        for start in range(0, len(frame), batch_size):
            part = self.scorer(frame.iloc[start:start + batch_size].reset_index(drop=True))
            self.parts.append(pa.Table.from_pandas(part, preserve_index=False))
        return self

    def to_arrow_refs(self) -> list[pa.Table]:
        return self.parts


@pytest.fixture
def in_process_ray_data(monkeypatch: pytest.MonkeyPatch) -> list[InProcessData]:
    """`score_file` without a Ray cluster: Ray Data runs in this process and `ray.get` is the identity."""
    import ray
    import ray.data

    import cluster.local

    made: list[InProcessData] = []

    def from_arrow(table: pa.Table) -> InProcessData:
        made.append(InProcessData(table))
        return made[-1]

    monkeypatch.setattr(cluster.local, "connect", lambda settings: None)
    monkeypatch.setattr(ray.data, "from_arrow", from_arrow)
    monkeypatch.setattr(ray, "get", lambda refs: refs)
    return made


@pytest.fixture
def events_workspace(smoke: Callable[[str], SmokeRun], tmp_path: Path) -> tuple[Workspace, str]:
    """A registry holding the smoke-trained events model, and that version."""
    run = smoke("events")
    assert run.history  # trained
    workspace = Workspace.from_settings(Settings(registry_uri=str(tmp_path / "registry"), data_dir=run.data_dir))
    version = workspace.registry.register("events", run.model_dir, {"metric": "val_macro_f1", "metrics": {}})
    return workspace, version.version


@pytest.mark.parametrize("gpus", [0.0, 0.5])
def test_batch_scoring_asks_each_actor_for_its_gpus(in_process_ray_data: list[InProcessData],
                                                    events_workspace: tuple[Workspace, str], tmp_path: Path,
                                                    gpus: float) -> None:
    workspace, version = events_workspace
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": ["pothole on 5th avenue", "loud party next door", "   "]}).to_csv(source, index=False)
    report = batch.score_file(get_domain("events"), workspace, source, tmp_path / "out.parquet", ref=version,
                              batch_size=2, concurrency=1, torch_threads=1, gpus=gpus)
    (data,) = in_process_ray_data
    assert data.asked == {"concurrency": 1, "num_cpus": 1, "num_gpus": gpus}
    # No GPU here, and Ray gave this process none: the actor scores on the CPU, in fp32.
    assert data.scorer.device == "cpu"
    assert isinstance(data.scorer.predictor, TextPredictor) and data.scorer.predictor.backend == "torch-fp32"
    assert (report.rows, report.scored, report.failed_count) == (3, 2, 1)
    assert report.failed[0][0] == 2 and "text" in report.failed[0][1]


@pytest.mark.parametrize("mask", [True, False])
def test_batch_output_masks_personal_data_unless_kept(in_process_ray_data: list[InProcessData],
                                                      events_workspace: tuple[Workspace, str], tmp_path: Path,
                                                      mask: bool) -> None:
    workspace, version = events_workspace
    text = "Call me at (415) 555-0132 about the pothole outside 1420 Mission St"
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": [text, "\x07 jane.doe@example.org"], "contact": ["jane.doe@example.org", "none"],
                  "case": [7, 8]}).to_csv(source, index=False)
    report = batch.score_file(get_domain("events"), workspace, source, tmp_path / "out.parquet", ref=version,
                              mask=mask)
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert (report.scored, report.failed_count) == (1, 1) and list(out["case"]) == [7, 8]
    if mask:
        assert out["text"][0] == "Call me at <PHONE> about the pothole outside <ADDRESS>"
        assert out["contact"][0] == "<EMAIL>" and "jane" not in out["error"][1] + out["text"][1]
    else:
        assert out["text"][0] == text and out["contact"][0] == "jane.doe@example.org"
    # the model read the text as sent, not its masked form
    predictor = workspace.registry.load_predictor(get_domain("events"), version)
    [answer] = predictor.predict([get_domain("events").request_model(text=text)])
    assert json.loads(out["result"][0])["confidence"] == pytest.approx(answer.confidence)  # type: ignore[attr-defined]


@pytest.mark.parametrize("gpus", [-1.0, 1.5])
def test_batch_scoring_refuses_gpus_ray_cannot_give(events_workspace: tuple[Workspace, str], tmp_path: Path,
                                                    gpus: float) -> None:
    workspace, version = events_workspace
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": ["pothole"]}).to_csv(source, index=False)
    with pytest.raises(ConfigError, match="GPUs per actor") as err:
        batch.score_file(get_domain("events"), workspace, source, tmp_path / "out.parquet", ref=version, gpus=gpus)
    assert err.value.field == "gpus"


def test_a_scoring_actor_loads_its_version_on_the_gpu_ray_gave_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    seen: list[str] = []
    monkeypatch.setattr(Registry, "load_predictor", lambda self, domain, ref, device="cpu": seen.append(device))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])  # what an actor holding num_gpus sees
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert batch.Scorer("energy", "registry", "v1", 1, True).device == "cuda"
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])  # an actor without GPUs, on a GPU machine
    assert batch.Scorer("energy", "registry", "v1", 1, True).device == "cpu"
    assert seen == ["cuda", "cpu"]


def test_the_batch_command_passes_gpus_per_actor_and_masking(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []

    def score_file(domain: Any, workspace: Any, source: str, dest: str, **options: Any) -> batch.BatchReport:
        calls.append(options)
        return batch.BatchReport("v1", 1, 1, output=dest)

    monkeypatch.setattr(batch, "score_file", score_file)
    monkeypatch.setenv("CITYSERVE_REGISTRY_URI", str(tmp_path / "registry"))
    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(cli.main, ["batch", "events", "in.csv", "out.parquet", "--gpus-per-actor", "0.25"])
        assert out.exit_code == 0, out.output
        out = CliRunner().invoke(cli.main, ["batch", "events", "in.csv", "out.parquet", "--keep-personal-data"])
        assert out.exit_code == 0, out.output
    finally:
        get_settings.cache_clear()
    assert [(c["gpus"], c["mask"]) for c in calls] == [(0.25, True), (0.0, False)]


# ---- the GPU proof's pieces (bench/gpu.py; the whole script: tests/integration/test_gpu_script.py) ----
def test_the_gpu_proof_serves_events_on_the_gpu_as_the_cluster_config_does() -> None:
    from bench.gpu import DOMAIN, cpu_smoke_sizes, gpu_sizes, serve_overlay
    from services.config import build_config, load_overlay, model_configs

    sizes = gpu_sizes()
    config = build_config("local", serve_overlay(sizes), domains=[DOMAIN])  # validated: Ray's schema, our args
    (app,) = config["applications"]
    replica = next(d for d in app["deployments"] if d["name"] == DOMAIN)
    cluster = load_overlay("cluster").deployments[DOMAIN]["ray_actor_options"]
    assert replica["ray_actor_options"]["num_gpus"] == cluster["num_gpus"] > 0
    assert model_configs(config)[DOMAIN].device == "cuda"
    assert model_configs(config)[DOMAIN].max_batch_size == sizes.in_process_batch == 64
    assert replica["autoscaling_config"]["min_replicas"] == replica["autoscaling_config"]["max_replicas"] == 1
    assert (sizes.concurrency, sizes.items, sizes.train_pairs, sizes.sweep_trials) == (64, 16, 3, 4)
    assert sizes.sweep_resources[1] == 0.25 and sum(sizes.timeouts.values()) <= sizes.budget_s <= 8 * 60
    smoke = build_config("local", serve_overlay(cpu_smoke_sizes()), domains=[DOMAIN])
    smoke_replica = next(d for d in smoke["applications"][0]["deployments"] if d["name"] == DOMAIN)
    assert "num_gpus" not in smoke_replica["ray_actor_options"]
    assert model_configs(smoke)[DOMAIN].device == "cpu"


def test_the_sweep_overlap_is_read_off_each_trials_results(tmp_path: Path) -> None:
    import json

    from bench.gpu import overlap, trial_times

    for name, reports in {"run_trial_a_00000": [(100, 5.0), (104, 9.5)],
                          "run_trial_a_00001": [(103, 4.0), (108, 9.0)]}.items():
        (tmp_path / name).mkdir()
        lines = [{"timestamp": stamp, "time_total_s": total, "trial_id": name.removeprefix("run_trial_")}
                 for stamp, total in reports]
        (tmp_path / name / "result.json").write_text("\n".join(map(json.dumps, lines)))
    times = trial_times(tmp_path)
    assert times == {"run_trial_a_00000": ("a_00000", 94.5, 104.0), "run_trial_a_00001": ("a_00001", 99.0, 108.0)}
    assert overlap([(s, e) for _, s, e in times.values()]) == (5.0, 2)
    assert overlap([(0, 10), (10, 20), (20, 30)]) == (0.0, 1)  # one after another: never together
    assert overlap([(0, 10), (1, 9), (2, 8), (3, 7)]) == (4.0, 4)


def test_the_gpu_proofs_steps_get_a_workspace_of_their_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.gpu import step_env

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("CITYSERVE_RAY_ADDRESS", "auto")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = step_env(tmp_path / "work", tmp_path / "state", tmp_path / "site")
    assert "RAY_ADDRESS" not in env and "CITYSERVE_RAY_ADDRESS" not in env  # no other cluster's address
    assert env["CITYSERVE_REGISTRY_URI"] == str(tmp_path / "work" / "registry")
    assert env["CITYSERVE_STATE_DIR"] == str(tmp_path / "state")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "site"), "/elsewhere"]  # the stand-in encoder first
