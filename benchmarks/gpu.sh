#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in ONE device call: step timeouts sum to 505 s; with
# nvidia-smi's 20 s and each kill's 5 s grace the worst case is 565 s, under the device's 600 s a
# call (a typical run needs about half).
#   check     45 s  python3 module versions and a C compiler (Triton builds its launchers with one);
#                   stops here, with one line, if torch/triton/numpy or a CUDA device is missing
#                   (nothing is ever installed). 45 s: a bare machine's first CUDA start is slow.
#   warm      90 s  every Triton launch of the matrix once, filling the Triton cache the later steps
#                   reuse (TRITON_CACHE_DIR; lanit_kernels.aot lists the 16 variants)
#   selfcheck 100 s compiled kernels vs the PyTorch references (fp16, bf16; channels_last): about 35
#                   compiles, most of them not among the warmed ones
#   bench    100 s  256 px, fp16/bf16, batch 1/32: generator + adain_conv3x3 (+ _up), eager
#                   channels_last, Triton, CUDA graphs (TorchBackend), with max error vs eager
#   compile  100 s  the torch.compile rows (one fresh compile per shape; the slowest step, last)
#   train     60 s  training steps/s and their phases on the GPU (benchmarks/train_step.py, new side
#                   only: the GPU machine's copy has no git history), default config and 128 px;
#                   skipped with a line if python3 lacks Pillow, tqdm or safetensors (training needs
#                   them; the kernel steps need only torch, triton and numpy)
#   summary   10 s  one table from the JSON lines every step wrote row by row, and the train rows
# Results land in $OUT (benchmarks/results/gpu when OUT is unset): *.jsonl, *.txt, gpu.log,
# summary.txt / summary.json. Copy the table into benchmarks/RESULTS.md with the GPU name.
#
#   bash benchmarks/gpu.sh                        # on the GPU machine, from anywhere
#   GPU_SH_REHEARSAL=1 bash benchmarks/gpu.sh     # CPU rehearsal: Triton interpreter, 32 px, batch 1
#   bash benchmarks/gpu.sh --rehearse             # the same
set -uo pipefail
cd "$(dirname "$0")/.."
rehearse="${GPU_SH_REHEARSAL:-0}"
[ "${1:-}" = "--rehearse" ] && rehearse=1
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
# Rows are appended line by line, so an earlier run's rows are cleared first: only in a folder that
# is empty or that gpu.sh made (its marker file), never in one that holds other files.
if [ -n "$(ls -A "$out")" ] && [ ! -e "$out/.gpu_sh_out" ]; then
    echo "gpu.sh: OUT=$out holds files gpu.sh did not write; choose an empty folder" >&2
    exit 2
fi
touch "$out/.gpu_sh_out"
rm -f "$out"/*.jsonl "$out"/summary.txt "$out"/summary.json "$out"/train_step.json "$out"/gpu.log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/lanit-gpu-sh-triton-cache}"
rehearse_flag=""  # unquoted where used: empty, or one word
if [ "$rehearse" = 1 ]; then
    export TRITON_INTERPRET=1
    rehearse_flag=--rehearse
else
    unset TRITON_INTERPRET
fi
log() { echo "== $(date +%T) $*" | tee -a "$out/gpu.log"; }
# step NAME SECONDS CMD...: run with a timeout, keep its output, log its exit status.
step() {
    local name="$1" seconds="$2"
    shift 2
    log "$name (timeout ${seconds}s)"
    local start=$SECONDS
    timeout -k 5 "$seconds" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.txt" | tee -a "$out/gpu.log" >/dev/null
    local late=""
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then late=" TIMED OUT: rows written so far are kept"; fi
    log "$name rc=$rc ($((SECONDS - start)) s)$late"
    return $rc
}

log "gpu.sh start (rehearsal=$rehearse, out=$out)"
if [ "$rehearse" != 1 ]; then
    timeout -k 5 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        >"$out/gpu_name.txt" 2>&1 || echo "nvidia-smi failed" >>"$out/gpu_name.txt"
    cat "$out/gpu_name.txt" | tee -a "$out/gpu.log"
fi

step check 45 python3 benchmarks/gpu_bench.py check --out-dir "$out" $rehearse_flag
rc=$?
if [ $rc -ne 0 ]; then
    cat "$out/check.txt"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        log "stopped: the check step timed out (CUDA or the imports took over 45 s); nothing else ran"
    else
        log "stopped: the GPU machine lacks what gpu.sh needs (see the line above)"
    fi
    exit 3
fi
cat "$out/check.txt"

step warm 90 python3 benchmarks/gpu_bench.py warm --out-dir "$out" $rehearse_flag

if [ "$rehearse" = 1 ]; then
    log "selfcheck skipped in the rehearsal (it needs a CUDA GPU)"
else
    step selfcheck 100 python3 -m lanit_kernels.selfcheck --dtypes fp16 bf16 --layouts channels_last \
        --jsonl "$out/selfcheck.jsonl"
fi

step bench 100 python3 benchmarks/gpu_bench.py bench --out-dir "$out" $rehearse_flag \
    --impls eager_cl triton_cl graphs

step compile 100 python3 benchmarks/gpu_bench.py bench --out-dir "$out" $rehearse_flag --step compile \
    --impls compile --ops adain_conv3x3_up adain_conv3x3 generator

# the check step's row lists what training needs and python3 here cannot import
lacking=$(python3 -c 'import json, sys; row = json.loads(open(sys.argv[1]).read().splitlines()[-1])
print(" ".join(row["training_modules_missing"]))' "$out/check.jsonl" 2>&1) || lacking="? ($lacking)"
if [ -n "$lacking" ]; then
    log "train skipped: python3 here cannot import $lacking, which training needs"
elif [ "$rehearse" = 1 ]; then
    log "train skipped in the rehearsal (benchmarks/train_step.py runs on the CPU by itself)"
else
    step train 60 python3 benchmarks/train_step.py --device cuda --sizes default 128 --steps 10 \
        --warmup 3 --rounds 1 --baseline "" --json "$out/train_step.json"
fi

step summary 10 python3 benchmarks/gpu_bench.py summary --out-dir "$out"
log "done"
cat "$out/summary.txt"
