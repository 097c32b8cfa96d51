"""The SQL store of tenants, API keys, the audit log and the usage ledger, with its schema.

The `Store` is SQLite (one file, the default) or PostgreSQL (a `postgresql://` URL); the same SQL
runs on both. The admission actor (`services.admission`) is its only writer of usage rows.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from core.errors import ConfigError, InvalidInput
from services.tenants.keys import new_key, split_key
from services.tenants.records import USAGE_COLUMNS, ApiKey, Tenant, Usage, check_limits
from services.tenants.tenants_file import TenantEntry

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, grants TEXT NOT NULL,
       requests_per_minute INTEGER NOT NULL, items_per_minute INTEGER NOT NULL, max_concurrent INTEGER NOT NULL,
       created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS api_keys (key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, digest TEXT NOT NULL,
       created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS audit (id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL,
       action TEXT NOT NULL, tenant TEXT NOT NULL, detail TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS usage (request_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
       tenant TEXT NOT NULL, domain TEXT NOT NULL, items INTEGER NOT NULL, status INTEGER NOT NULL,
       latency_ms DOUBLE PRECISION NOT NULL, model_version TEXT NOT NULL, lease TEXT PRIMARY KEY)""",
    "CREATE INDEX IF NOT EXISTS usage_tenant_at ON usage (tenant, at)",
    # Tenants a tenants file (a Kubernetes Secret) manages: one dropped from the file is revoked.
    "CREATE TABLE IF NOT EXISTS file_tenants (name TEXT PRIMARY KEY)",
)


def resolve_url(url: str) -> str:
    """A ledger URL, or `env:NAME` for the one in that environment variable: on Kubernetes a
    PostgreSQL password comes from a Secret into the pods' environment, never into the serve config."""
    if not url.startswith("env:"):
        return url
    value = os.environ.get(url.removeprefix("env:"), "")
    if not value:
        raise ConfigError(f"the ledger URL is {url!r}, but that environment variable is not set here",
                          field="ledger_url")
    return value


@dataclass
class Store:
    """Tenants, keys, the audit log and the usage ledger in one SQL database.

    Args:
        url: `sqlite:///path/to/file.db` (relative paths from the working directory) or
            `postgresql://user:password@host/db`.
    """

    url: str = field(repr=False)  # it may hold a password
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _conn: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.url = resolve_url(self.url)

    @property
    def postgres(self) -> bool:
        return self.url.startswith(("postgresql://", "postgres://"))

    def _connect(self) -> Any:
        if self.postgres:
            import psycopg

            # An unreachable server fails the write in seconds (rows stay pending), not after
            # the operating system's TCP timeout with the admission actor's loop blocked.
            return psycopg.connect(self.url, autocommit=False, connect_timeout=10)
        if not self.url.startswith("sqlite:///"):
            raise ConfigError(f"ledger URL {self.url!r}: use sqlite:///FILE or postgresql://...", field="ledger_url")
        path = Path(self.url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # readers (the CLI) never block the ledger's writer
        conn.execute("PRAGMA synchronous=FULL")  # a committed usage row survives a power cut
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
                cur = self._conn.cursor()
                for statement in SCHEMA:
                    cur.execute(statement)
                _migrate_usage(cur)
                self._conn.commit()
            cur = self._conn.cursor()
            try:
                yield cur
                self._conn.commit()
            except BaseException:
                self._conn.rollback()
                raise

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self._tx() as cur:
            cur.execute(self._sql(sql), params)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._tx() as cur:
            cur.execute(self._sql(sql), params)
            return list(cur.fetchall())

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ---- tenants and keys ------------------------------------------------------------------------
    def audit(self, cur: Any, action: str, tenant: str, detail: dict[str, Any]) -> None:
        actor = f"{getpass.getuser()}@{socket.gethostname()}"
        cur.execute(self._sql("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?)"),
                    (uuid.uuid4().hex, time.time(), actor, action, tenant, json.dumps(detail, sort_keys=True)))

    def tenant(self, name: str) -> Tenant:
        rows = self.query("SELECT * FROM tenants WHERE name = ?", (name,))
        if not rows:
            raise InvalidInput(f"no tenant {name!r}; see `cityserve tenants list`", field="tenant")
        return _tenant(rows[0])

    def tenants(self) -> list[Tenant]:
        return [_tenant(r) for r in self.query("SELECT * FROM tenants ORDER BY name")]

    def api_keys(self, tenant: str | None = None) -> list[ApiKey]:
        sql, params = "SELECT * FROM api_keys", ()  # type: tuple[str, tuple[Any, ...]]
        if tenant is not None:
            sql, params = sql + " WHERE tenant = ?", (tenant,)
        return [ApiKey(*r) for r in self.query(sql + " ORDER BY created_at", params)]

    def api_key(self, key_id: str) -> tuple[ApiKey, Tenant] | None:
        """One key and its tenant, by the key's id (one indexed lookup)."""
        rows = self.query("SELECT k.*, t.* FROM api_keys k JOIN tenants t ON t.name = k.tenant WHERE k.key_id = ?",
                          (key_id,))
        columns = len(fields(ApiKey))
        return (ApiKey(*rows[0][:columns]), _tenant(rows[0][columns:])) if rows else None

    def create_tenant(self, tenant: Tenant, key_ttl_days: float) -> str:
        """Adds a tenant with its first key; returns the key (shown once, never stored)."""
        check_limits(tenant)
        if self.query("SELECT name FROM tenants WHERE name = ?", (tenant.name,)):
            raise InvalidInput(f"tenant {tenant.name!r} exists; rotate its key with `cityserve tenants rotate`",
                               field="name")
        now = time.time()
        key, key_id, key_digest = new_key()
        with self._tx() as cur:
            cur.execute(self._sql("INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?, ?)"),
                        (tenant.name, json.dumps(sorted(tenant.grants)), tenant.requests_per_minute,
                         tenant.items_per_minute, tenant.max_concurrent, now, None))
            cur.execute(self._sql("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?)"),
                        (key_id, tenant.name, key_digest, now, now + key_ttl_days * 86400, None))
            self.audit(cur, "create", tenant.name, {"grants": sorted(tenant.grants), "key_id": key_id,
                                                    "requests_per_minute": tenant.requests_per_minute,
                                                    "items_per_minute": tenant.items_per_minute,
                                                    "max_concurrent": tenant.max_concurrent})
        return key

    def rotate(self, name: str, key_ttl_days: float, grace_hours: float) -> str:
        """A new key for `name`; its current keys keep working for `grace_hours`, then expire."""
        if self.tenant(name).revoked_at is not None:
            raise InvalidInput(f"tenant {name!r} is revoked", field="tenant")
        now = time.time()
        key, key_id, key_digest = new_key()
        with self._tx() as cur:
            cur.execute(self._sql("UPDATE api_keys SET expires_at = ? WHERE tenant = ? AND revoked_at IS NULL "
                                  "AND expires_at > ?"), (now + grace_hours * 3600, name, now + grace_hours * 3600))
            cur.execute(self._sql("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?)"),
                        (key_id, name, key_digest, now, now + key_ttl_days * 86400, None))
            self.audit(cur, "rotate", name, {"key_id": key_id, "old_keys_expire_in_hours": grace_hours})
        return key

    def revoke(self, name: str, key_id: str | None = None) -> None:
        """Revokes one key, or the tenant and all its keys."""
        self.tenant(name)
        now = time.time()
        with self._tx() as cur:
            if key_id is None:
                self._revoke_tenant(cur, name, now)
            else:
                cur.execute(self._sql("UPDATE api_keys SET revoked_at = ? WHERE tenant = ? AND key_id = ?"),
                            (now, name, key_id))
                if cur.rowcount == 0:
                    raise InvalidInput(f"tenant {name!r} has no key {key_id!r}", field="key_id")
            self.audit(cur, "revoke", name, {"key_id": key_id} if key_id else {"all_keys": True})

    def _revoke_tenant(self, cur: Any, name: str, now: float) -> None:
        cur.execute(self._sql("UPDATE tenants SET revoked_at = ? WHERE name = ?"), (now, name))
        cur.execute(self._sql("UPDATE api_keys SET revoked_at = ? WHERE tenant = ? AND revoked_at IS NULL"),
                    (now, name))

    def set_quota(self, name: str, **changes: Any) -> Tenant:
        """Changes grants and limits (only those given)."""
        tenant = self.tenant(name)
        changes = {k: v for k, v in changes.items() if v is not None}
        for k, v in changes.items():
            setattr(tenant, k, v)
        check_limits(tenant)
        with self._tx() as cur:
            cur.execute(self._sql("UPDATE tenants SET grants = ?, requests_per_minute = ?, items_per_minute = ?, "
                                  "max_concurrent = ? WHERE name = ?"),
                        (json.dumps(sorted(tenant.grants)), tenant.requests_per_minute, tenant.items_per_minute,
                         tenant.max_concurrent, name))
            self.audit(cur, "set-quota", name, {k: sorted(v) if k == "grants" else v for k, v in changes.items()})
        return tenant

    def sync_tenants(self, listed: Sequence[TenantEntry], key_ttl_days: float = 365.0) -> list[str]:
        """Makes the database match a tenants file, which is the truth for the tenants it lists:
        creates them or sets their grants and limits, keeps their listed keys valid for
        `key_ttl_days` more, revokes their other keys, and revokes tenants the file dropped.
        Tenants created with `cityserve tenants` are left alone. Returns what changed, per tenant."""
        now = time.time()
        changes = []
        with self._tx() as cur:
            cur.execute("SELECT name FROM file_tenants")
            managed = {r[0] for r in cur.fetchall()}
            dropped = managed - {e.name for e in listed}
            for entry in listed:
                tenant = entry.tenant()
                check_limits(tenant)
                cur.execute(self._sql("SELECT * FROM tenants WHERE name = ?"), (tenant.name,))
                row = cur.fetchone()
                values = (json.dumps(sorted(tenant.grants)), tenant.requests_per_minute, tenant.items_per_minute,
                          tenant.max_concurrent)
                stale = row is None or tuple(row[1:5]) != values or row[6] is not None  # or revoked
                if row is None:
                    cur.execute(self._sql("INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?, ?)"),
                                (tenant.name, *values, now, None))
                elif stale:
                    cur.execute(self._sql("UPDATE tenants SET grants = ?, requests_per_minute = ?, "
                                          "items_per_minute = ?, max_concurrent = ?, revoked_at = NULL WHERE name = ?"),
                                (*values, tenant.name))
                if tenant.name not in managed:
                    cur.execute(self._sql("INSERT INTO file_tenants VALUES (?)"), (tenant.name,))
                listed_keys = {pair for k in entry.keys if (pair := split_key(k)) is not None}  # all, validated
                cur.execute(self._sql("SELECT key_id, digest FROM api_keys WHERE tenant = ? AND revoked_at IS NULL"),
                            (tenant.name,))
                held = {(r[0], r[1]) for r in cur.fetchall()}
                for key_id, _ in held - listed_keys:
                    cur.execute(self._sql("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?"), (now, key_id))
                for key_id, key_digest in listed_keys - held:
                    cur.execute(self._sql("SELECT tenant FROM api_keys WHERE key_id = ?"), (key_id,))
                    owner = cur.fetchone()
                    if owner is not None and owner[0] != tenant.name:
                        raise ConfigError(f"tenants file: {tenant.name}'s key {key_id} is {owner[0]}'s key id; "
                                          "make a new key with `cityserve tenants new-key`", field="keys")
                    cur.execute(self._sql("DELETE FROM api_keys WHERE key_id = ?"), (key_id,))  # its revoked row
                    cur.execute(self._sql("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?)"),
                                (key_id, tenant.name, key_digest, now, now, None))
                cur.execute(self._sql("UPDATE api_keys SET expires_at = ? WHERE tenant = ? AND revoked_at IS NULL"),
                            (now + key_ttl_days * 86400, tenant.name))
                if stale or held != listed_keys:
                    changes.append(tenant.name)
                    self.audit(cur, "sync", tenant.name, {"grants": sorted(tenant.grants),
                                                          "key_ids": sorted(k for k, _ in listed_keys),
                                                          "requests_per_minute": tenant.requests_per_minute,
                                                          "items_per_minute": tenant.items_per_minute,
                                                          "max_concurrent": tenant.max_concurrent})
            for name in sorted(dropped):
                self._revoke_tenant(cur, name, now)
                cur.execute(self._sql("DELETE FROM file_tenants WHERE name = ?"), (name,))
                self.audit(cur, "sync-revoke", name, {"reason": "no longer in the tenants file"})
                changes.append(name)
        return changes

    def audit_log(self, tenant: str | None = None) -> list[tuple[Any, ...]]:
        sql, params = "SELECT at, actor, action, tenant, detail FROM audit", ()  # type: tuple[str, tuple[Any, ...]]
        if tenant is not None:
            sql, params = sql + " WHERE tenant = ?", (tenant,)
        return self.query(sql + " ORDER BY at", params)

    # ---- usage ledger ----------------------------------------------------------------------------
    def record(self, usage: Sequence[Usage]) -> None:
        """Appends usage rows in one transaction; a row already there (a retried flush) is kept once."""
        if not usage:
            return
        sql = self._sql(f"INSERT INTO usage VALUES ({', '.join('?' * len(USAGE_COLUMNS))}) "
                        "ON CONFLICT (lease) DO NOTHING")
        with self._tx() as cur:
            cur.executemany(sql, [u.row() for u in usage])

    def usage(self, tenant: str | None = None, since: float | None = None) -> list[Usage]:
        where: list[str] = []
        params: list[Any] = []
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        sql = f"SELECT {', '.join(USAGE_COLUMNS)} FROM usage"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [Usage(*r) for r in self.query(sql + " ORDER BY at", params)]


def _migrate_usage(cur: Any) -> None:
    """A ledger made before usage rows had a lease (keyed by request id) gets the new table, its
    rows copied with their request id as lease (ids were unique then)."""
    cur.execute("SELECT * FROM usage WHERE 1 = 0")
    if "lease" in [d[0] for d in cur.description]:
        return
    old = USAGE_COLUMNS[:-1]
    cur.execute("ALTER TABLE usage RENAME TO usage_before_lease")
    cur.execute("DROP INDEX IF EXISTS usage_tenant_at")
    for statement in SCHEMA:
        cur.execute(statement)
    cur.execute(f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) SELECT {', '.join(old)}, request_id "
                "FROM usage_before_lease")
    cur.execute("DROP TABLE usage_before_lease")


def _tenant(row: Sequence[Any]) -> Tenant:
    name, grants, rpm, ipm, conc, created, revoked = row
    return Tenant(name, json.loads(grants), rpm, ipm, conc, created, revoked)
