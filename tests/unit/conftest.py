"""Unit tests run without a Ray cluster: any `ray.init` fails loudly (as Ray's own unit tests do)."""

from __future__ import annotations

from typing import Any, NoReturn

import pytest


@pytest.fixture(autouse=True)
def _no_ray_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("unit tests must not start Ray; put this test under tests/integration")

    monkeypatch.setattr(ray, "init", refuse)
