"""``bench/dataplane.py --client-grpc-experiments``: grpc's experiment switch reaches the bench's
client process and never its servers. The pure parts, loaded by path (``bench/`` is not an
installed package); no servers."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

from bench_support import load_bench

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # its sibling grpc_common, as when run as a script
    try:
        return load_bench(BENCH / "dataplane.py", name="gpufaas_bench_dataplane")
    finally:
        sys.path.remove(str(BENCH))


dataplane = _load()


def test_the_servers_never_inherit_the_clients_grpc_experiments(tmp_path: Path) -> None:
    base = {"GRPC_EXPERIMENTS": "-event_engine_client", "PATH": "/bin"}
    env = dataplane.server_env(base, models=tmp_path, home="h", pythonpath="tree")
    assert "GRPC_EXPERIMENTS" not in env
    assert env["PATH"] == "/bin" and env["GPUFAAS_HOME"] == "h" and env["PYTHONPATH"] == "tree"
    assert env["GPUFAAS_MODELS"] == str(tmp_path)
    assert base["GRPC_EXPERIMENTS"] == "-event_engine_client"  # the client's own is untouched


def test_the_client_is_rerun_with_the_setting_once() -> None:
    wanted = "-event_engine_client"
    env = dataplane.client_exec({"PATH": "/bin"}, wanted)
    assert env == {"PATH": "/bin", "GRPC_EXPERIMENTS": wanted}
    assert dataplane.client_exec(env, wanted) is None  # already running with it: no loop
    assert dataplane.client_exec({"PATH": "/bin"}, None) is None  # not asked: the default
    assert dataplane.client_exec({"GRPC_EXPERIMENTS": "x"}, wanted) == {"GRPC_EXPERIMENTS": wanted}
