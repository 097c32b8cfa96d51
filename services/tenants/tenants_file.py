"""The tenants file: tenants listed in YAML (a Kubernetes Secret mounted into the Ray pods), which
`Store.sync_tenants` makes the database match."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.errors import ConfigError
from services.tenants.keys import split_key
from services.tenants.records import Tenant, check_tenant_name


class TenantEntry(BaseModel):
    """A tenant as a tenants file lists it (a Kubernetes Secret mounted into the Ray pods)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The tenant's name: 1 to 63 ASCII letters, digits, '-' and '_', starting "
                      "with a letter or digit.")
    grants: list[str] = Field(description="Domains it may call.")
    requests_per_minute: int = Field(ge=1, description="Admitted requests in any 60 s window.")
    items_per_minute: int = Field(ge=1, description="Admitted items in any 60 s window.")
    max_concurrent: int = Field(ge=1, description="Requests in flight at once.")
    keys: list[str] = Field(min_length=1, max_length=2, description="Its API keys (two while it rotates), each "
                            "`csk_<id>_<secret>` as `cityserve tenants new-key` prints them.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return check_tenant_name(name)

    @field_validator("keys")
    @classmethod
    def _well_formed(cls, keys: list[str]) -> list[str]:
        bad = [i for i, k in enumerate(keys) if split_key(k) is None]
        if bad:  # never quote a key back: error messages reach logs
            raise ValueError(f"keys {bad} are not csk_<id>_<secret>; make keys with `cityserve tenants new-key`")
        return keys

    def tenant(self) -> Tenant:
        return Tenant(self.name, self.grants, self.requests_per_minute, self.items_per_minute, self.max_concurrent)


def read_tenants_file(path: Path) -> list[TenantEntry]:
    """The `tenants:` list of a YAML tenants file, validated."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
        listed = data.get("tenants") or []
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        raise ConfigError(f"tenants file {path}: {exc}", field="tenants_file") from exc
    entries = []
    for i, item in enumerate(listed):
        try:
            entries.append(TenantEntry.model_validate(item))
        except ValidationError as exc:  # without the input values: they would be keys, and reach logs
            problems = "; ".join(f"tenants[{i}].{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in exc.errors(include_input=False))
            raise ConfigError(f"tenants file {path}: {problems}", field="tenants_file") from None
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"tenants file {path}: a tenant is listed twice ({sorted(names)})", field="tenants_file")
    return entries
