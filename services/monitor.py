"""How each served model version is doing on live traffic: input and answer drift against its
reference, and live quality from feedback.

Everything comes from the files the gateways write (`services.samples`) and the registry: the
sampled items of a window (default 7 days) grouped by the version that answered, their features
(`Domain.features`) binned against that version's reference (`domains.drift`), and the feedback that
joins them on (tenant, request id, item) scored by `Domain.score` — the function that scored the
validation split when the reference was made, so live and reference quality compare like for like.

`cityserve monitor` prints it; the `Monitor` actor (one per registry, started by the first
gateway replica) exports it to Prometheus every `samples.monitor_s`, and deletes the days past
retention once an hour.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from domains import get_domain
from domains.drift import MIN_ITEMS, REFERENCE_FILE, drift
from services.samples import Root, SampleArgs, read, sweep
from training.registry import Registry

if TYPE_CHECKING:
    from services.tenants import Store

logger = logging.getLogger(__name__)
WINDOW_DAYS = 7
SWEEP_EVERY_S = 3600.0


@dataclass
class Day:
    """One UTC day of a version's live traffic."""

    day: str
    items: int
    feedback: int
    max_psi: float | None  # None: fewer than MIN_ITEMS items that day
    quality: float | None  # the domain's quality metric on that day's feedback


@dataclass
class VersionHealth:
    """A version's live traffic over the window."""

    domain: str
    version: str
    items: int  # sampled items it answered
    feedback: int  # of them, items with feedback
    shadowed: int  # of them, items it answered as a shadow canary (recorded, not returned)
    latency_p50_ms: float  # the gateway's latency of its sampled requests
    metric: str  # the domain's quality metric, and whether higher is better
    mode: str
    drift: dict[str, float] = field(default_factory=dict)  # PSI per feature; empty: too few items or no reference
    quality: dict[str, float] = field(default_factory=dict)  # live, on feedback
    reference: dict[str, float] = field(default_factory=dict)  # on the validation split, at registration
    days: list[Day] = field(default_factory=list)
    # From the usage ledger, every request of the window the version answered (200), refused (422)
    # or failed on (500), sampled or not; empty when the ledger was not read.
    statuses: dict[int, int] = field(default_factory=dict)
    note: str = ""  # why a figure is missing

    @property
    def max_psi(self) -> tuple[str, float] | None:
        return max(self.drift.items(), key=lambda kv: kv[1]) if self.drift else None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def latest_feedback(table: pa.Table) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Each (tenant, request id, item)'s last feedback: a resend replaces what it sent before."""
    out: dict[tuple[str, str, int], tuple[Any, dict[str, Any]]] = {}
    for row in table.to_pylist():
        key = (row["tenant"], row["request_id"], row["item"])
        if key not in out or row["at"] >= out[key][0]:
            out[key] = (row["at"], json.loads(row["truth"]))
    return {k: truth for k, (_, truth) in out.items()}


def health(registry: Registry, root: Root, domain: str, days: int = WINDOW_DAYS,
           now: float | None = None, ledger: Store | None = None) -> list[VersionHealth]:
    """Each version that answered sampled `domain` traffic in the last `days` days, newest first;
    with the `ledger`, each one's statuses over all its requests of those days."""
    since = (time.time() if now is None else now) - days * 86400
    samples = [r for r in read(root, "samples", domain).to_pylist() if r["at"].timestamp() >= since]
    truths = latest_feedback(read(root, "feedback", domain))
    by_version: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in samples:
        by_version[row["model_version"]].append(row)
    statuses = ledger.version_statuses(domain, since) if ledger is not None else {}
    reports = [_version_health(registry, domain, version, rows, truths)
               for version, rows in sorted(by_version.items(), key=lambda kv: _version_number(kv[0]), reverse=True)]
    for report in reports:
        report.statuses = statuses.get(report.version, {})
    return reports


def _version_health(registry: Registry, domain: str, version: str, rows: list[dict[str, Any]],
                    truths: dict[tuple[str, str, int], dict[str, Any]]) -> VersionHealth:
    """One version's health from its sampled rows, over the window and day by day."""
    dom = get_domain(domain)
    reference, note = _reference(registry, domain, version)
    items = [json.loads(r["request"]) for r in rows]
    answers = [json.loads(r["answer"]) for r in rows]
    features = [dom.features(i, a) for i, a in zip(items, answers, strict=True)]
    keys = [(r["tenant"], r["request_id"], r["item"]) for r in rows]

    def judged(members: Iterable[int]) -> tuple[int, dict[str, float]]:
        """How many of the rows `members` have feedback, and the score of those."""
        found = [n for n in members if keys[n] in truths]
        return len(found), dom.score([answers[n] for n in found], [truths[keys[n]] for n in found]) if found else {}

    def drifted(members: list[int]) -> dict[str, float]:
        return drift(reference, [features[n] for n in members]) if reference and len(members) >= MIN_ITEMS else {}

    everyone = list(range(len(rows)))
    count, quality = judged(everyone)
    report = VersionHealth(domain, version, len(rows), count, sum(bool(r["shadow"]) for r in rows),
                           float(np.median([r["latency_ms"] for r in rows])), dom.quality_metric, dom.quality_mode,
                           drift=drifted(everyone), quality=quality, reference=(reference or {}).get("quality", {}),
                           note=note)
    if reference is not None and len(rows) < MIN_ITEMS:
        report.note = f"drift needs {MIN_ITEMS} sampled items; {len(rows)} so far"
    per_day: dict[str, list[int]] = defaultdict(list)
    for n, row in enumerate(rows):
        per_day[row["at"].strftime("%Y-%m-%d")].append(n)
    for day, members in sorted(per_day.items()):
        day_count, day_quality = judged(members)
        day_psi = drifted(members)
        report.days.append(Day(day, len(members), day_count, max(day_psi.values()) if day_psi else None,
                               day_quality.get(dom.quality_metric)))
    return report


def _reference(registry: Registry, domain: str, version: str) -> tuple[dict[str, Any] | None, str]:
    """A version's reference, or None and why there is none."""
    try:
        data = registry.version_file(registry.get(domain, version), REFERENCE_FILE)
    except Exception as exc:  # the version was deleted, or the registry is away: the rest still shows
        logger.warning("%s %s: no reference (%s)", domain, version, exc)
        return None, f"its reference cannot be read: {exc}"
    if data is None:
        return None, f"no reference: made before references; run `cityserve models calibrate {domain} {version}`"
    return json.loads(data), ""


def _version_number(version: str) -> int:
    return int(version[1:]) if version[1:].isdigit() else -1


class Monitor:
    """The actor exporting each served domain's `health` as gauges (every node's metrics agent
    hands them to Prometheus):

    - `cityserve_drift_psi{domain, version, feature}`: PSI over the window;
    - `cityserve_live_quality{domain, version, metric}` and `cityserve_reference_quality{...}`:
      every figure of `Domain.score`, on feedback and on the validation split;
    - `cityserve_sampled_items{domain, version}` and `cityserve_feedback_items{domain, version}`.

    A series set in one round and not the next (a version that left the window, a drift figure
    with too few items now) is set to NaN, which no alert rule's comparison holds for."""

    def __init__(self, registry_uri: str, domains: list[str], args: dict[str, Any]) -> None:
        from ray.util.metrics import Gauge

        self.registry = Registry(registry_uri)
        self.root = registry_uri
        self.domains = domains
        self.args = SampleArgs.model_validate(args)
        self.task: asyncio.Task[None] | None = None
        self.updated_at: float | None = None
        self.shown: set[tuple[str, tuple[tuple[str, str], ...]]] = set()  # (gauge, tags) set last round
        keys = ("domain", "version")
        self.psi = Gauge("cityserve_drift_psi", description="Population-stability index of a feature over the "
                         "window against the version's reference.", tag_keys=(*keys, "feature"))
        self.live = Gauge("cityserve_live_quality", description="Quality on the window's feedback.",
                          tag_keys=(*keys, "metric"))
        self.reference = Gauge("cityserve_reference_quality", description="Quality on the validation split, "
                               "at registration.", tag_keys=(*keys, "metric"))
        self.sampled = Gauge("cityserve_sampled_items", description="Sampled items in the window.", tag_keys=keys)
        self.judged = Gauge("cityserve_feedback_items", description="Sampled items with feedback in the window.",
                            tag_keys=keys)

    async def start(self) -> None:
        """Starts the export loop, once (every gateway replica asks)."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        swept_at = -math.inf
        while True:
            try:
                await asyncio.to_thread(self.update)
            except Exception:  # the registry is away: the next round tries again
                logger.exception("monitor update failed")
            if time.monotonic() - swept_at >= SWEEP_EVERY_S:
                swept_at = time.monotonic()
                try:  # the one sweeper of the registry's samples and feedback
                    await asyncio.to_thread(sweep, self.root, self.args.retention_days)
                except Exception:  # the store is away: the next hour
                    logger.exception("sample retention sweep failed")
            await asyncio.sleep(self.args.monitor_s)

    def update(self) -> None:
        values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for domain in self.domains:
            for h in health(self.registry, self.root, domain, self.args.window_days):
                tags: tuple[tuple[str, str], ...] = (("domain", domain), ("version", h.version))
                values["sampled", tags] = h.items
                values["judged", tags] = h.feedback
                values.update({("psi", (*tags, ("feature", f))): v for f, v in h.drift.items()})
                values.update({("live", (*tags, ("metric", m))): v for m, v in h.quality.items()})
                values.update({("reference", (*tags, ("metric", m))): v for m, v in h.reference.items()})
        for gone in self.shown - values.keys():
            values[gone] = math.nan
        for (gauge, tags), value in values.items():
            getattr(self, gauge).set(value, tags=dict(tags))
        self.shown = {k for k, v in values.items() if not math.isnan(v)}
        self.updated_at = time.time()

    async def status(self) -> dict[str, Any]:
        return {"updated_at": self.updated_at, "domains": self.domains}


def monitor_actor(registry_uri: str, domains: list[str], args: SampleArgs) -> Any:
    """The registry's monitor actor, created by the first gateway replica that asks, and started."""
    import ray

    from services.admission import NAMESPACE, url_digest

    actor = ray.remote(Monitor).options(
        name=f"cityserve-monitor-{url_digest(registry_uri)}", namespace=NAMESPACE, lifetime="detached",
        get_if_exists=True, num_cpus=0, max_restarts=-1,
    ).remote(registry_uri, domains, args.model_dump())
    actor.start.remote()  # type: ignore[attr-defined]
    return actor
