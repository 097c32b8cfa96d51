"""The learning loop's record: a sampled, masked log of answered requests, and the ground truth
tenants send back about them.

Both are Parquet under the registry's filesystem (a local folder or an object store), partitioned
by domain and UTC day, so a retention sweep drops whole days and a reader picks the days it needs:

    {registry}/samples/domain=events/day=2026-12-04/part-20261204T101500-1a2b3c4d.parquet
    {registry}/feedback/domain=events/day=2026-12-04/part-...parquet

A sample row is one item of an answered request: its request id and position (`item`), tenant,
model version, latency, the request item and the answer as JSON; a shadow canary's answer to the
same item is a row of its own, marked `shadow`. The item's free text
(`Domain.text_fields`) is masked (`core.pii`) before it leaves the gateway's memory; an answer's
`explanation` is left out (it quotes the text's words). A feedback row carries the same request id
and position with the truth (`Domain.truth_model`: classes and numbers, no free text).

The gateway offers samples to a `SampleLog`: a bounded queue a background task empties into one
Parquet file per domain and day every `flush_s`. A full queue drops the sample and counts it: a
request never waits for the log. Feedback is written before its request is answered (`write`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, create_model

from core.storage import Location
from domains import get_domain

logger = logging.getLogger("ray.serve")
Kind = Literal["samples", "feedback"]
KINDS: tuple[Kind, ...] = ("samples", "feedback")
Root = str | os.PathLike[str] | Location  # the registry's root: where `samples/` and `feedback/` are
# The last position an item can have: requests carry at most 4096 (`DomainArgs.max_items`).
MAX_ITEM = 4095
# A request id as the gateway accepts one (X-Request-Id), and so as feedback may name it.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
SCHEMAS: dict[Kind, pa.Schema] = {
    "samples": pa.schema([("request_id", pa.string()), ("item", pa.int32()), ("at", pa.timestamp("ms", "UTC")),
                          ("tenant", pa.string()), ("model_version", pa.string()), ("latency_ms", pa.float64()),
                          ("request", pa.string()), ("answer", pa.string()), ("shadow", pa.bool_())]),
    "feedback": pa.schema([("request_id", pa.string()), ("item", pa.int32()), ("at", pa.timestamp("ms", "UTC")),
                           ("tenant", pa.string()), ("truth", pa.string())]),
}


class SampleArgs(BaseModel):
    """How a gateway replica keeps its sample log (the serve config's `args.samples`)."""

    model_config = ConfigDict(extra="forbid")

    retention_days: int = Field(30, ge=1, le=3650, description="Days of samples and feedback kept; older days are "
                                "deleted by the monitor's hourly sweep (and `cityserve samples sweep`).")
    queue_size: int = Field(10_000, ge=1, description="Samples a gateway replica holds before writing; past it "
                            "new samples are dropped and counted (requests never wait for the log).")
    flush_s: float = Field(5.0, gt=0, le=3600, description="How often a replica writes what it holds.")
    monitor_s: float = Field(60.0, ge=1, le=86400, description="How often the monitor re-reads the window's samples "
                             "and feedback and updates its Prometheus metrics (drift, live quality).")
    window_days: int = Field(7, ge=1, le=3650, description="The days of samples and feedback the monitor reads.")


@dataclass(frozen=True)
class Sample:
    """One answered request as the sample log keeps it (before masking)."""

    domain: str
    request_id: str
    at: float
    tenant: str
    model_version: str
    latency_ms: float
    items: Sequence[dict[str, Any]]
    answers: Sequence[dict[str, Any]]
    shadow: bool = False  # the answers of a shadow canary: recorded, never returned


def feedback_model(domain: str) -> type[BaseModel]:
    """The body item of `POST /v1/{domain}/feedback`: which answer, and what really happened."""
    from domains.base import request_example

    truth = get_domain(domain).truth_model
    example: dict[str, Any] = {"request_id": "8c3f0a6e2d5b4f1a", "item": 0, "truth": request_example(truth)}
    model: type[BaseModel] = create_model(
        f"{truth.__name__.removesuffix('Truth')}Feedback",
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [example]}),
        __doc__=f"Ground truth about one answered {domain} item: the request's id (its X-Request-Id) and the "
                "item's position in it.",
        request_id=(str, Field(pattern=REQUEST_ID_PATTERN, description="The X-Request-Id of the answered request.")),
        item=(int, Field(0, ge=0, le=MAX_ITEM, description="The item's position in that request (0 for a single "
                         "item).")),
        truth=(truth, Field(description=truth.__doc__)),
    )
    return model


def sample_rows(samples: Iterable[Sample]) -> list[dict[str, Any]]:
    """One row per item of each sample, masked, without the answers' explanations."""
    rows = []
    for s in samples:
        for i, (item, answer) in enumerate(zip(s.items, s.answers, strict=True)):
            kept = {k: v for k, v in answer.items() if k != "explanation"}
            rows.append({"domain": s.domain, "request_id": s.request_id, "item": i, "at": s.at, "tenant": s.tenant,
                         "model_version": s.model_version, "latency_ms": s.latency_ms,
                         "request": json.dumps(get_domain(s.domain).masked(item), ensure_ascii=False),
                         "answer": json.dumps(kept, ensure_ascii=False), "shadow": s.shadow})
    return rows


def feedback_rows(domain: str, tenant: str, at: float, feedback: Iterable[BaseModel]) -> list[dict[str, Any]]:
    return [{"domain": domain, "request_id": f.request_id, "item": f.item, "at": at,  # type: ignore[attr-defined]
             "tenant": tenant, "truth": f.truth.model_dump_json(exclude_none=True)}  # type: ignore[attr-defined]
            for f in feedback]


def day_of(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def write(root: Root, kind: Kind, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Writes `rows` (each with its `domain` and `at` in Unix seconds) as one Parquet file per domain
    and day under `root/kind`, each whole or absent; returns the files' URIs."""
    import pyarrow.parquet as pq

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["domain"], day_of(row["at"])), []).append(row)
    written = []
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for (domain, day), group in sorted(groups.items()):
        schema = SCHEMAS[kind]
        table = pa.Table.from_pylist([{**r, "at": int(r["at"] * 1000)} for r in group], schema=schema)
        target = Location.of(root).join(kind, f"domain={domain}", f"day={day}",
                                        f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet")
        if target.local:
            target.fs.create_dir(target.path.rsplit("/", 1)[0], recursive=True)
        with target.writing() as tmp:
            pq.write_table(table, tmp)
        written.append(str(target))
    return written


def read(root: Root, kind: Kind, domain: str) -> pa.Table:
    """Every row of `kind` kept for `domain` (with its `day`), in no particular order; empty when none."""
    import pyarrow.dataset as pads

    # The schema given, not read from a file: a column added since older files were written reads as null there.
    day = pa.field("day", pa.string())
    schema = SCHEMAS[kind].append(day)
    where = Location.of(root).join(kind, f"domain={domain}")
    if not where.exists():
        return schema.empty_table()
    days = pads.partitioning(pa.schema([day]), flavor="hive")
    return pads.dataset(where.path, filesystem=where.fs, format="parquet", partitioning=days, schema=schema).to_table()


@dataclass(frozen=True)
class Partition:
    """One day of one domain's samples or feedback."""

    kind: Kind
    domain: str
    day: str
    files: int
    rows: int
    bytes: int


def partitions(root: Root) -> list[Partition]:
    """Every day of samples and feedback under `root`, with its files, rows and bytes."""
    import pyarrow.parquet as pq

    out = []
    top = Location.of(root)
    for kind in KINDS:
        for domain_dir in _dirs(top.join(kind), "domain="):
            for day_dir in _dirs(domain_dir, "day="):
                files = [f for f in day_dir.children() if f.type == pafs.FileType.File and f.path.endswith(".parquet")]
                rows = 0
                for f in files:
                    with day_dir.fs.open_input_file(f.path) as fh:
                        rows += pq.ParquetFile(fh).metadata.num_rows
                out.append(Partition(kind, domain_dir.name.removeprefix("domain="), day_dir.name.removeprefix("day="),
                                     len(files), rows, sum(f.size or 0 for f in files)))
    return out


def sweep(root: Root, retention_days: int, now: float | None = None) -> list[Partition]:
    """Deletes the days older than `retention_days` (by UTC day); returns what it deleted."""
    cutoff = day_of((time.time() if now is None else now) - retention_days * 86400)
    top = Location.of(root)
    old = [p for p in partitions(top) if p.day < cutoff]
    for p in old:
        where = top.join(p.kind, f"domain={p.domain}", f"day={p.day}")
        where.fs.delete_dir(where.path)
    return old


def _dirs(parent: Location, prefix: str) -> list[Location]:
    return [parent.join(info.base_name) for info in parent.children()
            if info.type == pafs.FileType.Directory and info.base_name.startswith(prefix)]


class SampleLog:
    """A gateway replica's sample log: `offer` never waits; a task writes what it holds every
    `flush_s`. Counts what it wrote, dropped (the queue was full) and lost (a write failed: the
    registry's filesystem was away). Expired days are swept by the registry's one monitor actor
    (`services.monitor`), not by each replica."""

    def __init__(self, root: str, args: SampleArgs, observe: Callable[[str, int], None] | None = None) -> None:
        self.root = root
        self.args = args
        self.queue: asyncio.Queue[Sample] | None = None  # made on first use, in the replica's event loop
        self.task: asyncio.Task[None] | None = None
        self.held: list[Sample] = []  # taken from the queue, not yet handed to a write
        self.counts = {"written": 0, "dropped": 0, "lost": 0}
        self.observe = observe  # also told each count's increase (the gateway's metrics)

    def _count(self, outcome: str, n: int) -> None:
        self.counts[outcome] += n
        if self.observe is not None:
            self.observe(outcome, n)

    def offer(self, sample: Sample) -> bool:
        """Queues `sample` for writing; False (and counted as dropped) when the queue is full."""
        if self.queue is None:
            self.queue = asyncio.Queue(self.args.queue_size)
            self.task = asyncio.get_running_loop().create_task(self._run())
        try:
            self.queue.put_nowait(sample)
        except asyncio.QueueFull:
            self._count("dropped", 1)
            return False
        return True

    async def _run(self) -> None:
        assert self.queue is not None
        while True:
            self.held.append(await self.queue.get())
            await asyncio.sleep(self.args.flush_s)  # what else arrives meanwhile goes into the same files
            await self._write(self._take())

    def _take(self) -> list[Sample]:
        """What is held and queued, no longer either."""
        taken, self.held = self.held, []
        while self.queue is not None and not self.queue.empty():
            taken.append(self.queue.get_nowait())
        return taken

    async def _write(self, held: list[Sample]) -> None:
        try:
            # Masking too in the thread: on the event loop it would hold up the replica's requests.
            await asyncio.to_thread(lambda: write(self.root, "samples", sample_rows(held)))
            self._count("written", len(held))
        except Exception:  # the registry's filesystem is away: these samples are lost, requests are not
            self._count("lost", len(held))
            logger.exception("%d samples not written", len(held))

    async def close(self) -> None:
        """Writes what the queue holds (a stopping replica's last samples)."""
        if self.task is not None:
            self.task.cancel()
        held = self._take()
        if held:
            await self._write(held)
