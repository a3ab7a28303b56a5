#!/usr/bin/env bash
# The GPU path, proven: a few minutes on one CUDA GPU (prepared; not yet run - no GPU was lent).
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# 1. the device-parametrised tests on cuda (every mode, tiny models, fp32, bf16 autocast and the
#    bfloat16 decoder);
# 2. bench/latency.py --device cuda: SAM vit_h + DINOv2-L (the GPU defaults) and MobileSAM +
#    DINOv2-S, each in fp32 and under bf16 and fp16 autocast, and MobileSAM with the bfloat16
#    decoder (per-stage seconds, peak GPU memory);
# 3. encoder batching: features_many over 8 images in batches of 1, 4 and 8;
# 4. bench/runtime_speed.py is CPU-only (ONNX Runtime, OpenVINO); not run here.
# Random weights throughout (a forward pass costs the same whatever the weights).
set -u
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
export MODEL_DIR=${MODEL_DIR:-/tmp/gpu-check-models}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

echo "== 1. device tests on cuda" | tee "$OUT/summary.txt"
timeout 240 $PY -m pytest -q -p no:cacheprovider -W ignore tests/engine/test_device.py -k cuda \
  2>&1 | tail -20 | tee "$OUT/tests.txt" | tail -3 | tee -a "$OUT/summary.txt"

echo "== 2. latency on cuda" | tee -a "$OUT/summary.txt"
run() {  # name, then latency.py arguments
  local name=$1; shift
  timeout 240 $PY bench/latency.py --device cuda --targets 1 --model-dir "$MODEL_DIR" "$@" \
    > "$OUT/latency-$name.txt" 2>&1
  echo "-- $name (rc $?)" | tee -a "$OUT/summary.txt"
  grep -E "^\| [a-z_-]+ \| [0-9]+ \||raw SAM" "$OUT/latency-$name.txt" | tee -a "$OUT/summary.txt"
}
for cast in none bf16 fp16; do
  extra=(); [ "$cast" != none ] && extra=(--autocast "$cast")
  run "vit_h-dinov2L-$cast" --sam-type vit_h --encoder vit_large_patch14_dinov2.lvd142m ${extra[@]+"${extra[@]}"}
  run "mobile_sam-dinov2S-$cast" --sam-type mobile_sam ${extra[@]+"${extra[@]}"}
done
# The engine's own bfloat16 decoder (decoder_precision), encoders in fp32.
run "mobile_sam-dinov2S-decoder-bf16" --sam-type mobile_sam --decoder-precision bfloat16

echo "== 3. encoder batching (features_many)" | tee -a "$OUT/summary.txt"
timeout 180 $PY - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import os, time, numpy as np, torch
from matcher_core import OneShotSegmenter, SegmenterConfig
for sam_type, encoder in (("vit_h", "vit_large_patch14_dinov2.lvd142m"),
                          ("mobile_sam", "vit_small_patch14_dinov2.lvd142m")):
    seg = OneShotSegmenter(SegmenterConfig(sam_type=sam_type, encoder=encoder, device="cuda",
                                           random_weights=True, model_dir=os.environ["MODEL_DIR"]))
    g = np.random.default_rng(0)
    images = [g.integers(0, 255, (480, 854, 3), dtype=np.uint8) for _ in range(8)]
    seg.features_many(images[:2], batch_size=2)  # warm-up
    for batch in (1, 4, 8):
        seg.cache.clear(); torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        seg.features_many(images, batch_size=batch); torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(f"{sam_type}: batch {batch}: {1000 * seconds / 8:.1f} ms/image, peak {peak:.0f} MiB")
    del seg; torch.cuda.empty_cache()
PY
echo "done: $OUT/summary.txt"
