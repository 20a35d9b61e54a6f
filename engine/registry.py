"""Picks the engine the configuration asks for (`auto`: kyutai with CUDA, else cpu)."""

from __future__ import annotations

from dataclasses import dataclass

from api.config import EngineConfig
from engine.base import Engine


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
        return EngineChoice(config.name, f"engine = {config.name!r} in config")
    if cuda_available():
        return EngineChoice("kyutai", "engine = 'auto' and CUDA is available")
    return EngineChoice("cpu", "engine = 'auto' and no CUDA device: using the CPU engine")


def build_engine(config: EngineConfig) -> tuple[Engine, EngineChoice]:
    choice = choose_engine(config)
    if choice.name == "cpu":
        from engine.cpu import CpuEngine

        engine: Engine = CpuEngine(
            capacity=config.capacity,
            workers=config.workers,
            max_buffer_s=config.max_buffer_s,
            vad_window_s=config.vad_window_s,
            vad_ratio=config.vad_ratio,
            vad_mode=config.vad_mode,
        )
        return engine, choice
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
        )
        return kyutai, choice
    if choice.name == "sink":
        from engine.sink import SinkEngine

        return SinkEngine(capacity=config.capacity, max_buffer_s=config.max_buffer_s), choice
    raise ValueError(f"unknown engine {choice.name!r} (choose auto, cpu, kyutai or sink)")
