"""Random-weight Kyutai STT checkpoints in the Hugging Face repo layout.

Hugging Face is out of reach in tests and on benchmark machines, so tests build a checkpoint
folder with the same files and config keys as `kyutai/stt-1b-en_fr` (config.json,
model.safetensors, the Mimi weights, the sentencepiece model) and load it through the very
loader a hub repo id goes through (`engine.kyutai.load_checkpoint`). `tiny` is a few thousand
parameters and steps in milliseconds; `stt-1b` and `stt-2.6b` have the hub models' dimensions
(from Kyutai's server configs) for benchmarks, where the weights are drawn in memory instead of
written out (`write_weights=False`). See ../shared/protocols/kyutai-stt.md §6.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # read by moshi at import: no inductor here

MIMI_NAME: Final = "mimi-pytorch-random@125.safetensors"
MODEL_NAME: Final = "model.safetensors"
TOKENIZER_NAME: Final = "tokenizer_random.model"
MIMI_CONFIG_NAME: Final = "mimi_config.json"

# Words for the tokenizer: its vocabulary should fill the model's text card, so random tokens
# decode to real pieces.
_CORPUS: Final = (
    "please hold while i transfer you to billing the account number is on your statement "
    "thank you for calling how can i help you today my card was charged twice last month "
    "can you check the balance and the payment date i would like to speak with an agent "
    "your call is important to us one two three four five six seven eight nine ten zero "
    "yes no maybe cancel order delivery address street city phone email password reset "
    "monday tuesday wednesday thursday friday saturday sunday morning evening afternoon "
    "refund invoice contract upgrade network signal router internet television mobile "
)


@dataclass(frozen=True)
class Architecture:
    lm: dict[str, Any]
    mimi: str  # "tiny", or "real": moshi's own Mimi configuration
    tokenizer_vocab: int
    stt_config: dict[str, float]


def _lm(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "card": 2048,
        "n_q": 32,
        "dep_q": 0,
        "delays": [0] * 33,
        "dim": 2048,
        "text_card": 8000,
        "existing_text_padding_id": 3,
        "num_heads": 16,
        "num_layers": 16,
        "hidden_scale": 4.125,
        "causal": True,
        "layer_scale": None,
        "context": 750,
        "max_period": 100000.0,
        "gating": "silu",
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "extra_heads_num_heads": 4,
        "extra_heads_dim": 6,
    }
    base.update(overrides)
    return base


def _tiny_mimi() -> dict[str, Any]:
    from moshi.models import loaders

    seanet = dict(loaders._seanet_kwargs, n_filters=4, dimension=16)  # ratios kept: 1920/frame
    transformer = dict(
        loaders._transformer_kwargs,
        d_model=16,
        num_heads=2,
        num_layers=1,
        dim_feedforward=32,
        input_dimension=16,
        output_dimensions=[16],
    )
    quantizer = {
        "dimension": 8,
        "n_q": 4,
        "bins": 64,
        "input_dimension": 16,
        "output_dimension": 16,
    }
    return dict(loaders._mimi_config, seanet=seanet, transformer=transformer, quantizer=quantizer)


def architecture(name: str, extra_heads: bool = True) -> Architecture:
    """`tiny`, `stt-1b` (kyutai/stt-1b-en_fr) or `stt-2.6b` (kyutai/stt-2.6b-en)."""
    if name == "tiny":
        lm = _lm(
            card=64,
            n_q=4,
            delays=[0] * 5,
            dim=32,
            text_card=128,
            num_heads=2,
            num_layers=2,
            hidden_scale=2.0,
            context=64,
            max_period=10000.0,
        )
        arch = Architecture(
            lm, "tiny", 128, {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0}
        )
    elif name == "stt-1b":
        arch = Architecture(
            _lm(), "real", 8000, {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0}
        )
    elif name == "stt-2.6b":
        lm = _lm(num_heads=32, num_layers=48, context=375, text_card=4000, extra_heads_num_heads=0)
        arch = Architecture(
            lm, "real", 4000, {"audio_delay_seconds": 2.5, "audio_silence_prefix_seconds": 1.0}
        )
    else:
        raise ValueError(f"unknown architecture {name!r} (tiny, stt-1b, stt-2.6b)")
    if not extra_heads:
        arch.lm["extra_heads_num_heads"] = 0
    return arch


def _train_tokenizer(prefix: Path, vocab: int) -> None:
    import sentencepiece

    corpus = prefix.with_suffix(".txt")
    words = _CORPUS.split()
    # Enough distinct text for a large vocabulary: every word, pairs of words, and spellings.
    lines = [_CORPUS] + [f"{a} {b}" for a in words for b in words[:40]]
    corpus.write_text("\n".join(lines) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=3,  # ids 0-3 are never text to a Kyutai model: 0 starts a word, 3 pads
        minloglevel=2,
    )
    corpus.unlink()
    prefix.with_suffix(".vocab").unlink()  # the hub repos ship the .model alone


def write_checkpoint(
    folder: Path,
    arch_name: str = "tiny",
    *,
    extra_heads: bool = True,
    seed: int = 0,
    write_weights: bool = True,
) -> Path:
    """Write a checkpoint folder with the hub repo's files; returns the folder.

    Without `write_weights` only the small files are written (config, Mimi config, tokenizer):
    the model then draws random weights in memory (`KyutaiModel(..., random_weights=True)`).
    """
    import torch
    from moshi.models import loaders
    from safetensors.torch import save_file

    arch = architecture(arch_name, extra_heads)
    folder.mkdir(parents=True, exist_ok=True)
    mimi_config = _tiny_mimi() if arch.mimi == "tiny" else copy.deepcopy(loaders._mimi_config)
    (folder / MIMI_CONFIG_NAME).write_text(json.dumps(mimi_config, indent=2))
    vocab = min(arch.tokenizer_vocab, arch.lm["text_card"])
    if arch_name != "tiny":
        vocab = min(vocab, 600)  # a larger one needs a real corpus; ids above it are skipped
    _train_tokenizer(folder / Path(TOKENIZER_NAME).stem, vocab)
    config = dict(arch.lm)
    config.update(
        model_type="stt",
        moshi_name=MODEL_NAME,
        mimi_name=MIMI_NAME,
        tokenizer_name=TOKENIZER_NAME,
        mimi_config_name=MIMI_CONFIG_NAME,
        lm_gen_config={"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50},
        stt_config=arch.stt_config,
        model_id={"sig": f"random-{arch_name}-{seed}", "epoch": 0},
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if write_weights:
        torch.manual_seed(seed)
        n_q = arch.lm["n_q"]
        mimi = loaders.get_mimi(None, mimi_config, num_codebooks=n_q, device="cpu")
        save_file(mimi.state_dict(), str(folder / MIMI_NAME))
        lm = loaders.get_moshi_lm(None, lm_kwargs=arch.lm, device="cpu", dtype=torch.float32)
        save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(folder / MODEL_NAME))
    return folder
