"""The prepared Moonshine model (engine/moonshine_graph.py): the merged decoder split in two
computes what the merged one computes, and int8 writes the words float32 writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine.moonshine_graph import split_merged_decoder
from engine.moonshine_model import (
    HEAD_DIM,
    HEADS,
    START_TOKEN,
    ModelFiles,
    ModelLoadError,
    load,
    prepare,
)
from engine.ort_to_onnx import read
from tests.conftest import MODEL_CACHE
from tests.engine.test_moonshine_reuse import audio_of
from tests.speech import SENTENCES, normalize


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def test_the_split_decoder_computes_what_the_merged_one_does() -> None:
    files = ModelFiles.locate("")
    merged_model = read(files.source("decoder_model_merged"))
    first_model, step_model = split_merged_decoder(merged_model)
    merged, first, step = session(merged_model), session(first_model), session(step_model)
    encoder = session(prepare(files, MODEL_CACHE, "float32")["encoder_model"])
    audio = audio_of(SENTENCES[0])[None, :]
    hidden = encoder.run(None, {"input_values": audio})[0]
    ids = np.array([[START_TOKEN, 306, 723]], dtype=np.int64)
    past = [i.name for i in merged.get_inputs() if i.name.startswith("past_key_values.")]
    empty = np.zeros((1, HEADS, 0, HEAD_DIM), dtype=np.float32)
    feeds = {
        "input_ids": ids,
        "encoder_hidden_states": hidden,
        "use_cache_branch": np.array([False]),
    }
    want, *want_cache = merged.run(None, {**feeds, **dict.fromkeys(past, empty)})
    got, *cache = first.run(None, {"input_ids": ids, "encoder_hidden_states": hidden})
    np.testing.assert_allclose(got, want, atol=1e-4)
    for a, b in zip(cache, want_cache, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # One step more, from that cache: the merged graph's cached branch against STEP.
    names = [o.name.replace("present.", "past_key_values.") for o in first.get_outputs()[1:]]
    cached = dict(zip(names, cache, strict=True))
    token = np.array([[76]], dtype=np.int64)
    want = merged.run(
        ["logits"],
        {
            "input_ids": token,
            "encoder_hidden_states": hidden,
            "use_cache_branch": np.array([True]),
            **cached,
        },
    )[0]
    step_inputs = {i.name for i in step.get_inputs()}
    got = step.run(
        ["logits"], {"input_ids": token, **{k: v for k, v in cached.items() if k in step_inputs}}
    )[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    # The step reads only its self-attention cache and what the first pass gave.
    assert step_inputs == {"input_ids", *names}
    assert all(".decoder." in o.name for o in step.get_outputs()[1:])


@pytest.mark.parametrize("text", SENTENCES)
def test_int8_writes_the_words_float32_writes(text: str) -> None:
    audio = audio_of(text)
    int8 = load("", MODEL_CACHE, "int8").transcribe(audio)
    float32 = load("", MODEL_CACHE, "float32").transcribe(audio)
    assert normalize(int8) == normalize(float32) == normalize(text)


def test_a_decoder_that_is_not_merged_is_a_clear_error(tmp_path: Path) -> None:
    """A folder whose decoder is some other graph (here: the encoder) stops the start with the
    file's name, not a failure in the first call."""
    folder = tmp_path / "model"
    folder.mkdir()
    source = ModelFiles.locate("")
    encoder = read(source.source("encoder_model"))
    for part in ("encoder_model", "decoder_model_merged"):
        onnx.save_model(encoder, str(folder / f"{part}.onnx"))
    with pytest.raises(ModelLoadError, match=r"decoder_model_merged\.onnx: not a usable model"):
        prepare(ModelFiles.locate(str(folder)), tmp_path / "cache")
