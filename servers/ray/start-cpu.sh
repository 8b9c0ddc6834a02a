#!/usr/bin/env bash
# A one-node Ray cluster on 127.0.0.1 serving servers/ray/serve-cpu.yaml with Ray Serve LLM
# on vLLM's CPU build: the VM path of servers/ray/README.md, shrunk to one machine.
#
#   bash servers/ray/setup.sh && bash servers/cpu-vllm/setup.sh   # once: venv and model
#   bash servers/ray/start-cpu.sh                                 # prints pid=... url=...
#   bash servers/ray/stop-cpu.sh                                  # stops this cluster only
#
# Environment (all optional):
#   GRA_RAY_HOME            cache root of servers/ray/setup.sh (default ~/.cache/gra-async/ray)
#   GRA_VLLM_MODEL_DIR      the converted SmolLM2 directory
#                           (default ~/.cache/gra-async/vllm/models/smollm2-135m-instruct)
#   GRA_RAY_TEMP_DIR        Ray's session directory (default /tmp/gra-ray; Ray's socket
#                           paths must stay under ~100 characters)
#   GRA_RAY_GCS_PORT        default 6379
#   GRA_RAY_DASHBOARD_PORT  default 8265 (serve deploy talks to it)
#   GRA_RAY_SERVE_PORT      default 8000 (the OpenAI-compatible URL)
#   GRA_RAY_CLIENT_PORT     default 10001
#   GRA_RAY_AGENT_PORT      the dashboard agent's HTTP port, default 52365
#   GRA_RAY_METRICS_PORT    default: Ray's own choice
#   GRA_RAY_NUM_CPUS        logical CPUs Ray may hand out, default 2 (one model replica
#                           takes one for itself and one for its engine)
#   GRA_RAY_READY_TIMEOUT   seconds to wait for the application to run (default 900)
#   GRA_RAY_WATCH_PID       if set, the cluster is stopped once that process is gone
#                           (test runners: no cluster is left behind by a killed pytest)
#
# The deployed file is a copy of serve-cpu.yaml with model_source set to the model
# directory and the port to GRA_RAY_SERVE_PORT (both are all that differs between
# machines); it is kept in the session directory as serve-cpu.deployed.yaml.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOME_DIR="${GRA_RAY_HOME:-$HOME/.cache/gra-async/ray}"
VENV="$HOME_DIR/venv"
MODEL_DIR="${GRA_VLLM_MODEL_DIR:-$HOME/.cache/gra-async/vllm/models/smollm2-135m-instruct}"
TEMP_DIR="${GRA_RAY_TEMP_DIR:-/tmp/gra-ray}"
GCS_PORT="${GRA_RAY_GCS_PORT:-6379}"
DASH_PORT="${GRA_RAY_DASHBOARD_PORT:-8265}"
SERVE_PORT="${GRA_RAY_SERVE_PORT:-8000}"
CLIENT_PORT="${GRA_RAY_CLIENT_PORT:-10001}"
AGENT_PORT="${GRA_RAY_AGENT_PORT:-52365}"
NUM_CPUS="${GRA_RAY_NUM_CPUS:-2}"
TIMEOUT="${GRA_RAY_READY_TIMEOUT:-900}"
LOG="$TEMP_DIR/ray-start.log"

[[ -x "$VENV/bin/ray" ]] || { echo "start-cpu.sh: no Ray venv at $VENV: run servers/ray/setup.sh first" >&2; exit 3; }
[[ -f "$MODEL_DIR/config.json" ]] || { echo "start-cpu.sh: no model at $MODEL_DIR: run servers/cpu-vllm/setup.sh first" >&2; exit 3; }
mkdir -p "$TEMP_DIR"

# Ray and vLLM must not phone home, and nothing may be fetched at run time.
export RAY_USAGE_STATS_ENABLED=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PATH="$VENV/bin:$PATH"
# Ray replaces 127.0.0.1 in --node-ip-address with the machine's routable address; this
# switch (meant for single-machine clusters on macOS and Windows, honoured on Linux too)
# keeps the GCS, the raylet and every worker on loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

DEPLOYED="$TEMP_DIR/serve-cpu.deployed.yaml"
"$VENV/bin/python" - "$HERE/serve-cpu.yaml" "$DEPLOYED" "$MODEL_DIR" "$SERVE_PORT" <<'EOF'
import sys, yaml
src, dst, model_dir, port = sys.argv[1:]
config = yaml.safe_load(open(src))
config["http_options"]["port"] = int(port)
(llm,) = config["applications"][0]["args"]["llm_configs"]
llm["model_loading_config"]["model_source"] = model_dir
with open(dst, "w") as out:
    yaml.safe_dump(config, out, sort_keys=False)
EOF

metrics=()
if [[ -n "${GRA_RAY_METRICS_PORT:-}" ]]; then metrics=(--metrics-export-port "$GRA_RAY_METRICS_PORT"); fi
T0=$(date +%s.%N)
# --block: the whole cluster (GCS, raylet, dashboard, workers, vLLM engines) is one process
# tree under PID, which stop-cpu.sh ends by id; `ray stop` would end every Ray process on
# the machine, whoever started it.
# The object store is capped: Ray's default takes 30% of RAM in /dev/shm, and model
# replies never pass through it.
setsid ray start --head --block \
  --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
  --num-cpus "$NUM_CPUS" --num-gpus 0 \
  --object-store-memory 300000000 \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
  --dashboard-agent-listen-port "$AGENT_PORT" \
  --ray-client-server-port "$CLIENT_PORT" \
  "${metrics[@]}" \
  --temp-dir "$TEMP_DIR" --disable-usage-stats >"$LOG" 2>&1 </dev/null &
PID=$!
echo "$PID" >"$TEMP_DIR/cluster.pid"
if [[ -n "${GRA_RAY_WATCH_PID:-}" ]]; then
  W="$GRA_RAY_WATCH_PID"
  setsid bash -c "while kill -0 $W 2>/dev/null && kill -0 $PID 2>/dev/null; do sleep 2; done; GRA_RAY_TEMP_DIR='$TEMP_DIR' bash '$HERE/stop-cpu.sh' $PID" \
    >/dev/null 2>&1 </dev/null &
fi

fail() {
  echo "start-cpu.sh: $1; last lines of $LOG:" >&2
  tail -n 30 "$LOG" >&2
  GRA_RAY_TEMP_DIR="$TEMP_DIR" bash "$HERE/stop-cpu.sh" "$PID"
  exit 1
}
DEADLINE=$(( $(date +%s) + TIMEOUT ))
DASH="http://127.0.0.1:$DASH_PORT"
until "$VENV/bin/python" -c "import sys,urllib.request; urllib.request.urlopen('$DASH/api/version', timeout=2)" 2>/dev/null; do
  kill -0 "$PID" 2>/dev/null || fail "ray start exited"
  (( $(date +%s) < DEADLINE )) || fail "the dashboard did not answer in ${TIMEOUT}s"
  sleep 1
done

serve deploy "$DEPLOYED" --address "$DASH" >>"$LOG" 2>&1 || fail "serve deploy failed"

# The application is RUNNING once its vLLM engine has started and passed a health check.
app_status() {
  serve status --address "$DASH" 2>/dev/null | "$VENV/bin/python" -c "
import sys, yaml
doc = yaml.safe_load(sys.stdin) or {}
app = (doc.get('applications') or {}).get('gra-models') or {}
print(app.get('status', 'NONE'))
if app.get('status') == 'DEPLOY_FAILED':
    print(app.get('message', ''), file=sys.stderr)
"
}
while :; do
  state="$(app_status || echo NONE)"
  [[ "$state" == RUNNING ]] && break
  [[ "$state" == DEPLOY_FAILED ]] && { serve status --address "$DASH" >&2 || true; fail "the application failed to deploy"; }
  kill -0 "$PID" 2>/dev/null || fail "the Ray cluster exited"
  (( $(date +%s) < DEADLINE )) || { serve status --address "$DASH" >&2 || true; fail "not RUNNING after ${TIMEOUT}s"; }
  sleep 2
done
READY=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
echo "pid=$PID url=http://127.0.0.1:$SERVE_PORT/v1 dashboard=$DASH log=$LOG session=$TEMP_DIR ready_s=$READY"
