"""ONNX models: checked before anything runs, then run with onnxruntime.

:func:`read_onnx` parses a ``.onnx`` file (protobuf: no code in it) and refuses, with a message
naming the cause, what the node cannot serve:

* tensors stored as external data (a path inside the model could point anywhere on the node;
  ship one self-contained file);
* operators outside the standard ONNX domains (``ai.onnx``, ``ai.onnx.ml``), onnxruntime's
  ``com.microsoft`` contrib domain and the model's own functions, or not in ONNX's operator
  registry;
* operators that onnxruntime has no kernel for: the model is opened once on the CPU to find out.

:func:`open_session` opens it for one device: the CUDA execution provider on a GPU (refused if
this onnxruntime has none: no silent CPU fallback), the CPU one otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gpufaas.core.api import ModelFormat
from gpufaas.core.modelio import ModelLoadError

__all__ = ["OnnxModel", "open_session", "read_onnx", "unsupported_operators"]

_STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
_CONTRIB_DOMAINS = frozenset({"com.microsoft"})  # onnxruntime's own kernels
_NO_KERNEL = re.compile(r"implementation for (\w+)\((\d+)\) node with name '([^']*)'")
_NO_OP = re.compile(r"No Op registered for (\w+) with domain_version of (\d+)")


@dataclass(frozen=True)
class OnnxModel:
    """A checked ONNX model: its bytes and what it holds."""

    path: Path
    data: bytes
    initializer_bytes: int  # the weights: what ``tensor_bytes`` counts for torch models
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def read_onnx(path: Path) -> OnnxModel:
    """Read and check ``path``; :class:`ModelLoadError` names what cannot be served."""
    import onnx

    fmt = ModelFormat.ONNX
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(path, fmt, "file not found")
    data = path.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except Exception as e:
        raise ModelLoadError(path, fmt, f"not an ONNX model ({type(e).__name__})") from None
    external = [
        t.name for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ModelLoadError(
            path, fmt, f"tensor {external[0]!r} is stored as external data; ship one file"
        )
    unknown = unsupported_operators(model)
    if unknown:
        raise ModelLoadError(path, fmt, f"unsupported operator(s): {', '.join(unknown)}")
    _open(data, providers=["CPUExecutionProvider"], path=path)  # kernels exist for every node
    return OnnxModel(
        path=path,
        data=data,
        initializer_bytes=sum(_nbytes(t) for t in _tensors(model.graph)),
        input_names=tuple(
            i.name
            for i in model.graph.input
            if i.name not in {t.name for t in model.graph.initializer}
        ),
        output_names=tuple(o.name for o in model.graph.output),
    )


def unsupported_operators(model: Any) -> list[str]:
    """Operators (``domain:Op``, ``Op`` for the default domain) outside what can run here."""
    import onnx

    local = {f.domain for f in model.functions}
    found: set[str] = set()
    for node in _nodes(model.graph):
        domain = node.domain
        if domain in local or domain in _CONTRIB_DOMAINS:
            continue
        known = domain in _STANDARD_DOMAINS and onnx.defs.has(
            node.op_type, "" if domain == "ai.onnx" else domain
        )
        if not known:
            found.add(f"{domain}:{node.op_type}" if domain else node.op_type)
    return sorted(found)


def open_session(data: bytes, *, device_kind: str, device_index: int = 0, threads: int = 1) -> Any:
    """An onnxruntime session for one device (``device_kind`` "cuda" or "cpu")."""
    import onnxruntime as ort

    if device_kind == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelLoadError(
                "<memory>",
                ModelFormat.ONNX,
                "this onnxruntime has no CUDA execution provider (install onnxruntime-gpu)",
            )
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device_index})]
    else:
        providers = ["CPUExecutionProvider"]
    return _open(data, providers=providers, path=Path("<memory>"), threads=threads)


def run(
    session: Any, inputs: Sequence[NDArray[Any]], *, names: Sequence[str] = ()
) -> list[NDArray[Any]]:
    """One call; outputs in the graph's order. ``inputs`` are matched to the graph's inputs by
    ``names`` when those are exactly the graph's input names, else by position."""
    graph_names = [i.name for i in session.get_inputs()]
    order = list(names) if sorted(names) == sorted(graph_names) else graph_names
    feed = {name: np.ascontiguousarray(array) for name, array in zip(order, inputs, strict=True)}
    return [np.asarray(output) for output in session.run(None, feed)]


def _open(data: bytes, *, providers: list[Any], path: Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(data, sess_options=options, providers=providers)
    except Exception as e:
        message = str(e)
        kernel = _NO_KERNEL.search(message) or _NO_OP.search(message)
        if kernel is not None:
            reason = f"onnxruntime cannot run operator {kernel.group(1)} (opset {kernel.group(2)})"
        else:
            reason = f"onnxruntime cannot open it: {message.strip().splitlines()[0][:300]}"
        raise ModelLoadError(path, ModelFormat.ONNX, reason) from None


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node, subgraphs (If/Loop/Scan bodies) included."""
    import onnx

    stack = [graph]
    while stack:
        current = stack.pop()
        for node in current.node:
            yield node
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    stack.append(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attribute.graphs)


def _tensors(graph: Any) -> Iterator[Any]:
    """Initializers and constant tensors, subgraphs included."""
    import onnx

    stack = [graph]
    while stack:
        current = stack.pop()
        yield from current.initializer
        for node in current.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    stack.append(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attribute.graphs)


def _nbytes(tensor: Any) -> int:
    import onnx

    count = 1
    for dim in tensor.dims:
        count *= dim
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return count * itemsize
