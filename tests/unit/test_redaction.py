"""A ledger password stays out of the serve config (which Ray's dashboard shows), out of
`state/serve-config.json`, and out of every message that quotes a URL."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

import pytest
from pydantic import ValidationError

from cluster.serve import Platform
from core import has_password, redact
from core.errors import ConfigError
from core.settings import LEDGER_ENV, Settings
from services import platform
from services.config import PlatformArgs, ServeOverlay, build_config
from services.platform import ledger_secrets, platform_up, serve_config
from services.tenants import Store
from training.workspace import Workspace

SECRET = "hunter2"
WITH_PASSWORD = f"postgresql://cityserve:{SECRET}@db.internal:5432/cityserve"
# pgserver's URL (tests/integration): a user with an empty password, the server on a socket.
PGSERVER = "postgresql://postgres:@/postgres?host=/tmp/pg"


@pytest.mark.parametrize("text, redacted", [
    (WITH_PASSWORD, "postgresql://cityserve:***@db.internal:5432/cityserve"),
    ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # an unescaped @ in the password
    (f"ledger URL 'mysql://u:{SECRET}@h/db': use sqlite", "ledger URL 'mysql://u:***@h/db': use sqlite"),
    (f"postgresql://h/db?user=u&password={SECRET}&sslmode=require",
     "postgresql://h/db?user=u&password=***&sslmode=require"),
    (f"host=h user=u password={SECRET}", "host=h user=u password=***"),  # a libpq keyword string
])
def test_a_password_in_a_url_is_redacted_wherever_the_url_is_quoted(text: str, redacted: str) -> None:
    assert redact(text) == redacted and has_password(text)


@pytest.mark.parametrize("url", [PGSERVER, "postgresql://cityserve@db/cityserve", "sqlite:///state/c.db",
                                 "env:CITYSERVE_LEDGER_URL"])
def test_a_url_without_a_password_is_left_as_it_is(url: str) -> None:
    assert redact(url) == url and not has_password(url)
    PlatformArgs(registry_uri="r", ledger_url=url, domains={"events": {}})


def test_a_serve_config_with_a_ledger_password_is_refused_without_quoting_it() -> None:
    with pytest.raises(ValidationError) as refused:
        PlatformArgs(registry_uri="r", ledger_url=WITH_PASSWORD, domains={"events": {}})
    assert SECRET not in str(refused.value) and "env:NAME" in str(refused.value)
    with pytest.raises(ConfigError, match="env:NAME") as config_refused:  # as `serve up` and the chart's test see it
        build_config("cluster", ServeOverlay(args={"ledger_url": WITH_PASSWORD}))
    assert SECRET not in str(config_refused.value) and "cityserve:***@db.internal" in str(config_refused.value)


def _settings(tmp_path: Path, ledger_url: str) -> Settings:
    return Settings(registry_uri=str(tmp_path / "registry"), state_dir=tmp_path / "state", ledger_url=ledger_url)


def test_the_local_platform_passes_a_ledger_password_through_the_environment(tmp_path: Path) -> None:
    settings = _settings(tmp_path, WITH_PASSWORD)
    config = serve_config(Workspace.from_settings(settings), "local", ["events"], 8123)
    assert config["applications"][0]["args"]["ledger_url"] == f"env:{LEDGER_ENV}"
    assert SECRET not in json.dumps(config)  # what Ray's dashboard and state/serve-config.json show
    assert ledger_secrets(settings) == {LEDGER_ENV: WITH_PASSWORD}  # what `start_head` puts in Ray's environment
    plain = _settings(tmp_path, PGSERVER)
    assert serve_config(Workspace.from_settings(plain), "local", ["events"], 8123)[
        "applications"][0]["args"]["ledger_url"] == PGSERVER
    assert ledger_secrets(plain) == {}


def test_a_new_ray_head_gets_the_ledger_password_in_its_environment(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path, WITH_PASSWORD)
    settings.state_dir.mkdir()
    given: list[Mapping[str, str] | None] = []

    def start_head(state_dir: Path, *, num_cpus: int, http_port: int,
                   secrets: Mapping[str, str] | None = None) -> NoReturn:
        given.append(secrets)
        raise RuntimeError("no Ray in unit tests")

    monkeypatch.setattr(platform, "start_head", start_head)
    with pytest.raises(RuntimeError, match="no Ray"):
        platform_up(settings, serve_config(Workspace.from_settings(settings), "local", ["events"], 8123), num_cpus=1)
    assert given == [{LEDGER_ENV: WITH_PASSWORD}]


def test_a_running_platform_is_not_given_a_ledger_password_it_did_not_start_with(tmp_path: Path) -> None:
    """A running head's environment is fixed: the replicas would not see a new password."""
    settings = _settings(tmp_path, WITH_PASSWORD)
    settings.state_dir.mkdir()
    Platform(os.getpid(), "", "http://127.0.0.1:1", "http://127.0.0.1:8123", "", "local").save(settings.state_dir)
    config = serve_config(Workspace.from_settings(settings), "local", ["events"], 8123)
    with pytest.raises(ConfigError, match="serve down") as refused:
        platform_up(settings, config, num_cpus=1)
    assert SECRET not in str(refused.value)


def test_the_store_quotes_its_url_without_the_password() -> None:
    store = Store(f"mysql://cityserve:{SECRET}@db/cityserve")
    assert SECRET not in repr(store)
    with pytest.raises(ConfigError, match="use sqlite") as refused:
        store.tenants()
    assert SECRET not in str(refused.value) and "cityserve:***@db" in str(refused.value)
