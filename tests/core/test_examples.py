"""The example models: built once, reproducibly, and MiniLM really encodes meaning."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpufaas.core import examples
from gpufaas.core.api import ModelFormat
from gpufaas.core.examples import (
    EXAMPLES,
    build_examples,
    default_models_dir,
    example_inputs,
    load_minilm,
    minilm_source_dir,
    model_filename,
)
from gpufaas.core.modelio import load_model

pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)

FORMATS = {
    "tiny-mlp": ModelFormat.TORCHSCRIPT,
    "small-cnn": ModelFormat.TORCH_EXPORT,
    "minilm": ModelFormat.TORCHSCRIPT,
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(name: str, path: Path, batch: int) -> torch.Tensor:
    module = load_model(path, format=FORMATS[name])
    inputs = [torch.from_numpy(a) for a in example_inputs(name, batch=batch).values()]
    with torch.inference_mode():
        output = module(*inputs)
    assert isinstance(output, torch.Tensor)
    return output


def test_all_examples_are_built(example_models: dict[str, Path]) -> None:
    assert set(example_models) == set(EXAMPLES)
    for name, path in example_models.items():
        assert path.name == model_filename(name)
        assert path.suffix == (".pt2" if FORMATS[name] is ModelFormat.TORCH_EXPORT else ".pt")
        assert path.stat().st_size > 0
    assert not [
        p for p in next(iter(example_models.values())).parent.iterdir() if p.suffix == ".tmp"
    ]


@pytest.mark.parametrize("name", EXAMPLES)
def test_models_run_with_any_batch_size(example_models: dict[str, Path], name: str) -> None:
    for batch in (1, 5):
        output = _run(name, example_models[name], batch)
        assert output.shape[0] == batch
        assert torch.isfinite(output).all()


def test_rebuilding_gives_identical_files(example_models: dict[str, Path], tmp_path: Path) -> None:
    again = build_examples(tmp_path, names=("tiny-mlp", "small-cnn"), progress=False)
    for name, path in again.items():
        assert _sha(path) == _sha(example_models[name]), name
        assert torch.equal(_run(name, path, 3), _run(name, example_models[name], 3))


def test_another_process_builds_identical_files(
    example_models: dict[str, Path], tmp_path: Path
) -> None:
    # A fresh interpreter with another hash seed: nothing may depend on set order or state.
    # (tiny-mlp stands for minilm too: both are scripted from the same constant-free layers.)
    names = ("tiny-mlp", "small-cnn")
    script = (
        "import sys; from gpufaas.core.examples import build_examples as b; "
        "b(sys.argv[1], names=sys.argv[2:], progress=False)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    command = [sys.executable, "-c", script, str(tmp_path), *names]
    subprocess.run(command, env=env, check=True, timeout=240)
    for name in names:
        assert _sha(tmp_path / model_filename(name)) == _sha(example_models[name]), name


def test_build_skips_existing_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[Path] = []
    real_save = examples.save_model

    def counting_save(module: torch.nn.Module, path: Path, **kwargs: object) -> None:
        saved.append(path)
        real_save(module, path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(examples, "save_model", counting_save)
    first = build_examples(tmp_path, names=("tiny-mlp",), progress=False)
    before = first["tiny-mlp"].stat()
    assert saved == [tmp_path / "tiny-mlp.pt"]

    assert build_examples(tmp_path, names=("tiny-mlp",), progress=False) == first
    assert len(saved) == 1
    after = first["tiny-mlp"].stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    build_examples(tmp_path, names=("tiny-mlp",), progress=False, force=True)
    assert len(saved) == 2
    assert first["tiny-mlp"].stat().st_ino != before.st_ino  # replaced by rename


def test_build_shows_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_examples(tmp_path, names=("tiny-mlp",), progress=True)
    assert "example models" in capsys.readouterr().err
    build_examples(tmp_path / "quiet", names=("tiny-mlp",), progress=False)
    assert capsys.readouterr().err == ""


def test_build_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(7)
    state = torch.get_rng_state()
    build_examples(tmp_path, names=("tiny-mlp", "small-cnn"), progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_unknown_example(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown example 'resnet'"):
        build_examples(tmp_path, names=("resnet",), progress=False)
    with pytest.raises(ValueError, match="unknown example"):
        example_inputs("resnet")


def test_default_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GPUFAAS_HOME", str(tmp_path))
    assert default_models_dir() == tmp_path / "models"
    monkeypatch.delenv("GPUFAAS_HOME")
    assert default_models_dir() == Path.home() / ".cache" / "gpufaas" / "models"


# --- example_inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tiny-mlp", {"x": (np.float32, (4, 16))}),
        ("small-cnn", {"image": (np.float32, (4, 3, 32, 32))}),
        ("minilm", {"input_ids": (np.int64, (4, 16)), "attention_mask": (np.int64, (4, 16))}),
    ],
)
def test_example_inputs(name: str, expected: dict[str, tuple[type, tuple[int, ...]]]) -> None:
    inputs = example_inputs(name, batch=4)
    assert {k: (v.dtype.type, v.shape) for k, v in inputs.items()} == expected
    again = example_inputs(name, batch=4)
    other = example_inputs(name, batch=4, seed=1)
    for key in inputs:
        np.testing.assert_array_equal(inputs[key], again[key])
        assert not np.array_equal(inputs[key], other[key]) or key == "attention_mask"


def test_example_inputs_reject_empty_batch() -> None:
    with pytest.raises(ValueError, match="batch must be at least 1"):
        example_inputs("tiny-mlp", batch=0)


def test_minilm_example_tokens_are_framed_and_masked() -> None:
    inputs = example_inputs("minilm", batch=4)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for row in range(4):
        used = int(mask[row].sum())
        assert ids[row, 0] == 101 and ids[row, used - 1] == 102  # [CLS] ... [SEP]
        assert (ids[row, used:] == 0).all() and (mask[row, :used] == 1).all()
    assert len({int(m.sum()) for m in mask}) > 1  # some rows are padded


# --- minilm is the real sentence encoder ---------------------------------------------------------


@pytest.fixture(scope="module")
def encode(example_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_source_dir() / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch
    model = load_model(example_models["minilm"], format=ModelFormat.TORCHSCRIPT)

    def run(sentences: list[str], module: torch.nn.Module = model) -> torch.Tensor:
        batch = tokenizer.encode_batch(sentences)
        ids = torch.tensor([e.ids for e in batch])
        mask = torch.tensor([e.attention_mask for e in batch])
        with torch.inference_mode():
            out: torch.Tensor = module(ids, mask)
        return out

    return run


def test_minilm_embeddings_carry_meaning(encode) -> None:  # type: ignore[no-untyped-def]
    food, bread, baby = encode(
        [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The girl is carrying a baby.",
        ]
    )
    assert food.shape == (384,)
    torch.testing.assert_close(food.norm(), torch.tensor(1.0))
    similar, unrelated = float(food @ bread), float(food @ baby)
    assert similar > unrelated + 0.3
    # sentence-transformers reports 0.7553 for this pair with all-MiniLM-L6-v2.
    assert similar == pytest.approx(0.7553, abs=0.01)


def test_minilm_padding_does_not_change_embeddings(encode) -> None:  # type: ignore[no-untyped-def]
    short, long = "A dog.", "A man is riding a white horse on an enclosed ground."
    alone = encode([short])[0]
    padded = encode([short, long])[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)


def test_minilm_export_matches_the_eager_module(encode) -> None:  # type: ignore[no-untyped-def]
    sentences = ["Exported models must match.", "Der schnelle braune Fuchs.", "ok"]
    torch.testing.assert_close(encode(sentences), encode(sentences, load_minilm()))
