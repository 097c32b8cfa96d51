"""Integration tests share one real Ray cluster per session (starting one costs ~10 s here)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cluster.local import connect
from cluster.serve import serve_env
from core.settings import Settings
from training.workspace import Workspace

# For speed, not correctness: serving last reuses the versions that training and sweeping
# registered (a serving module trains smoke versions for itself when it runs first). Every module
# passes in any order: `pytest --random-order tests/integration` shuffles modules and their tests
# (this sort runs first, the shuffle after it).
ORDER = ("test_train.py", "test_tune.py", "test_training_faults.py", "test_serve.py", "test_reliability.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In a run of both tiers the unit tests come first: they run while the multi-node checks,
    started at collection, use the core they leave idle. Then the integration modules, in ORDER."""
    def position(item: pytest.Item) -> tuple[bool, int]:
        integration = item.path.parent.name == "integration"
        return integration, ORDER.index(item.path.name) if item.path.name in ORDER else -1

    items.sort(key=position)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Starts the multi-node checks at once when they were collected (test_cluster.py says why)."""
    if any(item.path.name == "test_cluster.py" for item in session.items):
        from tests.integration.test_cluster import CLUSTER_CHECKS, ClusterChecks

        session.config.stash[CLUSTER_CHECKS] = ClusterChecks.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """No multi-node run outlives the session (one whose test never ran, after `-x`, Ctrl-C...)."""
    from tests.integration.test_cluster import CLUSTER_CHECKS

    run = session.config.stash.get(CLUSTER_CHECKS, None)
    if run is not None:
        run.stop()


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("cityserve")
    (root / "state").mkdir()  # as `cityserve` makes it before anything writes there
    return Settings(data_dir=root / "data", registry_uri=str(root / "registry"),
                    storage_path=str(root / "ray_results"), reports_dir=root / "reports",
                    ray_temp_dir=tmp_path_factory.mktemp("ray"), state_dir=root / "state",
                    ledger_url=f"sqlite:///{root / 'state' / 'ledger.db'}")


@pytest.fixture(scope="session")
def workspace(settings: Settings) -> Workspace:
    return Workspace.from_settings(settings)


@pytest.fixture(scope="session")
def ray_cluster(settings: Settings) -> Iterator[None]:
    """A local 2-CPU cluster of our own, bound to 127.0.0.1, with the platform's Serve settings (its
    processes inherit this environment); shut down after the session."""
    import ray

    saved = dict(os.environ)
    # Not RAY_AUTH_MODE: this process read it when it imported ray; the cluster keeps the default.
    os.environ.update({k: v for k, v in serve_env().items() if k != "RAY_AUTH_MODE"})
    connect(settings, num_cpus=2)
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)
