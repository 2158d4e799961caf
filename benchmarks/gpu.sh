#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run sized for a 10-minute device call:
#   1. the compiled Triton kernels against their references (lanit_kernels.selfcheck),
#   2. the GPU tests (pytest -m gpu),
#   3. the kernel benchmark at 128/256 px (fp16 and fp32, batch 1 and 64),
#   4. Translator / bare-generator throughput at 256 px, batch 1/8/32/64, fp16, CUDA graphs,
#      with torch.compile of the reference as a comparison row.
# Results land in $OUT (or benchmarks/results/gpu when OUT is unset); copy the tables into
# benchmarks/RESULTS.md with the GPU name that nvidia-smi prints.
#
#   bash benchmarks/gpu.sh                      # on the GPU machine, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
unset TRITON_INTERPRET
log() { echo "== $(date +%T) $*" | tee -a "$out/gpu.log"; }

log "setup"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_name.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/gpu.log" || pip install -q -e '.[triton,onnx-gpu]' >>"$out/gpu.log" 2>&1

log "lanit_kernels.selfcheck"
timeout 120 python -m lanit_kernels.selfcheck >"$out/selfcheck.json" 2>>"$out/gpu.log"; echo "rc $?" | tee -a "$out/gpu.log"

log "pytest -m gpu"
HF_HUB_OFFLINE=1 timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tail -5 | tee -a "$out/gpu.log"

log "kernels benchmark"
timeout 200 python benchmarks/fused_ops.py --sizes 128 256 --batches 1 64 --dtypes fp16 fp32 \
    --out "$out/fused_ops.json" 2>&1 | tee "$out/fused_ops.txt" | tail -40

log "throughput"
timeout 200 python benchmarks/throughput.py --device cuda --sizes 256 --batch-sizes 1,8,32,64 \
    --dtype fp16 --cuda-graphs --compile --backends torch --out "$out/throughput.json" 2>&1 \
    | tee "$out/throughput.txt" | tail -30
log "done"
