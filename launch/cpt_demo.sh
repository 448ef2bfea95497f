#!/usr/bin/env bash
# Continual pretraining on a CPU, in one command (README "Continual
# pretraining"; docs/continual.md):
#
#   bash launch/cpt_demo.sh          # the demo
#   bash launch/cpt_demo.sh sweep    # the EWC lambda sweep that picked LAMBDA
#
# 1. a base model (tiny-gemma2: 4 layers, d_model 128) trained 200 steps on
#    prose and code only (configs/cpt/tiny-base.yaml), unless WORKDIR/base
#    holds a finished run;
# 2. its Fisher (per_example) on 128 training rows each of prose and code;
# 3. the base continued on math (configs/cpt/tiny-cpt.yaml) four ways at
#    equal steps and tokens: naive (math only), replay (80% math, 10% prose,
#    10% code), EWC (math only, ewc_lambda=LAMBDA on the mean-normalised
#    Fisher) and EWC + replay;
# 4. `gemma-jax report` of the base and the four: held-out loss per source
#    (math: the gain; prose and code: the forgetting) and the accuracy on
#    two multiple-choice tasks generated from the corpus's held-out files
#    (prose_next, code_next: the true next sentence / line of 4), scored by
#    lm-evaluation-harness (their task YAMLs in WORKDIR/tasks), printed as
#    one table with the change from the base in parentheses.
#
# `sweep` trains the EWC variant (math only) at each lambda of SWEEP (orders
# of magnitude) and prints the same table for them; LAMBDA is the one with
# the lowest mean held-out loss over prose, code and math (the gain and the
# forgetting weighted equally).
#
# Everything goes to $WORKDIR (default runs/cpt_demo); rerunning skips
# finished steps. GEMMA_JAX / PYTHON name the command and interpreter to use
# (default: the .venv that launch/setup.sh creates).
set -euo pipefail
cd "$(dirname "$0")/.."

W=${WORKDIR:-runs/cpt_demo}
LAMBDA=${LAMBDA:-1e-1}
STEPS=${STEPS:-100}
SWEEP=${SWEEP:-1e-4 1e-3 1e-2 1e-1 1}
if [ -z "${GEMMA_JAX:-}" ]; then
  GEMMA_JAX_EXTRAS="eval" source launch/setup.sh
  GEMMA_JAX=".venv/bin/gemma-jax"
  PYTHON=".venv/bin/python"
fi
PYTHON=${PYTHON:-python3}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
: "${JAX_COMPILATION_CACHE_DIR:=$HOME/.cache/gemma_jax/xla}"
export JAX_COMPILATION_CACHE_DIR
gj() { $GEMMA_JAX "$@"; }
# Trains unless WORKDIR/params exists (a finished run).
train() {
  local dir=$1; shift
  [ -d "$dir/params" ] || gj train "$@" --workdir "$dir"
}
CPT=configs/cpt/tiny-cpt.yaml
COMMON=(--set "checkpoint.init_from=$W/base/params"
        --set "continual.fisher=$W/fisher" --set "train.steps=$STEPS")
MATH_ONLY="data.stages=[{start_step: 0, weights: {math: 1.0}}]"
# One continued run into WORKDIR/DIR: variant DIR [KEY=VALUE overrides of
# tiny-cpt.yaml].
variant() {
  local dir=$1; shift
  local sets=(); for kv in "$@"; do sets+=(--set "$kv"); done
  train "$W/$dir" "$CPT" "${COMMON[@]}" "${sets[@]}"
}
# The report of the base and runs NAME=DIR... into WORKDIR/OUT, its summary
# table in WORKDIR/OUT.txt (unless WORKDIR/OUT holds a finished report).
report() {
  local out=$1; shift
  [ -f "$W/$out/report.json" ] && return
  local specs=(--checkpoint "base=$W/base/params")
  for run in "$@"; do
    specs+=(--checkpoint "${run%%=*}=$W/${run#*=}/params")
  done
  gj report "$CPT" "${COMMON[@]}" --set continual.ewc_lambda=0 \
      "${specs[@]}" --tasks prose_next,code_next --include-path "$W/tasks" \
      --eval-batches 4 \
      --out "$W/$out" > "$W/$out.txt"
}

start=$(date +%s)
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
gj data build-default
train "$W/base" configs/cpt/tiny-base.yaml
[ -f "$W/fisher/fisher.json" ] || gj fisher "$CPT" \
    --set continual.ewc_lambda=0 --params "$W/base/params" \
    --source prose --source code --sequences 128 --out "$W/fisher" --force
if [ ! -f "$W/tasks/code_next.yaml" ]; then
  $PYTHON -c "import sys; from gemma_jax.evals import synthetic
paths = synthetic.write_synthetic(sys.argv[1], num_items=100)
synthetic.write_harness_tasks(sys.argv[1], paths)" "$W/tasks"
fi

# naive is EWC at lambda 0; the sweep's runs are the demo's EWC runs.
variant naive continual.ewc_lambda=0 "$MATH_ONLY"
if [ "${1:-}" = "sweep" ]; then
  runs=(naive=naive)
  for lam in $SWEEP; do
    variant "ewc_$lam" "continual.ewc_lambda=$lam" "$MATH_ONLY"
    runs+=("ewc_$lam=ewc_$lam")
  done
  report sweep "${runs[@]}"
  echo
  echo "EWC (math only) at each lambda after $STEPS steps:"
  echo
  grep '^|' "$W/sweep.txt"
  $PYTHON - "$W/sweep/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
mean = {n: sum(v["heldout"][s]["loss"] for s in ("prose", "code", "math")) / 3
        for n, v in r.items() if n != "base"}
best = min(mean, key=mean.get)
print("\nmean held-out loss of prose, code and math:",
      ", ".join(f"{n} {m:.3f}" for n, m in mean.items()))
print(f"picked: {best} (lowest mean held-out loss)")
PY
else
  variant replay continual.ewc_lambda=0
  variant "ewc_$LAMBDA" "continual.ewc_lambda=$LAMBDA" "$MATH_ONLY"
  variant "ewc_replay_$LAMBDA" "continual.ewc_lambda=$LAMBDA"
  report "report_$LAMBDA" naive=naive replay=replay "ewc=ewc_$LAMBDA" \
      "ewc_replay=ewc_replay_$LAMBDA"
  echo
  echo "Held-out loss (nats/token; 4 batches x 12 x 128 tokens per source) and"
  echo "accuracy (100 items, 4 choices) after $STEPS steps of continued"
  echo "pretraining; EWC lambda $LAMBDA (mean-normalised Fisher):"
  echo
  grep '^|' "$W/report_$LAMBDA.txt"
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "done in $(( $(date +%s) - start ))s; CPU time (user, system) of this"\
     "shell and of the commands it ran:"
times
