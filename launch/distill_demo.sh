#!/usr/bin/env bash
# Distillation and merging on a CPU, in one command (README "Distillation"):
#
#   bash launch/distill_demo.sh
#
# 1. a teacher (tiny-gemma2: 4 layers, d_model 128) trained 300 steps;
# 2. a student (2 layers, d_model 64) trained 150 steps three ways at equal
#    tokens: cross-entropy only, online distillation from the teacher, and
#    offline distillation from a top-64 dump of the teacher;
# 3. the online-distilled student fine-tuned 60 steps on code only and on
#    math only (each with an EMA of its weights), then the two merged
#    (linear average; SLERP of the task vectors from the student);
# 4. held-out loss per source of every model, as a table.
#
# Everything goes to $WORKDIR (default runs/distill_demo); rerunning skips
# finished steps. GEMMA_JAX / PYTHON name the command and interpreter to use
# (default: the .venv that launch/setup.sh creates).
set -euo pipefail
cd "$(dirname "$0")/.."

W=${WORKDIR:-runs/distill_demo}
if [ -z "${GEMMA_JAX:-}" ]; then
  GEMMA_JAX_EXTRAS="" source launch/setup.sh
  GEMMA_JAX=".venv/bin/gemma-jax"
  PYTHON=".venv/bin/python"
fi
PYTHON=${PYTHON:-python3}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/gemma_jax/xla}
gj() { $GEMMA_JAX "$@"; }
# Trains unless WORKDIR/params exists (a finished run).
train() { local dir=$1; shift; [ -d "$dir/params" ] || gj train "$@" --workdir "$dir"; }

start=$(date +%s)
gj data build-default
train "$W/teacher" configs/distill/teacher.yaml
T="distill.teacher=$W/teacher/params"
train "$W/student_ce" configs/distill/student.yaml
train "$W/student_online" configs/distill/student.yaml --set "$T"
[ -f "$W/dump/dump.json" ] || gj distill dump configs/distill/student.yaml \
    --set "$T" --out "$W/dump" | tee "$W/dump_summary.txt"
train "$W/student_offline" configs/distill/student.yaml \
    --set "distill.dump=$W/dump" --set "$T"
for src in code math; do
  train "$W/ft_$src" "configs/distill/finetune_$src.yaml" \
      --set "checkpoint.init_from=$W/student_online/params"
done
[ -d "$W/merged_linear" ] || gj merge "$W/ft_code/params" "$W/ft_math/params" \
    --out "$W/merged_linear"
[ -d "$W/merged_slerp" ] || gj merge "$W/ft_code/params" "$W/ft_math/params" \
    --method slerp --base "$W/student_online/params" --out "$W/merged_slerp"
for m in merged_linear merged_slerp; do
  [ -f "$W/$m.json" ] || gj eval configs/distill/finetune_code.yaml \
      --params "$W/$m" --out "$W/$m.json"
done

$PYTHON - "$W" <<'PY'
import json, os, sys
w = sys.argv[1]
sources = ("prose", "code", "math")

def last_eval(run, prefix="eval"):
  lines = open(os.path.join(w, run, "eval.jsonl")).read().splitlines()
  r = json.loads(lines[-1])
  return [r[f"{prefix}/{s}/loss"] for s in sources]

def row(name, losses, extra=""):
  cells = " | ".join(f"{x:.3f}" for x in losses)
  print(f"| {name} | {cells} | {sum(losses) / 3:.3f} |{extra}")

print("Held-out loss (nats/token) per source, mean of 8 batches x 16 x 128:")
print("\n| model | prose | code | math | mean |\n|---|---|---|---|---|")
row("teacher (4 x 128, 300 steps)", last_eval("teacher"))
for run, name in (("student_ce", "student, cross-entropy only"),
                  ("student_online", "student, online distillation"),
                  ("student_offline", "student, offline (top-64 dump)")):
  row(name + " (2 x 64, 150 steps)", last_eval(run))
print("\n| model | prose | code | math | mean |\n|---|---|---|---|---|")
row("distilled student (the base)", last_eval("student_online"))
for src in ("code", "math"):
  row(f"fine-tuned on {src}", last_eval(f"ft_{src}"))
  row(f"fine-tuned on {src}, EMA 0.9", last_eval(f"ft_{src}", "eval_ema"))
for m, name in (("merged_linear", "merge: linear 0.5 / 0.5"),
                ("merged_slerp", "merge: SLERP t=0.5 from the base")):
  r = json.load(open(os.path.join(w, f"{m}.json")))["sources"]
  row(name, [r[s]["loss"] for s in sources])
dump = json.loads(
    open(os.path.join(w, "dump_summary.txt")).read().splitlines()[-1])
print(f"\ndump: {dump['positions']} positions, {dump['bytes']} bytes = "
      f"{dump['bytes_per_position']} bytes per position on disk "
      f"({dump['record_bytes_per_position']} per record before ArrayRecord's "
      "compression)")
PY
echo "done in $(( $(date +%s) - start ))s; CPU time (user, system) of this"\
     "shell and of the commands it ran:"
times
