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

from core.errors import CityServeError, ConfigError, InvalidInput
from core.redact import redact
from services.tenants.keys import new_key
from services.tenants.records import USAGE_COLUMNS, ApiKey, Tenant, Usage, check_limits
from services.tenants.tenants_file import KeyEntry, TenantEntry

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, grants TEXT NOT NULL,
       requests_per_minute INTEGER NOT NULL, items_per_minute INTEGER NOT NULL, max_concurrent INTEGER NOT NULL,
       created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION,
       sample_rate DOUBLE PRECISION NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS api_keys (key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, digest TEXT NOT NULL,
       created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS audit (id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL,
       action TEXT NOT NULL, tenant TEXT NOT NULL, detail TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS usage (request_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
       tenant TEXT NOT NULL, domain TEXT NOT NULL, items INTEGER NOT NULL, status INTEGER NOT NULL,
       latency_ms DOUBLE PRECISION NOT NULL, model_version TEXT NOT NULL, lease TEXT PRIMARY KEY,
       route TEXT NOT NULL DEFAULT 'predict')""",
    "CREATE INDEX IF NOT EXISTS usage_tenant_at ON usage (tenant, at)",
    # Tenants a tenants file (a Kubernetes Secret) manages, for good: the CLI refuses to change them, and
    # one dropped from the file stays here, revoked, so that listing it again restores it.
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


class LedgerUnavailable(CityServeError):
    """The ledger's database cannot be reached now (it was unreachable a moment ago: the store waits
    out a backoff before it tries again, so callers fail at once instead of each waiting for a timeout)."""


# A lost connection is re-opened at the next call after this backoff, doubled at each failure to
# connect (up to the last figure) and reset by a success: a database that is down costs each call an
# immediate LedgerUnavailable, not a connect timeout.
RECONNECT_BACKOFF_S = (0.5, 5.0)
CONNECT_TIMEOUT_S = 3


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
    _retry_at: float = field(default=0.0, repr=False)  # monotonic time before which no reconnect is tried
    _backoff: float = field(default=RECONNECT_BACKOFF_S[0], repr=False)

    def __post_init__(self) -> None:
        self.url = resolve_url(self.url)

    @property
    def postgres(self) -> bool:
        return self.url.startswith(("postgresql://", "postgres://"))

    def _connect(self) -> Any:
        if self.postgres:
            import psycopg

            return psycopg.connect(self.url, autocommit=False, connect_timeout=CONNECT_TIMEOUT_S)
        if not self.url.startswith("sqlite:///"):
            raise ConfigError(f"ledger URL {redact(self.url)!r}: use sqlite:///FILE or postgresql://...",
                              field="ledger_url")
        path = Path(self.url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # readers (the CLI) never block the ledger's writer
        conn.execute("PRAGMA synchronous=FULL")  # a committed usage row survives a power cut
        return conn

    def _open(self) -> Any:
        """The connection, opened (with the schema) when there is none and the backoff allows."""
        if self._conn is not None:
            return self._conn
        if time.monotonic() < self._retry_at:
            raise LedgerUnavailable(f"the ledger database was unreachable; retrying in "
                                    f"{self._retry_at - time.monotonic():.1f} s")
        try:
            conn = self._connect()
            cur = conn.cursor()
            for statement in SCHEMA:
                cur.execute(statement)
            _migrate_usage(cur)
            _add_columns(cur)
            conn.commit()
        except ConfigError:
            raise
        except Exception as exc:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RECONNECT_BACKOFF_S[1])
            raise LedgerUnavailable(f"the ledger database is unreachable ({type(exc).__name__})") from exc
        self._conn, self._backoff = conn, RECONNECT_BACKOFF_S[0]
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            conn = self._open()
            try:
                yield conn.cursor()
                conn.commit()
            except BaseException as exc:
                if _connection_lost(exc):  # the next call opens a new connection
                    with contextlib.suppress(Exception):
                        conn.close()
                    self._conn = None
                    raise LedgerUnavailable(f"the ledger database connection was lost ({type(exc).__name__})") \
                        from exc
                conn.rollback()
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

    def file_managed(self) -> set[str]:
        """The tenants a tenants file manages (see `sync_tenants`)."""
        return {r[0] for r in self.query("SELECT name FROM file_tenants")}

    def _cli_may_change(self, name: str, instead: str) -> Tenant:
        """Tenant `name`, unless the tenants file manages it: the file is its one source of truth, and
        its next sync would undo the change, so that is refused. `instead` says what to edit there."""
        tenant = self.tenant(name)
        if name in self.file_managed():
            raise InvalidInput(f"tenant {name!r} is managed by the tenants file (the serve config's "
                               f"tenants_file; on Kubernetes the tenants Secret): {instead} there", field="tenant")
        return tenant

    def create_tenant(self, tenant: Tenant, key_ttl_days: float) -> str:
        """Adds a tenant with its first key; returns the key (shown once, never stored)."""
        check_limits(tenant)
        if self.query("SELECT name FROM tenants WHERE name = ?", (tenant.name,)):
            raise InvalidInput(f"tenant {tenant.name!r} exists; rotate its key with `cityserve tenants rotate`",
                               field="name")
        now = time.time()
        key, key_id, key_digest = new_key()
        with self._tx() as cur:
            cur.execute(self._sql("INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                        (tenant.name, json.dumps(sorted(tenant.grants)), tenant.requests_per_minute,
                         tenant.items_per_minute, tenant.max_concurrent, now, None, tenant.sample_rate))
            cur.execute(self._sql("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?)"),
                        (key_id, tenant.name, key_digest, now, now + key_ttl_days * 86400, None))
            self.audit(cur, "create", tenant.name, {"grants": sorted(tenant.grants), "key_id": key_id,
                                                    "requests_per_minute": tenant.requests_per_minute,
                                                    "items_per_minute": tenant.items_per_minute,
                                                    "max_concurrent": tenant.max_concurrent,
                                                    "sample_rate": tenant.sample_rate})
        return key

    def rotate(self, name: str, key_ttl_days: float, grace_hours: float) -> str:
        """A new key for `name`; its current keys keep working for `grace_hours`, then expire."""
        tenant = self._cli_may_change(name, "add the entry `cityserve tenants new-key` prints to its keys, and "
                                            "remove the old key once its users have the new one")
        if tenant.revoked_at is not None:
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
        self._cli_may_change(name, "remove the key from its keys" if key_id else "remove the tenant from the file")
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
        """Changes grants, limits and the sample rate (only those given)."""
        tenant = self._cli_may_change(name, "change its grants and limits")
        changes = {k: v for k, v in changes.items() if v is not None}
        for k, v in changes.items():
            setattr(tenant, k, v)
        check_limits(tenant)
        with self._tx() as cur:
            cur.execute(self._sql("UPDATE tenants SET grants = ?, requests_per_minute = ?, items_per_minute = ?, "
                                  "max_concurrent = ?, sample_rate = ? WHERE name = ?"),
                        (*_limits(tenant), name))
            self.audit(cur, "set-quota", name, {k: sorted(v) if k == "grants" else v for k, v in changes.items()})
        return tenant

    def sync_tenants(self, listed: Sequence[TenantEntry]) -> list[str]:
        """Makes the database match a tenants file, the one source of truth for the tenants it lists;
        they are file-managed from then on (`file_managed`), and the CLI refuses to change them.

        - A listed tenant is created, or gets the file's grants and limits (and is restored if the
          file dropped it before).
        - Its keys are exactly the listed ones: each valid until the `expires` the file gives it
          (never, when it gives none); a key the file no longer lists is revoked, and only listing
          it again restores it.
        - A file-managed tenant dropped from the file is revoked with its keys.
        - A tenant created with `cityserve tenants create` is never touched: a file listing its name
          is refused whole, like any other bad file.

        Returns the tenants that changed; an unchanged file changes nothing, and is not audited.
        """
        now = time.time()
        changes = []
        with self._tx() as cur:
            cur.execute("SELECT name FROM file_tenants")
            managed = {r[0] for r in cur.fetchall()}
            for entry in listed:
                if self._sync_tenant(cur, entry, entry.name in managed, now):
                    changes.append(entry.name)
            cur.execute("SELECT name FROM tenants WHERE revoked_at IS NULL")
            live = {r[0] for r in cur.fetchall()}
            for name in sorted((managed & live) - {e.name for e in listed}):
                self._revoke_tenant(cur, name, now)
                self.audit(cur, "sync-revoke", name, {"reason": "no longer in the tenants file"})
                changes.append(name)
        return changes

    def _sync_tenant(self, cur: Any, entry: TenantEntry, managed: bool, now: float) -> bool:
        """Applies one listed tenant; True when anything changed."""
        tenant = entry.tenant()
        check_limits(tenant)
        cur.execute(self._sql("SELECT * FROM tenants WHERE name = ?"), (tenant.name,))
        row = cur.fetchone()
        if row is not None and not managed:
            raise ConfigError(f"tenants file: tenant {tenant.name!r} was created with `cityserve tenants create`, "
                              "which manages it; give the file's tenant another name", field="name")
        values = _limits(tenant)
        stale = row is None or (*row[1:5], row[7]) != values or row[6] is not None  # or revoked
        if row is None:
            cur.execute(self._sql("INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                        (tenant.name, *values[:4], now, None, tenant.sample_rate))
            cur.execute(self._sql("INSERT INTO file_tenants VALUES (?)"), (tenant.name,))
        elif stale:
            cur.execute(self._sql("UPDATE tenants SET grants = ?, requests_per_minute = ?, items_per_minute = ?, "
                                  "max_concurrent = ?, sample_rate = ?, revoked_at = NULL WHERE name = ?"),
                        (*values, tenant.name))
        keys_changed = self._sync_keys(cur, tenant.name, entry.keys, now)
        if stale or keys_changed:
            self.audit(cur, "sync", tenant.name, {
                "grants": sorted(tenant.grants), "requests_per_minute": tenant.requests_per_minute,
                "items_per_minute": tenant.items_per_minute, "max_concurrent": tenant.max_concurrent,
                "sample_rate": tenant.sample_rate,
                "keys": {k.id: k.expires.isoformat() if k.expires else None for k in entry.keys}})
        return stale or keys_changed

    def _sync_keys(self, cur: Any, name: str, listed: Sequence[KeyEntry], now: float) -> bool:
        """Makes tenant `name`'s keys the listed ones; True when any changed."""
        cur.execute(self._sql("SELECT key_id, digest, expires_at, revoked_at FROM api_keys WHERE tenant = ?"),
                    (name,))
        held = {r[0]: tuple(r[1:]) for r in cur.fetchall()}
        ids = {k.id for k in listed}
        gone = [key_id for key_id, (_, _, revoked) in held.items() if revoked is None and key_id not in ids]
        for key_id in gone:
            cur.execute(self._sql("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?"), (now, key_id))
        changed = bool(gone)
        for key in listed:
            wanted = (key.sha256, key.expires_at, None)
            if held.get(key.id) == wanted:
                continue
            changed = True
            if key.id in held:  # a new digest or expiry, or listed again after the file dropped it
                cur.execute(self._sql("UPDATE api_keys SET digest = ?, expires_at = ?, revoked_at = ? "
                                      "WHERE key_id = ?"), (*wanted, key.id))
                continue
            cur.execute(self._sql("SELECT tenant FROM api_keys WHERE key_id = ?"), (key.id,))
            if cur.fetchone() is not None:
                raise ConfigError(f"tenants file: {name}'s key {key.id} is another tenant's key id; "
                                  "make a new key with `cityserve tenants new-key`", field="keys")
            cur.execute(self._sql("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?)"),
                        (key.id, name, key.sha256, now, key.expires_at, None))
        return changed

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


    def version_statuses(self, domain: str, since: float) -> dict[str, dict[int, int]]:
        """Per model version, the count of each status of `domain`'s predictions since `since`:
        the requests a version answered (200), refused (422) or failed on (500). Rows without a
        version (refused before any model saw them, timed out) are left out."""
        rows = self.query("SELECT model_version, status, COUNT(*) FROM usage WHERE domain = ? AND at >= ? "
                          "AND route = 'predict' AND model_version <> '' GROUP BY model_version, status",
                          [domain, since])
        out: dict[str, dict[int, int]] = {}
        for version, status, count in rows:
            out.setdefault(version, {})[int(status)] = int(count)
        return out


def _connection_lost(exc: BaseException) -> bool:
    """Whether `exc` means the connection is gone (the server restarted, the network dropped), not
    that one statement failed: psycopg's operational and interface errors; for SQLite, a file that
    cannot be opened is the closest (a locked database is retried by SQLite itself)."""
    if isinstance(exc, sqlite3.OperationalError):
        return "unable to open" in str(exc) or "disk I/O" in str(exc)
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def _migrate_usage(cur: Any) -> None:
    """A ledger made before usage rows had a lease (keyed by request id) gets the new table, its
    rows copied with their request id as lease (ids were unique then)."""
    cur.execute("SELECT * FROM usage WHERE 1 = 0")
    if "lease" in [d[0] for d in cur.description]:
        return
    old = USAGE_COLUMNS[:USAGE_COLUMNS.index("lease")]
    cur.execute("ALTER TABLE usage RENAME TO usage_before_lease")
    cur.execute("DROP INDEX IF EXISTS usage_tenant_at")
    for statement in SCHEMA:
        cur.execute(statement)
    cur.execute(f"INSERT INTO usage ({', '.join(old)}, lease) SELECT {', '.join(old)}, request_id "
                "FROM usage_before_lease")
    cur.execute("DROP TABLE usage_before_lease")


def _add_columns(cur: Any) -> None:
    """Columns added since a table was made, with the value every older row gets: a tenant's sample
    rate (0: nothing kept) and a usage row's route (they were all predictions)."""
    for table, column, definition in (("tenants", "sample_rate", "DOUBLE PRECISION NOT NULL DEFAULT 0"),
                                      ("usage", "route", "TEXT NOT NULL DEFAULT 'predict'")):
        cur.execute(f"SELECT * FROM {table} WHERE 1 = 0")
        if column not in [d[0] for d in cur.description]:
            cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


def _limits(tenant: Tenant) -> tuple[Any, ...]:
    """A tenant's grants, limits and sample rate, as its columns hold them."""
    return (json.dumps(sorted(tenant.grants)), tenant.requests_per_minute, tenant.items_per_minute,
            tenant.max_concurrent, tenant.sample_rate)


def _tenant(row: Sequence[Any]) -> Tenant:
    name, grants, rpm, ipm, conc, created, revoked, sample_rate = row
    return Tenant(name, json.loads(grants), rpm, ipm, conc, created, revoked, sample_rate)
