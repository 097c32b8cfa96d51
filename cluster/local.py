"""The local Ray cluster: join the configured one, or start one of our own bound to 127.0.0.1."""

from __future__ import annotations

import os
from typing import Any

from cityserve.config import Settings


def connect(settings: Settings, *, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Initialises Ray once per process.

    `ray.init()` without an address attaches to whatever cluster it finds on the machine (possibly
    someone else's), so say what we mean: the configured address, or `"local"` for our own.
    """
    import ray

    if ray.is_initialized():
        return
    # Training output from workers reaches this driver; keep Ray's own progress bars quiet.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if settings.ray_address:
        ray.init(address=settings.ray_address, **kwargs)
        return
    temp = str(settings.ray_temp_dir.resolve()) if settings.ray_temp_dir else None
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", _temp_dir=temp, **kwargs)
