"""Fixtures for both tiers: a real S3-compatible server (moto) for everything that stores files."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest

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
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request, once Ray sets up logging
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    try:
        host, port = server.get_host_and_port()
        for name in saved:
            del os.environ[name]
        os.environ.update({**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
        # from_uri honours AWS_ENDPOINT_URL (the S3FileSystem constructor does not).
        fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")
        fs.create_dir(BUCKET)
        yield f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    finally:
        server.stop()
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(saved)


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
