"""How a Ray Train run's workers take a cluster's nodes: the placement strategies Ray knows, and the
default CPUs per worker that lets every worker run at once."""

from __future__ import annotations

from collections.abc import Sequence

from core.errors import ConfigError

# How Ray places a run's workers (its placement group's strategy): PACK fills one node first (the least
# traffic between workers); SPREAD puts them on different nodes where it can (a node lost costs fewer of
# them, and each gets a node's CPUs); STRICT_* refuse to start otherwise.
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def default_cpus_per_worker(nodes: Sequence[tuple[float, float]], num_workers: int, use_gpu: bool) -> float:
    """The most whole CPUs per worker at which all `num_workers` workers fit at once on `nodes`
    ((CPUs, GPUs) of each node alive now); GPU workers only where a GPU is free for each. A share of the
    whole cluster's CPUs can be more than any one node holds, and Ray would then wait forever. 1 where
    nothing fits yet (an autoscaler may still add the nodes)."""
    def fit(cpus: int) -> int:
        return sum(min(int(node_cpus // cpus), int(node_gpus) if use_gpu else num_workers)
                   for node_cpus, node_gpus in nodes)

    largest = int(max((node_cpus for node_cpus, _ in nodes), default=1))
    return float(max((c for c in range(1, largest + 1) if fit(c) >= num_workers), default=1))


def check_placement(strategy: str) -> None:
    """Refuses a placement strategy Ray does not know, before anything starts."""
    if strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError(f"placement strategy {strategy!r}: choose one of {list(PLACEMENT_STRATEGIES)}",
                          field="placement_strategy")
