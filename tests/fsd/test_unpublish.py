"""A removed shard set's files are deleted (fsd, seventeenth session).

``Coordinator.deploy`` writes one safetensors file per shard under its ``artifact_base``;
until now nothing deleted them, so a gateway that deployed and removed sets kept them all.
Now ``Coordinator.remove`` deletes a set's files, and so does a deploy whose launch fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from gpufaas.core.layered import radix_net
from gpufaas.core.sharding import Parallelism
from gpufaas.scheduler.coordinator import Coordinator, LaunchFailed

TWO = Parallelism(shards=2, strategy="intra-layer", channel="direct")


def _files(set_name: str, folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{set_name}.shard-*.safetensors"))


async def test_a_removed_set_leaves_none_of_its_shard_files_and_the_others_keep_theirs(
    thread_nodes: Any, coordinator: Coordinator, net: Any, x: np.ndarray, tmp_path: Path
) -> None:
    folder = tmp_path / "shards"
    urls = [n.url for n in thread_nodes[:2]]
    await coordinator.deploy("gone", net, TWO, nodes=urls)
    await coordinator.deploy("kept", net, TWO, nodes=urls, method="random", seed=1)
    assert len(_files("gone", folder)) == len(_files("kept", folder)) == 2
    await coordinator.remove("gone")
    assert _files("gone", folder) == []
    assert len(_files("kept", folder)) == 2
    out = await coordinator.infer("kept", x)  # the other set still serves
    np.testing.assert_allclose(out, net.forward(x), rtol=1e-5, atol=1e-5)
    await coordinator.remove("kept")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("base", ["local", "memory"])
async def test_a_set_whose_launch_fails_leaves_no_shard_files(base: str, tmp_path: Path) -> None:
    """Local files and fsspec URIs alike (``memory://`` stands in for an object store)."""
    artifact_base = str(tmp_path / "shards") if base == "local" else "memory://fsd-unpublish"
    coordinator = Coordinator(artifact_base=artifact_base, timeout_s=5)
    fs, root = fsspec.core.url_to_fs(artifact_base)
    try:
        with pytest.raises(LaunchFailed):  # nothing listens on port 1
            await coordinator.deploy("lost", radix_net(256, 4), TWO, nodes=["http://127.0.0.1:1"])
        assert "lost" not in coordinator
        left = fs.glob(f"{root}/lost.shard-*") if fs.exists(root) else []
        assert left == []
    finally:
        await coordinator.close()
        if base == "memory" and fs.exists(root):
            fs.rm(root, recursive=True)
