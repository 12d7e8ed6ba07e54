"""What a node closes when it stops (mends, nineteenth session).

The fsd fixtures' nodes never closed their ``ShardHost``s, and a host's link server closed
only its listening socket: the links peers had opened to it stayed open until the loop went,
and under uvloop a transport left open is closed by the collector, which once closed another
thread's file (the eighteenth session's ``[4-2]`` flake). Run with ``-W
error::ResourceWarning``, stopping a node that had served over links hung its thread in
``loop.close()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpufaas.core.hostlink import HostLinks, LinkBroken, LinkEndpoint, LinkServer, host_identity
from gpufaas.core.sharding import Parallelism
from gpufaas.scheduler.coordinator import Coordinator


def _refuse(notice: dict[str, object], values: Any) -> int:
    return 404


async def test_a_link_servers_close_closes_the_links_it_accepted(tmp_path: Path) -> None:
    """A peer's link, set up and greeted, breaks when the server closes: a message sent on it
    afterwards fails (``LinkBroken``). Before, the accepted connection stayed open after the
    listening socket closed, and the closed server went on answering it."""
    server = LinkServer(_refuse, directory=tmp_path)
    endpoint = await server.start()

    async def endpoint_of(url: str) -> LinkEndpoint | None:
        return endpoint

    links = HostLinks(endpoint_of=endpoint_of, connect_timeout_s=60)
    links.identity = host_identity(tmp_path)
    try:
        link = await links.find("http://peer.invalid:1")
        assert link is not None and link.broken is None
        await server.close()
        notice = {"set_name": "s", "request_id": "r", "layer": 0, "src": 0, "dst": 1}
        with pytest.raises(LinkBroken):  # bounded: a link left open is answered at once
            await link.send(notice, np.ones(4, np.float32), timeout_s=60)
        assert not Path(endpoint.socket).exists()
    finally:
        await links.close()


async def test_a_stopped_node_has_closed_its_host(
    thread_nodes: Any, coordinator: Coordinator, net: Any, x: np.ndarray
) -> None:
    """The fixture's node closes its host on the server's own loop as it stops: its shards
    are dropped and its link socket is gone."""
    nodes = thread_nodes[:2]
    two = Parallelism(shards=2, strategy="intra-layer", channel="direct")
    await coordinator.deploy("s", net, two, nodes=[n.url for n in nodes])
    np.testing.assert_allclose(
        await coordinator.infer("s", x), net.forward(x), rtol=1e-5, atol=1e-5
    )
    endpoint = nodes[0].host.link_server.endpoint
    assert endpoint is not None and nodes[0].host.shards
    nodes[0].stop()
    assert not nodes[0].host.shards
    assert nodes[0].host.link_server.endpoint is None
    assert not Path(endpoint.socket).exists()
