"""core imports no component; the `gpufaas` subcommands come from entry points."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gpufaas.core.cli import commands, main

CORE = Path(__file__).resolve().parents[2] / "core"
COMPONENTS = ("gpufaas.scheduler", "gpufaas.gpu_manager", "gpufaas.operator")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_imports_no_component(path: Path) -> None:
    bad = {n for n in _imports(path) if n.startswith(COMPONENTS)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_every_subcommand_is_an_installed_entry_point() -> None:
    found = commands()
    expected = {"up", "gateway", "gpu-manager", "operator", "check-model", "crd", "validate"}
    assert expected <= set(found)
    for entry in found.values():
        assert callable(entry.load())


def test_unknown_command_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_crd_command_prints_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd"]) == 0
    assert "kind: CustomResourceDefinition" in capsys.readouterr().out
