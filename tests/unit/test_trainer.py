"""The Train driver's pieces that need no cluster."""

from __future__ import annotations

from training.trainer import run_name


def test_runs_started_in_the_same_second_get_their_own_names() -> None:
    # Ray Train V2 resumes a run from the checkpoints of an earlier run with the same name.
    names = {run_name("energy", "smoke") for _ in range(50)}
    assert len(names) == 50 and all(n.startswith("energy-smoke-") for n in names)
