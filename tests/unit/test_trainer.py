"""The Train driver's pieces that need no cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cluster.placement import default_cpus_per_worker
from core.errors import ConfigError
from core.settings import Settings
from training.trainer import run_name


def test_runs_started_in_the_same_second_get_their_own_names() -> None:
    # Ray Train V2 resumes a run from the checkpoints of an earlier run with the same name.
    names = {run_name("energy", "smoke") for _ in range(50)}
    assert len(names) == 50 and all(n.startswith("energy-smoke-") for n in names)


def test_a_run_places_its_workers_as_asked_and_packs_them_by_default() -> None:
    from domains import get_domain
    from training.runs import torch_trainer

    def trainer(**placement: Any) -> Any:
        return torch_trainer(get_domain("energy"), {}, name="n", storage_path="/tmp/unused", num_workers=2,
                             cpus_per_worker=1, gpus_per_worker=0, max_failures=0, **placement)

    assert trainer().scaling_config.placement_strategy == "PACK"
    assert trainer(placement_strategy="SPREAD").scaling_config.placement_strategy == "SPREAD"


def test_an_unknown_placement_strategy_is_refused_before_anything_starts(tmp_path: Path) -> None:
    from domains import get_domain
    from training.trainer import make_trainer

    # Refused before the data is prepared or Ray is joined (unit tests refuse ray.init).
    with pytest.raises(ConfigError, match="'SPRED'") as caught:
        make_trainer(get_domain("energy"), Settings(data_dir=tmp_path), profile="smoke", placement_strategy="SPRED")
    assert caught.value.field == "placement_strategy" and not any(tmp_path.iterdir())


@pytest.mark.parametrize(("nodes", "workers", "use_gpu", "expected"), [
    ([(2, 0)], 1, False, 2),  # this machine: one worker takes both cores, as before
    ([(2, 0)], 2, False, 1),
    ([(0, 0), (4, 0), (4, 0)], 1, False, 4),  # a share of 8 would fit on no node
    ([(0, 0), (4, 0), (2, 0)], 2, False, 2),  # 3 each would leave the second worker waiting
    ([(8, 0), (16, 1)], 1, True, 16),  # a GPU worker goes where the GPU is
    ([(8, 0), (16, 1), (16, 1)], 2, True, 16),
    ([(8, 0), (16, 1)], 2, True, 1),  # one GPU for two workers: nothing fits until a node is added
    ([(8, 0)], 1, True, 1),  # no GPU node yet (an autoscaled group at zero)
])
def test_default_cpus_per_worker_lets_every_worker_run_at_once(nodes: list[tuple[float, float]], workers: int,
                                                               use_gpu: bool, expected: float) -> None:
    assert default_cpus_per_worker(nodes, workers, use_gpu) == expected
