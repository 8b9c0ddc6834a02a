#!/usr/bin/env bash
# The package as a user gets it: build the wheel (and the sdist) from the checkout, install the
# wheel with its [testing] extra in a fresh venv, and use it from a directory outside the
# checkout: the CLI and the Python API against the fake server, prompts from the installed
# package. Catches what the editable install of the tests hides: package data left out of the
# wheel, runtime imports that are not declared dependencies, code reading the checkout's files.
#
#   bash .ci/wheel_check.sh        (PYTHON=... to build with another interpreter)
#
# One line per step with its time; the output of a failed step is shown below its line.
# Build and install failures stop at once; the usage steps all run, and any failure makes the
# exit code 1. KEEP_TMP=1 keeps the temporary directory (venv, run dirs, logs).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/gra-wheel-check.XXXXXX")
case "$(cd "$tmp" && pwd -P)/" in
  "$(cd "$repo" && pwd -P)"/*)
    echo "wheel check: TMPDIR must be outside the checkout" >&2; rmdir "$tmp"; exit 2 ;;
esac
venv="$tmp/venv"
work="$tmp/work"  # the current directory of every usage step: not the checkout
failed=()

cleanup() {
  local pid
  if pid=$(cat "$tmp/fake.pid" 2>/dev/null) && kill "$pid" 2>/dev/null; then
    for _ in {1..50}; do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  if [[ ${KEEP_TMP:-} == 1 ]]; then
    echo "[wheel-check] kept $tmp"
  else
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# run_step NAME FUNCTION: FUNCTION runs in a subshell with errexit, its output to a log that is
# shown if it fails; the exit code is left in $step_code. Never call it (or fatal/check) from
# an `if`, `||` or `&&`: bash ignores -e in everything such a command runs, subshells too.
step_code=0
run_step() {
  local name=$1 started log="$tmp/logs/$1.log"
  shift
  started=$(now)
  set +e
  (set -e; "$@") >"$log" 2>&1
  step_code=$?
  set -e
  if ((step_code == 0)); then
    printf '[wheel-check] ok    %-10s %6ss\n' "$name" "$(since "$started")"
  else
    printf '[wheel-check] FAIL  %-10s %6ss (exit %d); its output:\n' \
      "$name" "$(since "$started")" "$step_code"
    sed 's/^/    | /' "$log"
  fi
}
# fatal: a step that the next ones need. check: independent, failures reported at the end.
fatal() {
  run_step "$@"
  if ((step_code)); then
    echo "wheel check failed at step '$1' (the steps after it need it)" >&2
    exit 1
  fi
}
check() {
  run_step "$@"
  if ((step_code)); then failed+=("$1"); fi
}

in_venv() { (cd "$work" && env -u PYTHONPATH -u PYTHONHOME "$venv/bin/$1" "${@:2}"); }

# --- build: the wheel and the sdist, from a copy of the checkout's files (tracked and new, not
#     ignored: stale build/ or *.egg-info/ folders cannot add files), with the build backend
#     that pyproject.toml asks for, in a venv of its own (what `python -m build` does).
build() {
  local builder="$tmp/build-venv/bin/python"
  mkdir -p "$tmp/src" "$tmp/dist"
  if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' file; do [[ -e $file ]] && printf '%s\0' "$file"; done \
      | xargs -0 cp --parents -t "$tmp/src")
  else
    cp -a "$repo/." "$tmp/src"
  fi
  "$python" -m venv "$tmp/build-venv"
  local requires
  mapfile -t requires < <("$builder" -c 'import sys, tomllib
with open(sys.argv[1], "rb") as handle:
    print(*tomllib.load(handle)["build-system"]["requires"], sep="\n")' "$tmp/src/pyproject.toml")
  "$builder" -m pip install --quiet --disable-pip-version-check "${requires[@]}"
  mapfile -t requires < <(cd "$tmp/src" && "$builder" -c 'import contextlib, sys
from setuptools import build_meta
with contextlib.redirect_stdout(sys.stderr):  # its log goes to stdout
    requires = build_meta.get_requires_for_build_wheel()
print("".join(f"{name}\n" for name in requires), end="")')
  if ((${#requires[@]})); then
    "$builder" -m pip install --quiet --disable-pip-version-check "${requires[@]}"
  fi
  (cd "$tmp/src" && "$builder" -m pip wheel --no-deps --no-build-isolation . -w "$tmp/dist")
  (cd "$tmp/src" && "$builder" -c 'import sys
from setuptools import build_meta
print(build_meta.build_sdist(sys.argv[1]))' "$tmp/dist")
  ls -l "$tmp/dist"
}

# --- contents: package data in both archives, nothing but the package in the wheel.
contents() {
  local wheel sdist listing sdist_listing  # listings in variables: `tar | grep -q` is a SIGPIPE
  wheel=$(ls "$tmp"/dist/gra_async-*.whl)
  sdist=$(ls "$tmp"/dist/*.tar.gz)  # gra_async- or gra-async-, by setuptools version
  listing=$("$python" -m zipfile -l "$wheel" | awk 'NR > 1 { print $1 }')
  sdist_listing=$(tar -tzf "$sdist" | sed 's|^[^/]*/||')
  for path in gra_async/data/prompts/generator.md gra_async/data/prompts/reviewer.md \
      gra_async/data/prompts/adjudicator.md gra_async/data/prompts/metadata.md \
      gra_async/data/seeds.jsonl gra_async/py.typed; do
    grep -qx "$path" <<<"$listing" || { echo "the wheel lacks $path"; exit 1; }
    grep -qx "$path" <<<"$sdist_listing" || { echo "the sdist lacks $path"; exit 1; }
  done
  local stray
  stray=$(grep -v -e '^gra_async/' -e '^gra_async-[^/]*\.dist-info/' <<<"$listing" || true)
  [[ -z $stray ]] || { echo "the wheel holds files outside the package:"; echo "$stray"; exit 1; }
  echo "$listing" | grep -c . | sed 's/$/ files in the wheel/'
}

# --- install: a fresh venv, the wheel (not editable) and its [testing] extra; pip may use its
#     cache and the index for the dependencies.
install() {
  local wheel
  wheel=$(ls "$tmp"/dist/gra_async-*.whl)
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel[testing]"
  mkdir -p "$work"
  in_venv python -c 'import gra_async, sys; print(gra_async.__file__)'
}

# --- deps: what the installed package imports (outside gra_async/testing/) is exactly what it
#     declares, and every module imports with those alone.
deps() {
  in_venv python - <<'EOF'
import ast, importlib, importlib.metadata as md, pathlib, pkgutil, re, sys

import gra_async

root = pathlib.Path(gra_async.__file__).parent
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
imported = set()
for path in root.rglob("*.py"):
    if "testing" in path.relative_to(root).parts:
        continue
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
third_party = {name for name in imported
               if name not in sys.stdlib_module_names and name != "gra_async"}
owners = md.packages_distributions()
# An extra's package (matplotlib for `report`) may be absent: the code that imports it says
# which extra to install when it is.
extras = {norm(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
          for req in md.requires("gra-async") or [] if "extra ==" in req}
missing = sorted(name for name in third_party if name not in owners and norm(name) not in extras)
used = {norm(dist) for name in third_party for dist in owners.get(name, [])}
declared = {norm(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
            for req in md.requires("gra-async") or [] if "extra ==" not in req}
problems = []
if missing:
    problems.append(f"imported but not installed with the wheel: {missing}")
if used - declared:
    problems.append(f"imported but not declared: {sorted(used - declared)}")
if declared - used:
    problems.append(f"declared but never imported: {sorted(declared - used)}")
for module in pkgutil.walk_packages(gra_async.__path__, "gra_async."):
    if module.name.endswith(".__main__"):
        continue  # importing it runs the CLI
    try:
        importlib.import_module(module.name)
    except Exception as exc:
        problems.append(f"import {module.name}: {type(exc).__name__}: {exc}")
print("runtime dependencies:", ", ".join(sorted(declared)))
sys.exit("\n".join(problems) or None)
EOF
}

# --- server: the fake OpenAI-compatible server from the installed package, in the background
#     (its pid in fake.pid for cleanup). Both reviewers give every criterion 9 (rules by
#     model), so every sample is accepted: target 3 in 3 tasks, not by luck of hashed scores.
server() {
  local rules pid deadline=$((SECONDS + 20))
  rules=$(in_venv python -c 'import json
from gra_async import defaults
review = json.dumps({"scores": dict.fromkeys(defaults.CRITERIA, 9), "feedback": "fine"})
print(json.dumps([{"model": model, "content": review}
                  for model in ("rev-b", "rev-c", "llama-3.1-8b-instruct", "granite-3.3-8b-instruct")]))')
  (cd "$work" && exec env -u PYTHONPATH -u PYTHONHOME "$venv/bin/python" \
    -m gra_async.testing.fake_server --port 0 --rules "$rules" \
    --models gen-a,rev-b,rev-c,adj-d,qwen2.5-7b-instruct,llama-3.1-8b-instruct,granite-3.3-8b-instruct \
    </dev/null >"$tmp/fake.out" 2>"$tmp/fake.err") &
  pid=$!
  echo "$pid" >"$tmp/fake.pid"
  while ! grep -q '^READY [0-9]' "$tmp/fake.out"; do
    kill -0 "$pid" 2>/dev/null || { echo "fake server exited:"; cat "$tmp/fake.err"; exit 1; }
    ((SECONDS < deadline)) || { echo "fake server printed no READY line in 20 s"; exit 1; }
    sleep 0.1
  done
  cat "$tmp/fake.out"
}

# --- (a) cli: run, status --json, export.
cli() {
  in_venv gra-async run --run-dir runs/cli --target 3 \
    --endpoint "generator=gen-a@$url" --endpoint "reviewer=rev-b@$url" \
    --endpoint "reviewer=rev-c@$url" --endpoint "adjudicator=adj-d@$url" </dev/null
  in_venv gra-async status --run-dir runs/cli --json >"$tmp/status.json"
  in_venv python - "$tmp/status.json" <<'EOF'
import json, sys

with open(sys.argv[1], encoding="utf-8") as handle:
    accepted = json.load(handle)["accepted"]
assert accepted >= 3, f"status --json says accepted {accepted}, expected >= 3"
print("status: accepted", accepted)
EOF
  in_venv gra-async export --run-dir runs/cli
  local lines
  lines=$(wc -l <"$work/runs/cli/samples.jsonl")
  ((lines >= 3)) || { echo "runs/cli/samples.jsonl has $lines lines, expected >= 3"; exit 1; }
  echo "exported $lines samples"
}

# --- (b) api: the README's "From Python" example, as written (its GATEWAY URL pointed at
#     the fake server), then the API contract on its own.
api() {
  in_venv python - "$repo/README.md" "$url" <<'EOF'
import re, sys

readme = open(sys.argv[1], encoding="utf-8").read()
section = readme[readme.index("## From Python"):]
block = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
written = 'GATEWAY = "http://127.0.0.1:4000/v1"'
assert written in block, "the README example no longer names its GATEWAY URL"
namespace: dict = {}
exec(compile(block.replace(written, f'GATEWAY = "{sys.argv[2]}"'), "README.md", "exec"), namespace)
assert namespace["summary"].reached_target, namespace["summary"]
print("README example:", namespace["summary"].explain())
EOF
  in_venv python - "$url" <<'EOF'
import sys

import gra_async

URL = sys.argv[1]
config = gra_async.RunConfig.model_validate({
    "run": {"run_dir": "runs/api", "target": 3},
    "endpoints": {
        "generator": [{"base_url": URL, "model": "gen-a"}],
        "reviewer": [{"base_url": URL, "model": "rev-b"}, {"base_url": URL, "model": "rev-c"}],
        "adjudicator": [{"base_url": URL, "model": "adj-d"}],
    },
})
summary = gra_async.run(config)
assert summary.reached_target and summary.accepted >= 3, summary
samples = list(gra_async.read_samples("runs/api"))
assert len(samples) >= 3 and samples[0].reviews[0].model, samples[:1]
print(f"api: {summary.accepted} accepted, {len(samples)} samples read back")
EOF
}

# --- (c) installed: the package and its prompts come from the venv, not the checkout.
installed() {
  in_venv python - "$repo" <<'EOF'
import pathlib, sys, sysconfig

checkout = pathlib.Path(sys.argv[1]).resolve()
on_path = [p for p in sys.path if pathlib.Path(p or ".").resolve().is_relative_to(checkout)]
assert not on_path, f"the checkout is on sys.path: {on_path}"

import gra_async
import gra_async.prompts as prompts

site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
package = pathlib.Path(gra_async.__file__).resolve()
folder = prompts.default_prompts_dir().resolve()
assert package.is_relative_to(site), f"gra_async imported from {package}, not from {site}"
assert folder.is_relative_to(site), f"prompts found in {folder}, not in {site}"
assert not folder.is_relative_to(checkout), f"prompts read from the checkout: {folder}"
assert prompts.PromptSet.load(None).metadata_template is not None  # all four templates parse
print("package:", package.parent)
print("prompts:", folder)
EOF
}

mkdir -p "$tmp/logs"
echo "[wheel-check] $("$python" --version 2>&1), temp dir $tmp"
fatal build build
fatal contents contents
fatal install install
check deps deps

fatal server server
url="http://127.0.0.1:$(awk '/^READY/ { print $2; exit }' "$tmp/fake.out")/v1"

check cli cli
check api api
check installed installed

if ((${#failed[@]})); then
  echo "wheel check failed at: ${failed[*]}" >&2
  exit 1
fi
echo "[wheel-check] all steps passed"
