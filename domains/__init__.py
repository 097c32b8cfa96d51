"""The four city domains. `get_domain(name)` imports a domain only when asked: serving a
forecaster never imports transformers.

Each domain is a package (`events`, `sentiment`, `traffic`, `energy`) holding its data contract,
model, baselines and data preparation; what they share sits beside them: `base` (what a domain
is), `tables` (the prepared-data layout), `metrics`, `text` (the MiniLM text domains) and
`forecast` (the forecasters' quantile answer and loss).
"""

from __future__ import annotations

import importlib

from core.errors import ConfigError
from domains.base import Domain

__all__ = ["DOMAINS", "get_domain"]

DOMAINS: dict[str, str] = {
    "traffic": "domains.traffic:TrafficDomain",
    "events": "domains.events:EventsDomain",
    "sentiment": "domains.sentiment:SentimentDomain",
    "energy": "domains.energy:EnergyDomain",
}


def get_domain(name: str) -> Domain:
    """The domain called `name`; a clear error for an unknown one."""
    if name not in DOMAINS:
        raise ConfigError(f"unknown domain {name!r}; choose one of {sorted(DOMAINS)}", field="domain")
    module, cls = DOMAINS[name].split(":")
    domain: Domain = getattr(importlib.import_module(module), cls)()
    return domain
