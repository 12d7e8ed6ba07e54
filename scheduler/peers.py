"""Gateway replicas finding each other: membership and reachability.

A :class:`Membership` knows this replica's own id (its URL, as its peers reach it) and, after
every :meth:`Membership.refresh`, the other replicas and whether each answered its heartbeat.
Where the list of replicas comes from is a callable:

- locally (``gpufaas up --gateways N``): :func:`static_peers`, the URLs given on the command line;
- in Kubernetes: :func:`kubernetes_peers`, the ready endpoints of the gateway's headless Service
  (EndpointSlices; core Endpoints on old clusters).

A peer is *reachable* while its heartbeat (``GET`` :data:`HEARTBEAT_PATH`) answers; a forward or
an event that fails to connect marks it unreachable at once, and the next heartbeat that answers
brings it back (unreachable peers are probed every second, reachable ones every sync interval).
A new peer counts as reachable only once its first heartbeat has answered. The ring of owners is this replica plus its reachable peers, so a replica that
cannot reach any peer owns every function: it schedules locally and keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from gpufaas.scheduler.kube import ready_endpoints

logger = logging.getLogger(__name__)

__all__ = [
    "HEARTBEAT_PATH",
    "Membership",
    "Mode",
    "Peer",
    "kubernetes_peers",
    "peer_urls",
    "static_peers",
]

HEARTBEAT_PATH = "/v2/gpufaas/peers/heartbeat"
EVENTS_PATH = "/v2/gpufaas/peers/events"
# A peer asks the placement owner where a model goes (forwarding "decision", replicas.py).
PLACE_PATH = "/v2/gpufaas/peers/place"
PEER_PATHS = "/v2/gpufaas/peers"

# single: no peers configured; coordinated: every peer reachable; degraded: some are not;
# local: none is, so this replica schedules every function itself.
Mode = Literal["single", "coordinated", "degraded", "local"]


@dataclass
class Peer:
    id: str  # its base URL
    client: httpx.AsyncClient
    # Unverified until its first heartbeat answers: an optimistic start let two replicas that
    # started a moment apart each report 'coordinated' while disagreeing about the owner.
    reachable: bool = False
    last_seen: float = 0.0  # monotonic time of the last answer
    # The status of its heartbeat's refusal of this replica's peer token (401, 403) since it
    # last answered, once logged; None while it takes the token
    refused: int | None = None
    report: dict[str, Any] = field(default_factory=dict)  # its last heartbeat body


def _refused(peer: Peer, status: int) -> None:
    """A heartbeat answered ``status``: a 401 or 403 is the peer refusing this replica's peer
    token, logged once until it answers again (a peer that never answered would otherwise stay
    off the ring with nothing in the log: ``mark_unreachable`` logs only a reachable one)."""
    if status not in (401, 403) or peer.refused == status:
        return
    peer.refused = status
    logger.warning(
        "gateway replica %s refuses this replica's peer token (HTTP %d): it stays off the ring "
        "until its heartbeat answers; GPUFAAS_PEER_TOKEN must be the same on every replica",
        peer.id,
        status,
    )


def _normal(url: str) -> str:
    return url.strip().rstrip("/")


def static_peers(urls: Iterable[str]) -> Callable[[], Awaitable[list[str]]]:
    """A fixed list of replica URLs (this replica's own may be among them)."""
    fixed = sorted({_normal(u) for u in urls if u.strip()})

    async def discover() -> list[str]:
        return fixed

    return discover


def peer_urls(
    slices: Sequence[Mapping[str, Any]], *, port_name: str | None = "http", scheme: str = "http"
) -> list[str]:
    """Base URLs of the ready endpoints in EndpointSlices, one per pod address."""
    return sorted(
        {url for _, _, url in ready_endpoints(slices, port_name=port_name, scheme=scheme)}
    )


def kubernetes_peers(
    *, namespace: str, service: str, port_name: str | None = "http"
) -> Callable[[], Awaitable[list[str]]]:
    """The gateway replicas behind the headless Service ``service`` (its EndpointSlices)."""
    from gpufaas.core.kubeclient import KubeConnection

    label = "kubernetes.io/service-name"

    async def discover() -> list[str]:
        conn = await asyncio.to_thread(KubeConnection.load)
        async with conn.client(timeout=10.0, user_agent="gpufaas-gateway") as client:
            response = await client.get(
                f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                params={"labelSelector": f"{label}={service}"},
            )
            response.raise_for_status()
            items = response.json().get("items") or []
        slices = [
            s
            for s in items
            if ((s.get("metadata") or {}).get("labels") or {}).get(label) == service
        ]
        return peer_urls(slices, port_name=port_name)

    return discover


class Membership:
    """This replica, its peers, and which of them answer; see the module docstring."""

    def __init__(
        self,
        *,
        self_url: str,
        discover: Callable[[], Awaitable[list[str]]],
        token: str | None = None,
        heartbeat_timeout_s: float = 1.0,
        request_timeout_s: float = 120.0,
        heartbeat: Callable[[], Mapping[str, Any]] = dict,
    ) -> None:
        self.self_id = _normal(self_url)
        self.discover = discover
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.request_timeout_s = request_timeout_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = httpx.Timeout(request_timeout_s, connect=2.0)
        self._own_report = heartbeat
        self.peers: dict[str, Peer] = {}
        self.configured = False  # a discovery has listed at least one other replica

    def __repr__(self) -> str:
        return f"<Membership {self.self_id}: {self.mode}, live {self.live()}>"

    # -- views -------------------------------------------------------------------------------

    def live(self) -> list[str]:
        """This replica and the peers that answer: the members of the ring."""
        return [self.self_id, *(p.id for p in self.peers.values() if p.reachable)]

    @property
    def mode(self) -> Mode:
        if not self.peers:
            return "local" if self.configured else "single"
        reachable = sum(p.reachable for p in self.peers.values())
        if reachable == len(self.peers):
            return "coordinated"
        return "degraded" if reachable else "local"

    def peer(self, peer_id: str) -> Peer | None:
        return self.peers.get(peer_id)

    @property
    def auth_headers(self) -> dict[str, str]:
        """What a request to a peer presents (the peer token), for other transports."""
        return dict(self._headers)

    # -- changes -----------------------------------------------------------------------------

    def adopt(self, urls: Iterable[str]) -> None:
        """Set the peers to ``urls`` (less this replica): new ones are reachable once a heartbeat
        answers (:meth:`refresh` probes them at once)."""
        wanted = {_normal(u) for u in urls} - {self.self_id}
        if wanted:
            self.configured = True
        for gone in set(self.peers) - wanted:
            peer = self.peers.pop(gone)
            task = asyncio.get_event_loop().create_task(peer.client.aclose())
            task.add_done_callback(lambda t: t.exception())
        for url in sorted(wanted - set(self.peers)):
            self.peers[url] = Peer(
                id=url,
                client=httpx.AsyncClient(
                    base_url=url,
                    timeout=self._timeout,
                    headers=self._headers,
                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                ),
            )

    def mark_unreachable(self, peer_id: str, reason: object) -> bool:
        """A request to the peer failed to connect; True if it was reachable until now."""
        peer = self.peers.get(peer_id)
        if peer is None or not peer.reachable:
            return False
        peer.reachable = False
        logger.warning(
            "gateway replica %s is unreachable (%s); its functions move", peer_id, reason
        )
        return True

    async def refresh(self) -> bool:
        """Discover the replicas and probe each; True if the live set changed."""
        before = self.live()
        try:
            self.adopt(await self.discover())
        except Exception as e:  # keep the last membership; the next refresh tries again
            logger.warning("gateway replica discovery failed: %s", e)
        await asyncio.gather(*(self._probe(p) for p in list(self.peers.values())))
        return sorted(self.live()) != sorted(before)

    async def probe(self, peer_id: str) -> bool:
        """Heartbeat one peer now (at most ``heartbeat_timeout_s``); whether it answered. A
        peer that does not is marked unreachable, as at a refresh."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return False
        await self._probe(peer)
        return peer.reachable

    async def _probe(self, peer: Peer) -> None:
        try:
            response = await peer.client.get(HEARTBEAT_PATH, timeout=self.heartbeat_timeout_s)
            response.raise_for_status()
            report = response.json()
        except (httpx.HTTPError, ValueError) as e:
            if isinstance(e, httpx.HTTPStatusError):
                _refused(peer, e.response.status_code)
            self.mark_unreachable(peer.id, e)
            return
        if not peer.reachable:
            logger.info("gateway replica %s is reachable again", peer.id)
        peer.reachable = True
        peer.refused = None
        peer.last_seen = time.monotonic()
        peer.report = report if isinstance(report, dict) else {}

    def heartbeat(self) -> dict[str, Any]:
        """What this replica answers to a peer's heartbeat."""
        return {"id": self.self_id, "mode": self.mode, **self._own_report()}

    def health(self) -> dict[str, Any]:
        """For ``/v2/health/ready``: the mode, the ring, and each peer's reachability."""
        return {
            "id": self.self_id,
            "mode": self.mode,
            "members": sorted(self.live()),
            "peers": {
                p.id: "reachable" if p.reachable else "unreachable" for p in self.peers.values()
            },
        }

    async def close(self) -> None:
        await asyncio.gather(
            *(p.client.aclose() for p in self.peers.values()), return_exceptions=True
        )
