"""Fixtures for both tiers: a real S3-compatible server (moto) for everything that stores files."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest

from core.storage import s3_endpoint

BUCKET = "cityserve-test"
# Test credentials only: moto accepts any. The other AWS_* variables a developer may have set
# (a profile, a session token, a real endpoint) are hidden for the session so nothing reaches AWS.
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "cityserve-test-key", "AWS_SECRET_ACCESS_KEY": "cityserve-test-secret",
                    "AWS_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """An S3 server on 127.0.0.1 for the session, with the AWS_* variables that point pyarrow (and
    Ray, and every process started from here) at it; yields `s3://BUCKET/<unique prefix>`."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request, once Ray sets up logging
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        with s3_endpoint(f"http://{host}:{port}", TEST_CREDENTIALS, BUCKET) as bucket:
            yield f"{bucket}/{uuid.uuid4().hex[:12]}"
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _s3_before_ray(request: pytest.FixtureRequest) -> None:
    """Starts the S3 server before anything else when any collected test uses it: the session's Ray
    cluster (tests/integration) passes its environment on to its workers only if it is there when
    the cluster starts, and the first test to run may be one that does not ask for `s3`."""
    if any("s3" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("s3")


@pytest.fixture
def s3_dir(s3: str) -> str:
    """A prefix of the session's bucket for one test, empty when the test starts."""
    return f"{s3}/{uuid.uuid4().hex[:8]}"
