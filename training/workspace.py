"""Where a command's work reads and writes, resolved once from the settings and passed down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.settings import Settings
from training.registry import Registry, Version


@dataclass(frozen=True)
class Workspace:
    """The settings (data, Ray storage, reports, state) and the model registry they name."""

    settings: Settings
    registry: Registry

    @classmethod
    def from_settings(cls, settings: Settings) -> Workspace:
        return cls(settings, Registry(settings.registry_location()))

    def data_dir_of(self, version: Version) -> Path:
        """The data a version was trained on (its test split scores it), else the settings' data."""
        return Path(version.record.get("config", {}).get("data_dir", self.settings.data_dir))
