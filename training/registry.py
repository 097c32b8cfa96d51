"""The model registry: versions of each domain's model, and the stage that says which one serves.

Layout under the registry root (a local folder or any pyarrow filesystem URI such as s3://bucket/x):

    <domain>/v<N>/            model.pt, config.json, meta.json, domain extras, version.json
    <domain>/stages.json      {"production": "v3", "history": ["v1", "v3"], "generation": 4}

A version exists only once its `version.json` is written, and that file is written last (locally
the whole folder is renamed into place), so a crash mid-write never leaves a half version. The
record keeps the sha256 of every model file (`files`); promotion and loading refuse a version whose
files are missing or differ, since a flipped byte inside a weights tensor still loads (torch does
not check its archive's CRCs) and would serve wrong predictions. A version with an unreadable
record is left out of listings and refused by name; it never hides the others. Every
version starts as a `candidate`; `promote` makes one `production`, `rollback` returns to the one
before. Serving names the `production` alias, never a version number; each promote or rollback
bumps the domain's `generation`, which the serve config carries so replicas know to reload.
Writers of a domain's numbering and stages take its lock (`<domain>/.lock`: a file lock on a
disk, writers' claims on an object store), so concurrent registrations get distinct numbers there too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from core.errors import ConfigError, RegistryError
from core.io import sha256_file
from core.storage import Location
from domains.onnx_text import ARTIFACTS, choose_backend, gate_failures

if TYPE_CHECKING:
    from domains.base import Domain, Predictor

VERSION_FILE = "version.json"
STAGES_FILE = "stages.json"
ISSUED_FILE = "issued.json"  # the highest version number ever given out in the domain
LOCK = ".lock"  # a file locally; a prefix of writers' claims on an object store
PRODUCTION = "production"
CANDIDATE = "candidate"
# In stages.json while a canary runs: {"version", "weight" (percent of requests), "shadow"}.
CANARY = "canary"
FILES = "files"  # in version.json: {path in the version folder: sha256}, recorded at registration

logger = logging.getLogger(__name__)


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


def file_digests(model_dir: Path) -> dict[str, str]:
    """The sha256 of every file in a model folder, by path relative to it (the record excluded)."""
    return {p.relative_to(model_dir).as_posix(): sha256_file(p) for p in sorted(model_dir.rglob("*"))
            if p.is_file() and p.name != VERSION_FILE}


# The packages whose code a model or a report depends on: a report or figure written into the
# checkout does not make its code dirty.
CODE_PACKAGES = ("core", "cityserve", "domains", "services", "training", "cluster")
CHECKOUT = Path(__file__).resolve().parents[1]


def code_revision(root: Path = CHECKOUT) -> str:
    """The git commit of the checkout at `root` (+dirty when its code has uncommitted changes), or
    'unknown'."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PACKAGES],
                               cwd=root, capture_output=True, text=True, check=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


class Registry:
    """Versions and stages of every domain's models under one root."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.location = Location.of(uri)
        self.fs, self.root = self.location.fs, self.location.path
        self.local = self.location.local

    # ---- reading -----------------------------------------------------------------------------
    def _at(self, *parts: str) -> Location:
        return self.location.join(*parts)

    def _read_json(self, at: Location) -> dict[str, Any] | None:
        """The file's JSON object; None when there is no such file."""
        try:
            data = json.loads(at.read_bytes().decode())
        except FileNotFoundError:
            return None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{at} is corrupt ({exc})") from exc
        if not isinstance(data, dict):
            raise RegistryError(f"{at} is corrupt (a JSON {type(data).__name__}, not an object)")
        return data

    def _write_json(self, at: Location, data: dict[str, Any]) -> None:
        """Whole or not at all: readers never see half a record."""
        at.write_bytes(json.dumps(data, indent=2, default=str).encode())

    def stages(self, domain: str) -> dict[str, Any]:
        return self._read_json(self._at(domain, STAGES_FILE)) or {PRODUCTION: None, "history": []}

    def generation(self, domain: str) -> int:
        """How many times the domain's production stage has moved."""
        return int(self.stages(domain).get("generation", 0))

    def _move_stages(self, domain: str, before: dict[str, Any], after: dict[str, Any]) -> None:
        """Writes the domain's stages as `after`, one generation on from `before`: the generation
        is what tells replicas to take the stages up."""
        self._write_json(self._at(domain, STAGES_FILE), {**after, "generation": int(before.get("generation", 0)) + 1})

    def canary(self, domain: str) -> dict[str, Any] | None:
        """The domain's running canary (`start_canary`), or None."""
        canary: dict[str, Any] | None = self.stages(domain).get(CANARY)
        return canary

    def _stage_of(self, version: str, stages: dict[str, Any]) -> str:
        if stages.get(PRODUCTION) == version:
            return PRODUCTION
        if _canary_version(stages) == version:
            return CANARY
        return "archived" if version in stages.get("history", []) else CANDIDATE

    def _record(self, domain: str, name: str) -> dict[str, Any] | None:
        """A version's record (None: the folder is no version); refused when unreadable or when it
        names another version (every record written here names its own)."""
        at = self._at(domain, name, VERSION_FILE)
        record = self._read_json(at)
        if record is not None and (record.get("domain"), record.get("version")) != (domain, name):
            raise RegistryError(f"{at} is corrupt (it names {record.get('domain')!r} {record.get('version')!r})")
        return record

    def versions(self, domain: str) -> list[Version]:
        """Every complete version of a domain, oldest first; one with an unreadable record is left out
        (and logged): it must not hide the others, production among them."""
        found, unreadable = self._scan(domain)
        for name, why in unreadable.items():
            logger.warning("%s %s left out: %s", domain, name, why)
        return found

    def _scan(self, domain: str) -> tuple[list[Version], dict[str, str]]:
        """The domain's versions, oldest first, and why each version folder with an unreadable record
        is not one."""
        stages = self.stages(domain)
        found, unreadable = [], {}
        for info in self._at(domain).children():
            name = info.base_name
            if info.type != pafs.FileType.Directory or not _is_version(name):
                continue
            try:
                record = self._record(domain, name)
            except RegistryError as exc:
                unreadable[name] = exc.message
                continue
            if record is not None:
                found.append(Version(domain, name, record, self._stage_of(name, stages)))
        return sorted(found, key=lambda v: int(v.version[1:])), unreadable

    def get(self, domain: str, ref: str = PRODUCTION) -> Version:
        """A version by id (`v3`), or by alias: `production`, `latest`. Reads only that version's
        record, so a corrupt sibling cannot stop production from loading."""
        stages = self.stages(domain)
        if ref == "latest":
            versions = self.versions(domain)
            if not versions:
                raise RegistryError(f"{domain} has no versions; train one with `cityserve train {domain}`")
            return versions[-1]
        name = ref
        if ref == PRODUCTION:
            name = stages.get(PRODUCTION) or ""
            if not name:
                raise RegistryError(f"{domain} has no production version; promote one with "
                                    f"`cityserve models promote {domain} VERSION`", field="version")
        record = self._record(domain, name) if _is_version(name) else None
        if record is None:
            found, unreadable = self._scan(domain)
            have = [v.version for v in found] + [f"{n} (unreadable)" for n in sorted(unreadable)]
            raise RegistryError(f"{domain} has no version {name!r}; have {have}", field="version")
        return Version(domain, name, record, self._stage_of(name, stages))

    def version_file(self, version: Version, name: str) -> bytes | None:
        """One file of a version, read alone (not the version's whole folder) and checked against
        its recorded checksum; None when its record lists no such file (made before it existed)."""
        digest = (version.record.get(FILES) or {}).get(name)
        if digest is None:
            return None
        data = self._at(version.domain, version.version, name).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise RegistryError(f"{version.domain} {version.version}: {name} does not match its recorded checksum")
        return data

    @contextlib.contextmanager
    def model_dir(self, domain: str, version: str) -> Iterator[Path]:
        """A local folder with the version's files (the registry folder itself when local)."""
        with self._at(domain, version).local_dir() as path:
            yield path

    def load_predictor(self, domain: Domain, ref: str = PRODUCTION, device: str = "cpu",
                       backend: str = "auto") -> Predictor:
        """`domain`'s version `ref` (an id or alias), loaded for inference on `device` ("cpu",
        "cuda", "cuda:1") with `backend` (one of the domain's `backends`) once its files match
        their recorded checksums."""
        if backend not in domain.backends:
            raise ConfigError(f"{domain.name} serves with backend {' or '.join(domain.backends)}, not {backend!r}",
                              field="backend")
        version = self.get(domain.name, ref)
        # Resolved from the record, not the folder: only an artifact with a recorded checksum loads.
        chosen = choose_backend(backend, device, stored_artifacts(version), f"{domain.name} {version.version}")
        with self.model_dir(domain.name, version.version) as path:
            check_files(version, path)
            return domain.load_predictor(path, version.version, device, chosen)

    # ---- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, domain: str) -> Iterator[None]:
        """Serialises the writers of one domain's numbering and stages, on a disk or an object store
        (`Location.lock`): two concurrent registrations would otherwise take the same number and
        write into one folder, and two promotions would each bump the generation from the same value."""
        if self.local:
            Path(self._at(domain).path).mkdir(parents=True, exist_ok=True)
        try:
            with self._at(domain, LOCK).lock():
                yield
        except TimeoutError as exc:
            raise RegistryError(f"{domain}: {exc}; try again") from exc

    def _next_version(self, domain: str) -> str:
        """The next version number, recorded as issued (call it holding the domain's lock)."""
        numbers = [int(i.base_name[1:]) for i in self._at(domain).children() if _is_version(i.base_name)]
        # A number is never given twice: reports, audit lines and lineage name versions, and a
        # removed vN's number would otherwise go to the next model registered.
        issued = int((self._read_json(self._at(domain, ISSUED_FILE)) or {}).get("version", 0))
        number = max([*numbers, issued], default=0) + 1
        self._write_json(self._at(domain, ISSUED_FILE), {"version": number})
        return f"v{number}"

    def register(self, domain: str, model_dir: Path, record: dict[str, Any]) -> Version:
        """Copies a model directory in as the next version (a `candidate`).

        Args:
            domain: the domain.
            model_dir: weights, config, meta and extras, as `training.loop.write_model_dir` writes.
            record: metrics, data manifest checksum, profile, lineage; created time, code
                revision and the files' checksums are added here.
        """
        # Only the numbering holds the lock: the number is ours once issued, and the copy (a large
        # model's upload) must not keep other writers waiting.
        with self._lock(domain):
            version = self._next_version(domain)
        full = {**record, "domain": domain, "version": version,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "code_revision": record.get("code_revision") or code_revision()}
        dest = self._at(domain, version)
        if self.local:
            tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self._at(domain).path))
            try:
                shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
                full[FILES] = file_digests(tmp)  # what landed in the registry, not only what was sent
                (tmp / VERSION_FILE).write_text(json.dumps(full, indent=2, default=str))
                os.replace(tmp, dest.path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        else:  # the record last: until it is written the folder is no version
            full[FILES] = file_digests(model_dir)
            dest.upload_dir(model_dir)
            self._write_json(dest.join(VERSION_FILE), full)
        return self.get(domain, version)

    def add_files(self, domain: str, version: str, files: dict[str, Path | None], record: dict[str, Any]) -> Version:
        """Adds (or replaces) files of a registered version and merges `record` into its record, with
        the new files' checksums; `files` maps a path in the version folder to a local file, or to
        None to remove that file, and a key of `record` set to None is removed (`cityserve models
        optimize`)."""
        target = self.get(domain, version)
        folder = self._at(domain, target.version)
        recorded = target.record.get(FILES) or {}
        digests = {k: v for k, v in recorded.items() if k not in files}
        if digests != recorded:
            # Files to replace leave the record before they change: a crash midway leaves a version
            # that loads without them, never one whose recorded checksums its files fail.
            self._write_json(folder.join(VERSION_FILE), {**target.record, FILES: digests})
        for name, source in files.items():
            if source is None:
                folder.join(name).delete()
            else:
                folder.join(name).upload_file(source)
                digests[name] = sha256_file(source)
        # The record last: until then the new files are named by nothing, and only an artifact the
        # record lists ever loads (`load_predictor`).
        merged = {k: v for k, v in {**target.record, **record}.items() if v is not None}
        self._write_json(folder.join(VERSION_FILE), {**merged, FILES: digests})
        return self.get(domain, target.version)

    def _servable(self, domain: str, version: str, verify: Callable[[Path], object] | None, refused: str) -> Version:
        """`version`, once its files match their checksums, each optimised artifact is within the
        accuracy gate of the PyTorch model (`inference` in its record) and `verify(model_dir)` loads
        it; otherwise RegistryError ending with `refused`."""
        try:
            target = self.get(domain, version)
            failures = gate_failures(target.record.get("inference", {}), stored_artifacts(target))
            if failures:
                raise RegistryError(f"{domain} {target.version}: {'; '.join(failures)}; remake its artifacts with "
                                    f"`cityserve models optimize {domain} {target.version}`")
            with self.model_dir(domain, target.version) as path:
                check_files(target, path)
                if verify is not None:
                    verify(path)
        except RegistryError as exc:
            raise RegistryError(f"{exc.message}; {refused}", field="version") from exc
        except Exception as exc:  # any load failure refuses it
            raise RegistryError(f"{domain} {version} does not load ({type(exc).__name__}: {exc}); {refused}",
                                field="version") from exc
        return target

    def promote(self, domain: str, version: str, verify: Callable[[Path], object] | None = None) -> Version:
        """Makes `version` production, once `_servable`; production stays as it was otherwise. A
        canary of `version` ends in its promotion; while a canary of another version runs, promotion
        is refused (promote that one, or abort it first)."""
        target = self._servable(domain, version, verify, "promotion refused, production is unchanged")
        with self._lock(domain):
            stages = self.stages(domain)
            current = stages.get(PRODUCTION)
            running = _canary_version(stages)
            if running not in (None, target.version):
                raise RegistryError(f"a canary of {domain} {running} runs: promote it or abort it "
                                    f"(`cityserve models abort {domain}`) first; production is unchanged",
                                    field="version")
            if current == target.version:
                return target
            history = [v for v in stages.get("history", []) if v != target.version]
            if current:
                history.append(current)
            self._move_stages(domain, stages, {PRODUCTION: target.version, "history": history})
        return self.get(domain, target.version)

    def start_canary(self, domain: str, version: str, weight: float, *, shadow: bool = False,
                     verify: Callable[[Path], object] | None = None) -> Version:
        """Has `version` answer `weight` percent of the domain's requests beside production (its
        answers are returned, with its version in X-Model-Version) or, with `shadow`, answer a copy
        of that share without its answers being returned (they are recorded in the sample log); once
        `_servable`. One canary at a time per domain: it ends with `promote` or `abort_canary`."""
        if not 0 < weight <= 100:
            raise RegistryError(f"weight {weight:g}: give a percentage of requests above 0 and at most 100",
                                field="weight")
        target = self._servable(domain, version, verify, "canary refused")
        with self._lock(domain):
            stages = self.stages(domain)
            running = _canary_version(stages)
            if not stages.get(PRODUCTION):
                raise RegistryError(f"{domain} has no production version to compare a canary with; promote one "
                                    "first", field="version")
            if stages[PRODUCTION] == target.version:
                raise RegistryError(f"{domain} {target.version} is production already", field="version")
            if running not in (None, target.version):
                raise RegistryError(f"a canary of {domain} {running} runs: promote it or abort it first",
                                    field="version")
            self._move_stages(domain, stages, {**stages, CANARY: {"version": target.version, "weight": weight,
                                                                  "shadow": shadow}})
        return self.get(domain, target.version)

    def abort_canary(self, domain: str) -> str:
        """Ends the domain's canary without promoting it; returns its version."""
        with self._lock(domain):
            stages = self.stages(domain)
            if not stages.get(CANARY):
                raise RegistryError(f"{domain} runs no canary", field="domain")
            version: str = stages[CANARY]["version"]
            self._move_stages(domain, stages, {k: v for k, v in stages.items() if k != CANARY})
        return version

    def rollback(self, domain: str) -> Version:
        """Returns production to the version that served before the current one (ending any canary:
        a rollback is the way back to what served before, with nothing beside it)."""
        with self._lock(domain):
            stages = self.stages(domain)
            history = list(stages.get("history", []))
            if not history:
                raise RegistryError(f"{domain} has no earlier production version to roll back to")
            previous = history.pop()
            self._move_stages(domain, stages, {PRODUCTION: previous, "history": history})
        return self.get(domain, previous)


def _canary_version(stages: dict[str, Any]) -> str | None:
    """The version a domain's stages run as a canary, if any."""
    version: str | None = (stages.get(CANARY) or {}).get("version")
    return version


def _is_version(name: str) -> bool:
    return name.startswith("v") and name[1:].isdigit()


def stored_artifacts(version: Version) -> list[str]:
    """The optimised inference artifacts (`domains.onnx_text.ARTIFACTS`) the version's record lists."""
    files = version.record.get(FILES) or {}
    return [backend for backend, name in ARTIFACTS.items() if name in files]


def check_files(version: Version, model_dir: Path) -> None:
    """Refuses a version whose files are missing or differ from the checksums recorded when it was
    registered (versions registered before checksums were kept have none to check)."""
    expected: dict[str, str] = version.record.get(FILES) or {}
    for name, digest in sorted(expected.items()):
        path = model_dir / name
        if not path.is_file():
            raise RegistryError(f"{version.domain} {version.version}: {name} is missing", field="version")
        if sha256_file(path) != digest:
            raise RegistryError(f"{version.domain} {version.version}: {name} does not match its recorded "
                                f"sha256 (changed or corrupted since registration)", field="version")
