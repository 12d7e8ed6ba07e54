"""One shard's products per sample against the pass size: why shared passes did not pay (#15).

Times one pass of a shard (the executor's own code on one thread, in thread CPU seconds, as
the cost model's calibration does: ``bench/fsd.py: shard_compute_seconds``) of the 4,096 x 24
RadiX-Net for the unsplit net (N = 1, block) and shard 0 of the hypergraph split in two, at
64, 128, 256 and 512 samples (and 64 again; or the comma-separated sizes given), and
shard 0 of the 4-way split, and prints the cost per 64 samples and the activations' size
(rows x samples x 4 bytes) against which the knee is read. Session 7
(bench/RESULTS.md): one shard's cost per sample rises past 64 samples (its activations, 4,096
rows x the pass's columns, leave the 1 MiB L2 cache), half a split's does not until 256.

    python bench/fsd-pass-size.py [32,64,96,128,...]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from gpufaas.core.layered import radix_net
from gpufaas.scheduler.partition import partition, split

_spec = importlib.util.spec_from_file_location("fsd_bench", Path(__file__).with_name("fsd.py"))
assert _spec is not None and _spec.loader is not None
fsd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fsd)


def main() -> None:
    net = radix_net(4096, 24)
    sizes = (
        [int(b) for b in sys.argv[1].split(",")] if len(sys.argv) > 1 else [64, 128, 256, 512, 64]
    )
    for shards, method in ((1, "block"), (2, "hypergraph"), (4, "hypergraph")):
        spec = split(net, partition(net, shards, method=method))[0]
        rows = max(layer.owned.size for layer in spec.layers)
        print(f"N={shards}: shard 0 owns up to {rows} rows per layer", flush=True)
        for batch in sizes:
            seconds = fsd.shard_compute_seconds(spec, batch, repeats=5)
            print(f"N={shards} {method:<10} shard 0, {batch:>3} samples: {seconds * 1e3:6.1f} ms "
                  f"per pass, {seconds * 1e3 / batch * 64:5.1f} ms per 64 samples, "
                  f"activations {rows * batch * 4 / 2**20:5.2f} MiB", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
