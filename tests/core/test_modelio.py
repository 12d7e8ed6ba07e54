"""Loading model artifacts: round trips, corrupt files, and archives that try to run code."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gpufaas.core.api import ModelFormat
from gpufaas.core.modelio import ModelLoadError, load_model, save_model, tensor_bytes

pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)

TS = ModelFormat.TORCHSCRIPT
EXPORT = ModelFormat.TORCH_EXPORT


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.full((3,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(h) * self.scale


class _Payload:
    """Unpickling this creates ``marker``: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.makedirs, (self.marker,))


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return _Net().eval()


def _example() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[ModelFormat, Path]:
    out = tmp_path_factory.mktemp("artifacts")
    batch = torch.export.Dim("batch", min=1, max=64)
    save_model(_net(), out / "net.pt", format=TS, example_inputs=_example())
    save_model(
        _net(),
        out / "net.pt2",
        format=EXPORT,
        example_inputs=_example(),
        dynamic_shapes=({0: batch},),
    )
    return {TS: out / "net.pt", EXPORT: out / "net.pt2"}


def _malicious_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.ones(2), "payload": _Payload(marker)}, buffer)
    return buffer.getvalue()


def _rewrite(
    archive: Path,
    out: Path,
    *,
    edit: Callable[[str, bytes], bytes | None] = lambda name, data: data,
    add: dict[str, bytes] | None = None,
) -> Path:
    """Copy a zip archive, editing records by their name below the root (None drops one)."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for info in src.infolist():
            name = info.filename[len(root) + 1 :]
            data = edit(name, src.read(info))
            if data is not None:
                dst.writestr(info.filename, data)
        for name, data in (add or {}).items():
            dst.writestr(f"{root}/{name}", data)
    return out


def _edit_json(name: str, change: Callable[[Any], None]) -> Callable[[str, bytes], bytes]:
    def edit(record: str, data: bytes) -> bytes:
        if record != name:
            return data
        document = json.loads(data)
        change(document)
        return json.dumps(document).encode()

    return edit


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [TS, EXPORT])
def test_round_trip_gives_the_same_outputs(
    artifacts: dict[ModelFormat, Path], fmt: ModelFormat
) -> None:
    loaded = load_model(artifacts[fmt], format=fmt)
    x = torch.randn(5, 3, 8, 8)  # another batch size than the example
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), _net()(x))


@pytest.mark.parametrize("fmt", [TS, EXPORT])
def test_loaded_modules_accept_eval(artifacts: dict[ModelFormat, Path], fmt: ModelFormat) -> None:
    # Callers put every module in eval mode; torch.export's own modules refuse that.
    loaded = load_model(artifacts[fmt], format=fmt)
    assert loaded.eval() is loaded
    assert not loaded.training
    if fmt is EXPORT:  # its graph cannot follow a switch to training mode
        with pytest.raises(NotImplementedError):
            loaded.train()


@pytest.mark.parametrize("fmt", [TS, EXPORT])
def test_tensor_bytes_counts_parameters_and_buffers(
    artifacts: dict[ModelFormat, Path], fmt: ModelFormat
) -> None:
    net = _net()
    expected = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    assert tensor_bytes(net) == expected
    assert tensor_bytes(load_model(artifacts[fmt], format=fmt)) == expected


def test_tensor_bytes_counts_tied_weights_once() -> None:
    embed = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    assert tensor_bytes(torch.nn.ModuleList([embed, head])) == 10 * 4 * 4


@pytest.mark.parametrize("fmt", [TS, EXPORT])
def test_saving_twice_gives_identical_bytes(tmp_path: Path, fmt: ModelFormat) -> None:
    # Scripted, not traced: each trace defines new TorchScript types (name-mangled).
    paths = [tmp_path / "a" / "model.bin", tmp_path / "b" / "other-name.bin"]
    for path in paths:
        net = torch.jit.script(_net()) if fmt is TS else _net()
        save_model(net, path, format=fmt, example_inputs=_example())
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


# --- bad files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [TS, EXPORT])
def test_missing_file(tmp_path: Path, fmt: ModelFormat) -> None:
    with pytest.raises(ModelLoadError, match="file not found") as info:
        load_model(tmp_path / "absent.pt", format=fmt)
    assert str(tmp_path / "absent.pt") in str(info.value)
    assert fmt.value in str(info.value)


@pytest.mark.parametrize("fmt", [TS, EXPORT])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.9])
def test_truncated_file(
    artifacts: dict[ModelFormat, Path], tmp_path: Path, fmt: ModelFormat, fraction: float
) -> None:
    data = artifacts[fmt].read_bytes()
    bad = tmp_path / "truncated"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError, match=r"cannot load .*truncated"):
        load_model(bad, format=fmt)


@pytest.mark.parametrize("fmt", [TS, EXPORT])
def test_garbage_file(tmp_path: Path, fmt: ModelFormat) -> None:
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="not a zip archive"):
        load_model(bad, format=fmt)


def test_corrupt_record_inside_the_archive(
    artifacts: dict[ModelFormat, Path], tmp_path: Path
) -> None:
    def scramble(name: str, data: bytes) -> bytes:
        return b"{not json" if name == "models/model.json" else data

    bad = _rewrite(artifacts[EXPORT], tmp_path / "bad.pt2", edit=scramble)
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(bad, format=EXPORT)


@pytest.mark.parametrize(("saved", "asked"), [(TS, EXPORT), (EXPORT, TS)])
def test_wrong_format(
    artifacts: dict[ModelFormat, Path], saved: ModelFormat, asked: ModelFormat
) -> None:
    with pytest.raises(
        ModelLoadError, match=f"not a {'TorchScript' if asked is TS else 'torch.export'}"
    ):
        load_model(artifacts[saved], format=asked)


# --- archives that try to run code ---------------------------------------------------------------


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: the payload used below really runs when unpickled without restrictions."""
    marker = tmp_path / "ran"
    torch.load(io.BytesIO(_malicious_pickle(marker)), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fmt", [TS, EXPORT])
@pytest.mark.parametrize("zipped", [True, False])
def test_torch_save_pickle_is_rejected(tmp_path: Path, fmt: ModelFormat, zipped: bool) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    if zipped:
        path.write_bytes(_malicious_pickle(marker))
    else:
        with path.open("wb") as f:
            torch.save(_Payload(marker), f, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelLoadError):
        load_model(path, format=fmt)
    assert not marker.exists()


def test_plain_pickle_is_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    for fmt in (TS, EXPORT):
        with pytest.raises(ModelLoadError):
            load_model(path, format=fmt)
    assert not marker.exists()


def test_torchscript_with_pickled_code_in_data_pkl(
    artifacts: dict[ModelFormat, Path], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"

    def poison(name: str, data: bytes) -> bytes:
        return pickle.dumps(_Payload(marker), protocol=2) if name == "data.pkl" else data

    evil = _rewrite(artifacts[TS], tmp_path / "evil.pt", edit=poison)
    with pytest.raises(ModelLoadError, match="corrupt TorchScript archive"):
        load_model(evil, format=TS)
    assert not marker.exists()


def test_export_sample_inputs_pickle_is_rejected(
    artifacts: dict[ModelFormat, Path], tmp_path: Path
) -> None:
    # torch.export.load retries these with weights_only=False: this would run.
    marker = tmp_path / "ran"

    def poison(name: str, data: bytes) -> bytes:
        return _malicious_pickle(marker) if name.startswith("data/sample_inputs/") else data

    evil = _rewrite(artifacts[EXPORT], tmp_path / "evil.pt2", edit=poison)
    with pytest.raises(ModelLoadError, match=r"sample_inputs.* other than tensors"):
        load_model(evil, format=EXPORT)
    assert not marker.exists()


def test_export_pickled_weight_is_rejected(
    artifacts: dict[ModelFormat, Path], tmp_path: Path
) -> None:
    # torch.export.load unpickles use_pickle weights with weights_only=False.
    marker = tmp_path / "ran"

    def use_pickle(config: Any) -> None:
        for meta in config["config"].values():
            meta["use_pickle"] = True

    edit_config = _edit_json("data/weights/model_weights_config.json", use_pickle)

    def poison(name: str, data: bytes) -> bytes:
        return (
            _malicious_pickle(marker)
            if name.startswith("data/weights/weight_")
            else edit_config(name, data)
        )

    evil = _rewrite(artifacts[EXPORT], tmp_path / "evil.pt2", edit=poison)
    with pytest.raises(ModelLoadError, match="pickled payload"):
        load_model(evil, format=EXPORT)
    assert not marker.exists()


@pytest.mark.parametrize(
    "entry",
    [
        "data/constants/opaque_obj_0",  # pickle.loads
        "data/constants/custom_obj_0",  # torchbind objects
        "data/weights/model.pt",  # legacy weights: weights_only=False fallback
        "data/aotinductor/model/model.so",  # dlopen-ed
        "serialized_state_dict.pt",  # the pre-2.8 layout
    ],
)
def test_export_entries_that_load_code_are_rejected(
    artifacts: dict[ModelFormat, Path], tmp_path: Path, entry: str
) -> None:
    marker = tmp_path / "ran"
    evil = _rewrite(
        artifacts[EXPORT], tmp_path / "evil.pt2", add={entry: _malicious_pickle(marker)}
    )
    with pytest.raises(ModelLoadError, match="unsupported archive entry"):
        load_model(evil, format=EXPORT)
    assert not marker.exists()


def test_export_entries_outside_the_root_are_rejected(
    artifacts: dict[ModelFormat, Path], tmp_path: Path
) -> None:
    evil = tmp_path / "evil.pt2"
    evil.write_bytes(artifacts[EXPORT].read_bytes())
    with zipfile.ZipFile(evil, "a") as archive:
        archive.writestr("version", b"0")
    with pytest.raises(ModelLoadError, match="outside its root"):
        load_model(evil, format=EXPORT)


def test_export_symbolic_expression_with_code_is_rejected(
    artifacts: dict[ModelFormat, Path], tmp_path: Path
) -> None:
    # torch parses expr_str with sympy.sympify, which evaluates Python.
    marker = tmp_path / "ran"
    code = f"__import__('os').makedirs({str(marker)!r})"

    def inject(document: Any) -> None:
        hits = [d for d in _walk(document) if "expr_str" in d]
        assert hits, "the exported graph has symbolic shapes"
        for d in hits:
            d["expr_str"] = code

    edit = _edit_json("models/model.json", inject)
    evil = _rewrite(artifacts[EXPORT], tmp_path / "evil.pt2", edit=edit)
    with pytest.raises(ModelLoadError, match="not plain sympy"):
        load_model(evil, format=EXPORT)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("name", "x=__import__('os').getpid()", "not an identifier"),
        ("parameter_name", 'w"); import os; ("', "not an attribute path"),
        ("stack_trace", 'File "a.py", line 1, in f\n    x\rimport os', "control characters"),
    ],
)
def test_export_names_that_reach_generated_code_are_rejected(
    artifacts: dict[ModelFormat, Path], tmp_path: Path, key: str, value: str, error: str
) -> None:
    def inject(document: Any) -> None:
        hits = [d for d in _walk(document) if isinstance(d.get(key), str)]
        if not hits:  # stack traces are stripped on save: put one back
            hits = [d["metadata"] for d in _walk(document) if isinstance(d.get("metadata"), dict)]
        for d in hits:
            d[key] = value

    edit = _edit_json("models/model.json", inject)
    evil = _rewrite(artifacts[EXPORT], tmp_path / "evil.pt2", edit=edit)
    with pytest.raises(ModelLoadError, match=error):
        load_model(evil, format=EXPORT)


def test_export_graph_calling_a_python_function_is_rejected(
    artifacts: dict[ModelFormat, Path], tmp_path: Path
) -> None:
    # torch resolves targets as any attribute path under torch: torch.os is the os module.
    def retarget(document: Any) -> None:
        nodes = [d for d in _walk(document) if d.get("target") == "torch.ops.aten.relu.default"]
        assert nodes
        nodes[0]["target"] = "torch.os.getpid"

    edit = _edit_json("models/model.json", retarget)
    evil = _rewrite(artifacts[EXPORT], tmp_path / "evil.pt2", edit=edit)
    with pytest.raises(ModelLoadError, match="getpid"):
        load_model(evil, format=EXPORT)


def test_rewritten_but_harmless_archive_still_loads(
    artifacts: dict[ModelFormat, Path], tmp_path: Path
) -> None:
    """Control for the tests above: rewriting the zip by itself does not break loading."""
    copy = _rewrite(artifacts[EXPORT], tmp_path / "copy.pt2")
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(load_model(copy, format=EXPORT)(x), _net()(x))


def test_error_survives_pickling() -> None:
    # Errors cross process boundaries (worker pools); their fields must come along.
    error = pickle.loads(pickle.dumps(ModelLoadError("/m.pt", TS, "corrupt")))
    assert (error.path, error.format, error.reason) == (Path("/m.pt"), TS, "corrupt")
    assert str(error) == "cannot load /m.pt as torchscript: corrupt"
