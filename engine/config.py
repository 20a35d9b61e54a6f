"""The `[engine]` section of the configuration: read by engine/registry.py, composed by api."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from engine import config_checks as check
from engine.keyterms import InvalidKeyterms, check_keyterms

# The engines `name` picks; `cpu` is Moonshine's alias (the CPU engine's name before it).
ENGINE_NAMES: Final = ("auto", "moonshine", "cpu", "kyutai", "remote", "sink")
# moonshine: the model's weight products in int8 or as shipped (engine/moonshine_graph.py).
Precision = Literal["int8", "float32"]
PRECISIONS: Final = ("int8", "float32")
_XDG: Final = {"cache": ("XDG_CACHE_HOME", ".cache"), "data": ("XDG_DATA_HOME", ".local/share")}


def user_dir(kind: Literal["cache", "data"], environ: Mapping[str, str] | None = None) -> Path:
    """This user's stt-bridge folder of that kind (XDG base directories): the prepared model
    and the store are found again wherever the service or the CLI is started from, instead of a
    new `./data` in each working directory."""
    environ = os.environ if environ is None else environ
    variable, fallback = _XDG[kind]
    base = environ.get(variable, "")
    if not os.path.isabs(base):  # the spec: a relative value is invalid and ignored
        base = os.path.join(environ.get("HOME") or os.path.expanduser("~"), fallback)
    return Path(base) / "stt-bridge"


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
    # per-stream audio buffer: WebSocket senders that can wait are slowed at half of it; phone
    # legs drop their oldest audio beyond it
    max_buffer_s: float = 10.0
    moonshine_model: str = ""  # moonshine: "" = base-en from the moonshine-cpp wheel, or a folder
    cache_dir: str = ""  # moonshine: the prepared model; "" = ~/.cache/stt-bridge (XDG)
    threads: int = 0  # moonshine: decoding threads; 0 = one per core
    # moonshine: the model's weight products in int8 (2-3x faster decodes, the same WER
    # on our call-centre sets: engine/moonshine_graph.py) or float32 (the weights as shipped)
    precision: str = "int8"
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

    def model_cache(self) -> Path:
        """Where Moonshine's model is prepared: `cache_dir`, else the user's cache folder."""
        return Path(self.cache_dir) if self.cache_dir else user_dir("cache")

    def __post_init__(self) -> None:
        check.no_negative_numbers("engine", self)
        check.choice("engine.name", self.name, ENGINE_NAMES)
        check.choice("engine.precision", self.precision, PRECISIONS)
        check.device("engine.device", self.device)
        for device in self.devices:
            check.device("engine.devices", device, auto=False)
        check.between("engine.vad_threshold", self.vad_threshold, 0.0, 1.0)
        check.between("engine.end_of_turn_threshold", self.end_of_turn_threshold, 0.0, 1.0)
        for name in ("max_buffer_s", "probe_interval_s", "min_silence_s", "max_utterance_s"):
            check.positive(f"engine.{name}", getattr(self, name))
        if self.name == "remote" and not self.urls:
            raise check.fail("engine.urls", self.urls, "the remote engine needs at least one node")
        try:
            check_keyterms(self.keyterms)
        except InvalidKeyterms as exc:  # the config loader names the setting and its source
            raise ValueError(f"engine.keyterms: {exc}") from None
