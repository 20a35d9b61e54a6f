#!/usr/bin/env bash
# Everything a GPU shows about the Kyutai engine, in one run of at most 8 minutes:
#   1. the device (nvidia-smi), and its memory sampled every second for the whole run;
#   2. the stt-1b architecture (random weights, built by engine/random_checkpoint.py as the tests
#      build theirs) stepped alone at batch 8..256: ms per step, steps per second, ms per stream
#      (bench/engine.py; a batch whose step stays under 80 ms keeps that many streams real time);
#   3. real-time streams through the whole bridge: `stt-bridge serve` with the kyutai engine on
#      that checkpoint, fed by bench/load.py's WebSocket callers at 20 ms frames (latency, lag,
#      drops, CPU), at several call counts;
#   4. peak GPU memory of each part, from the samples.
#
#   bench/gpu.sh                  # on a GPU machine: stt-1b, batch 8..256, 64..256 calls
#   SIZE=tiny bench/gpu.sh        # anywhere (CPU): the tests' tiny model, small batches, to try it
#
# Settings (environment): SIZE (stt-1b | tiny), BATCHES, CALLS, SECONDS (audio per call),
# STEPS (timed steps per batch), OUT (folder for the logs; default a new temporary one).
# Each part has its own time limit, so one that hangs cannot take the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SIZE=${SIZE:-stt-1b}
OUT=${OUT:-$(mktemp -d /tmp/stt-gpu-XXXX)}
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    DEVICE=cuda
    GRAPHS=--cuda-graphs
else
    DEVICE=cpu
    GRAPHS=
fi
if [ "$SIZE" = tiny ]; then
    BATCHES=${BATCHES:-"8 16 32"}
    CALLS=${CALLS:-"8 16"}
    SECONDS_PER_CALL=${SECONDS:-8}
    STEPS=${STEPS:-8}
else
    BATCHES=${BATCHES:-"8 16 32 64 128 256"}
    CALLS=${CALLS:-"64 128 256"}
    SECONDS_PER_CALL=${SECONDS:-20}
    STEPS=${STEPS:-20}
fi
began=$(date +%s)
echo "== device: $DEVICE, model $SIZE, logs in $OUT"
sampler=""
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits \
        -l 1 >"$OUT/gpu-samples.csv" 2>/dev/null &
    sampler=$!
fi
peak_mib() {  # the highest memory.used sample since line $1 of the samples
    [ -s "$OUT/gpu-samples.csv" ] || { echo "n/a (no GPU)"; return; }
    tail -n +"$1" "$OUT/gpu-samples.csv" | awk -F', ' '$2 > m { m = $2 } END { print m " MiB" }'
}
mark() { [ -f "$OUT/gpu-samples.csv" ] && wc -l <"$OUT/gpu-samples.csv" || echo 1; }

echo "== 1. $SIZE stepped alone, batch $BATCHES ($STEPS steps each; steps/s = 1000 / ms/step)"
from=$(mark)
# shellcheck disable=SC2086
timeout 200 "$PY" bench/engine.py --arch "$SIZE" --batch $BATCHES --steps "$STEPS" \
    --device "$DEVICE" $GRAPHS 2>&1 | tee "$OUT/engine.txt" |
    awk '{ print } $3 ~ /M$/ && $4 > 0 { printf "   -> batch %s: %.1f steps/s, %s ms/stream\n", $2, 1000 / $4, $5 }'
echo "   peak GPU memory: $(peak_mib "$from")"

echo "== 2. the whole bridge: kyutai engine on $SIZE (random weights), calls $CALLS, ${SECONDS_PER_CALL} s each"
ckpt="$OUT/checkpoint-$SIZE"
timeout 150 "$PY" -c "
import sys; sys.path.insert(0, '.')
from pathlib import Path
from engine.random_checkpoint import write_checkpoint
write_checkpoint(Path('$ckpt'), '$SIZE')
print('checkpoint written:', '$ckpt')
" 2>&1 | tail -1
from=$(mark)
for calls in $CALLS; do
    left=$((began + 470 - $(date +%s)))
    if [ "$left" -lt 60 ]; then
        echo "   $calls calls: skipped, the 8 minutes are nearly spent"
        continue
    fi
    batch=$(( calls > 8 ? calls : 8 ))
    STT_BRIDGE_ENGINE_MODEL="$ckpt" STT_BRIDGE_ENGINE_DEVICE="$DEVICE" \
        STT_BRIDGE_ENGINE_BATCH_SIZE="$batch" \
        timeout "$left" "$PY" bench/load.py --engine kyutai --front-end stream --calls "$calls" \
        --seconds "$SECONDS_PER_CALL" --server-core -1 --client-core -1 2>&1 |
        tee -a "$OUT/load.txt" | grep -v '^$'
done
echo "   peak GPU memory: $(peak_mib "$from")"
[ -n "$sampler" ] && kill "$sampler" 2>/dev/null
echo "== done in $(($(date +%s) - began)) s; logs in $OUT"
