"""A restarted node deletes the shard copies its last process kept (mends, nineteenth session).

A node keeps verified copies of its shard sets' artifacts in its artifact store; an unload
deletes them, but a node that stopped (or crashed) with sets loaded took its record of them
along, so they stayed on disk for good. Now each node records its copies in a ledger on disk
(``CopyLedger``), locked while the process lives, and a node that starts
(:func:`gpufaas.gpu_manager.shards.shard_host`) deletes the copies of every ledger whose
process is gone (``ArtifactStore.sweep_ledgers``). Several managers may share one store
(``gpufaas up --nodes N``): a live node's copies stay, and so does any blob a model's record
(or a live node's) points at.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.sharding import Parallelism, ShardLoad
from gpufaas.gpu_manager.main import build_runtime
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.shards import shard_host
from gpufaas.scheduler.coordinator import Coordinator

TWO = Parallelism(shards=2, strategy="intra-layer", channel="direct")


def _runtime(root: Path) -> NodeRuntime:
    return build_runtime(
        cpu_devices=1, device_memory_bytes=1 << 30, host_memory_bytes=1 << 20,
        artifact_dir=root, disk_cache_bytes=0, force_cpu=True,
    )  # fmt: skip


def _blobs(store: ArtifactStore) -> set[str]:
    return {p.name for p in (store.root / "blobs").iterdir()}


def _ledger_files(store: ArtifactStore) -> list[Path]:
    return sorted((store.root / "ledgers").rglob("*"))


async def test_a_restarted_node_deletes_the_copies_its_last_process_kept(
    thread_nodes: Any, coordinator: Coordinator, net: Any, x: np.ndarray
) -> None:
    """A node stops with a set loaded (no unload: its copies stay); the next node on its store
    deletes them at start, and a set launched after that is fetched and served again."""
    node = thread_nodes[0]
    store = node.host.store
    before = _blobs(store)
    await coordinator.deploy("s", net, TWO, nodes=[node.url])
    copies = {str(load.sha256) for load in coordinator.sets["s"].loads}
    assert copies and copies <= _blobs(store) - before
    node.stop()  # the process goes (its host closes: its shards dropped, its copies kept)
    assert copies <= _blobs(store)
    restarted = shard_host(_runtime(store.root), token=None)
    try:
        assert not copies & _blobs(store)  # nobody keeps them: deleted at start
        assert _blobs(store) == before
    finally:
        await restarted.close()


async def test_a_live_nodes_copies_and_a_models_blob_stay(tmp_path: Path) -> None:
    """Three processes' worth on one store: a node that is gone, a node still running, and a
    model's artifact. The node that starts deletes only the gone node's copies; the blob it
    shares with the model stays (only its URI's record goes)."""
    root = tmp_path / "shared"
    digests = {}
    for name in ("gone", "live", "model", "both"):
        (tmp_path / name).write_bytes(f"{name} bytes".encode())
        digests[name] = hashlib.sha256(f"{name} bytes".encode()).hexdigest()
    uri = {name: (tmp_path / name).as_uri() for name in digests}
    gone = shard_host(_runtime(root), token=None)
    live = shard_host(_runtime(root), token=None)
    try:
        for host, name in ((gone, "gone"), (live, "live"), (gone, "both")):
            host._fetch(_load(name, uri[name], digests[name]))
        model_store = ArtifactStore(root)  # a model: fetched with no ledger
        model_store.fetch(uri["model"], sha256=digests["model"])
        model_store.fetch((tmp_path / "both").as_uri() + "?model", sha256=digests["both"])
        await gone.close()  # the process ends, its copies kept
        assert set(digests.values()) <= _blobs(live.store)
        started = shard_host(_runtime(root), token=None)
        await started.close()
        assert _blobs(live.store) == {digests["live"], digests["model"], digests["both"]}
        assert live.store._index_file(uri["live"]).is_file()  # the live node's record too
        assert not live.store._index_file(uri["gone"]).is_file()
    finally:
        await live.close()


def test_a_node_killed_mid_run_leaves_its_copies_to_the_next_start(tmp_path: Path) -> None:
    """A process killed outright (SIGKILL: no close) releases its ledger's lock all the same;
    the next start deletes what it recorded."""
    root = tmp_path / "store"
    source = tmp_path / "a"
    source.write_bytes(b"killed")
    digest = hashlib.sha256(b"killed").hexdigest()
    script = (
        "import os, sys\n"
        "from gpufaas.core.artifacts import ArtifactStore\n"
        "store = ArtifactStore(sys.argv[1])\n"
        "ledger = store.ledger()\n"
        "ledger.record(sys.argv[2], sha256=sys.argv[3])\n"
        "store.fetch(sys.argv[2], sha256=sys.argv[3])\n"
        "os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(root), source.as_uri(), digest],
        check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == -9
    store = ArtifactStore(root)
    assert digest in _blobs(store)
    assert store.sweep_ledgers() == [source.as_uri()]
    assert _blobs(store) == set()
    assert _ledger_files(store) == [store.root / "ledgers" / "sweeping"]  # the sweeps' lock


@settings(max_examples=25, deadline=None)
@given(
    kept=st.lists(st.sampled_from(range(6)), max_size=6),
    live=st.lists(st.sampled_from(range(6)), max_size=6),
    models=st.lists(st.sampled_from(range(6)), max_size=6),
)
def test_a_sweep_deletes_exactly_the_blobs_nobody_else_refers_to(
    tmp_path_factory: Any, kept: list[int], live: list[int], models: list[int]
) -> None:
    """Any mix: blob ``i`` is recorded by a dead ledger (``kept``), a live one (``live``,
    under another URI) and models' records (``models``, another URI again). After a sweep,
    a blob is gone exactly when only the dead ledger referred to it."""
    tmp = tmp_path_factory.mktemp("sweep")
    store = ArtifactStore(tmp / "store")
    sources = []
    for i in range(6):
        path = tmp / f"{i}"
        path.write_bytes(os.urandom(8) + bytes([i]))
        sources.append((path, hashlib.sha256(path.read_bytes()).hexdigest()))

    def fetch(i: int, tag: str) -> None:
        path, digest = sources[i]
        store.fetch(f"{path.as_uri()}?{tag}", sha256=digest)

    dead, alive = store.ledger(), store.ledger()
    for i in kept:
        dead.record(f"{sources[i][0].as_uri()}?dead", sha256=sources[i][1])
        fetch(i, "dead")
    for i in live:
        alive.record(f"{sources[i][0].as_uri()}?live", sha256=sources[i][1])
        fetch(i, "live")
    for i in models:
        fetch(i, "model")
    dead.close()
    store.sweep_ledgers()
    expected = {sources[i][1] for i in (*kept, *live, *models)} - {
        sources[i][1] for i in set(kept) - set(live) - set(models)
    }
    assert _blobs(store) == expected
    alive.close()


def _load(set_name: str, uri: str, sha256: str) -> ShardLoad:
    return ShardLoad(set_name=set_name, shard=0, shards=1, artifact=uri, sha256=sha256,
                     node="http://n:1", peers={0: "http://n:1"})  # fmt: skip


def test_a_sweep_waits_for_a_record_and_its_fetch_under_way(tmp_path: Path) -> None:
    """A live node's record-then-fetch and a sweep exclude each other: a sweep that starts
    inside the block ends only after it (so it sees the record, and keeps the blob). Only the
    sweep's not ending while the block is open is checked, which load cannot make fail."""
    store = ArtifactStore(tmp_path / "store")
    ledger = store.ledger()
    swept = threading.Event()
    try:
        with ledger.recording("file:///x", sha256=None):
            sweep = threading.Thread(target=lambda: (store.sweep_ledgers(), swept.set()))
            sweep.start()
            assert not swept.wait(0.5)  # waits for the block (a wrong pass, never a failure)
        assert swept.wait(60)
        sweep.join()
    finally:
        ledger.close()


async def test_garbage_in_a_dead_ledger_is_skipped_and_a_failed_sweep_never_stops_a_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A record that is not one (truncated, not JSON, no URI) is skipped and the ledger goes;
    a sweep that fails outright (here: the store's folder unreadable) is logged, and the node
    starts without it."""
    root = tmp_path / "store"
    store = ArtifactStore(root)
    ledger = store.ledger()
    ledger.record("file:///kept-no-copy", sha256=None)
    for name, body in (("a.json", b"{trunc"), ("b.json", b"[1, 2]"), ("c.json", b'{"x": 1}')):
        (ledger.folder / name).write_bytes(body)
    ledger.close()
    assert store.sweep_ledgers() == ["file:///kept-no-copy"]
    assert _ledger_files(store) == [root / "ledgers" / "sweeping"]

    def unreadable(self: ArtifactStore) -> list[str]:
        raise PermissionError(13, "Permission denied", str(root / "ledgers"))

    monkeypatch.setattr(ArtifactStore, "sweep_ledgers", unreadable)
    host = shard_host(_runtime(root), token=None)
    await host.close()
    assert "could not delete the shard copies of nodes now gone" in caplog.text
