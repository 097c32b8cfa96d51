"""Tenants, their API keys, quotas and usage: the arithmetic, and the database that keeps them.

Keys look like `csk_<key id>_<secret>`; only the SHA-256 of the secret is stored (`keys`). Quotas
mean what a tenant reads in its contract: in any 60 s window the requests (and items) it was
admitted never exceed its per-minute quota, paced over the minute, with concurrency slots that free
themselves (`quota`). The records (`records`) are kept in one SQL database, SQLite or PostgreSQL
(`store`), and a tenants file can list tenants, with their keys' digests, as a Kubernetes Secret does
(`tenants_file`).

Other packages import from here; the modules are this package's own layout.
"""

from services.tenants.keys import KEY_PREFIX, digest, new_key, same_digest, split_key
from services.tenants.quota import WINDOW_S, Expiring, Leases, Pacer, SlidingWindow
from services.tenants.records import (
    TENANT_NAME,
    USAGE_COLUMNS,
    USAGE_SUMMARY_COLUMNS,
    ApiKey,
    Tenant,
    Usage,
    check_tenant_name,
    summarise_usage,
)
from services.tenants.spill import UsageSpill
from services.tenants.store import SCHEMA, LedgerUnavailable, Store, resolve_url
from services.tenants.tenants_file import KeyEntry, TenantEntry, read_tenants_file

__all__ = [
    "KEY_PREFIX",
    "SCHEMA",
    "TENANT_NAME",
    "USAGE_COLUMNS",
    "USAGE_SUMMARY_COLUMNS",
    "WINDOW_S",
    "ApiKey",
    "Expiring",
    "KeyEntry",
    "Leases",
    "LedgerUnavailable",
    "Pacer",
    "SlidingWindow",
    "Store",
    "Tenant",
    "TenantEntry",
    "Usage",
    "UsageSpill",
    "check_tenant_name",
    "digest",
    "new_key",
    "read_tenants_file",
    "resolve_url",
    "same_digest",
    "split_key",
    "summarise_usage",
]
