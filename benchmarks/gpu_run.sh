#!/usr/bin/env bash
# Everything a leased GPU should run, in the order that matters when time runs out, each step's
# JSON under $OUT as soon as it finishes (docs/benchmarks.md, On a GPU):
#   1. attention: every SDPA kernel's gradients against fp32 math at the six token counts
#      (benchmarks/attention_check.py; must run: the engine's kernel wrong exits 1 at the end);
#   2. benchmarks/gpu_proof.py: the per-stage profile, the engine, baselines, the largest model,
#      the ablation rows, until PROOF_BUDGET_S (default 330) is spent;
#   3. the headline: ray start, ray job submit of a short CoAtNet-6 run, /metrics mid-run, a
#      complete checkpoint, the handoff to 384 px, the bias gradient at 576 tokens, ray stop
#      (benchmarks/gpu_run.py; skipped, and said so, where Ray is not installed);
#   4. $OUT/gpu-<date>-<device>.json: all of it with versions and $GIT_COMMIT
#      (benchmarks/gpu_results.py collect); commit it as benchmarks/results/ and generate the page's
#      table with `python benchmarks/gpu_results.py table FILE --write docs/benchmarks.md`.
# Usage: GIT_COMMIT=$(git rev-parse HEAD) OUT=/path bash benchmarks/gpu_run.sh [--dry-run]
# A host with PyTorch but not this project's stack: `make wheelhouse` here, carry wheelhouse/;
# this installs it (--no-index, into /tmp/site) before anything runs. WHEELS=dir: another folder
# of wheels (one that also holds Ray, for the headline).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
PY=${PY:-python3}
PROOF_BUDGET_S=${PROOF_BUDGET_S:-330}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT"
run() { echo "+ $*"; [ "$DRY" = 1 ] || "$@"; }

WHEELS=${WHEELS:-wheelhouse}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  run "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl
  export PATH="/tmp/site/bin:$PATH"  # ray's command, when the wheels hold it
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export DS_BUILD_OPS=0

run "$PY" benchmarks/attention_check.py --heads 20 --head-dim 64 --out "$OUT/attention.json"
attention=$?
run "$PY" benchmarks/gpu_proof.py --budget-s "$PROOF_BUDGET_S" --skip attention --out "$OUT/proof.json"
if [ "$DRY" = 1 ]; then  # the headline's steps and commands, written, none run
  run "$PY" benchmarks/gpu_run.py --out "$OUT/headline.json"
  "$PY" benchmarks/gpu_run.py --dry-run --out "$OUT/headline-plan.json"
elif "$PY" -c "import ray" 2> /dev/null; then
  trap 'ray stop --force > /dev/null 2>&1' EXIT  # a killed run leaves no cluster behind
  run "$PY" benchmarks/gpu_run.py --out "$OUT/headline.json"
else
  echo '{"steps": [], "skipped": "ray is not installed on this host"}' > "$OUT/headline.json"
fi
run "$PY" benchmarks/gpu_results.py collect --attention "$OUT/attention.json" --proof "$OUT/proof.json" \
  --headline "$OUT/headline.json" --out-dir "$OUT"
exit "$attention"
