"""Where gpufaas keeps its files on this machine.

``GPUFAAS_HOME`` (default ``~/.cache/gpufaas``) holds the built example models
(``models/``, or ``GPUFAAS_MODELS``) and the node-local artifact cache
(``artifacts/``).
"""

from __future__ import annotations

import os
from pathlib import Path


def gpufaas_home() -> Path:
    home = os.environ.get("GPUFAAS_HOME")
    return Path(home) if home else Path.home() / ".cache" / "gpufaas"


def models_dir() -> Path:
    override = os.environ.get("GPUFAAS_MODELS")
    return Path(override) if override else gpufaas_home() / "models"


def artifact_dir() -> Path:
    return gpufaas_home() / "artifacts"
