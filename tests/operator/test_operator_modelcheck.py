"""``gpufaas check-model``: what the operator's Job runs (gpufaas.core.modelcheck)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gpufaas.core.api import ModelFormat, ModelSource, parse_spec
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.modelcheck import (
    TERMINATION_MESSAGE_LIMIT,
    CheckOutcome,
    ModelCheckError,
    ModelReport,
    check_model,
    parse_check_message,
    run_check_model_cli,
    termination_message,
)
from gpufaas.core.modelio import save_model

pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "net.pt"
    save_model(
        _Net().eval(), path, format=ModelFormat.TORCHSCRIPT, example_inputs=(torch.zeros(1, 4),)
    )
    return path


def _spec(
    path: Path, *, out_shape: list[int] | None = None, sha256: str | None = None
) -> dict[str, Any]:
    model: dict[str, Any] = {"uri": path.as_uri(), "format": "torchscript"}
    if sha256:
        model["sha256"] = sha256
    return {
        "model": model,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": out_shape or [-1, 2]}],
    }


def test_report_measures_and_runs_the_model(model_file: Path, tmp_path: Path) -> None:
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    report = check_model(
        parse_spec(_spec(model_file, sha256=digest)), store=ArtifactStore(tmp_path)
    )
    assert report.sha256 == digest
    assert report.size_bytes == model_file.stat().st_size
    assert report.tensor_bytes == (4 * 2 + 2) * 4  # fp32 weight + bias
    assert report.smoke_tested
    assert [t.name for t in report.inputs] == ["x"]


def test_a_bare_model_source_is_loaded_but_not_run(model_file: Path, tmp_path: Path) -> None:
    source = ModelSource(uri=model_file.as_uri(), format=ModelFormat.TORCHSCRIPT)
    report = check_model(source, store=ArtifactStore(tmp_path))
    assert not report.smoke_tested
    assert report.inputs == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s, p: s.update(_spec(p, out_shape=[-1, 3])), "shape [-1, 3] declared"),
        (
            lambda s, p: s["outputs"].append({"name": "z", "datatype": "FP32", "shape": [2]}),
            "declares 2",
        ),
        (lambda s, p: s["inputs"][0].update(shape=[-1, 5]), "forward pass"),
        (lambda s, p: s["model"].update(sha256="0" * 64), "sha256"),
        (lambda s, p: s["model"].update(format="torch-export"), "torch-export"),
        (lambda s, p: s["model"].update(uri=(p.parent / "missing.pt").as_uri()), "missing.pt"),
    ],
)
def test_unusable_models_are_explained(
    model_file: Path, tmp_path: Path, mutate: Any, message: str
) -> None:
    raw = _spec(model_file)
    mutate(raw, model_file)
    with pytest.raises(ModelCheckError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_model(parse_spec(raw), store=ArtifactStore(tmp_path))


def test_termination_message_fits_kubernetes_limit() -> None:
    tensors = [
        {"name": f"t{i:03d}_" + "n" * 100, "datatype": "FP32", "shape": [-1] * 16}
        for i in range(64)
    ]
    report = ModelReport.model_validate(
        {"uri": "s3://b/m.pt", "format": "torchscript", "sha256": "a" * 64, "sizeBytes": 1, "tensorBytes": 1,
         "inputs": tensors, "outputs": tensors}
    )  # fmt: skip
    text = termination_message(CheckOutcome(ok=True, report=report))
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    parsed = parse_check_message(text)
    assert parsed is not None and parsed.report is not None and parsed.report.tensor_bytes == 1
    long_error = termination_message(CheckOutcome(ok=False, error="x" * 10_000))
    assert len(long_error.encode()) <= TERMINATION_MESSAGE_LIMIT
    assert parse_check_message("Traceback (most recent call last): ...") is None


def test_cli_prints_and_writes_the_termination_log(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "termination-log"
    log.touch()  # the kubelet creates it; outside a pod it does not exist and is not written
    argv = [
        "--spec-json",
        json.dumps(_spec(model_file)),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--termination-log",
        str(log),
    ]
    assert run_check_model_cli(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ok"] is True and printed["report"]["smokeTested"] is True
    outcome = parse_check_message(log.read_text())
    assert outcome is not None and outcome.ok and outcome.report is not None
    assert outcome.report.tensor_bytes == printed["report"]["tensorBytes"]


def test_cli_reports_an_unusable_model_with_exit_1(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "termination-log"
    log.touch()
    argv = [
        "--uri",
        model_file.as_uri(),
        "--format",
        "torch-export",
        "--cache-dir",
        str(tmp_path),
        "--termination-log",
        str(log),
    ]
    assert run_check_model_cli(argv) == 1
    outcome = parse_check_message(log.read_text())
    assert outcome is not None and not outcome.ok and "torch-export" in (outcome.error or "")
    assert json.loads(capsys.readouterr().out)["ok"] is False


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--uri", "ftp://x/m.pt", "--format", "torchscript"], "model.uri"),
        (["--spec-json", '{"model": {"uri": "s3://b/m", "format": "torchscript"}}'], "spec.inputs"),
        (["--spec-json", "not json"], "--spec-json"),
        ([], "--uri and --format"),
    ],
)
def test_cli_bad_arguments_exit_2_naming_the_field(
    argv: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_check_model_cli([*argv, "--termination-log", str(tmp_path / "absent")]) == 2
    assert named in json.loads(capsys.readouterr().out)["error"]
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize(
    "uri",
    ["FILE", "http://127.0.0.1:9/m.pt", "http://169.254.169.254/latest/meta-data/m.pt"],
)
def test_cli_in_kubernetes_refuses_local_and_internal_uris(
    uri: str, model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = model_file.as_uri() if uri == "FILE" else uri
    argv = ["--kubernetes", "--uri", uri, "--format", "torchscript", "--cache-dir", str(tmp_path)]
    assert run_check_model_cli([*argv, "--termination-log", str(tmp_path / "absent")]) == 1
    assert "not allowed" in json.loads(capsys.readouterr().out)["error"]


def test_cli_in_kubernetes_allows_files_below_a_root(model_file: Path, tmp_path: Path) -> None:
    argv = ["--kubernetes", "--file-root", str(model_file.parent), "--uri", model_file.as_uri()]
    argv += [
        "--format",
        "torchscript",
        "--cache-dir",
        str(tmp_path),
        "--termination-log",
        str(tmp_path / "x"),
    ]
    assert run_check_model_cli(argv) == 0
