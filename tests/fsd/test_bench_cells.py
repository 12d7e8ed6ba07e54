"""``bench/fsd.py --cells`` (fsd, eighteenth session): a grid run can be limited to some of
its cells, so one cell's repetitions can be run again alone; a name that is no cell of the
grid is refused before any manager starts, naming it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from bench_support import load_bench
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
fsd = load_bench(ROOT / "bench" / "fsd.py", name="fsd_bench_cells")

GRID = fsd.grid_configs(8, ["direct", "nats", "s3"], every_method=True)


def _name(config: tuple[int, str, str]) -> str:
    return "-".join(map(str, config))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(GRID), min_size=1, max_size=len(GRID)))
def test_the_cells_named_are_run_in_the_grids_order_and_no_others(
    picked: list[tuple[int, str, str]],
) -> None:
    chosen = fsd.select_cells(GRID, ", ".join(_name(c) for c in picked))
    assert chosen == [c for c in GRID if c in picked]


def test_one_cell_with_repeats_is_that_cells_repetitions() -> None:
    chosen = fsd.select_cells(GRID, "2-direct-block")
    orders = fsd.repetition_orders(chosen, repeats=3, seed=29)
    assert orders == [[(2, "direct", "block")]] * 3


@pytest.mark.parametrize(
    ("cells", "named"),
    [
        ("2-direct", "'2-direct'"),
        ("", "''"),
        ("two-direct-block", "'two-direct-block'"),
        ("2-direct-block,,4-nats-random", "''"),
        ("8-s3-hypergraph", "8-s3-hypergraph"),  # S3 runs up to N = 4
        ("2-direct-blocks", "2-direct-blocks"),
    ],
)
def test_a_name_that_is_no_cell_of_the_grid_is_refused_naming_it(cells: str, named: str) -> None:
    with pytest.raises(ValueError, match="--cells") as refused:
        fsd.select_cells(GRID, cells)
    assert named in str(refused.value)


def test_the_command_line_refuses_a_bad_cell_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def never(*_: object, **__: object) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr(fsd, "main_async", never)
    monkeypatch.setattr(sys, "argv", ["fsd.py", "--every-method", "--cells", "2-direct-blok"])
    with pytest.raises(SystemExit) as stopped:
        fsd.main()
    assert stopped.value.code == 2
    assert "2-direct-blok" in capsys.readouterr().err
