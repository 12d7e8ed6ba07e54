"""Fetching artifacts into the node-local cache: file://, http:// on loopback, and real S3."""

from __future__ import annotations

import functools
import hashlib
import http.server
import pickle
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import s3fs

from gpufaas.core.artifacts import ArtifactError, ArtifactStore
from gpufaas.core.channelservers import S3Server

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit: more than one chunk
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
WRONG_SHA = hashlib.sha256(b"something else").hexdigest()


def _cached_files(store: ArtifactStore) -> list[Path]:
    """Blobs and temporary files: what a failed fetch must not leave behind."""
    return sorted(p for sub in ("blobs", "tmp") for p in (store.root / sub).iterdir())


class _Server:
    """A static-file HTTP server on 127.0.0.1 in a thread, counting GET requests."""

    def __init__(self, directory: Path) -> None:
        self.gets = 0
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.gets += 1
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        handler = functools.partial(Handler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    (root / "model.pt").write_bytes(PAYLOAD)
    return root


@pytest.fixture
def web(site: Path) -> Iterator[_Server]:
    server = _Server(site)
    yield server
    server.stop()


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "cache")


# --- file:// -------------------------------------------------------------------------------------


def test_file_without_sha_is_used_in_place(store: ArtifactStore, site: Path) -> None:
    source = site / "model.pt"
    assert store.fetch(source.as_uri()) == source
    assert _cached_files(store) == []


def test_file_with_sha_is_copied_and_verified(store: ArtifactStore, site: Path) -> None:
    source = site / "model.pt"
    path = store.fetch(source.as_uri(), sha256=PAYLOAD_SHA)
    assert path != source
    assert path.is_relative_to(store.root)
    assert path.read_bytes() == PAYLOAD
    # What was verified stays what is loaded, whatever happens to the original.
    source.write_bytes(b"changed")
    assert store.fetch(source.as_uri(), sha256=PAYLOAD_SHA).read_bytes() == PAYLOAD


def test_file_sha_mismatch(store: ArtifactStore, site: Path) -> None:
    uri = (site / "model.pt").as_uri()
    with pytest.raises(ArtifactError) as info:
        store.fetch(uri, sha256=WRONG_SHA)
    message = str(info.value)
    assert uri in message
    assert WRONG_SHA in message
    assert PAYLOAD_SHA in message
    assert _cached_files(store) == []


def test_file_not_found(store: ArtifactStore, tmp_path: Path) -> None:
    uri = (tmp_path / "absent.pt").as_uri()
    for sha in (None, PAYLOAD_SHA):
        with pytest.raises(ArtifactError, match="not found") as info:
            store.fetch(uri, sha256=sha)
        assert uri in str(info.value)


def test_file_uri_must_be_absolute(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactError, match="absolute"):
        store.fetch("file://relative/model.pt")


def test_file_uri_is_percent_decoded(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "with space.pt"
    source.write_bytes(PAYLOAD)
    assert store.fetch(source.as_uri()) == source


# --- checks before any I/O -------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["ftp://host/model.pt", "gs://bucket/model.pt", "/no/scheme.pt"])
def test_scheme_not_allowed(store: ArtifactStore, uri: str) -> None:
    with pytest.raises(ArtifactError, match="is not allowed") as info:
        store.fetch(uri)
    assert uri in str(info.value)


def test_schemes_can_be_restricted(tmp_path: Path, web: _Server) -> None:
    store = ArtifactStore(tmp_path / "cache", allowed_schemes=("file", "s3"))
    with pytest.raises(ArtifactError, match="'http' is not allowed"):
        store.fetch(f"{web.url}/model.pt")
    assert web.gets == 0


def test_malformed_sha(store: ArtifactStore, site: Path) -> None:
    with pytest.raises(ArtifactError, match="64 hex digits"):
        store.fetch((site / "model.pt").as_uri(), sha256="abc")


def test_uppercase_sha_is_accepted(store: ArtifactStore, site: Path) -> None:
    path = store.fetch((site / "model.pt").as_uri(), sha256=PAYLOAD_SHA.upper())
    assert path.name == PAYLOAD_SHA


# --- size limit -----------------------------------------------------------------------------------


def test_size_limit_in_place(tmp_path: Path, site: Path) -> None:
    store = ArtifactStore(tmp_path / "cache", max_bytes=1000)
    with pytest.raises(ArtifactError, match="size limit of 1000 bytes"):
        store.fetch((site / "model.pt").as_uri())


def test_size_limit_while_downloading(tmp_path: Path, web: _Server) -> None:
    store = ArtifactStore(tmp_path / "cache", max_bytes=len(PAYLOAD) - 1)
    with pytest.raises(ArtifactError, match="size limit"):
        store.fetch(f"{web.url}/model.pt")
    assert _cached_files(store) == []


# --- http:// --------------------------------------------------------------------------------------


def test_http_fetch_verifies_and_caches(store: ArtifactStore, web: _Server) -> None:
    uri = f"{web.url}/model.pt"
    path = store.fetch(uri, sha256=PAYLOAD_SHA)
    assert path.read_bytes() == PAYLOAD
    assert path.name == PAYLOAD_SHA  # content-addressed
    assert web.gets == 1

    assert store.fetch(uri, sha256=PAYLOAD_SHA) == path
    assert web.gets == 1
    web.stop()  # no network from here on
    assert store.fetch(uri, sha256=PAYLOAD_SHA) == path
    assert store.fetch(uri) == path  # the index remembers the URI
    # A new store over the same folder (another process) sees the same cache.
    assert ArtifactStore(store.root).fetch(uri, sha256=PAYLOAD_SHA) == path


def test_http_without_sha_is_cached_by_uri(store: ArtifactStore, web: _Server) -> None:
    uri = f"{web.url}/model.pt"
    path = store.fetch(uri)
    assert path.read_bytes() == PAYLOAD
    web.stop()
    assert store.fetch(uri) == path


def test_http_sha_mismatch_leaves_nothing(store: ArtifactStore, web: _Server) -> None:
    uri = f"{web.url}/model.pt"
    with pytest.raises(ArtifactError) as info:
        store.fetch(uri, sha256=WRONG_SHA)
    assert f"expected {WRONG_SHA}, got {PAYLOAD_SHA}" in str(info.value)
    assert uri in str(info.value)
    assert _cached_files(store) == []
    # ...and a later fetch with no sha does not find the rejected bytes either.
    assert web.gets == 1
    store.fetch(uri)
    assert web.gets == 2


def test_http_not_found(store: ArtifactStore, web: _Server) -> None:
    uri = f"{web.url}/absent.pt"
    with pytest.raises(ArtifactError, match="not found") as info:
        store.fetch(uri)
    assert uri in str(info.value)
    assert _cached_files(store) == []


def test_http_server_down(store: ArtifactStore, web: _Server) -> None:
    web.stop()
    with pytest.raises(ArtifactError, match=r"could not fetch .*Connect") as info:
        store.fetch(f"{web.url}/model.pt")
    assert web.url in str(info.value)


def test_concurrent_fetches_do_not_corrupt(tmp_path: Path, web: _Server) -> None:
    uri = f"{web.url}/model.pt"
    root = tmp_path / "cache"
    stores = [ArtifactStore(root), ArtifactStore(root)]  # two "processes", separate locks
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(stores[i % 2].fetch, uri, sha256=PAYLOAD_SHA) for i in range(8)]
        paths = {f.result(timeout=60) for f in futures}
    assert len(paths) == 1
    assert paths.pop().read_bytes() == PAYLOAD
    assert list((root / "tmp").iterdir()) == []
    assert web.gets <= 2  # one download per store at most


# --- s3:// against SeaweedFS ------------------------------------------------------------------------


def _storage_options(server: S3Server) -> dict[str, Any]:
    """s3fs options reaching ``server`` with valid credentials."""
    return {"endpoint_url": server.endpoint_url, "key": server.key, "secret": server.secret}


@pytest.fixture
def s3_object(s3_server: S3Server) -> str:
    """A fresh object in the bucket, holding PAYLOAD; returns its s3:// URI."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **_storage_options(s3_server))
    key = f"{s3_server.bucket}/{uuid.uuid4().hex}/model.pt"
    fs.pipe(key, PAYLOAD)
    return f"s3://{key}"


def test_s3_with_storage_options(tmp_path: Path, s3_server: S3Server, s3_object: str) -> None:
    store = ArtifactStore(tmp_path / "cache", storage_options={"s3": _storage_options(s3_server)})
    path = store.fetch(s3_object, sha256=PAYLOAD_SHA)
    assert path.read_bytes() == PAYLOAD
    assert store.fetch(s3_object) == path


def test_s3_with_environment_variables(
    tmp_path: Path, s3_server: S3Server, s3_object: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    store = ArtifactStore(tmp_path / "cache")
    assert store.fetch(s3_object, sha256=PAYLOAD_SHA).read_bytes() == PAYLOAD


def test_s3_sha_mismatch(tmp_path: Path, s3_server: S3Server, s3_object: str) -> None:
    store = ArtifactStore(tmp_path / "cache", storage_options={"s3": _storage_options(s3_server)})
    with pytest.raises(ArtifactError) as info:
        store.fetch(s3_object, sha256=WRONG_SHA)
    assert WRONG_SHA in str(info.value)
    assert PAYLOAD_SHA in str(info.value)
    assert _cached_files(store) == []


def test_s3_not_found(tmp_path: Path, s3_server: S3Server) -> None:
    store = ArtifactStore(tmp_path / "cache", storage_options={"s3": _storage_options(s3_server)})
    uri = f"s3://{s3_server.bucket}/absent/model.pt"
    with pytest.raises(ArtifactError, match="not found") as info:
        store.fetch(uri)
    assert uri in str(info.value)


def test_s3_wrong_credentials(tmp_path: Path, s3_server: S3Server, s3_object: str) -> None:
    options = {**_storage_options(s3_server), "secret": "wrong-secret"}
    store = ArtifactStore(tmp_path / "cache", storage_options={"s3": options})
    with pytest.raises(ArtifactError, match="access denied"):
        store.fetch(s3_object)
    assert _cached_files(store) == []


def test_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(ArtifactError("s3://b/m.pt", "not found")))
    assert (error.uri, error.reason, str(error)) == (
        "s3://b/m.pt",
        "not found",
        "artifact s3://b/m.pt: not found",
    )
