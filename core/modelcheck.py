"""Verify that a function's model can be fetched and loaded, and measure it.

The operator runs this in a Kubernetes Job (``gpufaas check-model``) before a
function is marked ready. The outcome goes to stdout as JSON and, inside a pod,
to ``/dev/termination-log``, where the operator reads it back from the pod's
``state.terminated.message``; that message is capped at 4096 bytes, so the
termination copy drops the tensor signature when it would not fit.

Fetching and loading import torch; they are imported inside the functions, so
the operator can parse outcomes (:func:`parse_check_message`) without torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from gpufaas.core.api import (
    InferenceFunctionSpec,
    ManifestError,
    ModelFormat,
    ModelSource,
    TensorSpec,
    format_validation_error,
    parse_spec,
)

if TYPE_CHECKING:
    import torch

    from gpufaas.core.artifacts import ArtifactStore

TERMINATION_LOG = Path("/dev/termination-log")
# Kubernetes keeps at most 4096 bytes of a container's termination message.
TERMINATION_MESSAGE_LIMIT = 4096

_TORCH_DTYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BF16": "bfloat16",
}  # fmt: skip


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class ModelReport(_Camel):
    """What the check measured about one model artifact."""

    uri: str
    format: ModelFormat
    sha256: str = Field(description="Hex SHA-256 of the artifact as fetched.")
    size_bytes: int = Field(ge=0, description="Size of the artifact file(s).")
    tensor_bytes: int = Field(ge=0, description="Bytes of parameters and buffers once loaded.")
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    smoke_tested: bool = Field(
        default=False, description="A forward pass on the declared inputs matched the outputs."
    )


class CheckOutcome(_Camel):
    """Success with a report, or failure with an error message."""

    ok: bool
    report: ModelReport | None = None
    error: str | None = None


class ModelCheckError(Exception):
    """The model cannot be served as declared; the message says why."""


def check_model(spec: ModelSource | InferenceFunctionSpec, *, store: ArtifactStore) -> ModelReport:
    """Fetch, hash, load and measure the model; with a whole spec, also run it once.

    Raises :class:`ModelCheckError` naming what failed (fetch, digest, load, signature).
    """
    from gpufaas.core.artifacts import ArtifactError
    from gpufaas.core.modelio import ModelLoadError, load_model, tensor_bytes

    source = spec.model if isinstance(spec, InferenceFunctionSpec) else spec
    try:
        path = store.fetch(source.uri, sha256=source.sha256)
    except ArtifactError as e:
        raise ModelCheckError(str(e)) from None
    size, digest = _size_and_digest(path)
    if source.sha256 is not None and digest != source.sha256:
        raise ModelCheckError(f"sha256 mismatch for {source.uri}: got {digest}")
    if source.format is ModelFormat.ONNX:
        return _check_onnx(spec, path, size=size, digest=digest)
    try:
        module = load_model(path, format=source.format)
    except ModelLoadError as e:
        raise ModelCheckError(f"{source.uri}: {e}") from None

    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    smoke_tested = False
    if isinstance(spec, InferenceFunctionSpec):
        inputs, outputs = list(spec.inputs), list(spec.outputs)
        smoke_tested = smoke_test(module, inputs=inputs, outputs=outputs)
    return ModelReport(
        uri=source.uri,
        format=source.format,
        sha256=digest,
        size_bytes=size,
        tensor_bytes=tensor_bytes(module),
        inputs=inputs,
        outputs=outputs,
        smoke_tested=smoke_tested,
    )


def _check_onnx(
    spec: ModelSource | InferenceFunctionSpec, path: Path, *, size: int, digest: str
) -> ModelReport:
    """ONNX: every operator known and runnable by onnxruntime; with a spec, one run on zeros."""
    from gpufaas.core.modelio import ModelLoadError
    from gpufaas.core.onnxmodel import open_session, read_onnx, run

    source = spec.model if isinstance(spec, InferenceFunctionSpec) else spec
    try:
        model = read_onnx(path)
    except ModelLoadError as e:
        raise ModelCheckError(f"{source.uri}: {e}") from None
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    smoke_tested = False
    if isinstance(spec, InferenceFunctionSpec):
        inputs, outputs = list(spec.inputs), list(spec.outputs)
        if not any(t.datatype in ("BYTES", "BF16") for t in inputs):  # no numpy form
            import numpy as np

            arrays = [
                np.zeros([1 if d == -1 else d for d in t.shape], dtype=_TORCH_DTYPES[t.datatype])
                for t in inputs
            ]
            try:
                produced = run(open_session(model.data, device_kind="cpu"), arrays)
            except Exception as e:
                raise ModelCheckError(
                    f"forward pass on the declared inputs failed: {type(e).__name__}: {e}"
                ) from None
            if len(produced) != len(outputs):
                raise ModelCheckError(
                    f"model returned {len(produced)} output(s), spec declares {len(outputs)}"
                )
            for declared, array in zip(outputs, produced, strict=True):
                _check_output(declared, str(array.dtype), list(array.shape))
            smoke_tested = True
    return ModelReport(
        uri=source.uri,
        format=source.format,
        sha256=digest,
        size_bytes=size,
        tensor_bytes=model.initializer_bytes,
        inputs=inputs,
        outputs=outputs,
        smoke_tested=smoke_tested,
    )


def _check_output(declared: TensorSpec, dtype: str, shape: list[int]) -> None:
    """An output's dtype (numpy/torch name) and fixed dimensions against its declaration."""
    expected = _TORCH_DTYPES.get(declared.datatype)
    if expected is not None and dtype.removeprefix("torch.") != expected:
        raise ModelCheckError(
            f"output {declared.name!r}: datatype {declared.datatype} declared, model returned {dtype}"
        )
    fixed_ok = len(shape) == len(declared.shape) and all(
        d == -1 or d == a for d, a in zip(declared.shape, shape, strict=True)
    )
    if not fixed_ok:
        raise ModelCheckError(
            f"output {declared.name!r}: shape {declared.shape} declared, model returned {shape}"
        )


def _size_and_digest(path: Path) -> tuple[int, str]:
    """Total size and SHA-256 of a file, or of a folder's files in sorted order."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    size = 0
    for file in files:
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    return size, digest.hexdigest()


def smoke_test(
    module: torch.nn.Module, *, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> bool:
    """Run one forward pass on zeros shaped like the declared inputs (``-1`` -> 1).

    Returns False (skipped) when an input is ``BYTES``, which has no tensor form.
    Raises :class:`ModelCheckError` when the call fails or the results do not
    match the declared outputs in count, datatype or fixed dimensions.
    """
    import torch

    if any(t.datatype == "BYTES" for t in inputs):
        return False
    args = [
        torch.zeros(
            [1 if d == -1 else d for d in t.shape], dtype=getattr(torch, _TORCH_DTYPES[t.datatype])
        )
        for t in inputs
    ]
    try:
        with torch.no_grad():
            result = module(*args)
    except Exception as e:  # any failure inside user code means "not servable as declared"
        raise ModelCheckError(
            f"forward pass on the declared inputs failed: {type(e).__name__}: {e}"
        ) from None
    produced = _as_tensor_list(result, names=[t.name for t in outputs])
    if len(produced) != len(outputs):
        raise ModelCheckError(
            f"model returned {len(produced)} output(s), spec declares {len(outputs)}"
        )
    for declared, tensor in zip(outputs, produced, strict=True):
        _check_output(declared, str(tensor.dtype), list(tensor.shape))
    return True


def _as_tensor_list(result: Any, *, names: Sequence[str]) -> list[torch.Tensor]:
    import torch

    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        if set(result) == set(names):
            return [result[n] for n in names]
        return list(result.values())
    if isinstance(result, list | tuple) and all(isinstance(t, torch.Tensor) for t in result):
        return list(result)
    raise ModelCheckError(f"model returned {type(result).__name__}, expected tensors")


def termination_message(outcome: CheckOutcome) -> str:
    """Compact JSON that fits Kubernetes' termination-message limit."""
    text = outcome.model_dump_json(by_alias=True, exclude_none=True)
    if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
        return text
    if outcome.report is not None:
        slim = outcome.report.model_copy(update={"inputs": [], "outputs": []})
        text = outcome.model_copy(update={"report": slim}).model_dump_json(
            by_alias=True, exclude_none=True
        )
    if outcome.error is not None and len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
        short = outcome.error[: TERMINATION_MESSAGE_LIMIT // 2] + "..."
        text = outcome.model_copy(update={"error": short}).model_dump_json(
            by_alias=True, exclude_none=True
        )
    return text


def parse_check_message(text: str) -> CheckOutcome | None:
    """Read an outcome back from a termination message; None if it is not one (e.g. logs)."""
    try:
        return CheckOutcome.model_validate_json(text.strip())
    except ValidationError:
        return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpufaas check-model",
        description="Fetch and load a model, print a JSON report (and write it to the termination log).",
    )
    parser.add_argument("--uri", help="artifact URI (file://, http(s)://, s3://)")
    parser.add_argument("--format", choices=[f.value for f in ModelFormat])
    parser.add_argument("--sha256", default=None)
    parser.add_argument(
        "--spec-json",
        default=None,
        help="a whole InferenceFunction spec as JSON (instead of --uri/--format): also runs it once",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="artifact cache (default: $GPUFAAS_CACHE_DIR)"
    )
    parser.add_argument("--termination-log", type=Path, default=TERMINATION_LOG)
    parser.add_argument(
        "--kubernetes",
        action="store_true",
        help="fetch under the cluster URI policy: file:// only below --file-root, no loopback/metadata hosts",
    )
    parser.add_argument(
        "--file-root", type=Path, action="append", default=[], help="allowed file:// root"
    )
    return parser


def _spec_from_args(args: argparse.Namespace) -> ModelSource | InferenceFunctionSpec:
    if args.spec_json is not None:
        try:
            document = json.loads(args.spec_json)
        except json.JSONDecodeError as e:
            raise ManifestError(f"--spec-json: not JSON: {e}") from None
        if not isinstance(document, dict):
            raise ManifestError("--spec-json: expected a JSON object")
        return parse_spec(document)
    if not args.uri or not args.format:
        raise ManifestError("give --uri and --format, or --spec-json")
    try:
        return ModelSource.model_validate(
            {"uri": args.uri, "format": args.format, "sha256": args.sha256}
        )
    except ValidationError as e:
        raise ManifestError(format_validation_error(e, prefix="model")) from None


def _emit(outcome: CheckOutcome, *, termination_log: Path) -> None:
    sys.stdout.write(outcome.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n")
    sys.stdout.flush()
    if termination_log.exists():
        try:
            termination_log.write_text(termination_message(outcome))
        except OSError as e:
            print(f"gpufaas check-model: cannot write {termination_log}: {e}", file=sys.stderr)


def _default_cache_dir() -> Path:
    from gpufaas.core.config import artifact_dir

    configured = os.environ.get("GPUFAAS_CACHE_DIR")
    return Path(configured) if configured else artifact_dir()


def run_check_model_cli(argv: Sequence[str] | None = None) -> int:
    """``gpufaas check-model``: 0 verified, 1 model unusable, 2 bad arguments."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        spec = _spec_from_args(args)
    except ManifestError as e:
        _emit(CheckOutcome(ok=False, error=str(e)), termination_log=args.termination_log)
        return 2

    from gpufaas.core.artifacts import ArtifactStore
    from gpufaas.core.uripolicy import UriPolicy

    policy = UriPolicy.for_kubernetes(file_roots=args.file_root) if args.kubernetes else None
    store = ArtifactStore(args.cache_dir or _default_cache_dir(), uri_policy=policy)
    try:
        report = check_model(spec, store=store)
    except ModelCheckError as e:
        _emit(CheckOutcome(ok=False, error=str(e)), termination_log=args.termination_log)
        return 1
    _emit(CheckOutcome(ok=True, report=report), termination_log=args.termination_log)
    return 0
