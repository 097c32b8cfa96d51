"""Where a model runs: a serving replica loads its model on the device Ray assigned it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from core.errors import ConfigError
from domains import get_domain
from services.config import ModelConfig
from services.model import replica_device
from training.registry import Registry


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
        def load_predictor(self, model_dir: Path, version: str, device: str = "cpu") -> Any:
            seen.append(device)
            return None

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights")
    registry = Registry(str(tmp_path / "registry"))
    version = registry.register("energy", model, {"metric": "val_mape", "metrics": {}}).version
    registry.load_predictor(Recording(), version, device="cuda:1")
    assert seen == ["cuda:1"]
