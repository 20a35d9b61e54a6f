"""The example configurations in configs/ load, and say what their comments say."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_every_example_config_loads(name: str) -> None:
    load_config(CONFIGS / name, environ={})


def test_gpu_configs_choose_the_kyutai_engine_on_cuda() -> None:
    one_b = load_config(CONFIGS / "gpu-1b.toml", environ={}).engine
    assert (one_b.name, one_b.device, one_b.batch_size) == ("kyutai", "cuda", 64)
    assert one_b.model == "kyutai/stt-1b-en_fr-candle"
    big = load_config(CONFIGS / "gpu-2.6b.toml", environ={}).engine
    assert (big.name, big.model, big.batch_size) == ("kyutai", "kyutai/stt-2.6b-en", 16)
    # The environment still wins over the file.
    env = {"STT_BRIDGE_ENGINE_BATCH_SIZE": "32", "STT_MODEL": "/models/stt-1b"}
    tuned = load_config(CONFIGS / "gpu-1b.toml", environ=env).engine
    assert (tuned.batch_size, tuned.model) == (32, "/models/stt-1b")
