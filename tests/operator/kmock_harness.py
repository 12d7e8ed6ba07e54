"""Harness: real kopf against KMock's Kubernetes emulator over HTTP on 127.0.0.1.

KMock stores bodies verbatim, so :class:`Emulator` adds what a real API server
would: uid, resourceVersion, namespace, generation, creationTimestamp. It runs
on its own event loop in a thread (KopfRunner is synchronous and runs kopf in
another thread). Tests talk to it over HTTP with :class:`Kube`, play the Job
and Deployment controllers themselves, and poll with bounded timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.server
import json
import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
import kmock
import yaml

from gpufaas.core.api import API_VERSION, GROUP, KIND, PLURAL, SINGULAR, VERSION

T = TypeVar("T")

# Every request is logged at INFO by both ends; that alone costs seconds per test.
for _noisy in ("httpx", "aiohttp.access"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)
FUNCTIONS = f"/apis/{API_VERSION}"
RESYNC_SECONDS = "0.5"


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """KMock's emulator plus the metadata a real API server stamps on objects."""

    log: list[tuple[str, str]] = attrs.field(factory=list)
    _rv: int = 0

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    async def _handle(self, request: kmock.Request) -> Any:  # type: ignore[override]
        self.log.append((str(request.method.value).upper(), request.url.path))
        if request.resource is not None:
            self._stamp(request)
        return await super()._handle(request)

    def _stamp(self, request: kmock.Request) -> None:
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta["uid"] = str(uuid.uuid4())
            meta["resourceVersion"] = self._next_rv()
            meta["generation"] = 1
            meta["creationTimestamp"] = datetime.datetime.now(tz=datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )
        elif request.action == kmock.action.UPDATE and request.name:
            key = (request.resource, request.namespace, request.name)
            current = self.objects[key] if key in self.objects else None  # noqa: SIM401 (no .get)
            if current is None or current.deleted:
                return
            generation = current.get("metadata", {}).get("generation") or 1
            rv = self._next_rv()
            if isinstance(data, dict):
                meta = data.setdefault("metadata", {})
                if not isinstance(meta, dict):
                    return
                meta["resourceVersion"] = rv
                if "spec" in data and request.subresource != "status":
                    meta["generation"] = generation + 1
            elif isinstance(data, list):
                # A real server answers a failed "test" op with 422; kopf retries on that.
                for op in data:
                    if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion":
                        actual = current.get("metadata", {}).get("resourceVersion")
                        if op.get("value") != actual:
                            raise kmock.KubernetesError(
                                status=422,
                                reason="Invalid",
                                message=f"resourceVersion {actual} is not {op.get('value')}",
                            )
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
                if any(str(op.get("path", "")).startswith("/spec") for op in data):
                    data.append(
                        {"op": "add", "path": "/metadata/generation", "value": generation + 1}
                    )
        elif request.action == kmock.action.DELETE and request.name:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                self.objects[key].patch({"metadata": {"resourceVersion": self._next_rv()}})


class KMockThread:
    """The emulator served on 127.0.0.1 from its own event loop in a daemon thread."""

    def __init__(self) -> None:
        self.url = ""
        self.emulator: Emulator | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(timeout=15):
            raise RuntimeError("KMock did not start within 15 s")
        if self._error is not None:
            raise RuntimeError("KMock failed to start") from self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=15)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Emulator() as emulator, kmock.Server(emulator) as server:
            with warnings.catch_warnings():  # kmock 0.8 uses a deprecated importlib API here
                warnings.simplefilter("ignore", DeprecationWarning)
                emulator.resources.load_bundled()
            emulator.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
                kind=KIND,
                singular=SINGULAR,
                namespaced=True,
                shortnames={"ifn"},
                categories={"gpufaas"},
                subresources={"status"},
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            )
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()


class Kube:
    """A synchronous test client for the emulator, and polling helpers."""

    def __init__(self, base_url: str, emulator: Emulator) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=10)
        self.emulator = emulator

    # paths
    @staticmethod
    def fn_path(ns: str, name: str | None = None) -> str:
        return f"{FUNCTIONS}/namespaces/{ns}/{PLURAL}" + (f"/{name}" if name else "")

    @staticmethod
    def path(api: str, plural: str, ns: str, name: str | None = None) -> str:
        prefix = f"/apis/{api}" if "/" in api else f"/api/{api}"
        return f"{prefix}/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")

    # verbs
    def get(self, path: str) -> dict[str, Any] | None:
        r = self.http.get(path)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    def list(self, path: str, **labels: str) -> list[dict[str, Any]]:
        r = self.http.get(path)
        r.raise_for_status()
        items: list[dict[str, Any]] = r.json().get("items") or []
        return [
            i
            for i in items
            if all((i["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())
        ]

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post(path, json=body)
        r.raise_for_status()
        created: dict[str, Any] = r.json()
        return created

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.patch(
            path, json=body, headers={"Content-Type": "application/merge-patch+json"}
        )
        r.raise_for_status()
        patched: dict[str, Any] = r.json()
        return patched

    def delete(self, path: str) -> None:
        self.http.delete(path).raise_for_status()

    # domain helpers
    def function(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.get(self.fn_path(ns, name))

    def condition(self, ns: str, name: str, type_: str) -> dict[str, Any] | None:
        body = self.function(ns, name) or {}
        for cond in (body.get("status") or {}).get("conditions") or []:
            if cond.get("type") == type_:
                found: dict[str, Any] = cond
                return found
        return None

    def events(self, ns: str) -> list[dict[str, Any]]:
        return self.list(self.path("v1", "events", ns))

    def mutations(self, *plurals: str) -> list[tuple[str, str]]:
        """POST/PATCH/DELETE requests the emulator received for these resources."""
        return [
            (method, path)
            for method, path in list(self.emulator.log)
            if method in {"POST", "PATCH", "DELETE", "PUT"}
            and any(f"/{p}" in path for p in plurals)
        ]

    def requests_to(self, method: str, path: str) -> int:
        return sum(1 for m, p in list(self.emulator.log) if m == method and p == path)

    # the controllers KMock lacks
    def complete_check(self, ns: str, job_name: str, *, tensor_bytes: int = 4096) -> None:
        """Play the Job controller: a pod that wrote a successful report, and a Complete Job."""
        report = {
            "ok": True,
            "report": {
                "uri": "file:///models/m.pt",
                "format": "torchscript",
                "sha256": "0" * 64,
                "sizeBytes": tensor_bytes + 100,
                "tensorBytes": tensor_bytes,
            },
        }
        self.fail_or_complete(ns, job_name, message=json.dumps(report), succeeded=True)

    def fail_or_complete(self, ns: str, job_name: str, *, message: str, succeeded: bool) -> None:
        self.create(
            self.path("v1", "pods", ns),
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{job_name}-{uuid.uuid4().hex[:5]}",
                    "labels": {"job-name": job_name},
                },
                "status": {
                    "containerStatuses": [
                        {
                            "name": "check",
                            "state": {
                                "terminated": {
                                    "exitCode": 0 if succeeded else 1,
                                    "message": message,
                                }
                            },
                        }
                    ]
                },
            },
        )
        condition = {"type": "Complete" if succeeded else "Failed", "status": "True"}
        counts = {"succeeded": 1} if succeeded else {"failed": 1}
        self.patch(
            self.path("batch/v1", "jobs", ns, job_name) + "/status",
            {"status": {"conditions": [condition], **counts}},
        )

    def make_deployment_ready(self, ns: str, name: str) -> None:
        """Play the Deployment controller: all replicas of the current generation ready."""
        path = self.path("apps/v1", "deployments", ns, name)
        deployment = self.get(path)
        assert deployment is not None, f"deployment {ns}/{name} missing"
        n = deployment["spec"]["replicas"]
        status = {
            "observedGeneration": deployment["metadata"].get("generation", 1),
            "replicas": n,
            "readyReplicas": n,
            "updatedReplicas": n,
            "availableReplicas": n,
        }
        self.patch(path + "/status", {"status": status})


def wait_for(
    predicate: Callable[[], T | None], *, timeout: float = 15.0, what: str = "condition"
) -> T:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class GatewayStandIn:
    """A tiny real HTTP server on 127.0.0.1 that records unload calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.authorizations: list[str | None] = []
        calls, authorizations = self.calls, self.authorizations

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                calls.append(self.path)
                authorizations.append(self.headers.get("Authorization"))
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> GatewayStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_kubeconfig(path: Path, url: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "kmock", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(config))


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def operator_running(timeout: float = 30.0) -> Iterator[Any]:
    """Real kopf with our handlers, all namespaces, standalone; bounded shutdown."""
    from kopf.testing import KopfRunner

    args = ["run", "-A", "--standalone", "-m", "gpufaas.operator.handlers"]
    with KopfRunner(args, timeout=timeout) as runner:
        yield runner
    assert runner.exit_code == 0, runner.output


def function_body(
    name: str, *, handler: bool = True, uri: str = "file:///models/m.pt", **spec: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": uri, "format": "torchscript"},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
        },
    }
    if handler:
        body["spec"]["handler"] = {
            "image": "registry.test/pre:1",
            "minReplicas": 1,
            "maxReplicas": 3,
        }
    body["spec"].update(spec)
    return body
