"""Batch scoring: a Parquet or CSV file through a domain's model with Ray Data `map_batches`.

The same request model validates each row and the same `Predictor` answers it as on the
endpoint. A row that does not validate, or that the model refuses, is reported by its number
(0-based data row) in the output's `error` column; the other rows are scored. The output is one
Parquet file with the input's columns plus `row`, `error` and `result` (the response as JSON).
Source and destination are local paths or URIs (`s3://bucket/in.csv`); the output is written
whole or not at all (locally renamed into place, on an object store one PUT).

Personal data in the output's text cells (the input's columns and the refusal reasons, which may
quote a cell) is masked by type (`core.pii`: `<PHONE>`, `<ADDRESS>`, ...) unless the caller keeps it;
the model reads the text as given.

Each scoring actor may hold GPUs (`gpus`, a fraction shares one): it then loads the version on the
GPU Ray gave it, as a serving replica does (`services.model.replica_device`), and the text models
answer in bf16 there.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from core import pii
from core.errors import ConfigError, DataError
from core.storage import Location
from domains import get_domain
from domains.base import Domain
from services.errors import field_path
from services.model import predict_groups, replica_device
from training.registry import Registry
from training.workspace import Workspace


@dataclass
class BatchReport:
    """What a batch run did: counts, the version that scored, the first refused rows."""

    version: str
    rows: int
    scored: int
    failed: list[tuple[int, str]] = field(default_factory=list)  # (row, reason), the first 100
    failed_count: int = 0
    output: str = ""


def read_table(source: str | os.PathLike[str]) -> pa.Table:
    """A Parquet or CSV file (a local path or a URI) as a table."""
    name, at = os.fspath(source), Location.of(source)
    if not at.exists():
        raise DataError(name, "no such file")
    suffix = PurePosixPath(at.path).suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(at.path, filesystem=at.fs)
        if suffix == ".csv":
            with at.fs.open_input_stream(at.path) as fh:
                return pacsv.read_csv(fh)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(name, f"unreadable: {exc}") from exc
    raise DataError(name, "expected a .parquet or .csv file")


def write_table(table: pa.Table, dest: str | os.PathLike[str]) -> None:
    """Writes `table` as the Parquet file `dest` (a local path or a URI), whole or not at all."""
    with Location.of(dest).writing() as tmp:
        pq.write_table(table, tmp)


def _text_field(annotation: Any) -> bool:
    """Whether a request field takes text (so a CSV cell is its value, not JSON to decode)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return all(a is str or a is type(None) for a in args)
    return annotation is str


def row_item(model: type[BaseModel], row: dict[str, Any]) -> BaseModel:
    """A request item from one row: empty cells are absent, list cells in CSV are JSON text."""
    data = {}
    for name, info in model.model_fields.items():
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if isinstance(value, str) and not _text_field(info.annotation):
            value = json.loads(value)
        elif hasattr(value, "tolist"):  # numpy arrays from Parquet list columns
            value = value.tolist()
        data[name] = value
    return model.model_validate(data)


class Scorer:
    """A Ray Data callable class: each actor loads the version once, on the GPU Ray assigned it
    (`map_batches(num_gpus=...)`) or else the CPU, and scores batches."""

    def __init__(self, domain: str, registry_uri: str, version: str, torch_threads: int, mask: bool) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        self.mask = mask
        self.domain = get_domain(domain)
        self.device = replica_device("auto")
        self.predictor = Registry(registry_uri).load_predictor(self.domain, version, self.device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        errors: list[str | None] = [None] * len(batch)
        results: list[str | None] = [None] * len(batch)
        items, where = [], []
        for i, row in enumerate(batch.to_dict("records")):
            try:
                items.append(row_item(self.domain.request_model, row))
                where.append(i)
            except ValidationError as exc:
                err = exc.errors()[0]
                errors[i] = f"{field_path(tuple(err['loc']))}: {err['msg']}"
            except ValueError as exc:  # a JSON cell that does not parse
                errors[i] = f"not JSON: {exc}"
        answers = predict_groups(self.predictor, [[item] for item in items]) if items else []
        for i, answer in zip(where, answers, strict=True):
            if "error" in answer:
                errors[i] = f"{answer['error'].get('field') or ''}: {answer['error']['message']}".lstrip(": ")
            else:
                results[i] = json.dumps(answer["items"][0])
        out = batch.assign(error=errors, result=results)
        if self.mask:
            for column in out.columns.drop("result"):
                if out[column].dtype == object:
                    out[column] = [pii.mask(v) if isinstance(v, str) else v for v in out[column]]
        return out


def score_file(domain: Domain, workspace: Workspace, source: str | os.PathLike[str], dest: str | os.PathLike[str],
               *, ref: str = "production", batch_size: int = 64, concurrency: int = 1,
               torch_threads: int = 1, gpus: float = 0.0, mask: bool = True) -> BatchReport:
    """Scores `source` (Parquet or CSV) with `domain`'s `ref` version into the Parquet file `dest`;
    each a local path or a URI.

    Args:
        domain: whose model scores.
        workspace: the settings and registry.
        source: the input file.
        dest: the output Parquet file.
        ref: a version id or a stage.
        batch_size: rows per model call.
        concurrency: scoring actors, each loading the model.
        torch_threads: CPUs each actor holds and torch's threads in it.
        gpus: GPUs each actor holds (0.5: two actors share one); 0 scores on the CPU.
        mask: mask personal data in the output's text cells (the module docstring).
    """
    import ray

    from cluster.local import connect

    table = read_table(source)
    missing = [n for n, f in domain.request_model.model_fields.items()
               if f.is_required() and n not in table.column_names]
    if missing:
        raise DataError(os.fspath(source), f"lacks the columns {missing} that {domain.name} requests need",
                        column=missing[0])
    if batch_size < 1 or concurrency < 1:
        raise ConfigError("batch size and concurrency must be at least 1", field="batch_size")
    if gpus < 0 or (gpus > 1 and not float(gpus).is_integer()):
        # Ray's rule for a task's GPUs: a fraction of one GPU, or whole GPUs.
        raise ConfigError(f"GPUs per actor must be 0, a fraction up to 1, or a whole number; got {gpus:g}",
                          field="gpus")
    settings = workspace.settings
    version = workspace.registry.get(domain.name, ref).version
    table = table.append_column("row", pa.array(range(table.num_rows), pa.int64()))

    connect(settings)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = True  # a long job shows how far it is
    scored = ray.data.from_arrow(table).map_batches(
        Scorer, fn_constructor_args=(domain.name, settings.registry_location(), version, torch_threads, mask),
        batch_size=batch_size, batch_format="pandas", concurrency=concurrency, num_cpus=torch_threads,
        num_gpus=gpus)
    out = scored.to_arrow_refs()
    # A batch with no refused row has an all-null `error` column (Arrow type null), one with no scored
    # row an all-null `result`: promoting null to the other batches' string type joins them.
    result = pa.concat_tables(ray.get(out), promote_options="default").sort_by("row") if out else table
    write_table(result, dest)
    error_col = result.column("error").to_pylist()
    rows_col = result.column("row").to_pylist()
    failed = [(r, e) for r, e in zip(rows_col, error_col, strict=True) if e is not None]
    return BatchReport(version, result.num_rows, result.num_rows - len(failed), failed[:100], len(failed),
                       os.fspath(dest))
