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
import copy
import datetime
import http.server
import json
import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
import kmock
import yaml
from apiserver_schema import ApiServerSchema
from kubernetes.utils.quantity import parse_quantity

from gpufaas.core.api import API_VERSION, GROUP, KIND, PLURAL, SINGULAR, VERSION
from gpufaas.core.crd import build_crd

T = TypeVar("T")

# Every request is logged at INFO by both ends; that alone costs seconds per test.
for _noisy in ("httpx", "aiohttp.access"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)
FUNCTIONS = f"/apis/{API_VERSION}"
RESYNC_SECONDS = "0.5"


@dataclass(frozen=True)
class Call:
    """One API request as RBAC sees it, and who sent it (by User-Agent)."""

    verb: str
    group: str
    resource: str  # plural, or plural/subresource
    namespace: str | None
    name: str | None
    user_agent: str
    path: str
    params: tuple[tuple[str, str], ...]


@dataclass
class Fault:
    """Answer the next ``times`` requests matching method and a path suffix with ``status``."""

    method: str
    path_suffix: str
    status: int
    times: int = 1


_BINARY = [("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)]
_DECIMAL = [("E", 10**18), ("P", 10**15), ("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)]


def canonical_quantity(text: str) -> str:
    """The form the API server stores a Quantity in ("0.1" -> "100m", "1024Mi" -> "1Gi")."""
    value = Decimal(parse_quantity(text))
    if value != value.to_integral_value():
        milli = value * 1000
        if milli == milli.to_integral_value():
            return f"{int(milli)}m"
        return f"{int((value * 10**9).to_integral_value())}n"
    whole = int(value)
    suffixes = _BINARY if text.endswith("i") else _DECIMAL
    for suffix, factor in suffixes:
        if whole and whole % factor == 0:
            return f"{whole // factor}{suffix}"
    return str(whole)


def _canonicalize_resources(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "resources" and isinstance(value, dict):
                for kind in ("requests", "limits"):
                    amounts = value.get(kind)
                    if isinstance(amounts, dict):
                        for name, amount in amounts.items():
                            if isinstance(amount, str | int | float):
                                amounts[name] = canonical_quantity(str(amount))
            else:
                _canonicalize_resources(value)
    elif isinstance(node, list):
        for item in node:
            _canonicalize_resources(item)


_CONTROLLER_KINDS = {"deployments", "jobs"}
FUNCTION_SCHEMA = ApiServerSchema(build_crd())


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _container_defaults(container: dict[str, Any]) -> None:
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    container.setdefault("imagePullPolicy", "IfNotPresent")
    for probe in ("readinessProbe", "livenessProbe"):
        if isinstance(container.get(probe), dict):
            container[probe] = {"timeoutSeconds": 1, "successThreshold": 1} | container[probe]
            get = container[probe].get("httpGet")
            if isinstance(get, dict):
                get.setdefault("scheme", "HTTP")


def apply_server_defaults(plural: str, body: Any) -> None:
    """Fields the API server fills in on create, so drift checks meet them as in a cluster."""
    if not isinstance(body, dict) or not isinstance(body.get("spec"), dict):
        return
    spec = body["spec"]
    if plural == "deployments":
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault(
            "strategy",
            {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
            },
        )
        pod = (spec.get("template") or {}).get("spec")
        if isinstance(pod, dict):
            pod.setdefault("restartPolicy", "Always")
            pod.setdefault("dnsPolicy", "ClusterFirst")
            pod.setdefault("schedulerName", "default-scheduler")
            pod.setdefault("terminationGracePeriodSeconds", 30)
            for container in pod.get("containers") or []:
                _container_defaults(container)
    elif plural == "services":
        spec.setdefault("clusterIP", "10.96.0.10")
        spec.setdefault("clusterIPs", ["10.96.0.10"])
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """KMock's emulator plus what a real API server does that the tests rely on.

    It stamps metadata (uid, resourceVersion, namespace, generation, creationTimestamp),
    refuses a merge patch whose ``metadata.resourceVersion`` is stale (409), stores
    Quantities in canonical form, lists with a real resourceVersion, and can be told to
    fail requests (:class:`Fault`), expire watches (an ERROR 410 event), send BOOKMARKs
    and end watch streams, as a real server does after a timeout.
    """

    log: list[tuple[str, str]] = attrs.field(factory=list)
    calls: list[Call] = attrs.field(factory=list)
    faults: list[Fault] = attrs.field(factory=list)
    expire_watches: dict[str, int] = attrs.field(factory=dict)  # plural -> watches to expire
    listed_versions: list[str] = attrs.field(factory=list)  # the resourceVersion of each list
    admission: bool = True  # validate and default InferenceFunctions with the CRD
    loop: asyncio.AbstractEventLoop | None = None
    _rv: int = 0

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    async def _handle(self, request: kmock.Request) -> Any:  # type: ignore[override]
        self.log.append((str(request.method.value).upper(), request.url.path))
        self._record(request)
        self._inject_fault(request)
        if request.resource is not None:
            self._admit_function(request)
            self._stamp(request)
        return await super()._handle(request)

    def _admit_function(self, request: kmock.Request) -> None:
        """Validate and default InferenceFunctions with the CRD, as the API server does.

        Creates are checked and stored with the schema's defaults; spec updates are checked
        on the object they would produce (other updates, like kopf's annotations, pass, as
        CRD validation ratcheting lets unchanged fields through).
        """
        resource = request.resource
        if not self.admission or resource is None or str(resource.plural) != PLURAL:
            return
        data = request.data
        if request.subresource or not isinstance(data, dict):
            return
        if request.action == kmock.action.CREATE:
            candidate = dict(data, metadata={"name": "x"} | (data.get("metadata") or {}))
        elif request.action == kmock.action.UPDATE and "spec" in data and request.name:
            key = (request.resource, request.namespace, request.name)
            if key not in self.objects or self.objects[key].deleted:
                return
            candidate = merge_patch(self.objects[key].raw, data)
        else:
            return
        errors = FUNCTION_SCHEMA.admit(candidate)
        if errors:
            raise kmock.KubernetesError(
                status=422,
                reason="Invalid",
                message=f"{KIND}.{GROUP} is invalid: " + "; ".join(errors),
            )
        if request.action == kmock.action.CREATE:
            defaulted = FUNCTION_SCHEMA.default(data)
            data.clear()
            data.update(defaulted)

    def _record(self, request: kmock.Request) -> None:
        resource = request.resource
        if resource is None or resource.plural is None or request.action is None:
            return  # discovery (/api, /apis/GROUP/VERSION): every user may read it
        method = str(request.method.value).upper()
        action = request.action
        verb = {
            kmock.action.LIST: "list",
            kmock.action.WATCH: "watch",
            kmock.action.FETCH: "get",
            kmock.action.CREATE: "create",
            kmock.action.DELETE: "delete" if request.name else "deletecollection",
        }.get(action, "patch" if method == "PATCH" else "update")
        plural = str(resource.plural)
        self.calls.append(
            Call(
                verb=verb,
                group=str(resource.group or ""),
                resource=f"{plural}/{request.subresource}" if request.subresource else plural,
                namespace=request.namespace,
                name=request.name,
                user_agent=str(request.headers.get("User-Agent", "")),
                path=request.url.path,
                params=tuple(sorted((str(k), str(v)) for k, v in request.params.items())),
            )
        )

    def _inject_fault(self, request: kmock.Request) -> None:
        method = str(request.method.value).upper()
        for fault in self.faults:
            if (
                fault.times > 0
                and fault.method == method
                and request.url.path.endswith(fault.path_suffix)
            ):
                fault.times -= 1
                raise kmock.KubernetesError(
                    status=fault.status,
                    reason="Conflict" if fault.status == 409 else "Injected",
                    message=f"injected {fault.status} for {method} {request.url.path}",
                )

    async def _serve_list(self, request: Any) -> Any:
        listed = await super()._serve_list(request)
        listed["metadata"] = {"resourceVersion": str(self._rv)}
        self.listed_versions.append(str(self._rv))
        return listed

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        plural = str(request.resource.plural) if request.resource is not None else ""
        if self.expire_watches.get(plural, 0) > 0:
            self.expire_watches[plural] -= 1
            yield b""
            yield {
                "type": "ERROR",
                "object": {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "code": 410,
                    "reason": "Expired",
                    "message": "too old resource version",
                },
            }
            return
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and event.get("type") == "END-OF-STREAM":
                return  # the server's timeoutSeconds ran out: the client resumes
            yield event

    async def send_to_watchers(
        self, group: str, version: str, plural: str, event: dict[str, Any]
    ) -> None:
        """Put a raw event (BOOKMARK, END-OF-STREAM) on a resource's watch streams."""
        await self._buses[kmock.resource(group, version, plural)].put(event)

    def _stamp(self, request: kmock.Request) -> None:
        data = request.data
        plural = str(request.resource.plural) if request.resource is not None else ""
        if plural in _CONTROLLER_KINDS and request.action in {
            kmock.action.CREATE,
            kmock.action.UPDATE,
        }:
            _canonicalize_resources(data)
        if request.action == kmock.action.CREATE:
            apply_server_defaults(plural, data)
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
            if isinstance(data, dict):
                wanted = (data.get("metadata") or {}).get("resourceVersion")
                actual = current.get("metadata", {}).get("resourceVersion")
                if wanted is not None and wanted != actual:
                    raise kmock.KubernetesError(
                        status=409,
                        reason="Conflict",
                        message=f"the object has been modified (resourceVersion {actual}, not {wanted})",
                    )
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
            emulator.loop = self._loop
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

    def send_to_watchers(self, plural_path: str, event: dict[str, Any]) -> None:
        """Put a raw event on the watch streams of ``group/version/plural`` (from any thread)."""
        group, version, plural = plural_path.split("/")
        assert self.emulator.loop is not None
        asyncio.run_coroutine_threadsafe(
            self.emulator.send_to_watchers(group, version, plural, event), self.emulator.loop
        ).result(timeout=5)

    def end_watches(self, plural_path: str, namespace: str | None = None) -> None:
        """End the open watch streams, as the server does when their timeoutSeconds run out."""
        meta = {} if namespace is None else {"namespace": namespace}
        self.send_to_watchers(plural_path, {"type": "END-OF-STREAM", "object": {"metadata": meta}})

    def bookmark(
        self, plural_path: str, resource_version: str, namespace: str | None = None
    ) -> None:
        meta: dict[str, Any] = {"resourceVersion": resource_version}
        if namespace is not None:
            meta["namespace"] = namespace  # KMock filters events by namespace
        self.send_to_watchers(
            plural_path,
            {
                "type": "BOOKMARK",
                "object": {"kind": KIND, "apiVersion": API_VERSION, "metadata": meta},
            },
        )

    def calls_by(self, user_agent_prefix: str) -> list[Call]:
        return [c for c in list(self.emulator.calls) if c.user_agent.startswith(user_agent_prefix)]

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
        # What GET /v2/gpufaas/cluster answers (None: 503, a gateway that cannot say).
        self.cluster_state: dict[str, Any] | None = {"nodes": [], "devices": []}
        self.cluster_reads: list[str | None] = []  # the Authorization of each cluster read
        calls, authorizations = self.calls, self.authorizations
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stand_in.cluster_reads.append(self.headers.get("Authorization"))
                state = stand_in.cluster_state
                body = json.dumps(state).encode()
                self.send_response(200 if state is not None else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

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
