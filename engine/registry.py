"""Picks the engine the configuration asks for (`auto`: kyutai with CUDA, else moonshine)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.base import Engine
from engine.config import ENGINE_NAMES, EngineConfig

ALIASES = {"cpu": "moonshine"}  # the CPU engine's name before Moonshine replaced PocketSphinx


@dataclass(frozen=True)
class EngineChoice:
    name: str
    reason: str


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_engine(config: EngineConfig) -> EngineChoice:
    if config.name != "auto":
        name = ALIASES.get(config.name, config.name)
        return EngineChoice(name, f"engine = {config.name!r} in config")
    if cuda_available():
        return EngineChoice("kyutai", "engine = 'auto' and CUDA is available")
    return EngineChoice("moonshine", "engine = 'auto' and no CUDA device: Moonshine on the CPU")


def build_engine(config: EngineConfig) -> tuple[Engine, EngineChoice]:
    """The engine, not started."""
    choice = choose_engine(config)
    if choice.name == "moonshine":
        from engine.endpointing import EndpointConfig
        from engine.moonshine import MoonshineEngine

        moonshine = MoonshineEngine(
            model=config.moonshine_model,
            cache_dir=config.model_cache(),
            capacity=config.capacity,
            threads=config.threads,
            precision="float32" if config.precision == "float32" else "int8",
            max_buffer_s=config.max_buffer_s,
            partial_interval_s=config.partial_interval_s,
            endpoint=EndpointConfig(
                threshold=config.vad_threshold,
                min_silence_s=config.min_silence_s,
                max_utterance_s=min(config.max_utterance_s, 64.0),
            ),
            keyterms=config.keyterms,
        )
        return moonshine, choice
    if choice.name == "kyutai":
        from engine.kyutai import KyutaiEngine

        kyutai = KyutaiEngine(
            config.model,
            revision=config.model_revision,
            batch_size=config.batch_size,
            device=config.device,
            cuda_graphs=config.cuda_graphs,
            torch_compile=config.torch_compile,
            max_buffer_s=config.max_buffer_s,
            end_of_turn_threshold=config.end_of_turn_threshold,
            end_of_turn_silence_s=config.end_of_turn_silence_s,
            keyterms=config.keyterms,
        )
        return kyutai, choice
    if choice.name == "remote":
        from engine.remote import DEFAULT_NODE_CAPACITY, RemoteEngine

        remote = RemoteEngine(
            config.urls,
            api_key=config.api_key,
            max_buffer_s=config.max_buffer_s,
            end_of_turn_silence_s=config.end_of_turn_silence_s,
            probe_interval_s=config.probe_interval_s,
            node_capacity=config.capacity or DEFAULT_NODE_CAPACITY,
        )
        return remote, choice
    if choice.name == "sink":
        from engine.sink import SinkEngine

        capacity = config.capacity or 1000
        return SinkEngine(capacity=capacity, max_buffer_s=config.max_buffer_s), choice
    raise ValueError(f"unknown engine {choice.name!r} (choose {', '.join(ENGINE_NAMES)})")
