"""``bench/kill_run.py``: a GPU manager SIGKILLed mid-run; each request is answered exactly once
and, as the nodes count it, ran at most once. A transport error counts as lost, never a crash."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from bench_support import load_bench

from gpufaas.scheduler.local import free_port

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _kill_run() -> ModuleType:
    return load_bench(BENCH / "kill_run.py", name="gpufaas_bench_kill_run")


@pytest.mark.slow
def test_a_killed_manager_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, example_models_dir: Path
) -> None:
    kill_run = _kill_run()
    result = kill_run.run_kill(
        requests=60, rate=15.0, kill_at=0.4, home=tmp_path / "home", models=example_models_dir
    )
    assert result["killed_manager_pid"] is not None and result["survivors"] == 1
    assert result["lost"] == 0, result
    # Nothing accepted is lost to the failure: requests in flight on the victim are retried on
    # the survivor, so every answer is a result, none an error.
    assert result["statuses"] == {"200": result["sent"]}, result
    assert result["answered_twice"] == 0, result
    assert result["wrong_id"] == 0, result
    assert result["ran_twice"] == 0, result
    # The counters saw the work: every answered request but those the victim may have run in
    # the moments between its last read and the kill.
    assert result["executions_observed"] >= result["statuses"].get("200", 0) - 2, result
    assert kill_run.exactly_once(result)


def test_a_transport_error_counts_as_lost_not_a_crash() -> None:
    kill_run = _kill_run()

    async def one() -> object:
        async with httpx.AsyncClient(timeout=5) as client:
            nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
            return await kill_run.send_one(client, nobody, "tiny-mlp", "req-0", b"{}", {})

    answer = asyncio.run(one())
    assert answer.status is None
    result = kill_run.summarise([answer], Counter(), sent=["req-0", "req-1"])
    assert result["lost"] == 2 and result["answered"] == 0
    assert result["statuses"] == {"transport error": 1}
    assert not kill_run.exactly_once(result)


def test_an_id_run_twice_or_answered_twice_is_caught() -> None:
    kill_run = _kill_run()
    ok = [kill_run.Answer("a", 200, "a"), kill_run.Answer("b", 200, "b")]
    assert kill_run.exactly_once(kill_run.summarise(ok, Counter(a=1, b=1), sent=["a", "b"]))
    twice_run = kill_run.summarise(ok, Counter(a=2, b=1), sent=["a", "b"])
    assert twice_run["ran_twice"] == 1 and not kill_run.exactly_once(twice_run)
    twice_answered = kill_run.summarise([*ok, ok[0]], Counter(a=1, b=1), sent=["a", "b"])
    assert twice_answered["answered_twice"] == 1 and not kill_run.exactly_once(twice_answered)
    wrong = kill_run.summarise([kill_run.Answer("a", 200, "b")], Counter(a=1), sent=["a"])
    assert wrong["wrong_id"] == 1
