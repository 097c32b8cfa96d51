"""Unit tests run without a Ray cluster: any `ray.init` fails loudly (as Ray's own unit tests do).

`smoke` builds what the domain tests share, once per test session and only for the domains a run
asks for: a domain's prepared smoke data, a model trained on it in this process, the predictor
loaded from it and the domain's evaluation of that predictor. A domain's test module names its
domain in `DOMAIN` and takes `run` (that domain's `SmokeRun`) and `data_dir` (its smoke data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:  # imported when first used: tests that use no domain never load torch
    from domains.base import Domain, Evaluation, Predictor
    from training.registry import Registry


@pytest.fixture(autouse=True)
def _no_ray_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("unit tests must not start Ray; put this test under tests/integration")

    monkeypatch.setattr(ray, "init", refuse)


def events_registry(root: Path, versions: int) -> Registry:
    """A registry under `root` holding `versions` events versions of a stand-in model (weights
    only: what the registry's stages need), v1 production."""
    from training.registry import Registry

    model = root / "model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights")
    registry = Registry(str(root / "registry"))
    for _ in range(versions):
        registry.register("events", model, {})
    registry.promote("events", "v1")
    return registry


# Changes to a domain's "smoke" profile for the shared smoke model: traffic's two epochs would
# double its training time, and one epoch is all its tests need.
SMOKE_OVERRIDES: dict[str, dict[str, Any]] = {"traffic": {"epochs": 1}}


@dataclass
class SmokeRun:
    """One domain's smoke data, and (built on first use) its trained model and evaluation."""

    domain: Domain
    root: Path  # a folder of this run's own: data under `data_dir`, the model, the figure
    _history: list[dict[str, float]] | None = None
    _predictor: Predictor | None = None
    _evaluation: Evaluation | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def figure(self) -> Path:
        return self.root / f"{self.domain.name}.png"

    @property
    def config(self) -> dict[str, Any]:
        return {**self.domain.default_config("smoke"), **SMOKE_OVERRIDES.get(self.domain.name, {})}

    @property
    def history(self) -> list[dict[str, float]]:
        """The metrics of each epoch of the smoke training (trains on first use)."""
        if self._history is None:
            from training.loop import fit_plain

            self._history = fit_plain(self.domain, self.config, self.data_dir, self.model_dir)
        return self._history

    @property
    def predictor(self) -> Predictor:
        """The smoke-trained model, loaded as serving loads a version (version "smoke-v1")."""
        if self._predictor is None:
            assert self.history  # trained
            self._predictor = self.domain.load_predictor(self.model_dir, "smoke-v1")
        return self._predictor

    @property
    def evaluation(self) -> Evaluation:
        """The domain's evaluation of the smoke predictor on the smoke test split."""
        if self._evaluation is None:
            self._evaluation = self.domain.evaluate(self.predictor, self.data_dir, self.figure)
        return self._evaluation


@pytest.fixture(scope="session")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], SmokeRun]:
    """`smoke("events")`: the events domain's `SmokeRun`, its data prepared on first use."""
    runs: dict[str, SmokeRun] = {}

    def build(name: str) -> SmokeRun:
        from domains import get_domain

        if name not in runs:
            run = SmokeRun(get_domain(name), tmp_path_factory.mktemp(f"{name}-smoke"))
            run.domain.prepare(run.data_dir, smoke=True)
            runs[name] = run
        return runs[name]

    return build


@pytest.fixture(scope="module")
def run(request: pytest.FixtureRequest, smoke: Callable[[str], SmokeRun]) -> SmokeRun:
    """The `SmokeRun` of the test module's `DOMAIN`."""
    name = getattr(request.module, "DOMAIN", None)
    if not isinstance(name, str):
        raise TypeError(f"{request.module.__name__} uses `run` but names no DOMAIN")
    return smoke(name)


@pytest.fixture(scope="module")
def data_dir(run: SmokeRun) -> Path:
    """The test module's domain's prepared smoke data (the data root)."""
    return run.data_dir
