#!/usr/bin/env bash
# Where tuneforge's GPU training step goes (issue #25): on a lent GPU without network, after
# `bash benchmarks/gpu_wheels.sh` here (carry .whl):
#
#   bash benchmarks/gpu_profile.sh [CONFIG ...]      # results under $OUT (else /tmp/gpu-profile)
#
# 1. installs the carried wheels into /tmp/tuneforge-site (as gpu_check.sh --offline);
# 2. runs benchmarks/throughput/profile_train.py on the 1B shape (random weights, SmolLM2's tokenizer) for each
#    CONFIG, "LABEL:BATCH:KEY=VALUE,KEY=VALUE" (default: the set below), printing each one's summary line and its
#    op tables (by CUDA time, by CPU time) and Python profile;
# 3. the training bench on the 1B shape: TRL and TRL + Liger (their packing: 16 rows of 1024 tokens a step) and
#    tuneforge with BENCH_SET at BENCH_BATCH examples a step (default 80: about the same tokens a step as TRL's 16
#    packed rows), tokens/s, peak memory and MFU side by side.
# BUDGET_S (default 420) bounds stages 2-3; a stage that would start with under 40 s left is skipped.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-/tmp/gpu-profile}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-420}
BENCH_BATCH=${BENCH_BATCH:-80}
BENCH_SET=${BENCH_SET:-attention=flash_varlen}
SHAPE=${SHAPE:-llama-3.2-1b}
DEVICE=${DEVICE:-cuda}        # DEVICE=cpu SHAPE=tiny SKIP_INSTALL=1: a dry run of the script on a CPU
PY=${PY:-python3}
WHEELS=${WHEELS:-$ROOT/.whl}
SITE=${TUNEFORGE_GPU_SITE:-/tmp/tuneforge-site}
MODEL=$WHEELS/smollm2-135m-instruct
DATA=$WHEELS/data/gpteacher_roleplay.json
[[ -f $ROOT/../shared/data/gpteacher_roleplay.json ]] && DATA=$ROOT/../shared/data/gpteacher_roleplay.json

t0=$(date +%s)
if [[ -n ${SKIP_INSTALL:-} ]]; then        # SKIP_INSTALL=1: PY as it is, tuneforge from src/
  export PYTHONPATH="$ROOT/src"
else
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl ||
    { echo "gpu_profile.sh: pip could not install $WHEELS"; exit 2; }
  export PYTHONPATH="$SITE:$ROOT/src"
fi
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU", "transformers", transformers.__version__)'
echo "install: $(($(date +%s) - t0)) s"
START=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

CONFIGS=("$@")
((${#CONFIGS[@]})) || CONFIGS=("b16-sdpa:16:" "b16-varlen:16:attention=flash_varlen" "b80-varlen:80:attention=flash_varlen"
  "b80-varlen-ckpt:80:attention=flash_varlen,gradient_checkpointing=true")
for cfg in "${CONFIGS[@]}"; do
  [[ $cfg == none ]] && continue      # `gpu_profile.sh none`: the benches only
  IFS=: read -r label batch sets <<<"$cfg"
  budget=$(left)
  ((budget < 40)) && { echo "skip $label: budget spent"; continue; }
  set_args=()
  IFS=, read -ra pairs <<<"$sets"
  for pair in "${pairs[@]}"; do [[ -n $pair ]] && set_args+=(--set "$pair"); done
  echo "===== profile $label (batch $batch ${sets:-defaults}), ${budget}s left"
  timeout $((budget < 120 ? budget : 120)) "$PY" benchmarks/throughput/profile_train.py --model "$MODEL" \
    --random-init-shape "$SHAPE" --data "$DATA" --device "$DEVICE" --batch "$batch" --steps ${PROFILE_STEPS:-6} --max-length 1024 \
    --label "$label" --out "$OUT/prof-$label" "${set_args[@]}" >"$OUT/prof-$label.log" 2>&1
  echo "exit $?"
  grep -E "SUMMARY|Error|error:" "$OUT/prof-$label.log" | tail -5
  sed -n '/ops_by_device_time/,/Self CUDA time total/p' "$OUT/prof-$label.log" | head -34
done

bench() {  # bench LABEL BATCH RECIPES... [-- extra args]
  local label=$1 batch=$2 budget
  shift 2
  budget=$(left)
  ((budget < 40)) && { echo "skip bench $label: budget spent"; return; }
  echo "===== bench $label (batch $batch), ${budget}s left"
  timeout "$budget" "$PY" benchmarks/train_throughput.py --device "$DEVICE" --steps 10 --batch "$batch" --max-length 1024 \
    --threads 8 --data "$DATA" --model "$MODEL" --random-init-shape "$SHAPE" --timeout 200 --no-build-venvs \
    --trl-python "$PY" --work-dir "$OUT/bench-$label" --json "$OUT/bench-$label.json" "$@" \
    >"$OUT/bench-$label.log" 2>&1
  echo "exit $?"
  grep -E "^\|" "$OUT/bench-$label.log" | head -8
}
bench_set=()
IFS=, read -ra pairs <<<"$BENCH_SET"
for pair in "${pairs[@]}"; do [[ -n $pair ]] && bench_set+=(--tuneforge-set "$pair"); done
bench "tuneforge-b$BENCH_BATCH" "$BENCH_BATCH" --recipes tuneforge "${bench_set[@]}"
[[ -z ${SKIP_TRL:-} ]] && bench trl-b16 16 --recipes trl --trl-liger
echo "total $(($(date +%s) - t0)) s"
