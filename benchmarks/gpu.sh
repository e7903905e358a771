#!/usr/bin/env bash
# The GPU checks of issues 14 and 11, in one script (about 8-10 minutes on one GPU). Writes benchmarks/results/gpu_*.md.
#
#   benchmarks/gpu.sh              run it (needs a CUDA GPU; without one it says so and exits 2)
#   benchmarks/gpu.sh --dry-run    print the commands without running them (works anywhere)
#
# 1. memtrain calibrate: real steps of each plan family at 256-512 px against their estimates; the measured
#    headroom model -> gpu_headroom.json, measurements -> gpu_calibrate.md.
# 2. Tracker accuracy: estimate vs allocator (alloc, reserved) vs NVML for none, the best plan for 8 GiB and
#    amp,checkpoint:full at 512, 1024, 2048 px -> gpu_tracker_accuracy.md (+ .csv).
# 3. Step time of the main plans against none, measured side by side (memtrain compare, 1024 px) -> gpu_step_time.md.
# 4. An amp:fp16 training run with its GradScaler (20 steps at 512 px): finite losses, the scale -> gpu_amp_fp16.md.
# 5. tile on the GPU (issue 11): allocator peaks and step time of the tile plans against none and the best untiled
#    plan, side by side (memtrain compare, 1024 and 2048 px) -> gpu_tile.md; and issue 11's float32 done-when on the
#    GPU, where tile keeps its one statistics sweep (cuDNN's BatchNorm is not mirrored): `memtrain fit --size 256
#    --seed 3 --max-steps 3` with and without tile:128, the logged losses side by side -> gpu_tile_exactness.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=benchmarks/results
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python}
run() { echo "+ $*" >&2; if [[ $DRY == 0 ]]; then "$@"; fi; }

if [[ $DRY == 0 ]] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: error: needs a CUDA GPU and this machine has none (--dry-run prints the commands)" >&2
    exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export MEMTRAIN_CACHE_DIR="$WORK/cache"   # fresh estimate cache: the timings include tracing
start=$(date +%s)

run $PY -m memtrain calibrate --sizes 256,384,512 --out "$RESULTS/gpu_headroom.json" --report "$RESULTS/gpu_calibrate.md"

run $PY benchmarks/tracker_accuracy.py --sizes 512,1024,2048 --memory-budget 8GiB --also "amp,checkpoint:full" --out "$WORK/accuracy"
if [[ $DRY == 0 ]]; then
    cp "$WORK/accuracy/tracker_accuracy_cuda.md" "$RESULTS/gpu_tracker_accuracy.md"
    cp "$WORK/accuracy/tracker_accuracy_cuda.csv" "$RESULTS/gpu_tracker_accuracy.csv"
fi

run $PY -m memtrain compare --strategies "none;amp;checkpoint;amp,checkpoint;amp,checkpoint:full;amp,checkpoint:full,quant" \
    --sizes 1024 --steps 5 --out "$WORK/compare"
[[ $DRY == 0 ]] && cp "$WORK/compare/compare.md" "$RESULTS/gpu_step_time.md"

run $PY -m memtrain fit --strategies amp:fp16 --size 512 --epochs 1 --max-steps 20 --batch-size 2 --train-images 40 --val-images 2 \
    --samples 0 --out "$WORK/fp16"
if [[ $DRY == 0 ]]; then
    $PY - "$WORK/fp16" "$RESULTS/gpu_amp_fp16.md" <<'PYEOF'
import csv, math, sys, torch
from pathlib import Path
import memtrain
run, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = list(csv.DictReader((run / "metrics.csv").open()))
losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
ok = bool(losses) and all(math.isfinite(v) for v in losses)
lines = [f"# amp:fp16 with GradScaler - {torch.cuda.get_device_name()}", "",
         f"torch {torch.__version__}, CUDA {torch.version.cuda}, memtrain {memtrain.__version__}", "",
         "Command: `python -m memtrain fit --strategies amp:fp16 --size 512 --epochs 1 --max-steps 20 --batch-size 2 ...` (benchmarks/gpu.sh)", "",
         f"train losses logged: {len(losses)}; all finite: {ok}; first {losses[0] if losses else 'n/a'}, last {losses[-1] if losses else 'n/a'}", ""]
out.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if ok else 1)
PYEOF
fi
run $PY -m memtrain compare --strategies "none;amp,checkpoint:full,quant;amp,tile;amp,tile,checkpoint:full,quant;amp,tile,offload;amp,tile:lean,offload" \
    --sizes 1024,2048 --steps 3 --out "$WORK/tile"
[[ $DRY == 0 ]] && cp "$WORK/tile/compare.md" "$RESULTS/gpu_tile.md"

TINY=(--config configs/ci-tiny.yaml --size 256 --seed 3 --max-steps 3 --batch-size 1 --train-images 1 --epochs 3
      --limit-val-batches 0 --samples 0 --no-memory)
run $PY -m memtrain fit "${TINY[@]}" --out "$WORK/untiled"
run $PY -m memtrain fit "${TINY[@]}" --strategies tile:128 --out "$WORK/tiled"
if [[ $DRY == 0 ]]; then
    $PY - "$WORK/untiled" "$WORK/tiled" "$RESULTS/gpu_tile_exactness.md" <<'PYEOF'
import csv, sys, torch
from pathlib import Path
import memtrain
ref, got = ([float(r["train_loss"]) for r in csv.DictReader((Path(d) / "metrics.csv").open()) if r.get("train_loss")] for d in sys.argv[1:3])
lines = [f"# tile:128 vs untiled, float32, on {torch.cuda.get_device_name()}", "",
         f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, memtrain {memtrain.__version__}", "",
         "Command: `memtrain fit --config configs/ci-tiny.yaml --size 256 --seed 3 --max-steps 3 ...` with and without"
         " `--strategies tile:128` (benchmarks/gpu.sh). Issue 11 asks for 1e-5 relative; on a CPU all three steps hold it.", "",
         "| step | untiled | tile:128 | relative difference |", "|---:|---:|---:|---:|"]
lines += [f"| {i + 1} | {a:.6f} | {b:.6f} | {abs(a - b) / abs(a):.1e} |" for i, (a, b) in enumerate(zip(ref, got))]
Path(sys.argv[3]).write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
fi

echo "benchmarks/gpu.sh: done in $(( $(date +%s) - start )) s; results in $RESULTS/gpu_*" >&2
