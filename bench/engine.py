"""The Kyutai engine's batched step: ms per step and per stream at each batch size.

Random weights with the real architectures (`engine/random_checkpoint.py`): `tiny` (the
tests' model), `stt-1b` (kyutai/stt-1b-en_fr's dimensions) and `stt-2.6b`. Each row builds the
model for one batch size, warms it up, then times `--steps` steps with every slot active (the
cost of a step does not depend on how many slots are active: masked rows are computed too).

- ms/step: wall time of one batched step (Mimi encode + LM step), median.
- ms/stream: ms/step / batch: the cost of one stream's 80 ms frame.
- batching efficiency: ms/stream(batch 32) / ms/stream(batch 1); lower is better.
- real-time streams: the largest batch whose step stays under 80 ms is how many live calls
  one such device carries (read it off the table).

The `engine` rows run the tiny model through the whole engine (streams, batcher, the model
thread, decoding): its overhead per step over the bare model step.

    python bench/engine.py [--arch tiny stt-1b] [--batch 1 8 32 64] [--steps 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.kyutai import FRAME_SIZE, KyutaiEngine, KyutaiModel, load_checkpoint
from engine.random_checkpoint import write_checkpoint


def state_bytes(folder: Path, batch: int, device: str) -> int:
    """Rough memory of one row: weights + per-slot KV caches (LM and Mimi), in bytes."""
    import json

    lm = json.loads((folder / "config.json").read_text())
    mimi = json.loads((folder / "mimi_config.json").read_text())["transformer"]
    width = 2 if device.startswith("cuda") else 4  # bf16 on CUDA, float32 on CPU
    dim, layers = lm["dim"], lm["num_layers"]
    ffn = int(lm["hidden_scale"] * dim)
    weights = layers * (4 * dim * dim + 3 * dim * ffn) * width
    lm_kv = 2 * layers * lm["context"] * dim * width
    mimi_kv = 2 * 2 * mimi["num_layers"] * mimi["context"] * mimi["d_model"] * 4
    return int(weights + batch * (lm_kv + mimi_kv))


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def time_model(folder: Path, batch: int, steps: int, device: str, graphs: bool, random: bool):  # type: ignore[no-untyped-def]
    import torch

    info = load_checkpoint(str(folder))
    model = KyutaiModel(info, batch, device, cuda_graphs=graphs, random_weights=random)
    model.warm_up()
    rng = np.random.default_rng(0)
    frames = (rng.standard_normal((batch, FRAME_SIZE)) * 0.1).astype(np.float32)
    active = np.ones(batch, dtype=np.bool_)
    no_reset = np.zeros(batch, dtype=np.bool_)
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.step(frames, active, no_reset)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.lm.parameters())
    model.close()
    del model
    return statistics.median(times) * 1000, params


async def time_engine(folder: Path, batch: int, steps: int) -> float:
    """ms per step with `batch` streams pushing audio as fast as the engine takes it."""
    engine = KyutaiEngine(str(folder), batch_size=batch, max_buffer_s=600.0)
    await engine.start()
    rng = np.random.default_rng(1)
    pcm = (rng.standard_normal(FRAME_SIZE * steps) * 3000).astype(np.int16)
    streams = [engine.open(f"s{i}") for i in range(batch)]
    start_steps = engine.batcher.steps
    start = time.perf_counter()
    for stream in streams:
        stream.push(pcm)
        stream.close()
    for stream in streams:
        async for _ in stream.events():
            pass
    elapsed = time.perf_counter() - start
    done = engine.batcher.steps - start_steps
    await engine.stop()
    return elapsed / done * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["tiny", "stt-1b"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cuda-graphs", action="store_true", help="capture steps (CUDA only)")
    args = parser.parse_args()

    import torch

    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    print(f"{'model':<10} {'batch':>5} {'params':>8} {'ms/step':>9} {'ms/stream':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            folder = Path(tmp) / arch
            random = arch != "tiny"  # real-size weights are drawn in memory, not written
            write_checkpoint(folder, arch, write_weights=not random)
            per_stream: dict[int, float] = {}
            for batch in args.batch:
                gc.collect()  # the last row's model (its streaming state holds cycles)
                need, have = state_bytes(folder, batch, args.device), available_bytes(args.device)
                if need > 0.9 * have:
                    print(
                        f"{arch:<10} {batch:>5}  skipped: needs ~{need / 2**30:.1f} GiB, "
                        f"{have / 2**30:.1f} GiB available"
                    )
                    continue
                try:
                    ms, params = time_model(
                        folder, batch, args.steps, args.device, args.cuda_graphs, random
                    )
                except (RuntimeError, MemoryError) as exc:  # out of memory: say so, go on
                    print(f"{arch:<10} {batch:>5}  failed: {str(exc).splitlines()[0][:60]}")
                    break
                per_stream[batch] = ms / batch
                print(
                    f"{arch:<10} {batch:>5} {params / 1e6:>7.1f}M {ms:>9.2f} {ms / batch:>10.3f}",
                    flush=True,
                )
            if 1 in per_stream and 32 in per_stream:
                ratio = per_stream[32] / per_stream[1]
                print(f"{arch:<10} batching efficiency ms/stream(32)/ms/stream(1) = {ratio:.3f}")
            if arch == "tiny":
                for batch in args.batch:
                    ms = asyncio.run(time_engine(folder, batch, max(args.steps, 40)))
                    print(f"{'engine':<10} {batch:>5} {'tiny':>8} {ms:>9.2f} {ms / batch:>10.3f}")


if __name__ == "__main__":
    main()
