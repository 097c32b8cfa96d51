"""The model registry: versions of each domain's model, and the stage that says which one serves.

Layout under the registry root (a local folder or any pyarrow filesystem URI such as s3://bucket/x):

    <domain>/v<N>/            model.pt, config.json, meta.json, domain extras, version.json
    <domain>/stages.json      {"production": "v3", "history": ["v1", "v3"], "generation": 4}

A version exists only once its `version.json` is written, and that file is written last (locally
the whole folder is renamed into place), so a crash mid-write never leaves a half version. Every
version starts as a `candidate`; `promote` makes one `production`, `rollback` returns to the one
before. Serving names the `production` alias, never a version number; each promote or rollback
bumps the domain's `generation`, which the serve config carries so replicas know to reload.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from domains.errors import RegistryError

if TYPE_CHECKING:
    from domains.base import Domain, Predictor

VERSION_FILE = "version.json"
STAGES_FILE = "stages.json"
PRODUCTION = "production"
CANDIDATE = "candidate"


@dataclass(frozen=True)
class Version:
    """One registered model version (the content of its `version.json`, plus its stage)."""

    domain: str
    version: str
    record: dict[str, Any]
    stage: str

    @property
    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = self.record.get("metrics", {})
        return metrics


def code_revision() -> str:
    """The git commit of this checkout (+dirty when it has uncommitted changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


class Registry:
    """Versions and stages of every domain's models under one root."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).resolve())
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    # ---- reading -----------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(path) as fh:
                data: dict[str, Any] = json.loads(fh.read().decode())
                return data
        except FileNotFoundError:
            return None

    def _write_json(self, path: str, data: dict[str, Any]) -> None:
        payload = json.dumps(data, indent=2, default=str).encode()
        if self.local:  # write then rename: readers never see a half-written file
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            Path(tmp).parent.mkdir(parents=True, exist_ok=True)
            Path(tmp).write_bytes(payload)
            os.replace(tmp, path)
        else:  # one object PUT is atomic on object stores
            with self.fs.open_output_stream(path) as fh:
                fh.write(payload)

    def stages(self, domain: str) -> dict[str, Any]:
        return self._read_json(self._path(domain, STAGES_FILE)) or {PRODUCTION: None, "history": []}

    def generation(self, domain: str) -> int:
        """How many times the domain's production stage has moved."""
        return int(self.stages(domain).get("generation", 0))

    def _stage_of(self, version: str, stages: dict[str, Any]) -> str:
        if stages.get(PRODUCTION) == version:
            return PRODUCTION
        return "archived" if version in stages.get("history", []) else CANDIDATE

    def versions(self, domain: str) -> list[Version]:
        """Every complete version of a domain, oldest first."""
        selector = pafs.FileSelector(self._path(domain), allow_not_found=True)
        stages = self.stages(domain)
        found = []
        for info in self.fs.get_file_info(selector):
            name = info.base_name
            if info.type != pafs.FileType.Directory or not name.startswith("v") or not name[1:].isdigit():
                continue
            record = self._read_json(self._path(domain, name, VERSION_FILE))
            if record is not None:
                found.append(Version(domain, name, record, self._stage_of(name, stages)))
        return sorted(found, key=lambda v: int(v.version[1:]))

    def get(self, domain: str, ref: str = PRODUCTION) -> Version:
        """A version by id (`v3`), or by alias: `production`, `latest`."""
        versions = self.versions(domain)
        if ref == PRODUCTION:
            ref = self.stages(domain).get(PRODUCTION) or ""
            if not ref:
                raise RegistryError(f"{domain} has no production version; promote one with "
                                    f"`cityserve models promote {domain} VERSION`", field="version")
        elif ref == "latest":
            if not versions:
                raise RegistryError(f"{domain} has no versions; train one with `cityserve train {domain}`")
            return versions[-1]
        for v in versions:
            if v.version == ref:
                return v
        raise RegistryError(f"{domain} has no version {ref!r}; have {[v.version for v in versions]}",
                            field="version")

    @contextlib.contextmanager
    def model_dir(self, domain: str, version: str) -> Iterator[Path]:
        """A local folder with the version's files (the registry folder itself when local)."""
        src = self._path(domain, version)
        if self.local:
            yield Path(src)
            return
        with tempfile.TemporaryDirectory(prefix=f"cityserve-{domain}-{version}-") as tmp:
            pafs.copy_files(src, tmp, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            yield Path(tmp)

    def load_predictor(self, domain: Domain, ref: str = PRODUCTION) -> Predictor:
        """`domain`'s version `ref` (an id or alias), loaded for inference."""
        version = self.get(domain.name, ref)
        with self.model_dir(domain.name, version.version) as path:
            return domain.load_predictor(path, version.version)

    # ---- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, domain: str) -> Iterator[None]:
        """Serialises writers of one domain on a local registry (object stores: one writer assumed)."""
        if not self.local:
            yield
            return
        Path(self._path(domain)).mkdir(parents=True, exist_ok=True)
        with open(self._path(domain, ".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _next_version(self, domain: str) -> str:
        selector = pafs.FileSelector(self._path(domain), allow_not_found=True)
        numbers = [int(i.base_name[1:]) for i in self.fs.get_file_info(selector)
                   if i.base_name.startswith("v") and i.base_name[1:].isdigit()]
        return f"v{max(numbers, default=0) + 1}"

    def register(self, domain: str, model_dir: Path, record: dict[str, Any]) -> Version:
        """Copies a model directory in as the next version (a `candidate`).

        Args:
            domain: the domain.
            model_dir: weights, config, meta and extras, as `training.loop.write_model_dir` writes.
            record: metrics, data manifest checksum, profile, lineage; created time and code
                revision are added here.
        """
        with self._lock(domain):
            version = self._next_version(domain)
            full = {**record, "domain": domain, "version": version,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "code_revision": record.get("code_revision") or code_revision()}
            if self.local:
                tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self._path(domain)))
                try:
                    shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
                    (tmp / VERSION_FILE).write_text(json.dumps(full, indent=2, default=str))
                    os.replace(tmp, self._path(domain, version))
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            else:
                dest = self._path(domain, version)
                pafs.copy_files(str(model_dir), dest, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=self.fs)
                self._write_json(self._path(domain, version, VERSION_FILE), full)
        return self.get(domain, version)

    def promote(self, domain: str, version: str, verify: Callable[[Path], object] | None = None) -> Version:
        """Makes `version` production. `verify(model_dir)` must load it, or promotion is refused."""
        target = self.get(domain, version)
        if verify is not None:
            try:
                with self.model_dir(domain, target.version) as path:
                    verify(path)
            except Exception as exc:  # any load failure refuses the promotion; production stays
                raise RegistryError(f"{domain} {version} does not load ({type(exc).__name__}: {exc}); "
                                    f"production is unchanged") from exc
        with self._lock(domain):
            stages = self.stages(domain)
            current = stages.get(PRODUCTION)
            if current == target.version:
                return target
            history = [v for v in stages.get("history", []) if v != target.version]
            if current:
                history.append(current)
            self._write_json(self._path(domain, STAGES_FILE), {PRODUCTION: target.version, "history": history,
                                                               "generation": int(stages.get("generation", 0)) + 1})
        return self.get(domain, target.version)

    def rollback(self, domain: str) -> Version:
        """Returns production to the version that served before the current one."""
        with self._lock(domain):
            stages = self.stages(domain)
            history = list(stages.get("history", []))
            if not history:
                raise RegistryError(f"{domain} has no earlier production version to roll back to")
            previous = history.pop()
            self._write_json(self._path(domain, STAGES_FILE), {PRODUCTION: previous, "history": history,
                                                               "generation": int(stages.get("generation", 0)) + 1})
        return self.get(domain, previous)
