"""``bench/make_bench.py`` rewrites only its own marked blocks of the results file."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from bench_support import load_bench

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _driver() -> ModuleType:
    return load_bench(BENCH / "make_bench.py", name="gpufaas_make_bench")


def test_a_block_is_replaced_and_the_rest_kept() -> None:
    driver = _driver()
    text = "intro\n<!-- bench:a -->\nold\n<!-- /bench:a -->\nmiddle\n<!-- bench:b -->\n<!-- /bench:b -->\n"
    once = driver.replace_block(text, "b", "new b")
    assert once == text.replace("<!-- bench:b -->\n", "<!-- bench:b -->\nnew b\n")
    twice = driver.replace_block(once, "b", "newer")
    assert "newer" in twice and "new b" not in twice and "old" in twice and "middle" in twice
    with pytest.raises(KeyError, match="no block"):
        driver.replace_block(text, "c", "x")


def test_every_step_has_its_block_in_results() -> None:
    driver = _driver()
    text = (BENCH / "RESULTS.md").read_text()
    for step in driver.STEPS:
        assert f"<!-- bench:{step.name} -->" in text and f"<!-- /bench:{step.name} -->" in text


def test_a_peers_section_nests_under_results_peers_heading() -> None:
    driver = _driver()
    section = "## Peers\n\n- date: x\n\n### tiny-mlp\n\n| a |\n"
    assert driver._nested(section) == "\n- date: x\n\n#### tiny-mlp\n\n| a |"


def test_the_hand_pasted_sections_have_steps() -> None:
    driver = _driver()
    names = {step.name for step in driver.STEPS}
    assert {"gpu-loading", "scaleout", "fsd", "dataplane", "predict"} <= names
    quick_only = {s.name for s in driver.STEPS if not s.full_only and not s.needs_peers}
    assert {"gpu-loading", "scaleout", "fsd", "dataplane", "predict"} <= quick_only


def test_printed_tables_are_kept_and_other_text_is_fenced() -> None:
    driver = _driver()
    table = "title\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n"
    assert driver._embedded(table) == table.strip()
    assert driver._embedded("rate 3.2 GB/s\n") == "```\nrate 3.2 GB/s\n```"
    rows = [{"method": "random", "bytes": 1.5, "nested": [1]}, {"method": "block", "bytes": 2}]
    assert driver._rows_table(rows).splitlines() == [
        "| method | bytes |",
        "| --- | --- |",
        "| random | 1.5 |",
        "| block | 2 |",
    ]
