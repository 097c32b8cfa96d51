"""One settings object per process, read from `CITYSERVE_*` environment variables (Helm sets them)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.storage import is_uri

ENV_PREFIX = "CITYSERVE_"
# The variable `ledger_url` is read from: where a ledger URL with a password lives (a Secret's on
# Kubernetes, the Ray head's environment locally), named by the serve config as `env:` + it.
LEDGER_ENV = f"{ENV_PREFIX}LEDGER_URL"


class Settings(BaseSettings):
    """Where data, models and results live, and which Ray cluster to use."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    data_dir: Path = Field(Path("data"), description="Root of prepared data (one folder per domain).")
    registry_uri: str = Field(
        "registry", description="Model registry: a local path or any pyarrow filesystem URI (s3://, gs://)."
    )
    storage_path: str = Field(
        "ray_results", description="Ray Train/Tune storage: a local path (made absolute) or a URI."
    )
    reports_dir: str = Field(
        "reports", description="Where evaluation reports and figures go: a local path or a URI (s3://, gs://)."
    )
    ray_address: str | None = Field(
        None, description="Join this Ray cluster ('auto' or host:port); unset starts a local one of our own."
    )
    ray_temp_dir: Path | None = Field(None, description="Ray's session files for a local cluster.")
    state_dir: Path = Field(Path("state"), description="The local platform's record, Ray session and logs.")
    ledger_url: str = Field(
        "sqlite:///state/cityserve.db",
        description="Tenants, keys, audit log and usage ledger: sqlite:///FILE or postgresql://user:pw@host/db "
        "(`serve up` hands a password to Ray through this variable, never through the serve config).")

    @field_validator("reports_dir", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        """A `Path` is taken as its text (the field also holds URIs, which a Path would mangle)."""
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    def storage_uri(self) -> str:
        """Ray needs an absolute path or a URI (a relative path fails inside `fit()`)."""
        if is_uri(self.storage_path):
            return self.storage_path
        return str(Path(self.storage_path).resolve())

    def ledger_location(self) -> str:
        """Replicas run elsewhere than this shell: a SQLite path is made absolute."""
        prefix = "sqlite:///"
        if self.ledger_url.startswith(prefix):
            return prefix + str(Path(self.ledger_url.removeprefix(prefix)).resolve())
        return self.ledger_url

    def registry_location(self) -> str:
        if is_uri(self.registry_uri):
            return self.registry_uri
        return str(Path(self.registry_uri).resolve())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
