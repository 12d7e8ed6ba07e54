"""A shard copy's deletion leaves the event loop, and no fetch finds it on its way out
(mends, nineteenth session).

``ShardHost._discard`` decided and deleted on the event loop, so that no load could start its
fetch between the check and the deletion; but unlinking a very large blob blocks the loop.
Now the loop only claims the copy (its record goes and the blob is renamed out of the cache,
``ArtifactStore.claim``) and a thread deletes the claimed file. These tests hold that
deletion on a gate, so they check what happens meanwhile, never how long anything takes.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.sharding import ShardLoad
from gpufaas.gpu_manager.main import build_runtime
from gpufaas.gpu_manager.shards import ShardHost

BYTES = b"shard bytes, large in production"
DIGEST = hashlib.sha256(BYTES).hexdigest()


class Gate:
    """Holds every deletion of a blob, or of a file under the store's ``tmp/`` (where a claim
    puts it), until opened, noting the thread it ran on; ``pending`` is set (on the loop)
    when the first one is held."""

    def __init__(self, store: ArtifactStore, loop: asyncio.AbstractEventLoop) -> None:
        self.tmp = store.root / "tmp"
        self.blobs = store.root / "blobs"
        self.loop = loop
        self.open = threading.Event()
        self.pending = asyncio.Event()
        self.threads: list[int] = []
        self.opened_in_time: list[bool] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = Path.unlink

        def unlink(path: Path, missing_ok: bool = False) -> None:
            if path.parent in (self.tmp, self.blobs):
                self.threads.append(threading.get_ident())
                self.loop.call_soon_threadsafe(self.pending.set)
                # Bounded, so that a deletion held on the loop thread (the defect) ends the
                # test with a failed assertion instead of a hang.
                self.opened_in_time.append(self.open.wait(30))
            real(path, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", unlink)


def _load(set_name: str, uri: str) -> ShardLoad:
    return ShardLoad(set_name=set_name, shard=0, shards=1, artifact=uri, sha256=DIGEST,
                     node="http://n:1", peers={0: "http://n:1"})  # fmt: skip


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[ShardHost]:
    runtime = build_runtime(
        cpu_devices=1, device_memory_bytes=1 << 20, host_memory_bytes=1 << 20,
        artifact_dir=tmp_path / "node", disk_cache_bytes=0, force_cpu=True,
    )  # fmt: skip
    shards = ShardHost(store=runtime.artifacts.store, devices=list(runtime.devices.values()))
    try:
        yield shards
    finally:
        await shards.close()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "a.safetensors"
    path.write_bytes(BYTES)
    return path


async def test_a_fetch_while_a_copy_is_being_deleted_gets_a_copy_that_stays(
    host: ShardHost, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deletion is held in its thread; meanwhile the loop is free, and a fetch of the same
    artifact neither waits for it nor gets the file on its way out: it fetches a fresh copy,
    which is still there, whole, after the deletion ends."""
    uri = source.as_uri()
    blob = host.store.fetch(uri, sha256=DIGEST)
    gate = Gate(host.store, asyncio.get_running_loop())
    gate.install(monkeypatch)
    discarding = asyncio.create_task(host._discard(_load("gone", uri)))
    try:
        await asyncio.wait_for(gate.pending.wait(), 60)
        assert gate.threads[0] != threading.get_ident()  # deleted off the event loop
        assert not blob.exists()  # claimed: no fetch can find it from here on
        again = await asyncio.to_thread(host.store.fetch, uri, sha256=DIGEST)
    finally:
        gate.open.set()
        await discarding
    assert gate.opened_in_time == [True]  # the fetch never waited for the deletion
    assert again == blob and again.read_bytes() == BYTES
    assert not list(gate.tmp.iterdir())  # the claimed file is gone


async def test_the_loop_serves_while_a_copy_is_being_deleted(
    host: ShardHost, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unload waits for its copy's deletion off the loop: while the deletion is held, the
    loop runs on (this test's own code) and the unload is still waiting; it returns once the
    deletion ends."""
    uri = source.as_uri()
    host.store.fetch(uri, sha256=DIGEST)
    host._copies["gone/0"] = _load("gone", uri)
    gate = Gate(host.store, asyncio.get_running_loop())
    gate.install(monkeypatch)
    unloading = asyncio.create_task(host.unload("gone", 0))
    try:
        await asyncio.wait_for(gate.pending.wait(), 60)
        assert not unloading.done()  # it waits for its deletion, off the loop
    finally:
        gate.open.set()
    assert await unloading is False  # it was not loaded (only its copy was kept)
    assert gate.opened_in_time == [True]
    assert not (host.store.root / "blobs" / DIGEST).exists()


def test_a_store_deletes_the_files_a_dead_process_claimed(tmp_path: Path) -> None:
    """A claimed file whose claimer died before deleting it goes when a store next opens on
    the same root; the claim itself takes the blob out of the cache at once."""
    store = ArtifactStore(tmp_path / "store")
    source = tmp_path / "a.bin"
    source.write_bytes(BYTES)
    blob = store.fetch(source.as_uri(), sha256=DIGEST)
    claimed = store.claim(source.as_uri(), sha256=DIGEST)
    assert claimed is not None and claimed.read_bytes() == BYTES and not blob.exists()
    ArtifactStore(tmp_path / "store")  # the next process on this root
    assert not claimed.exists()
