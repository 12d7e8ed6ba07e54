"""The operator's watches (kopf's) recover: 410 Gone re-lists, bookmarks are resumed from."""

from __future__ import annotations

import pytest
from kmock_harness import GatewayStandIn, Kube, function_body, operator_running, wait_for

pytestmark = pytest.mark.timeout(120)
FUNCTIONS = "gpufaas.dev/v1alpha1/inferencefunctions"


def _function_calls(kube: Kube, start: int) -> list[tuple[str, str | None]]:
    return [
        (c.verb, dict(c.params).get("resourceVersion"))
        for c in kube.calls_by("kopf/")[start:]
        if c.resource == "inferencefunctions" and c.verb in {"list", "watch"}
    ]


def _job_of(kube: Kube, ns: str) -> object:
    return kube.list(kube.path("batch/v1", "jobs", ns))


def _resume_from_bookmark(kube: Kube, version: str) -> list[tuple[str, str | None]]:
    """Send a bookmark and end the watches until kopf watches from ``version``; its calls since.

    A bookmark reaches only the watch streams open at that moment: one sent while kopf is
    between two watches (it renews them on its own) reaches none and is lost, as on a real
    server. So a try that saw kopf watch again from another version is repeated (at most 5);
    a kopf that ignored bookmarks fails every try.
    """
    start = len(kube.calls_by("kopf/"))
    for _ in range(5):
        tried = len(_function_calls(kube, start))
        kube.bookmark(FUNCTIONS, version)
        kube.end_watches(FUNCTIONS)
        calls = wait_for(
            lambda tried=tried: (
                (c := _function_calls(kube, start))
                and (("watch", version) in c or any(v == "watch" for v, _ in c[tried:]))
                and c
            ),
            what="kopf to watch again after the bookmark",
        )
        if ("watch", version) in calls:
            return calls
    raise AssertionError(f"kopf never resumed from bookmark {version}: {calls}")


def test_operator_relists_after_410_and_resumes_from_bookmarks(
    cluster: tuple[Kube, GatewayStandIn],
) -> None:
    kube, _ = cluster
    with operator_running():
        kube.create(kube.fn_path("watch-a"), function_body("fn-a", handler=False))
        wait_for(lambda: _job_of(kube, "watch-a"), what="fn-a's check Job")

        # 410 Gone on the resumed watch: kopf re-lists, then watches from the list's version.
        start = len(kube.calls_by("kopf/"))
        kube.emulator.expire_watches["inferencefunctions"] = 1
        kube.end_watches(FUNCTIONS)
        calls = wait_for(
            lambda: (c := _function_calls(kube, start)) and len(c) >= 3 and c,
            what="kopf to re-list and watch again",
        )
        relist_rv = kube.emulator.listed_versions[-1]
        assert [verb for verb, _ in calls[:3]] == ["watch", "list", "watch"]
        assert calls[2] == ("watch", relist_rv)
        kube.create(kube.fn_path("watch-b"), function_body("fn-b", handler=False))
        wait_for(lambda: _job_of(kube, "watch-b"), what="fn-b handled after the re-list")

        # A bookmark moves the resume point; the next watch starts there, with no re-list.
        calls = _resume_from_bookmark(kube, "424242")
        assert "list" not in [verb for verb, _ in calls[: calls.index(("watch", "424242"))]]
        for ns in ("watch-a", "watch-b"):
            for body in kube.list(kube.fn_path(ns)):
                kube.delete(kube.fn_path(ns, body["metadata"]["name"]))
        wait_for(
            lambda: (
                not kube.list(kube.fn_path("watch-a")) and not kube.list(kube.fn_path("watch-b"))
            ),
            what="functions deleted",
        )
