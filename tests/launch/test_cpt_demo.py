"""launch/cpt_demo.sh with a stand-in gemma-jax: every run it starts has a
config that loads, the four variants differ only in replay and lambda at
equal steps from the base, a rerun starts nothing, and `sweep` picks the
lambda with the lowest mean held-out loss."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from gemma_jax.train.config import load_config

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).parents[2]

# Records its arguments; makes what the script checks for; `report` gives
# ewc_<lam> runs a mean held-out loss of 3 + |log10(lam) + 2| (lowest at
# 1e-2) and prints a one-row table.
FAKE = """#!{python}
import json, math, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
opt = lambda name: args[args.index(name) + 1]
if args[0] == "train":
  os.makedirs(os.path.join(opt("--workdir"), "params"))
elif args[0] == "fisher":
  os.makedirs(opt("--out"))
  open(os.path.join(opt("--out"), "fisher.json"), "w").write("{{}}")
elif args[0] == "report":
  names = [args[i + 1].split("=")[0] for i, a in enumerate(args)
           if a == "--checkpoint"]
  def loss(name):
    try:
      lam = float(name.removeprefix("ewc_"))
    except ValueError:
      lam = 0
    return 3 + abs(math.log10(lam) + 2) if lam else 6.0
  os.makedirs(opt("--out"))
  json.dump({{n: {{"heldout": {{s: {{"loss": loss(n)}} for s in
                               ("prose", "code", "math")}}, "tasks": {{}}}}
             for n in names}},
            open(os.path.join(opt("--out"), "report.json"), "w"))
  print("| checkpoint | math loss |")
  print("| base | 4.0 |")
"""


def run_demo(tmp_path, *args, **env):
  fake = tmp_path / "gemma-jax"
  fake.write_text(FAKE.format(python=sys.executable))
  fake.chmod(0o755)
  log = tmp_path / "calls.jsonl"
  result = subprocess.run(
    ["bash", str(ROOT / "launch/cpt_demo.sh"), *args],
    env={
      **os.environ,
      "GEMMA_JAX": str(fake),
      "PYTHON": sys.executable,
      "PYTHONPATH": str(ROOT),
      "WORKDIR": str(tmp_path / "w"),
      "FAKE_LOG": str(log),
      **env,
    },
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  calls = [json.loads(x) for x in log.read_text().splitlines()]
  log.unlink()
  return result.stdout, calls


def config_of(call):
  """The RunConfig a recorded `train`/`report`/`fisher` call would run."""
  sets = [call[i + 1] for i, a in enumerate(call) if a == "--set"]
  return load_config(ROOT / call[1], sets)


def test_the_demo_runs_four_variants_of_one_base_then_one_report(tmp_path):
  out, calls = run_demo(tmp_path, LAMBDA="0.5", STEPS="7")
  w = str(tmp_path / "w")
  assert [c[0] for c in calls] == [
    "data",
    "train",
    "fisher",
    "train",
    "train",
    "train",
    "train",
    "report",
  ]
  base = config_of(calls[1])
  assert calls[1][1] == "configs/cpt/tiny-base.yaml"
  assert set(base.data.sources) == {"prose", "code"}
  fisher = calls[2]
  assert fisher[fisher.index("--params") + 1] == f"{w}/base/params"
  assert config_of(fisher).model == base.model
  runs = {c[c.index("--workdir") + 1]: config_of(c) for c in calls[3:7]}
  assert list(runs) == [
    f"{w}/{n}" for n in ("naive", "replay", "ewc_0.5", "ewc_replay_0.5")
  ]
  for name, cfg in runs.items():
    replay = "replay" in name
    weights = cfg.data.stages[0].weights
    assert len(cfg.data.stages) == 1 and weights["math"] == (
      0.8 if replay else 1.0
    ), name
    assert sum(weights.get(s, 0) for s in ("prose", "code")) == (
      pytest.approx(0.2) if replay else 0
    )
    assert cfg.continual.ewc_lambda == (0.5 if "ewc" in name else 0.0)
    assert cfg.continual.fisher == f"{w}/fisher"
    assert cfg.checkpoint.init_from == f"{w}/base/params"
    assert cfg.train.steps == 7 and cfg.model == base.model
  report = calls[7]
  assert config_of(report).continual.ewc_lambda == 0
  assert [
    report[i + 1] for i, a in enumerate(report) if a == "--checkpoint"
  ] == [
    f"base={w}/base/params",
    f"naive={w}/naive/params",
    f"replay={w}/replay/params",
    f"ewc={w}/ewc_0.5/params",
    f"ewc_replay={w}/ewc_replay_0.5/params",
  ]
  # The two tasks as lm-evaluation-harness task YAMLs, named by the report.
  assert report[report.index("--tasks") + 1] == "prose_next,code_next"
  assert report[report.index("--include-path") + 1] == f"{w}/tasks"
  for name in ("prose_next", "code_next"):
    task = json.loads((tmp_path / f"w/tasks/{name}.yaml").read_text())
    assert task["task"] == name and task["output_type"] == "multiple_choice"
  assert "| base | 4.0 |" in out and "after 7 steps" in out
  # Everything is there: a rerun trains nothing and only reports again.
  _, calls = run_demo(tmp_path, LAMBDA="0.5", STEPS="7")
  assert [c[0] for c in calls] == ["data"]


def test_sweep_picks_the_lambda_of_lowest_mean_heldout_loss(tmp_path):
  # Task files from an earlier run (the test above writes them): the script
  # leaves them as they are (writing them builds the synthetic corpus,
  # about 8 s of CPU).
  tasks = tmp_path / "w" / "tasks"
  tasks.mkdir(parents=True)
  (tasks / "code_next.yaml").write_text("{}\n")
  out, calls = run_demo(tmp_path, "sweep", SWEEP="1e-3 1e-2 1")
  assert (tasks / "code_next.yaml").read_text() == "{}\n"
  trained = [config_of(c) for c in calls if c[0] == "train"][1:]
  assert [c.continual.ewc_lambda for c in trained] == [0, 1e-3, 1e-2, 1]
  assert all(c.data.stages[0].weights == {"math": 1.0} for c in trained)
  assert "picked: ewc_1e-2 (lowest mean held-out loss)" in out
  assert f"naive 6.000, ewc_1e-3 {3 + abs(math.log10(1e-3) + 2):.3f}" in out
  # The demo then reuses the base, the Fisher, naive and the picked run.
  _, calls = run_demo(tmp_path, LAMBDA="1e-2")
  assert [
    c[c.index("--workdir") + 1].rsplit("/", 1)[1]
    for c in calls
    if c[0] == "train"
  ] == ["replay", "ewc_replay_1e-2"]
