"""Where a command's work reads and writes, resolved once from the settings and passed down."""

from __future__ import annotations

from dataclasses import dataclass

from core.settings import Settings
from training.registry import Registry


@dataclass(frozen=True)
class Workspace:
    """The settings (data, Ray storage, reports, state) and the model registry they name."""

    settings: Settings
    registry: Registry

    @classmethod
    def from_settings(cls, settings: Settings) -> Workspace:
        return cls(settings, Registry(settings.registry_location()))
