"""Tell the gateway to drop a deleted function's model from GPU and host memory.

Called from the delete handler before the finalizer is released. The attempts
are bounded: a gateway that is down must not keep a deleted function around
forever (the GPU managers also forget functions the gateway no longer serves).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnloadResult:
    done: bool
    attempts: int
    detail: str


async def unload_model(
    url: str,
    *,
    attempts: int,
    timeout_s: float,
    backoff_s: float,
    max_backoff_s: float = 10.0,
    token: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> UnloadResult:
    """POST ``url`` until a definite answer, at most ``attempts`` times.

    2xx and 404 (the gateway does not know the model: nothing to unload) are done.
    Connection errors, timeouts and 5xx are retried with exponential backoff;
    other 4xx are not (retrying cannot fix them). ``token`` is sent as a bearer token.
    """
    detail = "not attempted"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=timeout_s, transport=transport, headers=headers) as client:
        for attempt in range(1, attempts + 1):
            try:
                response = await client.post(url)
            except httpx.HTTPError as e:
                detail = f"{type(e).__name__}: {e}"
            else:
                if response.is_success or response.status_code == 404:
                    return UnloadResult(True, attempt, f"HTTP {response.status_code}")
                detail = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code < 500:
                    return UnloadResult(False, attempt, detail)
            logger.info("unload %s: attempt %d/%d failed: %s", url, attempt, attempts, detail)
            if attempt < attempts:
                await asyncio.sleep(min(max_backoff_s, backoff_s * 2 ** (attempt - 1)))
    return UnloadResult(False, attempts, detail)
