"""Loading ``bench/`` scripts in tests: ``bench/`` is no installed package (its scripts run by
path, and some names, like ``predict-warm.py``, are no module names), so a test loads a script
by its file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_bench(path: Path, *, name: str) -> ModuleType:
    """The script at ``path`` as module ``name``, registered in ``sys.modules`` (dataclasses
    look their module up by name)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
