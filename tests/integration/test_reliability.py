"""The short version of every serving reliability check (`bench/reliability`), against the app
deployed on the session's Ray cluster the way `cityserve serve up` deploys it; the shutdown check
starts a platform of its own. `make reliability` runs the full versions."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict

import pytest

from bench.reliability import Target
from bench.reliability.__main__ import OVERLAY, PLATFORM_CHECKS, platform_checks
from bench.reliability.durability import check_ledger_outage, check_shutdown_durability
from core.settings import Settings
from tests.integration.helpers import SERVED, TEST_OVERLAY, ensure_versions, session_app
from training.workspace import Workspace

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def production(workspace: Workspace) -> None:
    """A production version of each served domain (the other modules may leave some)."""
    for domain in SERVED:
        if not workspace.registry.stages(domain).get("production"):
            workspace.registry.promote(domain, ensure_versions(workspace, domain, 1)[-1])


@pytest.fixture(scope="module")
def target(workspace: Workspace, production: None) -> Iterator[Target]:
    """The test app, with `make reliability`'s two gateway and two energy replicas."""
    with session_app(workspace, TEST_OVERLAY, OVERLAY) as record:
        yield Target(record.gateway_url, record.dashboard_url, record.gcs_address, workspace.settings, os.getpid())


@pytest.mark.parametrize("name", PLATFORM_CHECKS)
def test_short_check_passes(target: Target, name: str) -> None:
    check = platform_checks()[name](target, True)
    print(json.dumps(asdict(check)))  # shown when it fails
    assert check.passed, (check.problems, check.figures)


# Each on a platform of its own: SIGTERM mid-load and restart; the ledger's PostgreSQL server stopped
# mid-load and started again. Every admitted request has exactly one usage row after either.
OWN_PLATFORM_CHECKS = {"shutdown_durability": (check_shutdown_durability, "answered_200"),
                       "ledger_outage": (check_ledger_outage, "answered_200_while_down")}


@pytest.mark.usefixtures("production")
@pytest.mark.parametrize("name", OWN_PLATFORM_CHECKS)
def test_every_admitted_request_has_one_usage_row_after_a_fault(settings: Settings, name: str) -> None:
    run, answered = OWN_PLATFORM_CHECKS[name]
    check = run(settings, short=True)
    print(json.dumps(asdict(check)))
    assert check.passed, (check.problems, check.figures)
    assert check.figures[answered] and check.figures["ledger_rows"]
