"""``make bench QUICK=1`` writes its own ``NAME-quick`` blocks and never a full run's block."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from bench_support import load_bench

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _driver() -> ModuleType:
    return load_bench(BENCH / "make_bench.py", name="gpufaas_make_bench_quick")


FULL = "<!-- bench:fig -->\nfull-run figures\n<!-- /bench:fig -->"


def _block(text: str, name: str) -> str:
    start, end = f"<!-- bench:{name} -->\n", f"\n<!-- /bench:{name} -->"
    assert text.count(start) == 1 and text.count(end) == 1, f"one block {name} expected"
    return text[text.index(start) + len(start) : text.index(end)]


def test_quick_runs_write_their_own_blocks_and_leave_the_full_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = _driver()
    results = tmp_path / "RESULTS.md"
    results.write_text(f"intro\n\n{FULL}\n\nthe section's history\n")

    def run(quick: bool) -> tuple[str, str]:
        return "python bench/fig.py", f"figures of a {'quick' if quick else 'full'} run"

    monkeypatch.setattr(driver, "STEPS", (driver.Step("fig", run),))
    monkeypatch.setattr(driver, "commit", lambda: "abc1234")
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # main() sets it; restored after the test
    for _ in range(2):  # made once, then rewritten in place
        assert driver.main(["--quick", "--results", str(results)]) == 0
        text = results.read_text()
        assert FULL in text, "a quick run rewrote the full block"
        quick = _block(text, "fig-quick")
        assert "QUICK=1" in quick and "figures of a quick run" in quick
        assert text.index(FULL) < text.index("<!-- bench:fig-quick -->")
        assert text.index("<!-- /bench:fig-quick -->") < text.index("the section's history")

    assert driver.main(["--results", str(results)]) == 0
    text = results.read_text()
    assert "figures of a full run" in _block(text, "fig")
    assert "QUICK=1" not in _block(text, "fig")
    assert "figures of a quick run" in _block(text, "fig-quick"), "a full run rewrote the quick one"


def test_a_block_missing_with_nothing_to_follow_is_an_error() -> None:
    driver = _driver()
    with pytest.raises(KeyError, match="no block"):
        driver.replace_block("text", "fig-quick", "x", after="fig")
    made = driver.replace_block(FULL, "fig-quick", "x", after="fig")
    assert made == f"{FULL}\n\n<!-- bench:fig-quick -->\nx\n<!-- /bench:fig-quick -->"
    assert driver.block_name("fig", quick=True) == "fig-quick"
    assert driver.block_name("fig", quick=False) == "fig"


def test_the_decision_cost_step_runs_several_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = _driver()
    commands: list[list[str]] = []
    stress = {
        "seeds": {s: {"cpu_p50_us": 7.0, "cpu_p99_us": 30.0 + int(s)} for s in "0123"},
        "worst": {"seed": 3, "cpu_p50_us": 7.0, "cpu_p99_us": 33.0, "p99_us": 35.0},
    }

    def run(command: list[str], *, timeout_s: float) -> str:
        commands.append(command)
        return json.dumps({"setup": {"seeds": [0, 1, 2, 3]}, "stress": {"lalb": stress}})

    monkeypatch.setattr(driver, "_run", run)
    for quick in (True, False):
        _, body = driver.decision_cost(quick)
        seeds = commands[-1][commands[-1].index("--seeds") + 1].split(",")
        assert len(seeds) >= 2, "the stress step must run several seeds"
        assert "| stress | lalb | 3 | 7.0 | 33.0 |" in body
        assert "**worst** (p99: seed 3)" in body
