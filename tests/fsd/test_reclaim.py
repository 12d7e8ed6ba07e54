"""The grid bench gives back each cell's disk space (fsd, sixteenth session, follow-up).

Hold (h) of RadiX-Net 16,384 x 120 stopped after 21 of 25 cells on a full disk: every cell's
shard artifacts stayed in the bench's folder (the coordinator's copy and each manager's
verified copy), and SeaweedFS keeps a deleted object's bytes until its master compacts the
volume. ``bench/fsd.py``'s ``reclaim`` deletes a removed set's artifacts
(``set_artifacts``) and compacts the S3 server's volumes (``channelservers.vacuum``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
from bench_support import load_bench

from gpufaas.core.channelservers import S3Server, ServerMissing, run_seaweedfs, vacuum
from gpufaas.core.sharding import ShardLoad

ROOT = Path(__file__).resolve().parents[2]
fsd = load_bench(ROOT / "bench" / "fsd.py", name="fsd_bench_reclaim")


def _load(root: Path, set_name: str, shard: int, sha: str) -> ShardLoad:
    path = root / "shards" / f"{set_name}.shard-{shard}-of-2.safetensors"
    return ShardLoad(set_name=set_name, shard=shard, shards=2, artifact=path.as_uri(),
                     sha256=sha, node="http://127.0.0.1:1", peers={})  # fmt: skip


def test_a_removed_sets_artifacts_and_their_managers_copies_are_found_and_no_others(
    tmp_path: Path,
) -> None:
    ours = [_load(tmp_path, "radix-2-s3-random", k, f"{k + 1}" * 64) for k in range(2)]
    theirs = _load(tmp_path, "radix-2-s3-block", 0, "c" * 64)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.safetensors"
    stray = ShardLoad(set_name="x", shard=0, shards=1, artifact=outside.as_uri(),
                      sha256="d" * 64, node="http://127.0.0.1:1", peers={})  # fmt: skip
    files = []
    for load in (*ours, theirs):
        files.append(Path(load.artifact.removeprefix("file://")))
    for index, load in enumerate((*ours, theirs)):  # each on its own manager, one on two
        for k in {index, 0}:
            files.append(tmp_path / f"artifacts{k}" / "blobs" / str(load.sha256))
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    outside.write_bytes(b"x")
    try:
        found = set(fsd.set_artifacts([*ours, stray], tmp_path))
        assert found == {
            tmp_path / "shards" / "radix-2-s3-random.shard-0-of-2.safetensors",
            tmp_path / "shards" / "radix-2-s3-random.shard-1-of-2.safetensors",
            tmp_path / "artifacts0" / "blobs" / ("1" * 64),
            tmp_path / "artifacts0" / "blobs" / ("2" * 64),
            tmp_path / "artifacts1" / "blobs" / ("2" * 64),
        }  # not the other set's, nor a file outside the bench's folder
    finally:
        outside.unlink()


def _disk_mb(folder: Path) -> float:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file()) / 1e6


@pytest.fixture
def seaweedfs(tmp_path: Path) -> Iterator[tuple[S3Server, Path]]:
    try:
        with run_seaweedfs(tmp_path / "s3") as server:
            yield server, tmp_path / "s3"
    except ServerMissing as e:
        pytest.skip(str(e))


def test_vacuum_gives_back_the_space_of_deleted_objects(
    seaweedfs: tuple[S3Server, Path],
) -> None:
    server, folder = seaweedfs
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint_url, key=server.key,
                           secret=server.secret, skip_instance_cache=True)  # fmt: skip
    paths = [f"{server.bucket}/msgs/{i}" for i in range(24)]
    for path in paths:
        fs.pipe_file(path, os.urandom(4 << 20))
    fs.rm(paths)
    before = _disk_mb(folder)
    assert before > 90  # deleted, yet still on disk: what filled hold (h)'s
    # The filer hands deletions to the volume server from a queue, so a compaction right
    # after the delete may find nothing to reclaim yet: compact until the space is back, or
    # a minute is up (the automatic sweep would come after 14).
    deadline = time.monotonic() + 60
    while True:
        vacuum(server)
        after = _disk_mb(folder)
        if after < before - 90 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert after < before - 90
