#!/usr/bin/env bash
# One-script GPU check of hf_ghosts (issue 13). From the repository root:
#
#   bash benchmarks/gpu_check.sh
#
# On a CUDA GPU (H200: about 5 minutes, under 8) it runs, each part in a process of its own (one part failing
# keeps the others' numbers; every failure is recorded):
#   1. tests: the tests marked `gpu` in tests/test_gpu.py, test_probe_dtype.py and test_attention_triton.py (only those
#      are collected: others import wandb, absent there) (bf16 probe accuracy on CUDA, sdpa training with the ghosts probe, the
#      chunked head at a 50k vocabulary: equality with the full head and peak memory);
#   2. overhead, scenario "pretrain": Pythia-160m's shape, bf16, 8 x 1024 tokens, from random init at lr 6e-4: plain
#      Trainer, RhoTrainer default, jvp-bf16 every step, fd-fp32 every step; time per step and peak memory
#      (torch.cuda.max_memory_allocated) as ratios to plain;
#   3. finetune, scenario "finetune": the same shape first trained 300 plain bf16 steps at lr 6e-4 on pydoc text,
#      then the same four settings fine-tuning it at lr 3e-5 on held-out text (what fine-tuning users see);
#   4. breakdown: benchmarks/gpu_breakdown.py, each piece of a probe timed alone in plain steps, and the bf16 JVP
#      probe's top ops (also written to benchmarks/results/gpu_breakdown.json);
#   5. recipe: the main job (recipes/pythia_finetune.py, pythia-70m preset, bf16, 60 steps, report_to none).
# Each part has a time limit (60 + 120 + 150 + 150 + 120 + 120 s at most: under 8 minutes in all; about 5 expected).
# Then it writes benchmarks/results/gpu_check.json (copied into $OUT when set) and prints a summary table.
# GPU_CHECK_RESULTS (default benchmarks/results) and GPU_CHECK_WORK (default outputs/gpu_check) move what it writes.
# Without CUDA it runs to the end as a smoke test (tiny sizes, 2 steps), skipping only what needs CUDA, and says so.
# If `transformers` is older than 5.23 it first installs the wheels in .whl/ into /tmp/site (no network).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=python3
command -v "$PY" >/dev/null 2>&1 || PY=python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

if ! "$PY" -c "import sys, transformers; from packaging.version import Version; sys.exit(Version(transformers.__version__) < Version('5.23'))" 2>/dev/null; then
    echo "gpu_check: transformers missing or older than 5.23: installing .whl/*.whl into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
RESULTS=${GPU_CHECK_RESULTS:-$ROOT/benchmarks/results}
WORK=${GPU_CHECK_WORK:-$ROOT/outputs/gpu_check}
PARTS=$RESULTS/gpu_check_parts
rm -rf "$PARTS"
mkdir -p "$PARTS"
if [ "$CUDA" = 1 ]; then
    echo "gpu_check: CUDA: $("$PY" -c 'import torch; print(torch.cuda.get_device_name())')"
else
    echo "gpu_check: NO CUDA on this machine: smoke form (tiny sizes, 2 steps); the gpu tests are skipped (they need CUDA)"
fi

# part NAME TIMEOUT_S NOTE -- COMMAND...: run it, log to $PARTS/NAME.log, record status, rc and seconds.
part() {
    local name=$1 limit=$2 note=$3
    shift 4
    local began rc=0 status=ok
    began=$(date +%s)
    echo
    echo "== gpu_check part '$name' ($note; limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > >(tee "$PARTS/$name.log") 2>&1 || rc=$?
    wait  # the tee
    [ "$rc" -eq 0 ] || status=failed
    [ "$rc" -eq 124 ] && note="$note; TIMED OUT after ${limit}s"
    printf 'status=%s\nrc=%s\nseconds=%s\nnote=%s\n' "$status" "$rc" "$(( $(date +%s) - began ))" "$note" > "$PARTS/$name.status"
    echo "== part '$name': $status (rc $rc)"
}

skipped() {  # skipped NAME WHY
    printf 'status=skipped\nrc=0\nseconds=0\nnote=%s\n' "$2" > "$PARTS/$1.status"
    echo
    echo "== gpu_check part '$1': SKIPPED: $2"
}

part env 60 "versions; does importing hf_ghosts import wandb" -- "$PY" benchmarks/gpu_check.py env --out "$PARTS/env.json"

if [ "$CUDA" = 1 ]; then
    part tests 120 "pytest -m gpu (flash-attn is not installed on the H200 machine: that one test is skipped)" -- \
        "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs --junitxml "$PARTS/tests.xml" tests/test_gpu.py tests/test_probe_dtype.py tests/test_attention_triton.py
    part overhead 150 "scenario pretrain: pythia-160m shape, bf16, 8 x 1024 tokens, 12 timed + 3 warm-up steps" -- \
        "$PY" benchmarks/gpu_check.py overhead --out "$PARTS/overhead.json"
    part finetune 150 "scenario finetune: 300 pretraining steps, then 12 timed + 3 warm-up steps at lr 3e-5" -- \
        "$PY" benchmarks/gpu_check.py finetune --out "$PARTS/finetune.json"
    part breakdown 120 "pieces of a probe in plain steps, the bf16 jvp probe's top ops" -- \
        "$PY" benchmarks/gpu_breakdown.py --repeats 5 --out "$PARTS/breakdown.json"
    [ -f "$PARTS/breakdown.json" ] && cp "$PARTS/breakdown.json" "$RESULTS/gpu_breakdown.json"
    part recipe 120 "pythia_finetune: pythia-70m preset, bf16, 60 steps, report_to none" -- \
        "$PY" recipes/pythia_finetune.py --preset pythia-70m --bf16 --max_steps 60 --eval_steps 30 \
        --report_to none --output_dir "$WORK/pythia_finetune"
else
    skipped tests "no CUDA: the gpu-marked tests need a CUDA GPU"
    part overhead 300 "no CUDA: smoke form, tiny size, fp32, 2 steps" -- \
        "$PY" benchmarks/gpu_check.py overhead --out "$PARTS/overhead.json"
    part finetune 300 "no CUDA: smoke form, tiny size, fp32, 3 pretraining steps, 2 steps" -- \
        "$PY" benchmarks/gpu_check.py finetune --out "$PARTS/finetune.json"
    part breakdown 300 "no CUDA: smoke form, tiny size" -- \
        "$PY" benchmarks/gpu_breakdown.py --tiny --repeats 1 --out "$PARTS/breakdown.json"
    part recipe 300 "no CUDA: smoke form, pythia-tiny, 2 steps, report_to none" -- \
        "$PY" recipes/pythia_finetune.py --max_steps 2 --eval_steps 2 --max_eval_blocks 4 --logging_steps 1 \
        --report_to none --output_dir "$WORK/pythia_finetune"
fi
if [ -f "$WORK/pythia_finetune/summary.json" ]; then
    cp "$WORK/pythia_finetune/summary.json" "$PARTS/recipe.json"
fi

"$PY" benchmarks/gpu_check.py summary --parts "$PARTS" --out "$RESULTS/gpu_check.json"
if [ -n "${OUT:-}" ] && [ "$CUDA" = 1 ] && [ -f "$RESULTS/gpu_breakdown.json" ]; then
    cp "$RESULTS/gpu_breakdown.json" "$OUT/"
fi
echo "gpu_check: done in $(( $(date +%s) - START )) s"
if grep -q '^status=failed' "$PARTS"/*.status; then
    echo "gpu_check: some parts FAILED (see the table above and benchmarks/results/gpu_check.json)"
    exit 1
fi
