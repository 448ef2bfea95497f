"""The README's main job (launch/run_local.sh -> configs/tiny.yaml), shrunk:
the real `gemma-jax train` command on the embedded corpus, two steps."""

import json
import os
import subprocess
import sys

import pytest

from gemma_jax.data import corpus
from gemma_jax.train.config import load_config

pytestmark = pytest.mark.slow

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


def test_second_stage_upweights_the_highest_quality_source():
  stages = load_config(CONFIG).data.stages
  assert len(stages) == 2
  first, second = (s.shares() for s in stages)
  assert second["math"] > first["math"]
  assert max(second, key=second.get) == "math"


def test_tiny_config_trains_evaluates_checkpoints_and_samples(tmp_path):
  out = tmp_path / "corpus"
  # A small build of the same corpus (the full one is what the job uses).
  corpus.build_default_corpus(
    str(out), vocab_size=2048, max_code_chars=300_000, math_docs=200
  )
  sets = [
    f"data.tokenizer={out}/tokenizer.model",
    "train.log_every=1",
    "train.eval_batches=1",
    "train.sample_tokens=4",
  ]
  sets += [
    f"data.sources.{s}.data_dir={out}/tfds" for s in ("prose", "code", "math")
  ]
  # One device, as the job has; compiled for compile time (as in
  # tests/conftest.py): the compiles take most of this test's time.
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_backend_optimization_level=0 "
    "--xla_cpu_use_fusion_emitters=false",
  )
  cmd = [
    sys.executable,
    "-m",
    "gemma_jax.cli",
    "train",
    CONFIG,
    "--workdir",
    str(tmp_path / "run"),
    "--steps",
    "2",
  ]
  for s in sets:
    cmd += ["--set", s]
  proc = subprocess.run(
    cmd, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 2/2 | loss" in proc.stdout
  assert proc.stdout.count("sample: ") == 2
  run = tmp_path / "run"
  evals = [json.loads(l) for l in open(run / "eval.jsonl")]
  assert {k.split("/")[1] for k in evals[-1] if k.startswith("eval/")} == {
    "prose",
    "code",
    "math",
  }
  assert os.listdir(run / "checkpoints") == ["2"]
  assert (run / "params" / "model_config.json").exists()
