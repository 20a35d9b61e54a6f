"""Kyutai streaming STT (`kyutai/stt-1b-en_fr`, `kyutai/stt-2.6b-en`) through `moshi`.

Every live leg holds one slot of a fixed batch; `engine.batcher` steps all slots together,
one 80 ms frame (1920 samples at 24 kHz) at a time, on the one thread that owns the model.
A slot whose next frame has not arrived is masked off for that step (moshi's `set_exec_mask`):
its state stays exactly as it was, so a late packet never becomes invented audio that would
shift the call's timeline. A slot taken by a new call is reset alone (`reset_streaming(mask)`).

Per step each slot gets one text token: 0 marks the start of a word, 3 is padding, others are
sentencepiece pieces. `TextDecoder` turns them into `Word`s whose times are frame index / 12.5
minus the model's text delay and the silence prefix (as Kyutai's scripts do); `TurnDetector`
gives `EndOfTurn` (and a `Segment` of the turn's words) from the semantic-VAD head where the
checkpoint has one (1b), else after a silence in the text. `close()` feeds the delay plus one
second of silence so the last words come out, then `Closed`.

Facts and sources: ../shared/protocols/kyutai-stt.md.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import os
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from engine.base import (
    Closed,
    EndOfTurn,
    Engine,
    EngineInfo,
    EngineStream,
    EngineUnavailable,
    ModelStep,
    Segment,
    Word,
)
from engine.batcher import Batcher, BoolMask, FloatFrames, StepResult
from engine.confidence import combine, segment_confidence
from engine.keyterm_bias import DEFAULT_SETTINGS, BiasSettings, KeytermBias, KeytermIndex
from engine.keyterms import check_keyterms, merge_keyterms
from engine.pcm import pcm16_to_float

if TYPE_CHECKING:
    import sentencepiece
    from moshi.models.loaders import CheckpointInfo

log = logging.getLogger(__name__)

SAMPLE_RATE: Final = 24000  # Mimi's input rate
FRAME_RATE: Final = 12.5
FRAME_SIZE: Final = 1920  # samples at 24 kHz: one Mimi frame, 80 ms
WORD_START_ID: Final = 0  # "end of padding": a word starts after it
PADDING_ID: Final = 3
LAST_SPECIAL_ID: Final = 3  # ids 0-3 are never text (upstream decodes only ids > 3)
FLUSH_EXTRA_S: Final = 1.0  # silence fed after the delay on close (as Kyutai's inference does)
KEYTERM_INDEXES_KEPT: Final = 64  # keyterm lists whose prefix trees are kept for reuse
PAUSE_HEAD: Final = 2  # the VAD head for a 2 s pause: the one Kyutai's Unmute uses

# moshi-server's batch sizes for Kyutai's repos; other checkpoints by depth.
DEFAULT_BATCH: Final = {
    "kyutai/stt-1b-en_fr": 64,
    "kyutai/stt-1b-en_fr-candle": 64,
    "kyutai/stt-2.6b-en": 16,
    "kyutai/stt-2.6b-en-candle": 16,
}


class CheckpointError(ValueError):
    """The model setting names neither a local checkpoint folder nor a loadable repo."""


# --- loading ----------------------------------------------------------------------------------


def load_checkpoint(model: str, revision: str | None = None) -> CheckpointInfo:
    """A Hugging Face repo id (downloaded through huggingface_hub: its cache, its progress
    bars) or a local folder with the same files (config.json names the others)."""
    from moshi.models.loaders import CheckpointInfo

    folder = Path(model).expanduser()
    if folder.is_dir():
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder} has no config.json (a Kyutai STT checkpoint has)")
        import json

        config = json.loads(config_path.read_text())
        names = {
            "moshi_weights": config.get("moshi_name", "model.safetensors"),
            "mimi_weights": config.get("mimi_name"),
            "tokenizer": config.get("tokenizer_name"),
        }
        missing = [key for key, name in names.items() if not name]
        if missing:
            raise CheckpointError(f"{config_path} does not name {', '.join(missing)}")
        mimi_config = config.get("mimi_config_name")
        # Path objects, every one: moshi downloads any file it is given only a name for.
        return CheckpointInfo.from_hf_repo(
            str(folder),
            moshi_weights=folder / names["moshi_weights"],
            mimi_weights=folder / names["mimi_weights"],
            tokenizer=folder / names["tokenizer"],
            config_path=config_path,
            mimi_config_path=folder / mimi_config if mimi_config else None,
            revision=revision,
        )
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise CheckpointError(f"{model!r} is neither a folder nor a Hugging Face repo id")
    return CheckpointInfo.from_hf_repo(model, revision=revision)


def _vad_heads(info: CheckpointInfo) -> tuple[int, int]:
    """(number, dim) of the semantic-VAD heads in the weights; (0, 0) without them.

    Kyutai's PyTorch repo for 1b has no `extra_heads.*` tensors while the -candle repo's weights
    do, and its config may not say so: the weights decide.
    """
    from safetensors import safe_open

    path = Path(info.moshi_weights)
    if path.suffix not in (".safetensors", ".sft", ".sfts") or not path.is_file():
        return 0, 0
    shapes: dict[int, int] = {}
    with safe_open(str(path), framework="pt") as handle:  # type: ignore[no-untyped-call]
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "extra_heads" and parts[2] == "weight":
                shapes[int(parts[1])] = int(handle.get_slice(key).get_shape()[0])
    if not shapes:
        return 0, 0
    return len(shapes), shapes[0]


@dataclass(frozen=True)
class ModelTiming:
    delay_s: float  # the text lags the audio by this much (the model learnt it)
    prefix_frames: int  # silence fed before a stream's audio
    flush_frames: int  # silence fed after it on close

    @property
    def delay_frames(self) -> int:
        return round(self.delay_s * FRAME_RATE)  # 0.5 s → 6, moshi-server's asr_delay_in_tokens

    @property
    def offset_s(self) -> float:
        """Subtracted from a step's time to give the time of the audio its text is about."""
        return self.delay_s + self.prefix_frames / FRAME_RATE


def model_timing(stt_config: dict[str, Any]) -> ModelTiming:
    delay_s = float(stt_config.get("audio_delay_seconds", 0.5))
    prefix_s = float(stt_config.get("audio_silence_prefix_seconds", 0.0))
    # At least one frame: the first step after a reset sees the initial token, not the audio.
    return ModelTiming(
        delay_s=delay_s,
        prefix_frames=max(1, math.ceil(prefix_s * FRAME_RATE)),
        flush_frames=math.ceil((delay_s + FLUSH_EXTRA_S) * FRAME_RATE),
    )


class KyutaiModel:
    """Mimi + the LM in streaming mode for a fixed batch: the batcher's `StepModel`.

    Built, warmed up and stepped only on the model thread.
    """

    frame_size = FRAME_SIZE

    def __init__(
        self,
        info: CheckpointInfo,
        batch_size: int,
        device: str,
        cuda_graphs: bool,
        random_weights: bool = False,
    ) -> None:
        import torch
        from moshi.models.lm import LMGen
        from moshi.utils.compile import no_compile, no_cuda_graph

        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self._stack = contextlib.ExitStack()
        if not cuda_graphs:
            self._stack.enter_context(no_cuda_graph())
        if os.environ.get("NO_TORCH_COMPILE"):
            self._stack.enter_context(no_compile())
        heads, head_dim = (0, 0) if random_weights else _vad_heads(info)
        overrides: dict[str, Any] = {}
        configured = int((info.lm_config or {}).get("extra_heads_num_heads", 0))
        if heads and heads != configured:
            overrides = {"extra_heads_num_heads": heads, "extra_heads_dim": head_dim}
        if random_weights:
            from moshi.models.loaders import get_mimi

            n_q = int((info.lm_config or {})["n_q"])
            self.mimi = get_mimi(None, info.mimi_config, device=self.device, num_codebooks=n_q)
        else:
            self.mimi = info.get_mimi(device=self.device)
        self.lm = info.get_moshi(
            device=self.device,
            dtype=self.dtype,
            load_weight=not random_weights,
            lm_kwargs_overrides=overrides,
        )
        self.has_vad = len(self.lm.extra_heads) > 0
        self.tokenizer: sentencepiece.SentencePieceProcessor = info.get_text_tokenizer()
        self.lm_gen = LMGen(self.lm, temp=0.0, temp_text=0.0)  # greedy, as upstream STT
        # Text logits are seen before the greedy pick: for each token's probability
        # (confidence) and to bias the slots that have keyterms.
        self.lm_gen.on_text_logits_hook = self._on_text_logits
        self._biases: Mapping[int, KeytermBias] = {}
        self._raw_logits: Any = None  # [batch, vocabulary] float32, before any bias
        self._log_norm: Any = None  # [batch]: logsumexp of each row
        self.vocabulary = [
            str(self.tokenizer.id_to_piece(i)).replace("\u2581", " ")
            for i in range(int(self.tokenizer.vocab_size()))
        ]
        # Padding and word starts stand between the words of a multi-word keyterm.
        self.separators = frozenset(range(LAST_SPECIAL_ID + 1))
        self.mimi.streaming_forever(batch_size)
        self.lm_gen.streaming_forever(batch_size)
        self._torch = torch

    def warm_up(self, steps: int = 3) -> None:
        """All-slot zero steps (captures the CUDA graphs), then every slot reset."""
        active = np.ones(self.batch_size, dtype=np.bool_)
        frames = np.zeros((self.batch_size, self.frame_size), dtype=np.float32)
        for _ in range(steps):
            self.step(frames, active, np.zeros(self.batch_size, dtype=np.bool_))
        self.step(frames, np.zeros(self.batch_size, dtype=np.bool_), active)

    def step(
        self,
        frames: FloatFrames,
        active: BoolMask,
        reset: BoolMask,
        biases: Mapping[int, KeytermBias] | None = None,
    ) -> StepResult:
        torch = self._torch
        self._biases = biases or {}
        with torch.no_grad():
            if reset.any():
                mask = torch.from_numpy(reset).to(self.device)
                self.mimi.reset_streaming(mask)
                self.lm_gen.reset_streaming(mask)
            exec_mask = torch.from_numpy(active).to(self.device)
            self.mimi.set_exec_mask(exec_mask)
            self.lm_gen.set_exec_mask(exec_mask)
            if not active.any():
                return StepResult(np.full(self.batch_size, -2, dtype=np.int64), None)
            pcm = torch.from_numpy(frames).to(self.device)[:, None, :]
            codes = self.mimi.encode(pcm)
            out = self.lm_gen.step_with_extra_heads(codes)
            assert out is not None  # STT models have no acoustic delay: a token every step
            tokens, heads = out
            # Copies: with CUDA graphs the outputs are buffers that the next replay overwrites.
            token_array = tokens[:, 0, 0].to("cpu", torch.int64).numpy().copy()
            token_probs = None
            if self._raw_logits is not None:
                chosen = self._raw_logits.gather(1, tokens[:, 0, :1].long().clamp(min=0))[:, 0]
                token_probs = torch.exp(chosen - self._log_norm).to("cpu").numpy().copy()
                self._raw_logits = self._log_norm = None
            probs = None
            if heads:
                stacked = torch.stack([head[:, 0, 0] for head in heads], dim=1)
                probs = stacked.to("cpu", torch.float32).numpy().copy()
            return StepResult(token_array, probs, token_probs)

    def _on_text_logits(self, text_logits: Any) -> None:
        """Inside `lm_gen.step`, before its greedy pick: keep the unbiased logits (each chosen
        token's probability), and make each biased slot's pick its bias's choice."""
        torch = self._torch
        raw = text_logits[:, 0, 0].float()
        if self._biases:
            raw = raw.clone()  # the pick below is made on text_logits, changed in place
        self._raw_logits = raw
        self._log_norm = torch.logsumexp(raw, dim=-1)
        if not self._biases:
            return
        slots = sorted(self._biases)
        rows = raw[slots].to("cpu").numpy()  # one copy for every biased slot
        for row, slot in zip(rows, slots, strict=True):
            choice = self._biases[slot].choose(row)
            if choice != int(row.argmax()):
                text_logits[slot, 0, 0, choice] = text_logits[slot, 0, 0].max() + 1.0

    def close(self) -> None:
        self._stack.close()


# --- tokens to words --------------------------------------------------------------------------


class TextDecoder:
    """One stream's text tokens, step by step, into timed `Word`s.

    A word is the run of pieces after a 0 (or a piece starting with "▁" inside such a run); it
    is finished by the next 0 or padding token, and is emitted then: start = the step of its
    first piece, end = the step that finished it, both as seconds of the stream's audio (minus
    the delay and silence prefix, clamped at 0). moshi-server emits the text at the same step
    but ends a word at the next 0, i.e. across any pause after it; we end it where its pieces
    stop, which keeps live words prompt and their end times tight.
    """

    def __init__(self, tokenizer: sentencepiece.SentencePieceProcessor, timing: ModelTiming):
        self._tokenizer = tokenizer
        self._vocab = int(tokenizer.vocab_size())
        self._timing = timing
        self._ids: list[int] = []
        self._probs: list[float] = []  # the model's probability of each of those pieces
        self._start = 0
        self.last_text_step = -1  # the last step that gave a piece

    @property
    def open_word_start(self) -> int | None:
        """The step of the first piece of the word still open, if any."""
        return self._start if self._ids else None

    def seconds(self, step: int) -> float:
        return round(max(0.0, step / FRAME_RATE - self._timing.offset_s), 3)

    def feed(self, step: int, token: int, probability: float | None = None) -> list[Word]:
        if token <= LAST_SPECIAL_ID:  # 0, padding, and -2 for an unstepped slot
            return self.finish(step) if token >= 0 else []
        if token >= self._vocab:  # out of the tokenizer's range: never text
            return []
        words: list[Word] = []
        if self._ids and self._tokenizer.id_to_piece(token).startswith("▁"):
            words = self.finish(step)
        if not self._ids:
            self._start = step
        self._ids.append(token)
        if probability is not None:
            self._probs.append(probability)
        self.last_text_step = step
        return words

    def finish(self, step: int) -> list[Word]:
        """The word still open, ended at `step` (a 0 or padding token, a pause, the flush)."""
        if not self._ids:
            return []
        text = str(self._tokenizer.decode(self._ids)).strip()
        ids, self._ids = self._ids, []
        probs, self._probs = self._probs, []
        if not text:
            return []
        end = max(step, self._start + len(ids))
        # A word's confidence as Moonshine's (engine/confidence.py), from its pieces
        confidence = round(combine(probs), 4) if len(probs) == len(ids) else None
        return [Word(text, self.seconds(self._start), self.seconds(end), confidence)]


class TurnDetector:
    """When a speaker's turn ends, from the VAD head or, without one, a silence in the text.

    The head sees audio `delay` frames before the text does, so its probabilities wait that
    long in a queue: an end of turn is declared only when the words of the turn are out, and
    the `Segment` that goes with it holds them all. A turn needs at least one word; leading
    silence (where the pause head says ~1.0) is no turn.
    """

    def __init__(self, timing: ModelTiming, threshold: float, silence_s: float) -> None:
        self._delay = timing.delay_frames
        self._threshold = threshold
        self._silence_steps = max(1, round(silence_s * FRAME_RATE))
        self._probs: deque[tuple[int, float]] = deque()

    def ended(
        self,
        step: int,
        pause_probs: npt.NDArray[np.float32] | None,
        decoder: TextDecoder,
        words_in_turn: bool,
    ) -> tuple[int, float] | None:
        """(the step of the audio where the turn ended, its probability), if it ends now."""
        if pause_probs is not None and len(pause_probs) > 0:
            head = min(PAUSE_HEAD, len(pause_probs) - 1)
            self._probs.append((step, float(pause_probs[head])))
            if len(self._probs) <= self._delay:
                return None
            seen_at, prob = self._probs.popleft()
            speech = words_in_turn or decoder.open_word_start is not None
            if speech and prob > self._threshold:
                return seen_at, prob
            return None
        if words_in_turn and step - decoder.last_text_step >= self._silence_steps:
            return decoder.last_text_step + 1, 1.0
        return None


# --- streams and engine -----------------------------------------------------------------------


class KyutaiStream(EngineStream):
    """One leg in one slot; every method runs on the event loop."""

    settles_on_take = False

    def __init__(
        self,
        engine: KyutaiEngine,
        call_id: str,
        leg: str,
        max_buffer_s: float,
        keyterms: tuple[str, ...] = (),
    ) -> None:
        super().__init__(call_id, leg, max_buffer_s, SAMPLE_RATE)
        model = engine.model
        assert model is not None
        self.keyterms = keyterms
        self._bias = (  # stepped on the model's thread, with this slot's logits
            KeytermBias(
                engine.keyterm_index(keyterms),
                engine.keyterm_settings,
                separators=model.separators,
            )
            if keyterms
            else None
        )
        self._engine = engine
        self._timing = engine.timing
        self._decoder = TextDecoder(model.tokenizer, engine.timing)
        self._turns = TurnDetector(
            engine.timing, engine.end_of_turn_threshold, engine.end_of_turn_silence_s
        )
        self._prefix_left = engine.timing.prefix_frames
        self._flush_left = engine.timing.flush_frames
        self._steps = 0  # steps this stream took (its own timeline, prefix included)
        # samples taken (with drops) at each audio frame the model has not settled yet
        self._taken_at_frame: deque[int] = deque()
        self._audio_samples = 0  # fed to the model: the decoder's clock
        # Where our buffer dropped audio (a phone leg, the engine behind): fed samples there,
        # and samples lost up to there. Times out are the leg's audio: fed time plus those.
        self._gap_at: list[int] = []
        self._gap_lost: list[int] = []
        self._settled_frames = 0
        self._turn_words: list[Word] = []
        self._finished = False
        self.slot = engine.batcher.attach(self)

    # -- EngineStream --

    def _on_audio(self) -> None:
        self._engine.batcher.wake()

    def _on_close(self) -> None:
        if self.stats.samples_in == 0:
            self._finish("flushed")  # nothing was said: no need to step the silence
        else:
            self._engine.batcher.wake()

    # -- SlotClient --

    def frames_ready(self) -> int:
        if self._finished:
            return 0
        whole, part = divmod(self.pending_samples, FRAME_SIZE)
        if not self.closing:
            return self._prefix_left + whole if whole else 0
        return self._prefix_left + whole + (1 if part else 0) + self._flush_left

    def next_frame(self) -> FloatFrames:
        if self._prefix_left:
            self._prefix_left -= 1
            return np.zeros(FRAME_SIZE, dtype=np.float32)
        if self.pending_samples:
            gap = self._take_gap()  # dropped just before this frame: taken together
            pcm = self._take_pending(FRAME_SIZE)
            if gap:
                lost = self._gap_lost[-1] if self._gap_lost else 0
                self._gap_at.append(self._audio_samples)
                self._gap_lost.append(lost + gap)
            self._audio_samples += len(pcm)
            self._taken_at_frame.append(self._taken)
            frame = pcm16_to_float(pcm)
            if len(frame) < FRAME_SIZE:  # a closing stream's last, partial frame
                frame = np.pad(frame, (0, FRAME_SIZE - len(frame)))
            return frame
        self._flush_left -= 1
        return np.zeros(FRAME_SIZE, dtype=np.float32)

    @property
    def keyterm_bias(self) -> KeytermBias | None:
        return self._bias

    def on_step(
        self,
        token: int,
        pause_probs: npt.NDArray[np.float32] | None,
        probability: float | None = None,
    ) -> None:
        if self._finished:
            return
        step = self._steps
        self._steps += 1
        if pause_probs is not None and self.on_model_step is not None:
            probs = tuple(float(p) for p in pause_probs)
            self.on_model_step(ModelStep(self._engine.batcher.steps, probs, self.pending_samples))
        for word in self._decoder.feed(step, token, probability):
            self._word(word)
        turn = self._turns.ended(step, pause_probs, self._decoder, bool(self._turn_words))
        if turn is not None:
            for word in self._decoder.finish(step + 1):  # the pause ends a word still open
                self._word(word)
            ended_at, probability = turn
            self._end_turn(self._decoder.seconds(ended_at), probability)
        self._settle_through(step)
        if self.closing and self.frames_ready() == 0:
            self._finish("flushed")

    # -- events --

    def _word(self, word: Word) -> None:
        # Times are seconds of this leg's audio: text the flush's silence brings out may end
        # no later than the audio did, and text that starts after it is about no audio at all.
        audio_s = round(self._audio_samples / SAMPLE_RATE, 3)
        if word.start_s >= audio_s:
            return
        if word.end_s > audio_s:
            word = Word(word.text, word.start_s, audio_s, word.confidence)
        if self._gap_at:
            start, end = self._leg_s(word.start_s), self._leg_s(word.end_s)
            word = Word(word.text, start, end, word.confidence)
        self._turn_words.append(word)
        self._emit(word)

    def _leg_s(self, fed_s: float) -> float:
        """Seconds of the model's audio as seconds of the leg's: the dropped audio before that
        point added back."""
        at = round(fed_s * SAMPLE_RATE)
        i = bisect.bisect_right(self._gap_at, at)
        lost = self._gap_lost[i - 1] if i else 0
        return round((at + lost) / SAMPLE_RATE, 3)

    def _end_turn(self, at_s: float, probability: float = 1.0) -> None:
        at_s = self._leg_s(at_s) if self._gap_at else at_s
        words = tuple(self._turn_words)
        self._turn_words = []
        if not words:
            return
        text = " ".join(w.text for w in words)
        known = [w.confidence for w in words if w.confidence is not None]
        confidence = segment_confidence(known) if len(known) == len(words) else None
        segment = Segment(text, words[0].start_s, words[-1].end_s, words, confidence)
        self._emit(segment)
        self._emit(EndOfTurn(max(at_s, words[-1].end_s), probability))

    def _settle_through(self, step: int) -> None:
        """Audio frames whose text is out (the delay has passed, no word open) are settled."""
        done = step + 1 - self._timing.delay_frames - self._timing.prefix_frames
        open_start = self._decoder.open_word_start
        if open_start is not None:
            done = min(done, open_start - self._timing.delay_frames - self._timing.prefix_frames)
        while self._settled_frames < done and self._taken_at_frame:
            self._settled_frames += 1
            self._settle(self._taken_at_frame.popleft())

    def _finish(self, reason: str) -> None:
        if self._finished:
            return
        self._finished = True
        for word in self._decoder.finish(self._steps):
            self._word(word)
        self._end_turn(round(self._audio_samples / SAMPLE_RATE, 3))
        self._engine._release(self)
        self._emit(Closed(reason))

    def abort(self, reason: str) -> None:
        """The engine failed or stops: what was decoded goes out, then `Closed`."""
        self._finish(reason)


class KyutaiEngine(Engine):
    """The production engine: one model, `batch_size` slots, stepped every 80 ms."""

    name = "kyutai"
    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        model: str = "kyutai/stt-1b-en_fr",
        *,
        revision: str = "",
        batch_size: int = 0,
        device: str = "auto",
        cuda_graphs: bool = True,
        torch_compile: bool = False,
        max_buffer_s: float = 10.0,
        end_of_turn_threshold: float = 0.5,
        end_of_turn_silence_s: float = 1.2,
        random_weights: bool = False,
        keyterms: tuple[str, ...] = (),
        keyterm_settings: BiasSettings = DEFAULT_SETTINGS,
    ) -> None:
        self.model_name = model
        self.keyterm_settings = keyterm_settings  # the bias's margins (engine/keyterm_bias.py)
        self.keyterms = check_keyterms(keyterms)  # every stream's, besides its own
        self._indexes: dict[tuple[str, ...], KeytermIndex] = {}  # used on the event loop
        self._revision = revision or None
        self._requested_batch = batch_size
        self._device_setting = device
        self._cuda_graphs = cuda_graphs
        self._torch_compile = torch_compile
        self._max_buffer_s = max_buffer_s
        self.end_of_turn_threshold = end_of_turn_threshold
        self.end_of_turn_silence_s = end_of_turn_silence_s
        self._random_weights = random_weights  # benchmarks only: the architecture, no weights
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kyutai-model")
        self.model: KyutaiModel | None = None
        self._batcher: Batcher | None = None
        self.timing = model_timing({})
        self._streams: set[KyutaiStream] = set()
        self._device = "cpu"

    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:
            raise EngineUnavailable("kyutai engine is not running")
        return self._batcher

    @property
    def capacity(self) -> int:
        return self._batcher.slots.size if self._batcher is not None else self._requested_batch

    @property
    def free_slots(self) -> int:
        # A failed model (a CUDA error, say) has no slot to give: /ready turns 503.
        if self._batcher is None or self._batcher.failure is not None:
            return 0
        return self._batcher.slots.free

    @property
    def failure(self) -> BaseException | None:
        return self._batcher.failure if self._batcher is not None else None

    async def start(self) -> None:
        if not self._torch_compile:
            os.environ.setdefault("NO_TORCH_COMPILE", "1")  # moshi reads it when imported
        import torch

        self._device = self._pick_device(torch)
        loop = asyncio.get_running_loop()
        info = await loop.run_in_executor(None, load_checkpoint, self.model_name, self._revision)
        batch = self._requested_batch or self._default_batch(info)
        self.timing = model_timing(info.stt_config)
        self.model = await loop.run_in_executor(
            self._executor,
            KyutaiModel,
            info,
            batch,
            self._device,
            self._cuda_graphs and self._device.startswith("cuda"),
            self._random_weights,
        )
        await loop.run_in_executor(self._executor, self.model.warm_up)
        self._batcher = Batcher(
            self.model,
            self._executor,
            1.0 / FRAME_RATE,
            on_step=self._stepped,
            on_failure=self._failed,
        )
        self._batcher.start()
        log.info(
            "kyutai engine ready",
            extra={"model": self.model_name, "device": self._device, "batch_size": batch},
        )

    async def stop(self) -> None:
        for stream in list(self._streams):
            stream.abort("engine stopped")
        if self._batcher is not None:
            await self._batcher.stop()
        if self.model is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.model.close)
        self._executor.shutdown(wait=True)

    def open(
        self, call_id: str, leg: str = "caller", keyterms: tuple[str, ...] = ()
    ) -> KyutaiStream:
        batcher = self.batcher
        if batcher.failure is not None:
            raise EngineUnavailable(f"kyutai engine failed: {batcher.failure}")
        terms = merge_keyterms(self.keyterms, keyterms)
        stream = KyutaiStream(self, call_id, leg, self._max_buffer_s, terms)  # EngineFull when full
        self._streams.add(stream)
        return stream

    def keyterm_index(self, terms: tuple[str, ...]) -> KeytermIndex:
        """The prefix tree of `terms` over the model's text pieces (kept for the next stream
        with the same list: the server-wide terms alone are the common case)."""
        model = self.model
        assert model is not None
        index = self._indexes.get(terms)
        if index is None:
            index = KeytermIndex(model.vocabulary, terms, first_text_id=LAST_SPECIAL_ID + 1)
            if len(self._indexes) >= KEYTERM_INDEXES_KEPT:
                self._indexes.pop(next(iter(self._indexes)))
            self._indexes[terms] = index
        return index

    def info(self) -> EngineInfo:
        model = self.model
        return EngineInfo(
            name=self.name,
            model=self.model_name,
            capacity=self.capacity,
            device=self._device,
            extra={
                "batch_size": self.capacity,
                "dtype": str(model.dtype).removeprefix("torch.") if model else None,
                "cuda_graphs": self._cuda_graphs and self._device.startswith("cuda"),
                "end_of_turn": "semantic VAD head"
                if model is not None and model.has_vad
                else f"{self.end_of_turn_silence_s} s without text",
                "delay_s": self.timing.delay_s,
                "steps": self._batcher.steps if self._batcher else 0,
            },
        )

    # -- internals --

    def _pick_device(self, torch: Any) -> str:
        setting = self._device_setting
        if setting == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if setting.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailable(f"engine.device = {setting!r} but CUDA is not available")
        return setting

    def _default_batch(self, info: CheckpointInfo) -> int:
        if self.model_name in DEFAULT_BATCH:
            return DEFAULT_BATCH[self.model_name]
        layers = int((info.lm_config or {}).get("num_layers", 16))
        return 16 if layers > 24 else 64

    def _stepped(self, seconds: float, slots: int) -> None:
        if self.on_step is not None:
            self.on_step(seconds, slots)

    def _failed(self, error: BaseException) -> None:
        for stream in list(self._streams):
            stream.abort("engine error")

    def _release(self, stream: KyutaiStream) -> None:
        if stream in self._streams:
            self._streams.discard(stream)
            self.batcher.detach(stream.slot)
