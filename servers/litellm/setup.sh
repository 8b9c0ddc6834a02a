#!/usr/bin/env bash
# Cached setup of a LiteLLM proxy (the gateway of the @gateway tests) in a venv of its own.
#
#   bash servers/litellm/setup.sh            # idempotent: a finished setup is reused (~1 s)
#   GRA_LITELLM_FORCE=1 bash .../setup.sh    # rebuild the venv
#
# Layout (outside the repo, so the project's own environment never sees LiteLLM's pins):
#   ${GRA_LITELLM_HOME:-$HOME/.cache/gra-async/litellm}/
#     venv/         litellm[proxy]==$LITELLM_VERSION; tests run venv/bin/litellm
#     ready         marker: its content is the key of the finished setup
#
# Environment:
#   GRA_LITELLM_HOME     cache root (default above); tests/gateway.py reads the same variable
#   GRA_LITELLM_PYTHON   interpreter for the venv (default: python3.11, else python3)
#   GRA_LITELLM_FORCE=1  ignore the marker
#
# Prints one summary line at the end: "litellm setup: ... total=<s>".
set -euo pipefail

# 1.108.7 is the newest 1.108 whose pinned siblings (litellm-proxy-extras, litellm-enterprise)
# the registry holds: 1.108.8-1.108.14 pin releases of those that are not published.
LITELLM_VERSION="1.108.7"

HOME_DIR="${GRA_LITELLM_HOME:-$HOME/.cache/gra-async/litellm}"
VENV="$HOME_DIR/venv"
MARKER="$HOME_DIR/ready"
FORCE="${GRA_LITELLM_FORCE:-0}"
if [[ -z "${GRA_LITELLM_PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then GRA_LITELLM_PYTHON=python3.11; else GRA_LITELLM_PYTHON=python3; fi
fi
KEY="litellm[proxy]==$LITELLM_VERSION python=$("$GRA_LITELLM_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

# Start-up must never need the network (CI has none): the model cost map and the other
# JSON files LiteLLM fetches at import come from the copies inside the wheel.
export LITELLM_TELEMETRY=False LITELLM_LOCAL_MODEL_COST_MAP=True \
  LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS=True LITELLM_LOCAL_POLICY_TEMPLATES=True \
  LITELLM_LOCAL_AUTOROUTER_PRESETS=True LITELLM_LOCAL_BLOG_POSTS=True
unset DATABASE_URL

mkdir -p "$HOME_DIR"
exec 9>"$HOME_DIR/.setup.lock"  # one setup at a time per cache
if command -v flock >/dev/null 2>&1; then
  flock -w 900 9 || { echo "litellm setup: $HOME_DIR/.setup.lock held for 15 min" >&2; exit 1; }
fi

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
t0=$(date +%s.%N)

if [[ "$FORCE" != 1 && -f "$MARKER" && "$(cat "$MARKER")" == "$KEY" && -x "$VENV/bin/litellm" ]]; then
  state=cached
else
  echo "[litellm setup] installing litellm[proxy]==$LITELLM_VERSION into $VENV" >&2
  rm -f "$MARKER"
  rm -rf "$VENV"
  "$GRA_LITELLM_PYTHON" -m venv "$VENV"
  pip_flags=(--disable-pip-version-check --no-input -q)
  # Local index mirrors print one "Location ... is ignored" line per package: hide those.
  "$VENV/bin/python" -m pip install "${pip_flags[@]}" --upgrade pip \
    2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
  "$VENV/bin/python" -m pip install "${pip_flags[@]}" "litellm[proxy]==$LITELLM_VERSION" \
    2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
  state=installed
fi

# Cold: the proxy's CLI must import without the network. Warm: the installed version only.
if [[ "$state" == installed ]]; then
  check='import litellm.proxy.proxy_cli'  # imports litellm and the proxy (~5-10 s)
else
  check='pass'
fi
got="$(cd "$HOME_DIR" && timeout 120 "$VENV/bin/python" -c "$check
import importlib.metadata
print(importlib.metadata.version('litellm'))" | tail -n 1)"
if [[ "$got" != "$LITELLM_VERSION" ]]; then
  echo "litellm setup: venv holds litellm $got, expected $LITELLM_VERSION" >&2
  exit 1
fi
printf '%s' "$KEY" >"$MARKER"
echo "litellm setup: litellm[proxy]==$got venv=$VENV $state total=$(elapsed "$t0")s"
