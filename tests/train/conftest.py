"""Shared tiny training setup: a small tokenizer and in-memory sources."""

import random

import pytest
import yaml

WORDS = ("the cat dog sat ran on a mat hat big small red blue and then it was "
         "happy sad very quick slow fox jumps over lazy river tree").split()


def _texts(seed: int, n: int, kind: str) -> list[str]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    if kind == "prose":
      out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
                 + ".")
    else:
      a, b = rng.randint(0, 99), rng.randint(0, 99)
      out.append(f"def f{a}(x):\n  return x + {b}\n")
  return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
  from gemma_jax.tokenizer import train_tokenizer
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  train_tokenizer(_texts(0, 300, "prose") + _texts(1, 300, "code"),
                  vocab_size=400, out_path=str(path))
  return str(path)


def tiny_config_dict(tokenizer: str, steps: int = 6) -> dict:
  """A 2-layer Gemma 2-style model on two in-memory sources, two stages."""
  return {
      "model": {"preset": "tiny-gemma2", "num_layers": 2, "d_model": 32,
                "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1,
                "head_dim": 16, "vocab_size": 512, "sliding_window": 8},
      "data": {
          "seq_len": 32, "tokenizer": tokenizer, "block_size": 8,
          "sources": {
              "prose": {"kind": "memory", "texts": _texts(2, 60, "prose"),
                        "eval_texts": _texts(3, 8, "prose")},
              "code": {"kind": "memory", "texts": _texts(4, 60, "code"),
                       "eval_texts": _texts(5, 8, "code")}},
          "stages": [{"start_step": 0, "weights": {"prose": 1, "code": 1}},
                     {"start_step": 4, "weights": {"prose": 3, "code": 1}}]},
      "optimizer": {"learning_rate": 1e-2, "warmup_steps": 1},
      "train": {"steps": steps, "batch_size": 8, "log_every": 1,
                "eval_every": 0, "eval_batches": 1},
      "checkpoint": {"save_every": 2, "keep": 2, "export_params": False},
  }


@pytest.fixture
def tiny_config_path(tiny_tokenizer, tmp_path):
  path = tmp_path / "tiny.yaml"
  path.write_text(yaml.safe_dump(tiny_config_dict(tiny_tokenizer), sort_keys=False))
  return str(path)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  """A persistent XLA cache shared by this area's runs and subprocesses:
  identical programs compile once per session."""
  import jax
  path = str(tmp_path_factory.mktemp("xla_cache"))
  old = {k: jax.config.values[k] for k in (
      "jax_compilation_cache_dir",
      "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield path
  for k, v in old.items():
    jax.config.update(k, v)


def subprocess_env(cache_dir: str, devices: int = 2) -> dict:
  import os
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONUNBUFFERED="1")
  return env


RESUME_STEPS = 40


def write_config(path, tokenizer, **train) -> str:
  """The resume/multi-process run: 40 steps, every step logged, saves
  every 4 steps, params exported at the end."""
  d = tiny_config_dict(tokenizer, steps=RESUME_STEPS)
  d["train"].update(eval_every=0, eval_batches=1, **train)
  d["checkpoint"].update(save_every=4, keep=2, export_params=True)
  with open(path, "w") as f:
    yaml.safe_dump(d, f, sort_keys=False)
  return str(path)


def train_process(config, workdir, env, *extra):
  import subprocess
  import sys
  return subprocess.Popen(
      [sys.executable, "-m", "gemma_jax.cli", "train", config, "--workdir",
       str(workdir), *extra], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def losses(workdir) -> dict[int, float]:
  from gemma_jax.train.metrics import read_jsonl
  return {r["step"]: r["loss"]
          for r in read_jsonl(f"{workdir}/metrics.jsonl")}


def exported_params(workdir):
  import jax
  from gemma_jax.checkpoint import native
  params, _ = native.load(f"{workdir}/params")
  return jax.tree_util.tree_leaves_with_path(params)


@pytest.fixture(scope="session")
def uninterrupted_run(tiny_tokenizer, compile_cache, tmp_path_factory):
  """The reference: one process, 2 CPU devices, no interruption. Started
  in the background; the fixture value waits for it."""
  root = tmp_path_factory.mktemp("reference")
  config = write_config(root / "run.yaml", tiny_tokenizer)
  proc = train_process(config, root / "run", subprocess_env(compile_cache))

  def result():
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return root / "run"
  return config, result
