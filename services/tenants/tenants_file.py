"""The tenants file: tenants listed in YAML (a Kubernetes Secret mounted into the Ray pods), which
`Store.sync_tenants` makes the database match.

It lists each key by its id and the SHA-256 of its secret, the same digest the store keeps, never
the key: the Secret is mounted in every serving pod, and a digest there lets nobody call the gateway.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ConfigError
from services.tenants.keys import KEY_PREFIX, split_key
from services.tenants.records import Tenant, check_tenant_name


class KeyEntry(BaseModel):
    """One API key as a tenants file lists it: its public id and the digest of its secret."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[0-9a-f]{12}$", description="The key's id: the 12 hex digits after `csk_`.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 (hex) of the key's secret, the part "
                        "after `csk_<id>_`.")
    expires: AwareDatetime | None = Field(None, description="When the key stops working (RFC 3339 with a zone, "
                                          "2027-06-30T00:00:00Z); none: it works until the file drops it.")

    @model_validator(mode="before")
    @classmethod
    def _not_a_whole_key(cls, value: Any) -> Any:
        if isinstance(value, str):  # never quote it back: error messages reach logs
            parts = split_key(value)
            what = f"a whole API key (id {parts[0]})" if parts else "a string"
            raise ValueError(f"{what}: the file lists a key's {{id, sha256}}, never its secret (the file is mounted "
                             "in every serving pod); convert keys with `cityserve tenants key-entry`, which reads "
                             "them on stdin and prints their entries")
        return value

    @field_validator("id", mode="before")
    @classmethod
    def _id_is_text(cls, value: Any) -> Any:
        if not isinstance(value, str):  # YAML reads an all-digit id such as 000000001234 as a number
            raise ValueError("write the key id in quotes, as `cityserve tenants new-key` prints it")
        return value

    @classmethod
    def of(cls, key: str) -> KeyEntry:
        """The entry of a well-formed key (ValueError otherwise, without quoting it)."""
        parts = split_key(key)
        if parts is None:
            raise ValueError(f"not a {KEY_PREFIX}_<id>_<secret> key")
        return cls(id=parts[0], sha256=parts[1])

    @property
    def expires_at(self) -> float:
        """The expiry as the store keeps it: a Unix time, infinite for a key without one."""
        return self.expires.timestamp() if self.expires else math.inf

    def line(self) -> str:
        """The entry as one YAML line, the id quoted so YAML cannot read it as a number."""
        return f'{{id: "{self.id}", sha256: "{self.sha256}"}}'


class TenantEntry(BaseModel):
    """A tenant as a tenants file lists it (a Kubernetes Secret mounted into the Ray pods)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The tenant's name: 1 to 63 ASCII letters, digits, '-' and '_', starting "
                      "with a letter or digit.")
    grants: list[str] = Field(description="Domains it may call.")
    requests_per_minute: int = Field(ge=1, description="Admitted requests in any 60 s window.")
    items_per_minute: int = Field(ge=1, description="Admitted items in any 60 s window.")
    max_concurrent: int = Field(ge=1, description="Requests in flight at once.")
    sample_rate: float = Field(0.0, ge=0.0, le=1.0, description="The share of its answered requests kept, masked, "
                               "in the sample log (0: none; see docs/privacy.md).")
    keys: list[KeyEntry] = Field(min_length=1, max_length=2, description="Its API keys (two while it rotates), "
                                 "each as `cityserve tenants new-key` prints its entry.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return check_tenant_name(name)

    @field_validator("keys")
    @classmethod
    def _distinct(cls, keys: list[KeyEntry]) -> list[KeyEntry]:
        ids = [k.id for k in keys]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"key ids {twice} are listed twice")
        return keys

    def tenant(self) -> Tenant:
        return Tenant(self.name, self.grants, self.requests_per_minute, self.items_per_minute, self.max_concurrent,
                      sample_rate=self.sample_rate)


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
