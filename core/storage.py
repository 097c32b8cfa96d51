"""Where files are kept: a local path or a URI of any pyarrow filesystem (`s3://bucket/x`, `gs://…`).

Every place that stores files (the registry, Tune results, evaluation reports, batch scoring)
goes through a `Location`, so a URI is parsed, joined, read and written in one place. The
filesystem comes from `pyarrow.fs.FileSystem.from_uri`, which reads the endpoint and credentials
from the environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, …). A local path is made absolute
against the working directory, as before.

A write is whole or absent: locally through a temporary file renamed into place, on an object
store as one PUT of a complete local file (a PUT is atomic; a stream written piece by piece is
not: pyarrow completes an upload even when the writer raised halfway).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from core.io import replacing, write_bytes_atomic

# Object stores have no file lock: a lock there is a set of claims (below). A holder keeps it for a
# few small reads and writes; a claim older than this, by the store's own clock, is a crashed holder's.
STALE_CLAIM_S = 60.0
LOCK_WAIT_S = 120.0


def is_uri(where: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(where)


@dataclass(frozen=True)
class Location:
    """A file or folder: its filesystem, its path in that filesystem, and the URI a user names it by.

    `uri` is the absolute local path for local files; `query` keeps a URI's options (`?region=…`)
    for its children.
    """

    uri: str
    fs: pafs.FileSystem
    path: str
    query: str = ""

    @classmethod
    def of(cls, where: str | os.PathLike[str] | Location) -> Location:
        """The location named by a local path (relative: against the working directory) or a URI."""
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        if not is_uri(text):
            path = str(Path(text).resolve())
            return cls(path, pafs.LocalFileSystem(), path)
        fs, path = pafs.FileSystem.from_uri(text)
        base, _, query = text.partition("?")
        if isinstance(fs, pafs.LocalFileSystem):  # file:///x is the local path /x
            return cls(path, fs, path)
        return cls(base.rstrip("/"), fs, path.rstrip("/"), query)

    @classmethod
    def from_fs(cls, fs: pafs.FileSystem, path: str) -> Location:
        """The location of `path` in `fs` (as Ray hands them out: a checkpoint's filesystem and path)."""
        return cls(uri_of(fs, path.rstrip("/")), fs, path.rstrip("/"))

    def __str__(self) -> str:
        return self.uri + (f"?{self.query}" if self.query else "")

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *parts: str) -> Location:
        """A location under this one (`parts` are names, or relative paths with `/`)."""
        tail = "/".join(p.strip("/") for p in parts if p)
        if not tail:
            return self
        return Location(f"{self.uri}/{tail}", self.fs, f"{self.path}/{tail}", self.query)

    def exists(self) -> bool:
        return bool(self.fs.get_file_info(self.path).type != pafs.FileType.NotFound)

    def is_file(self) -> bool:
        return bool(self.fs.get_file_info(self.path).type == pafs.FileType.File)

    def children(self) -> list[pafs.FileInfo]:
        """What is directly under this folder (nothing when there is no such folder)."""
        return list(self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)))

    def delete(self) -> None:
        """Removes this file; a missing one is not an error."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path)

    # ---- reading -----------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        """The file's content; FileNotFoundError when there is none."""
        with self.fs.open_input_stream(self.path) as fh:
            return bytes(fh.read())

    @contextlib.contextmanager
    def reading(self) -> Iterator[Path]:
        """A local file with this file's content: the file itself when local, else a temporary copy."""
        if self.local:
            if not Path(self.path).is_file():
                raise FileNotFoundError(self.uri)
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="cityserve-") as tmp:
            copy = Path(tmp) / self.name
            pafs.copy_files(self.path, str(copy), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            yield copy

    def download_dir(self, dest: Path, *, skip: Iterable[str] = ()) -> None:
        """Copies every file under this folder into the local folder `dest`, except those named in `skip`."""
        skipped = set(skip)
        dest.mkdir(parents=True, exist_ok=True)
        for info in self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True)):
            if info.type != pafs.FileType.File or info.base_name in skipped:
                continue
            target = dest / info.path[len(self.path):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(target), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())

    @contextlib.contextmanager
    def local_dir(self, *, skip: Iterable[str] = ()) -> Iterator[Path]:
        """A local folder with this folder's files: the folder itself when local (`skip` then does
        not apply), else a temporary copy."""
        if self.local:
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="cityserve-") as tmp:
            self.download_dir(Path(tmp), skip=skip)
            yield Path(tmp)

    # ---- writing -----------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        """Writes the file whole (readers see the old content or the new, never half)."""
        if self.local:
            write_bytes_atomic(Path(self.path), data)
            return
        with self.fs.open_output_stream(self.path) as out:  # one write, then one PUT: all or nothing
            out.write(data)

    def write_json(self, payload: Any, *, default: Any = None) -> None:
        """JSON as `core.io.write_json_atomic` writes it (no NaN, a final newline), whole."""
        self.write_bytes((json.dumps(payload, indent=2, allow_nan=False, default=default) + "\n").encode())

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A local file to write this file's content to; put in place when the block ends, dropped
        if it raises (so a failed writer leaves the old file, or none)."""
        if self.local:
            with replacing(Path(self.path)) as tmp:
                yield tmp
            return
        with tempfile.TemporaryDirectory(prefix="cityserve-") as tmp:
            staged = Path(tmp) / self.name
            yield staged
            self.upload_file(staged)

    def upload_file(self, source: Path) -> None:
        """Copies a complete local file here in one write (memory-mapped: no copy in memory)."""
        if self.local:
            with replacing(Path(self.path)) as tmp:
                shutil.copyfile(source, tmp)
            return
        with pa.memory_map(str(source)) as src, self.fs.open_output_stream(self.path) as out:
            out.write(src.read_buffer())

    def upload_dir(self, source: Path) -> None:
        """Copies every file of the local folder `source` under this folder."""
        for path in sorted(p for p in Path(source).rglob("*") if p.is_file()):
            self.join(path.relative_to(source).as_posix()).upload_file(path)

    # ---- one writer at a time ----------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, wait_s: float | None = None) -> Iterator[None]:
        """Holds this location as a lock: one holder at a time, across processes and machines.

        Locally an flock on the file. An object store has no lock, so each would-be holder writes a
        claim object under this prefix and lists the prefix: it holds the lock when its claim is the
        only live one there, else it withdraws and tries again. Stores with read-after-write
        consistent listings (S3, GCS) make that safe: of two claimants that list, the later one sees
        the earlier's claim. A claim older than `STALE_CLAIM_S` (store time) is a crashed holder's.

        Raises:
            TimeoutError: someone else held it for `wait_s` (default `LOCK_WAIT_S`).
        """
        if self.local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
            return
        mine = self._claim(time.monotonic() + (LOCK_WAIT_S if wait_s is None else wait_s))
        try:
            yield
        finally:
            mine.delete()

    def _claim(self, deadline: float) -> Location:
        who = {"host": socket.gethostname(), "pid": os.getpid()}
        while True:
            mine = self.join(uuid.uuid4().hex)
            mine.write_bytes(json.dumps(who).encode())
            claims = [i for i in self.children() if i.type == pafs.FileType.File]
            # Ages by the store's clock, read from one listing (no two machines' clocks compared).
            written = next((i.mtime for i in claims if i.path == mine.path), None)
            others = [i for i in claims if i.path != mine.path]
            stale = {i.base_name for i in others if written is not None and i.mtime is not None
                     and (written - i.mtime).total_seconds() > STALE_CLAIM_S}
            if written is not None and len(stale) == len(others):
                for name in stale:
                    self.join(name).delete()
                return mine
            mine.delete()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self} is held by another writer ({len(others) - len(stale)} live claims)")
            time.sleep(random.uniform(0.05, 0.5))


def join(where: str | os.PathLike[str] | Location, *parts: str) -> str:
    """A path or URI under `where` (a local path comes back absolute)."""
    return str(Location.of(where).join(*parts))


def uri_of(fs: pafs.FileSystem, path: str) -> str:
    """The URI a user would name a filesystem path by (`s3://bucket/x` for S3's `bucket/x`)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    scheme = {"gcs": "gs"}.get(fs.type_name, fs.type_name)
    return f"{scheme}://{path}"


@contextlib.contextmanager
def s3_endpoint(endpoint: str, credentials: dict[str, str], bucket: str) -> Iterator[str]:
    """Points this process's `AWS_*` variables at an S3-compatible `endpoint` (any other `AWS_*`
    variable hidden, so nothing reaches a real account) and makes `bucket` there; yields
    `s3://bucket`. Restores the variables afterwards. For the servers tests and benchmarks start:
    processes started inside the block inherit the endpoint."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    try:
        for name in saved:
            del os.environ[name]
        os.environ.update({**credentials, "AWS_ENDPOINT_URL": endpoint})
        # from_uri honours AWS_ENDPOINT_URL (the S3FileSystem constructor does not).
        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?allow_bucket_creation=true")
        fs.create_dir(bucket)
        yield f"s3://{bucket}"
    finally:
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(saved)

