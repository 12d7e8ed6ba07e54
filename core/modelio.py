"""Load and save model artifacts without running pickled code.

Two torch formats (:class:`~gpufaas.core.api.ModelFormat`; ONNX is read by
:mod:`gpufaas.core.onnxmodel`):

``torchscript``
    ``torch.jit.save`` archives, read by ``torch.jit.load``. The C++ TorchScript
    loader unpickles ``data.pkl``/``constants.pkl`` with its own restricted
    unpickler (tensors, containers and TorchScript classes compiled from the
    archive's ``code/``), never Python's ``pickle``; the code runs on the
    TorchScript interpreter, which can only call registered operators.

``torch-export``
    ``torch.export.save`` archives (``.pt2``). ``torch.export.load`` (torch 2.13)
    is NOT safe on untrusted files by itself; reading its source shows it:

    * unpickles weights and tensor constants saved with ``use_pickle`` (tensor
      subclasses) with ``torch.load(weights_only=False)``, and opaque constants
      with ``pickle.loads``;
    * loads ``data/sample_inputs/<model>.pt`` with ``weights_only=True`` but
      falls back to ``weights_only=False`` when that fails (so any pickle there
      runs), and does the same for legacy ``data/weights/<model>.pt`` files and
      for the pre-2.8 zip layout it falls back to on errors;
    * ``dlopen``-s AOTInductor shared libraries under ``data/aotinductor/``;
    * parses symbolic shapes (``expr_str``) with ``sympy.sympify`` (``eval``);
    * builds ``torch.fx`` code from names in the JSON (placeholders, keyword
      arguments, attribute paths, ``forward_arg_names``) and ``exec``-s it;
    * resolves node targets as any attribute path under ``torch`` (so
      ``torch.os.system`` is a valid "operator") that runs when the model runs.

    :func:`load_model` therefore validates the archive first, reading it with
    the same zip reader torch uses, and loads it only if it stays inside the
    subset that ``torch.export.save`` writes for plain modules: no pickled
    payloads besides sample inputs that load with ``weights_only=True``; no
    AOTInductor, custom or opaque objects; identifiers where code is generated;
    symbolic expressions made of sympy names and numbers only. After loading, every
    graph node must call a registered operator (``OpOverload``), a higher-order
    operator, or a symbolic-shape operator. Anything else raises
    :class:`ModelLoadError`, as do missing, truncated or corrupt files.
"""

from __future__ import annotations

import io
import json
import operator
import pickle
import re
import threading
import tokenize
import types
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from gpufaas.core.api import ModelFormat
from gpufaas.core.artifacts import write_atomically

__all__ = ["ModelLoadError", "load_model", "save_model", "tensor_bytes"]

# TorchScript is one of our two formats on purpose; torch 2.13 warns on every jit call.
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
)


# torch.export.load keeps its deserializer in a module global and asserts that no other load is
# running: concurrent loads in threads fail with "_CURRENT_DESERIALIZER is already set".
_EXPORT_LOAD_LOCK = threading.Lock()


class ModelLoadError(Exception):
    """A model artifact that cannot be loaded safely; the message says which file and why."""

    def __init__(self, path: Path | str, format: ModelFormat | str, reason: str) -> None:
        self.path = Path(path)
        self.format = ModelFormat(format)
        self.reason = reason
        super().__init__(f"cannot load {self.path} as {self.format.value}: {reason}")

    def __reduce__(self) -> tuple[type[ModelLoadError], tuple[Path, ModelFormat, str]]:
        return type(self), (self.path, self.format, self.reason)


# --- loading -------------------------------------------------------------------------------------


def load_model(
    path: Path, *, format: ModelFormat, map_location: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load a model artifact as a module on ``map_location``, running no pickled code.

    The module is ready for inference; ``.eval()`` works on both formats, while
    ``.train()`` raises ``NotImplementedError`` on torch.export modules (their
    graph is fixed at export time, in eval mode when written by :func:`save_model`).
    """
    path = Path(path)
    format = ModelFormat(format)
    if format is ModelFormat.ONNX:
        raise ModelLoadError(path, format, "not a torch module (see gpufaas.core.onnxmodel)")
    if format is ModelFormat.LAYERED:
        raise ModelLoadError(path, format, "a layered net is served as a shard set, not loaded")
    if not path.is_file():
        raise ModelLoadError(path, format, "file not found")
    try:
        with path.open("rb") as f:
            # One open file for checking and loading: what was checked is what gets loaded.
            if format is ModelFormat.TORCHSCRIPT:
                return _load_torchscript(f, path, map_location=map_location)
            return _load_exported(f, path, map_location=map_location)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(path, format, f"corrupt or unsupported file ({_brief(e)})") from e


def _load_torchscript(
    f: io.BufferedReader, path: Path, *, map_location: str | torch.device
) -> torch.nn.Module:
    fmt = ModelFormat.TORCHSCRIPT
    names = _archive_records(f, path, fmt)
    if "constants.pkl" not in names or not any(n.startswith("code/") for n in names):
        hint = " (it looks like a torch.save checkpoint)" if "data.pkl" in names else ""
        raise ModelLoadError(path, fmt, f"not a TorchScript archive{hint}")
    f.seek(0)
    try:
        module: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
            f, map_location=map_location
        )
    except Exception as e:
        raise ModelLoadError(path, fmt, f"corrupt TorchScript archive ({_brief(e)})") from None
    return module


def _load_exported(
    f: io.BufferedReader, path: Path, *, map_location: str | torch.device
) -> torch.nn.Module:
    fmt = ModelFormat.TORCH_EXPORT
    names = _archive_records(f, path, fmt)
    reader = _reader(f, path, fmt)
    _check_pt2_archive(reader, names, path)
    f.seek(0)
    try:
        with _EXPORT_LOAD_LOCK:
            program = torch.export.load(f)
    except Exception as e:
        raise ModelLoadError(path, fmt, f"corrupt torch.export archive ({_brief(e)})") from None
    _check_graph_calls(program.graph_module, path)
    if torch.device(map_location) != torch.device("cpu"):
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, torch.device(map_location))
    module = program.module()
    # torch makes eval() and train() raise on exported modules, since the mode is baked into
    # the graph. Ours are exported in eval mode, so eval() (flags only) is truthful.
    vars(module).pop("eval", None)
    module.train = types.MethodType(_train_eval_only, module)  # type: ignore[method-assign]
    return module


def _train_eval_only(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    if mode:
        raise NotImplementedError("a torch.export module cannot switch to training mode")
    return torch.nn.Module.train(self, False)


def _brief(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:300]}"


def _reader(f: io.BufferedReader, path: Path, fmt: ModelFormat) -> torch._C.PyTorchFileReader:
    f.seek(0)
    try:
        return torch._C.PyTorchFileReader(f)
    except Exception:
        raise ModelLoadError(path, fmt, "not a zip archive (truncated or corrupt file?)") from None


def _archive_records(f: io.BufferedReader, path: Path, fmt: ModelFormat) -> set[str]:
    """Record names (without the root folder), checked by both zip readers to agree.

    torch reads records through miniz relative to one root folder; Python's zipfile
    sees every entry. Entries outside that root or duplicated names could show one
    reader something the other does not, so both are rejected.
    """
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as archive:
            entries = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise ModelLoadError(path, fmt, "not a zip archive (truncated or corrupt file?)") from None
    if not entries:
        raise ModelLoadError(path, fmt, "empty archive")
    if len(set(entries)) != len(entries):
        raise ModelLoadError(path, fmt, "archive has duplicate entries")
    root = entries[0].split("/", 1)[0]
    stray = [e for e in entries if not e.startswith(f"{root}/") or ".." in e.split("/")]
    if stray:
        raise ModelLoadError(path, fmt, f"archive entry outside its root folder: {stray[0]!r}")
    relative = {e[len(root) + 1 :] for e in entries}
    torch_view = set(_reader(f, path, fmt).get_all_records())
    if torch_view != relative:
        raise ModelLoadError(path, fmt, "archive layout is ambiguous")
    return relative


# --- torch.export archive checks -------------------------------------------------------------------

_PT2_RECORDS = re.compile(
    r"""(?x)
    archive_format | archive_version | byteorder | \.data/[A-Za-z0-9_]+
    | models/[A-Za-z0-9_]+\.json
    | data/weights/[A-Za-z0-9_]+_weights_config\.json | data/weights/weight_[0-9]+
    | data/constants/[A-Za-z0-9_]+_constants_config\.json | data/constants/tensor_[0-9]+
    | data/sample_inputs/[A-Za-z0-9_]+\.pt
    | extra/[A-Za-z0-9_.\-]+
    """
)
_IDENTIFIER_KEYS = frozenset({"name", "as_name", "forward_arg_names"})
_ATTR_PATH_KEYS = frozenset(
    {"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn"}
)
_ATTR_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_OPERATOR_PATH = re.compile(r"(torch|_operator|math)(\.[A-Za-z0-9_]+)+")
# C0 controls (but tab and newline) and DEL: a lone "\r" ends a line in Python source,
# so a stack trace carrying one could escape the comment fx puts it in.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# sympy names that torch.export writes in ``expr_str`` (sympy srepr) plus torch's own functions.
_SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan",
    "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "true", "false", "True", "False",
    "oo", "zoo", "nan", "Infinity", "NegativeInfinity", "int_oo", "IntInfinity",
    "NegativeIntInfinity", "floor", "ceiling", "sqrt", "Piecewise", "ExprCondPair", "FloorDiv",
    "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
})  # fmt: skip
_SYMBOL_NAME = re.compile(r"[a-z]{1,3}[0-9]+")
_SYMPY_OPS = frozenset({"(", ")", ",", "=", "+", "-", "*", "/", "**", "//", "%", "<", ">"})
_SYMPY_OPS |= {"<=", ">=", "==", "!=", "~", "&", "|"}
_Fail = Callable[[str], ModelLoadError]


def _check_pt2_archive(reader: torch._C.PyTorchFileReader, names: set[str], path: Path) -> None:
    fmt = ModelFormat.TORCH_EXPORT

    def fail(reason: str) -> ModelLoadError:
        return ModelLoadError(path, fmt, reason)

    if "archive_format" not in names or reader.get_record("archive_format") != b"pt2":
        raise fail("not a torch.export archive (no 'archive_format: pt2' record)")
    for name in sorted(names):
        if not _PT2_RECORDS.fullmatch(name):
            raise fail(f"unsupported archive entry {name!r} (only graphs and raw tensors load)")
    models = sorted(n[len("models/") : -len(".json")] for n in names if n.startswith("models/"))
    if not models:
        raise fail("archive holds no exported program")
    for model in models:
        for kind in ("weights", "constants"):
            config_name = f"data/{kind}/{model}_{kind}_config.json"
            if config_name not in names:
                raise fail(f"missing {config_name}")
            _check_payload_config(_json_record(reader, config_name, fail), config_name, fail)
        _check_program_json(_json_record(reader, f"models/{model}.json", fail), fail)
        samples = f"data/sample_inputs/{model}.pt"
        if samples in names:
            # torch retries these with weights_only=False when this fails: never let it.
            try:
                torch.load(io.BytesIO(reader.get_record(samples)), weights_only=True)
            except pickle.UnpicklingError:
                raise fail(f"{samples} holds pickled objects other than tensors") from None
            except Exception as e:
                raise fail(f"{samples} is corrupt ({_brief(e)})") from None


def _json_record(reader: torch._C.PyTorchFileReader, name: str, fail: _Fail) -> Any:
    try:
        return json.loads(reader.get_record(name).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise fail(f"{name} is not valid JSON ({_brief(e)})") from None


def _check_payload_config(config: Any, name: str, fail: _Fail) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise fail(f"{name}: malformed payload config")
    for fqn, meta in entries.items():
        if not isinstance(fqn, str) or not _ATTR_PATH.fullmatch(fqn) or not isinstance(meta, dict):
            raise fail(f"{name}: malformed entry {str(fqn)[:80]!r}")
        if meta.get("use_pickle"):
            raise fail(f"{name}: {fqn!r} is a pickled payload, which is never loaded")
        path_name = meta.get("path_name")
        if not isinstance(path_name, str) or not re.fullmatch(r"(weight|tensor)_[0-9]+", path_name):
            raise fail(f"{name}: {fqn!r} is not a raw tensor (custom or opaque object)")


def _check_program_json(document: Any, fail: _Fail) -> None:
    for key, value in _strings(document):
        if _CONTROL_CHARS.search(value) or ("\n" in value and key != "stack_trace"):
            raise fail(f"control characters in {key!r}: {value[:80]!r}")
        if key in _IDENTIFIER_KEYS and not value.isidentifier():
            raise fail(f"{key} {value[:80]!r} is not an identifier")
        if key in _ATTR_PATH_KEYS and value and not _ATTR_PATH.fullmatch(value):
            raise fail(f"{key} {value[:80]!r} is not an attribute path")
        if key in ("target", "as_operator") and (
            not _OPERATOR_PATH.fullmatch(value) or "__" in value
        ):
            raise fail(f"unsupported operator {value[:80]!r}")
        if key == "expr_str" and not _is_plain_sympy(value):
            raise fail(f"symbolic expression {value[:80]!r} is not plain sympy")


def _strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a JSON document with the key it sits under (dict keys included)."""
    stack: list[tuple[str, Any]] = [(key, node)]
    while stack:
        key, node = stack.pop()
        if isinstance(node, str):
            yield key, node
        elif isinstance(node, dict):
            for k, v in node.items():
                yield "<key>", k
                stack.append((k, v))
        elif isinstance(node, list):
            stack.extend((key, v) for v in node)


def _is_plain_sympy(text: str) -> bool:
    """Whether ``text`` uses only sympy names, symbol names and numbers (no attributes, no calls out)."""
    if len(text) > 10_000:
        return False
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return False
    for token in tokens:
        kind, value = token.type, token.string
        if kind in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.NUMBER):
            pass
        elif kind == tokenize.STRING:
            if not re.fullmatch(r"'[a-z]{1,3}[0-9]+'", value):
                return False
        elif kind == tokenize.NAME:
            # ``positive=True``: assumption keywords are names followed by "=".
            if not (value in _SYMPY_NAMES or _SYMBOL_NAME.fullmatch(value) or value.isalpha()):
                return False
        elif kind == tokenize.OP:
            if value not in _SYMPY_OPS:
                return False
        else:
            return False
    return _names_are_known(tokens)


def _names_are_known(tokens: list[tokenize.TokenInfo]) -> bool:
    # A bare lowercase word may only be an assumption keyword (``integer=True``).
    for i, token in enumerate(tokens):
        if token.type != tokenize.NAME:
            continue
        if token.string in _SYMPY_NAMES or _SYMBOL_NAME.fullmatch(token.string):
            continue
        next_token = tokens[i + 1] if i + 1 < len(tokens) else None
        if next_token is None or next_token.string != "=":
            return False
    return True


def _allowed_call(target: Any) -> bool:
    from torch._export.serde.serialize import _SYM_OPS

    return (
        isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator))
        or target is operator.getitem
        or target in _SYM_OPS
    )


def _check_graph_calls(root: torch.fx.GraphModule, path: Path) -> None:
    """Every node of every (sub)graph calls an operator; nothing else is callable."""
    for module in root.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op not in ("placeholder", "output", "call_function", "get_attr"):
                raise ModelLoadError(path, ModelFormat.TORCH_EXPORT, f"unsupported node {node}")
            if node.op == "call_function" and not _allowed_call(node.target):
                raise ModelLoadError(
                    path, ModelFormat.TORCH_EXPORT, f"node {node.name} calls {node.target!r}"
                )
            _check_argument((node.args, node.kwargs), node, path)


def _check_argument(value: Any, node: torch.fx.Node, path: Path) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif (
            callable(item)
            and not isinstance(item, (torch.fx.Node, torch.nn.Module))
            and not _allowed_call(item)
        ):
            raise ModelLoadError(
                path, ModelFormat.TORCH_EXPORT, f"node {node.name} passes {item!r}"
            )


# --- saving --------------------------------------------------------------------------------------


def save_model(
    module_or_program: torch.nn.Module | torch.export.ExportedProgram,
    path: Path,
    *,
    format: ModelFormat,
    example_inputs: tuple[torch.Tensor, ...],
    dynamic_shapes: Any = None,
) -> None:
    """Serialise a module (or exported program) in ``format``, atomically and reproducibly.

    TorchScript: a ``ScriptModule`` is saved as is, any other module is traced with
    ``example_inputs``. torch-export: a module is exported with ``example_inputs``
    and ``dynamic_shapes`` (see ``torch.export.export``). Stack traces are dropped
    from exported graphs, and archives are written through memory, so the bytes do
    not depend on where the source or the target file lives. (TorchScript orders a
    module's ``__constants__`` by set iteration, so modules that have them, like
    ``nn.Linear``, give bytes that vary with ``PYTHONHASHSEED``; outputs do not.)
    """
    format = ModelFormat(format)
    buffer = io.BytesIO()
    if format is ModelFormat.TORCHSCRIPT:
        if isinstance(module_or_program, torch.export.ExportedProgram):
            raise TypeError("an ExportedProgram cannot be saved as TorchScript")
        if isinstance(module_or_program, torch.jit.ScriptModule):
            scripted = module_or_program
        else:
            scripted = torch.jit.trace(  # type: ignore[no-untyped-call]
                module_or_program.eval(), example_inputs
            )
        torch.jit.save(scripted, buffer)
    else:
        if isinstance(module_or_program, torch.export.ExportedProgram):
            program = module_or_program
        else:
            program = torch.export.export(
                module_or_program.eval(), example_inputs, dynamic_shapes=dynamic_shapes
            )
        for module in program.graph_module.modules():
            if isinstance(module, torch.fx.GraphModule):
                for node in module.graph.nodes:
                    node.meta.pop("stack_trace", None)
        torch.export.save(program, buffer)
    write_atomically(Path(path), buffer.getbuffer())


# --- sizing --------------------------------------------------------------------------------------


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters, buffers and graph tensor constants.

    Counted per storage, so tied weights and views count once, and a view counts
    its whole storage (what it keeps alive).
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in _module_tensors(module):
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if storage.data_ptr() != 0 and key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _module_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()
    # torch.export keeps lifted constants as plain attributes reached by get_attr nodes.
    for sub in module.modules():
        if isinstance(sub, torch.fx.GraphModule):
            for node in sub.graph.nodes:
                if node.op == "get_attr":
                    value = _get_attr(sub, str(node.target))
                    if isinstance(value, torch.Tensor):
                        yield value


def _get_attr(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value
