"""Moonshine base (English) on onnxruntime: the model files, their one-time preparation, decoding.

The weights ship inside the `moonshine-cpp` wheel (MIT) as `.ort` files; its own native library
is not used (../shared/protocols/moonshine.md: slow, 2.5 GB, leaks). On first start the `.ort`
files are prepared once in a cache folder (`engine.cache_dir`): converted to `.onnx`, which makes
decoding 5.6x faster, the decoder split in two and, in `int8`, quantized (engine/moonshine_graph.py)
for 3x more; later starts reuse them. A folder of the same layout (`encoder_model.ort|.onnx`,
`decoder_model_merged.ort|.onnx`, `tokenizer.bin`) can be given instead of the wheel's.

The model takes raw 16 kHz float audio (no mel front end), encodes it, then a decoder with a
KV cache writes tokens greedily until the end token: cased, punctuated text, numbers as digits,
no timestamps. One `MoonshineModel` per process: onnxruntime sessions run concurrently from
many threads, each `run` releasing the GIL, so every stream shares one copy of the weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.resources
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from engine.confidence import word_confidences
from engine.config import Precision
from engine.keyterm_bias import KeytermBias, KeytermIndex

log = logging.getLogger(__name__)

SAMPLE_RATE: Final = 16000
MAX_AUDIO_S: Final = 64.0  # the longest input the model was trained for
START_TOKEN: Final = 1
END_TOKEN: Final = 2
TOKENS_PER_S: Final = 6.5  # at most this many tokens per second of audio (+ 10), as upstream
SPACE: Final = "\u2581"
LAYERS: Final = 8
HEADS: Final = 8
HEAD_DIM: Final = 52
PARTS: Final = ("encoder_model", "decoder_model_merged")  # what a model folder holds
FIRST: Final = "decoder_first"  # the decoder's first pass: START and a draft over the audio
STEP: Final = "decoder_step"  # the decoder's step: one token more, with the cache
PREPARED: Final = ("encoder_model", FIRST, STEP)  # what `prepare` writes and the model loads
PREPARATION: Final = 4  # the version of `prepare`'s output: a new one prepares again
FIRST_TEXT_TOKEN: Final = 259  # 0-2 special, 3-258 the bytes: never keyterm spellings
KEYTERM_INDEXES_KEPT: Final = 64  # keyterm lists whose prefix trees are kept for reuse

FloatAudio = npt.NDArray[np.float32]
Cache = dict[str, npt.NDArray[np.float32]]  # the decoder's KV cache by input name


@dataclass(frozen=True)
class Transcript:
    """A decode: its text, the tokens that wrote it and the model's probability of each."""

    text: str
    pieces: tuple[str, ...]  # "".join(pieces).strip() == text
    probabilities: tuple[float, ...]
    # Every token the decoder wrote (before the end token): the draft of the next decode of
    # the same utterance once it has grown (`MoonshineModel.decode`).
    tokens: tuple[int, ...] = ()

    def word_confidences(self) -> list[float]:
        """One per word of `text.split()` (engine/confidence.py)."""
        return word_confidences(self.pieces, self.probabilities)


class ModelLoadError(RuntimeError):
    """The model cannot be prepared or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelFiles:
    """Where the model's files are, and what they are called in `/info`."""

    folder: Path
    name: str

    @classmethod
    def locate(cls, model: str) -> ModelFiles:
        """`model`: "" (or "moonshine/base-en") for the wheel's base-en, else a local folder."""
        if model and model not in ("moonshine/base-en", "base-en"):
            folder = Path(model).expanduser()
            if not folder.is_dir():
                raise ModelLoadError(f"engine.model {model!r}: no such folder")
            return cls(folder, str(folder))
        try:
            root = importlib.resources.files("moonshine_cpp")
        except ModuleNotFoundError:
            raise ModelLoadError(
                "the Moonshine model ships in the moonshine-cpp wheel, which is not installed: "
                "pip install moonshine-cpp==0.1.4"
            ) from None
        folder = Path(str(root)) / "models" / "base-en"
        return cls(folder, "moonshine base-en (moonshine-cpp wheel)")

    def source(self, part: str) -> Path:
        for suffix in (".onnx", ".ort"):
            path = self.folder / f"{part}{suffix}"
            if path.is_file():
                return path
        raise ModelLoadError(f"{self.folder}: {part}.ort or {part}.onnx is missing")


def prepare(files: ModelFiles, cache_dir: Path, precision: Precision = "int8") -> dict[str, Path]:
    """The `.onnx` file of each of `PREPARED`, made once into `cache_dir`: the encoder as it
    is, the merged decoder split in two and, for `int8`, quantized (engine/moonshine_graph.py).

    A manifest beside the prepared files holds their digests: a file that was cut short or
    altered is prepared again, never loaded.
    """
    sources = {part: files.source(part) for part in PARTS}
    key = hashlib.sha256(
        "|".join(
            [
                f"v{PREPARATION}:{precision}",
                *(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources.values()),
            ]
        ).encode()
    ).hexdigest()[:16]
    target = cache_dir / f"moonshine-{key}"
    manifest = target / "manifest.json"
    out = {part: target / f"{part}.onnx" for part in PREPARED}
    if _manifest_holds(manifest, out):
        return out
    try:
        target.mkdir(parents=True, exist_ok=True)
        lock = (target / ".lock").open("a")  # opening it for writing also proves we may write
    except OSError as exc:
        raise ModelLoadError(
            f"engine.cache_dir {cache_dir}: cannot write the prepared model there ({exc}); "
            "set engine.cache_dir (STT_BRIDGE_ENGINE_CACHE_DIR) to a writable folder"
        ) from None
    with lock:
        # Several processes may start at once on a new machine (workers, a test run): one
        # prepares, the others wait and then find its manifest.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _manifest_holds(manifest, out):
            log.info("preparing the Moonshine model once (%s) in %s", precision, target)
            began = time.monotonic()
            _prepare_all(sources, out, precision)
            manifest.write_text(json.dumps({p.name: _digest(p) for p in out.values()}))
            log.info("Moonshine model prepared in %.1f s", time.monotonic() - began)
    return out


def _prepare_all(sources: dict[str, Path], out: dict[str, Path], precision: Precision) -> None:
    import onnx
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

    from engine.moonshine_graph import (
        GraphError,
        save_decoder,
        save_encoder,
        split_merged_decoder,
    )
    from engine.ort_to_onnx import OrtFormatError, read

    def model(path: Path) -> onnx.ModelProto:
        return read(path) if path.suffix == ".ort" else onnx.load_model(str(path))

    for part, source in sources.items():
        try:
            graph = model(source)
            if part == "encoder_model":
                save_encoder(graph, out[part], precision)
            else:
                first, step = split_merged_decoder(graph)
                save_decoder(first, out[FIRST], precision)
                save_decoder(step, out[STEP], precision)
        except (OrtFormatError, GraphError, DecodeError, ValueError, OSError) as exc:
            raise ModelLoadError(f"{source}: not a usable model file ({exc})") from None


def _manifest_holds(manifest: Path, out: dict[str, Path]) -> bool:
    # By file name, not path: a cache prepared in one place and mounted in another (an image
    # built with it, a volume) holds as it is.
    try:
        digests = json.loads(manifest.read_text())
        return all(digests.get(p.name) == _digest(p) for p in out.values())
    except (OSError, ValueError):
        return False


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def token_probability(logits: npt.NDArray[np.float32], token: int) -> float:
    """Softmax probability of `token` (numerically stable)."""
    shifted = np.exp(logits - logits.max())
    return float(shifted[token] / shifted.sum())


def read_tokenizer(path: Path) -> list[str]:
    """`tokenizer.bin`: one length-prefixed byte string per token id (a 7-bit varint length)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the tokenizer ({exc})") from None
    tokens: list[str] = []
    i = 0
    while i < len(data):
        length, shift = 0, 0
        while True:
            if i >= len(data):
                raise ModelLoadError(f"{path}: the tokenizer is cut short")
            byte = data[i]
            i += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        tokens.append(data[i : i + length].decode("utf-8", "replace").replace(SPACE, " "))
        i += length
    if len(tokens) < 1000:
        raise ModelLoadError(f"{path}: not a Moonshine tokenizer ({len(tokens)} tokens)")
    return tokens


class MoonshineModel:
    """The loaded model: `transcribe(audio)` from any thread, concurrently."""

    def __init__(
        self, paths: dict[str, Path], tokenizer: list[str], name: str, exact_drafts: bool = True
    ) -> None:
        import onnxruntime as ort

        self.name = name
        # Whether a decode that reads a draft always gives the tokens of one without (float32),
        # or only nearly always (int8: engine/moonshine_graph.py `quantize_int8`).
        self.exact_drafts = exact_drafts
        self._tokens = tokenizer
        options = ort.SessionOptions()
        # One core per decode: concurrency comes from decoding several utterances at once.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._encoder, self._first, self._step_session = (
                ort.InferenceSession(str(paths[part]), options, providers=["CPUExecutionProvider"])
                for part in PREPARED
            )
        except Exception as exc:  # onnxruntime raises its own types for a bad file
            raise ModelLoadError(f"cannot load the Moonshine model: {exc}") from None
        # The first pass gives the whole cache; a step, only its self-attention part.
        present = [o.name for o in self._first.get_outputs()[1:]]
        self._cache_names = [name.replace("present.", "past_key_values.") for name in present]
        self._step_outputs = ["logits", *(name for name in present if ".decoder." in name)]
        self._self_attention_names = [
            name.replace("present.", "past_key_values.") for name in self._step_outputs[1:]
        ]
        self._indexes: dict[tuple[str, ...], KeytermIndex] = {}
        self._indexes_lock = threading.Lock()

    def transcribe(self, audio: FloatAudio) -> str:
        """Text of 16 kHz float audio in [-1, 1] (at most `MAX_AUDIO_S`); "" for no speech."""
        return self.decode(audio).text

    def decode(
        self,
        audio: FloatAudio,
        keyterms: KeytermIndex | None = None,
        draft: Sequence[int] = (),
    ) -> Transcript:
        """`transcribe` with each token's probability and, given `keyterms`, biased towards
        them (engine/keyterm_bias.py).

        `draft`: tokens this audio probably starts with (the last decode of the same utterance,
        shorter then). The decoder reads them all in one pass and keeps them for as long as
        each is the token it would have chosen there itself, then goes on one token at a time
        from the first it would not: the same tokens as without a draft, while a partial or
        final that repeats the words before it costs one pass instead of a step per token.
        """
        if len(audio) < SAMPLE_RATE // 10:
            audio = np.pad(audio, (0, SAMPLE_RATE // 10 - len(audio)))
        bias = KeytermBias(keyterms) if keyterms else None
        limit = int(len(audio) / SAMPLE_RATE * TOKENS_PER_S) + 10
        draft = list(draft[: limit - 1])
        tokens: list[int] = []
        probabilities: list[float] = []

        def choose(row: npt.NDArray[np.float32]) -> int:
            token = bias.choose(row) if bias is not None else int(np.argmax(row))
            if token != END_TOKEN:
                # The model's own probability of the token (softmax of the unbiased logits).
                probabilities.append(token_probability(row, token))
                tokens.append(token)
            return token

        # Row i is what the decoder says after START and draft[:i]: the row a step-by-step
        # decode would see at step i as long as draft[:i] are the tokens it chose.
        logits, cache = self._first_pass(self._encode(audio), [START_TOKEN, *draft])
        for i in range(len(draft) + 1):
            last = choose(logits[0, i])
            if last == END_TOKEN or i == len(draft) or last != draft[i]:
                break
        # The cache holds START and the draft tokens kept (the inputs of rows 0..i): the
        # self-attention part is cut to them (the rest read draft tokens that were not chosen).
        cache = {
            name: value if ".encoder." in name else np.ascontiguousarray(value[:, :, : len(tokens)])
            for name, value in cache.items()
        }
        while last != END_TOKEN and len(tokens) < limit:
            logits, cache = self._step(cache, last)
            last = choose(logits[0, -1])
        kept = [(t, p) for t, p in zip(tokens, probabilities, strict=True) if self._is_text(t)]
        pieces = tuple(self._tokens[t] for t, _ in kept)
        return Transcript("".join(pieces).strip(), pieces, tuple(p for _, p in kept), tuple(tokens))

    @property
    def vocabulary(self) -> list[str]:
        """Each token id's text (spaces for SentencePiece's word marks)."""
        return self._tokens

    def keyterm_index(self, terms: tuple[str, ...]) -> KeytermIndex:
        """The prefix tree of `terms` over this model's tokens (kept for the next stream)."""
        with self._indexes_lock:
            index = self._indexes.get(terms)
            if index is None:
                index = KeytermIndex(self._tokens, terms, first_text_id=FIRST_TEXT_TOKEN)
                if len(self._indexes) >= KEYTERM_INDEXES_KEPT:
                    self._indexes.pop(next(iter(self._indexes)))
                self._indexes[terms] = index
            return index

    def cost_probe(self, seconds: float, tokens: int, drafted: int = 0) -> None:
        """Encode `seconds` of audio and decode `tokens` tokens, the first `drafted` of them
        read as a draft in one pass (`decode`), the rest one step each: the work of a decode
        of that length, whatever the audio says (for measuring speed)."""
        rng = np.random.default_rng(0)
        audio = (rng.standard_normal(int(seconds * SAMPLE_RATE)) * 0.05).astype(np.float32)
        first = [START_TOKEN, *range(START_TOKEN + 10, START_TOKEN + 10 + drafted)]
        _, cache = self._first_pass(self._encode(audio), first)
        for step in range(len(first), tokens):
            _, cache = self._step(cache, START_TOKEN + 10 + step)

    def _encode(self, audio: FloatAudio) -> npt.NDArray[np.float32]:
        hidden: npt.NDArray[np.float32] = self._encoder.run(None, {"input_values": audio[None, :]})[
            0
        ]
        return hidden

    def _first_pass(self, hidden: npt.NDArray[np.float32], ids: list[int]) -> tuple[Any, Cache]:
        """Logits after each of `ids` (START first) over the encoded audio, and the KV cache."""
        feeds = {"input_ids": np.array([ids], dtype=np.int64), "encoder_hidden_states": hidden}
        logits, *present = self._first.run(None, feeds)
        return logits, dict(zip(self._cache_names, present, strict=True))

    def _step(self, cache: Cache, token: int) -> tuple[Any, Cache]:
        """Logits after one more token, and the cache grown by it (the cross-attention part,
        computed by the first pass, is passed on as it is)."""
        feeds: dict[str, npt.NDArray[np.generic]] = {"input_ids": np.array([[token]], np.int64)}
        feeds.update(cache)
        logits, *present = self._step_session.run(self._step_outputs, feeds)
        grown = dict(cache)
        grown.update(zip(self._self_attention_names, present, strict=True))
        return logits, grown

    def detokenize(self, tokens: list[int]) -> str:
        return "".join(self._tokens[t] for t in tokens if self._is_text(t)).strip()

    def _is_text(self, token: int) -> bool:
        return 2 < token < len(self._tokens)


_loaded: dict[str, MoonshineModel] = {}
_loading = threading.Lock()


def load(model: str, cache_dir: Path, precision: Precision = "int8") -> MoonshineModel:
    """The process's one copy of the model (prepared on first use); safe from any thread."""
    with _loading:
        files = ModelFiles.locate(model)
        key = f"{files.folder}:{precision}"
        if key not in _loaded:
            paths = prepare(files, cache_dir, precision)
            tokenizer = read_tokenizer(files.folder / "tokenizer.bin")
            began = time.monotonic()
            _loaded[key] = MoonshineModel(
                paths, tokenizer, files.name, exact_drafts=precision == "float32"
            )
            log.info("Moonshine model loaded in %.1f s", time.monotonic() - began)
        return _loaded[key]
