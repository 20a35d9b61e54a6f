"""The `[engine]` section of the configuration: read by engine/registry.py, composed by api."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    # auto (kyutai with CUDA, else moonshine) | moonshine (alias: cpu) | kyutai | remote | sink
    name: str = "auto"
    model: str = "kyutai/stt-1b-en_fr"  # kyutai: Hugging Face repo id or local folder
    capacity: int = 0  # streams at once; 0 = what the machine keeps real time (measured)
    # remote: engine nodes, "ws://host:port[/path] [health=http://host:health_port]" each
    urls: tuple[str, ...] = ()
    api_key: str = ""  # remote: sent to the nodes as `kyutai-api-key`
    probe_interval_s: float = 2.0  # remote: how often each node's /info (or HTTP) is checked
    max_buffer_s: float = 10.0  # per-stream audio buffer before the oldest audio is dropped
    moonshine_model: str = ""  # moonshine: "" = base-en from the moonshine-cpp wheel, or a folder
    cache_dir: str = ""  # moonshine: the prepared model; "" = <data.dir>/cache
    threads: int = 0  # moonshine: decoding threads; 0 = one per core
    partial_interval_s: float = 1.0  # moonshine: a partial every so much speech; 0 = none
    vad_threshold: float = 0.5  # moonshine: Silero P(speech) that starts an utterance
    min_silence_s: float = 0.5  # moonshine: a pause this long ends an utterance
    max_utterance_s: float = 20.0  # moonshine: longer ones are cut at their quietest point (<= 64)
    batch_size: int = 0  # kyutai: slots stepped together; 0 = the model's (1b: 64, 2.6b: 16)
    device: str = "auto"  # kyutai: auto (cuda when present, bf16) | cuda | cuda:N | cpu (fp32)
    # kyutai: one engine process per entry, each on that device (["cuda:0", "cuda:1"]), every
    # worker's calls spread over them (api/workers.py); () = one, on `device`
    devices: tuple[str, ...] = ()
    model_revision: str = ""  # kyutai: a hub revision (branch, tag, commit); "" = main
    cuda_graphs: bool = True  # kyutai: capture each step as a CUDA graph (CUDA only)
    torch_compile: bool = False  # kyutai: let moshi torch.compile its small kernels
    end_of_turn_threshold: float = 0.5  # kyutai: P(pause) of the VAD head that ends a turn
    end_of_turn_silence_s: float = 1.2  # kyutai without a VAD head, remote: a pause in the words
    # moonshine, kyutai: words every stream's decoder favours, besides the stream's own
    # (engine/keyterms.py limits); env STT_BRIDGE_ENGINE_KEYTERMS comma-separated
    keyterms: tuple[str, ...] = ()
