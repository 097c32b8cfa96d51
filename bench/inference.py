"""Inference backends of the text models, measured in one run with the same threads: items/s at
batch 1, 8 and 64 end to end (request items in, answers out: tokenising, padding to each batch's
longest text and answer-building included), and each backend's macro-F1 on the whole test split.

    .venv/bin/python -m bench.inference [--domain events] [--repeats 3] [--threads 2]

Each domain's production version comes from the workspace's registry (`make run` trains one); one
without ONNX artifacts gets them first (`cityserve models optimize`). Backends: PyTorch fp32, the
baseline of every ratio; PyTorch's own dynamic int8 (the encoder's linear layers; the heads stay
fp32), measured to compare, not served; and the version's ONNX artifacts (fp32, int8, the int8
student), as a CPU replica serves them.
Each repetition times every backend at every batch size, starting from a different backend each
time so drift in the machine's load spreads over all of them; a figure is the median of the
repetitions, with their min and max. Writes `bench/results/inference.json` (its result schema).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from bench import RESULTS, git_commit
from core.io import write_json_atomic
from core.settings import get_settings
from domains import get_domain
from domains.base import request_example
from domains.metrics import macro_f1
from domains.onnx_text import choose_backend
from domains.text import TextClassifier, TextDomain, TextPredictor
from training.registry import stored_artifacts
from training.runs import optimize_version
from training.workspace import Workspace

TEXT_DOMAINS = ("events", "sentiment")
BATCHES = (1, 8, 64)
ITEMS = {1: 96, 8: 256, 64: 1024}  # texts timed per repetition at each batch size: ~1-4 s each
BASELINE = "torch-fp32"


def torch_int8(predictor: TextPredictor) -> TextPredictor:
    """PyTorch's dynamic int8 quantisation of the encoder's linear layers, the heads left fp32."""
    model = copy.deepcopy(predictor.model)
    assert isinstance(model, TextClassifier)
    model.encoder = torch.ao.quantization.quantize_dynamic(model.encoder, {nn.Linear}, dtype=torch.qint8)
    return type(predictor)(predictor.version, model, predictor.tokenizer, predictor.max_len, backend="torch-int8")


def production(domain: TextDomain, workspace: Workspace) -> tuple[str, list[str]]:
    """The production version, its ONNX artifacts made first when it has none, and the backends
    to measure: PyTorch fp32 and int8, and the stored artifacts."""
    version = workspace.registry.get(domain.name, "production")
    if not stored_artifacts(version):
        version = optimize_version(domain, workspace, version.version)
    return version.version, [BASELINE, "torch-int8", *reversed(stored_artifacts(version))]


def load(domain: TextDomain, workspace: Workspace, version: str, backend: str) -> TextPredictor:
    """`version` computed by `backend`: torch-fp32, torch-int8 or a stored artifact's."""
    serving = "torch" if backend.startswith("torch") else backend
    predictor = workspace.registry.load_predictor(domain, version, backend=serving)
    assert isinstance(predictor, TextPredictor)
    return torch_int8(predictor) if backend == "torch-int8" else predictor


def requests(domain: TextDomain, texts: Sequence[str]) -> list[BaseModel]:
    example = request_example(domain.request_model)
    return [domain.request_model.model_validate({**example, "text": text}) for text in texts]


def items_per_s(predictor: TextPredictor, items: Sequence[BaseModel], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(items), batch):
        predictor.predict(items[i:i + batch])
    return len(items) / (time.perf_counter() - start)


def timed_texts(domain: TextDomain, data_dir: Path) -> list[str]:
    """A seeded mix of the test texts (the split's order groups similar texts)."""
    return list(domain.splits(data_dir)["test"]["text"].sample(frac=1.0, random_state=0))


def time_backend(domain: TextDomain, workspace: Workspace, version: str, backend: str,
                 items: dict[int, int]) -> dict[int, float]:
    """items/s of one backend at each batch size (`items[batch]` texts each), after a warm-up."""
    predictor = load(domain, workspace, version, backend)
    texts = timed_texts(domain, workspace.data_dir_of(workspace.registry.get(domain.name, version)))
    requested = requests(domain, texts[:max(items.values())])
    items_per_s(predictor, requested[:64], 8)  # first calls allocate and pick kernels
    return {batch: items_per_s(predictor, requested[:n], batch) for batch, n in items.items()}


def throughput(domain: TextDomain, workspace: Workspace, version: str, backends: list[str], repeats: int,
               threads: int, items: dict[int, int]) -> dict[tuple[str, int], list[float]]:
    """items/s of each (backend, batch size), one figure per repetition. Each backend runs in a
    process of its own, as in a replica: two runtimes in one process would share the cores with
    each other's thread pools, which spin a moment after each run."""
    env = {**os.environ, "CITYSERVE_REGISTRY_URI": workspace.registry.uri}
    rates: dict[tuple[str, int], list[float]] = {}
    for repetition in range(repeats):
        order = backends[repetition % len(backends):] + backends[:repetition % len(backends)]
        for backend in order:
            done = subprocess.run(
                [sys.executable, "-m", "bench.inference", "--worker", domain.name, version, backend,
                 "--threads", str(threads), "--items", json.dumps(items)],
                env=env, capture_output=True, text=True, check=True)
            for batch, rate in json.loads(done.stdout.strip().splitlines()[-1]).items():
                rates.setdefault((backend, int(batch)), []).append(rate)
    return rates


def scores(domain: TextDomain, workspace: Workspace, version: str, backends: list[str],
           data_dir: Path) -> dict[str, dict[str, float]]:
    """Each backend's macro-F1 on the whole test split and its label agreement with PyTorch fp32."""
    test = domain.splits(data_dir)["test"]
    texts, y = test["text"].tolist(), domain.targets(test)["label"]
    classes = range(len(domain.labels))
    labels = {name: np.asarray(load(domain, workspace, version, name).outputs(texts)[0].argmax(1))
              for name in backends}
    return {name: {"value": macro_f1(y, predicted, classes),
                   "agreement": float(np.mean(predicted == labels[BASELINE]))} for name, predicted in labels.items()}


def measure(domain: TextDomain, workspace: Workspace, repeats: int, threads: int,
            items: dict[int, int] | None = None) -> list[dict[str, Any]]:
    """The rows of one domain: every backend at every batch size."""
    version, backends = production(domain, workspace)
    data_dir = workspace.data_dir_of(workspace.registry.get(domain.name, version))
    rates = throughput(domain, workspace, version, backends, repeats, threads, items or ITEMS)
    metric = scores(domain, workspace, version, backends, data_dir)
    test_texts = len(domain.splits(data_dir)["test"])
    served = choose_backend("auto", "cpu", stored_artifacts(workspace.registry.get(domain.name, version)), version)
    rows = []
    for batch in BATCHES:
        baseline = statistics.median(rates[(BASELINE, batch)])
        for name in backends:
            runs = rates[(name, batch)]
            rows.append({"domain": domain.name, "backend": name, "batch_size": batch, "threads": threads,
                         "items_per_s": round(statistics.median(runs), 1),
                         "items_per_s_spread": [round(min(runs), 1), round(max(runs), 1)],
                         "ratio_to_torch_fp32": round(statistics.median(runs) / baseline, 3),
                         "metric": "macro_f1", "metric_value": round(metric[name]["value"], 4),
                         "metric_delta_to_torch_fp32": round(metric[name]["value"] - metric[BASELINE]["value"], 4),
                         "label_agreement_with_torch_fp32": round(metric[name]["agreement"], 4),
                         "served_on_cpu": name == served,
                         "version": version, "test_texts": test_texts, "repeats": repeats})
    return rows


# What int8 and bf16 speed depends on: VNNI's int8 dot products, AMX's tiles.
CPU_FEATURES = {"avx2": "AVX2", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX"}


def device_name() -> str:
    """The CPU's model, cores and the instruction sets int8 speed depends on."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    features = [name for flag, name in CPU_FEATURES.items() if flag in flags]
    return ", ".join([f"cpu: {cpu}", f"{os.cpu_count()} cores", *features])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", action="append", choices=TEXT_DOMAINS)
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per figure (median and spread)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads of every backend")
    parser.add_argument("--worker", nargs=3, metavar=("DOMAIN", "VERSION", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--items", type=json.loads, default=ITEMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # every backend's threads: ONNX sessions take torch's count
    workspace = Workspace.from_settings(get_settings())
    if args.worker:
        name, version, backend = args.worker
        domain = get_domain(name)
        assert isinstance(domain, TextDomain)
        items = {int(batch): int(n) for batch, n in args.items.items()}
        print(json.dumps(time_backend(domain, workspace, version, backend, items)))
        return
    rows = []
    for name in args.domain or TEXT_DOMAINS:
        domain = get_domain(name)
        assert isinstance(domain, TextDomain)
        measured = measure(domain, workspace, args.repeats, args.threads)
        rows += measured
        for row in measured:
            print(f"{row['domain']:<10} {row['backend']:<11} batch {row['batch_size']:>2}: "
                  f"{row['items_per_s']:>7.1f} items/s ({row['ratio_to_torch_fp32']:.2f}× torch fp32), "
                  f"macro-F1 {row['metric_value']:.4f} ({100 * row['metric_delta_to_torch_fp32']:+.2f} points)")
    path = RESULTS / "inference.json"
    write_json_atomic(path, {"commit": git_commit(), "device": device_name(),
                             "load_average": round(os.getloadavg()[0], 2), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
