"""Tiny training runs for tests: configs on in-memory sources, subprocesses.

config = tiny_config_dict(tokenizer_path)    # 2-layer model, 2 sources
proc = train_process(write_config(path, tok), workdir, subprocess_env(cache))
"""

import random

import yaml

WORDS = [
  "the",
  "cat",
  "dog",
  "sat",
  "ran",
  "on",
  "a",
  "mat",
  "hat",
  "big",
  "small",
  "red",
  "blue",
  "and",
  "then",
  "it",
  "was",
  "happy",
  "sad",
  "very",
  "quick",
  "slow",
  "fox",
  "jumps",
  "over",
  "lazy",
  "river",
  "tree",
]


def texts(seed: int, n: int, kind: str) -> list[str]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    if kind == "prose":
      out.append(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + "."
      )
    else:
      a, b = rng.randint(0, 99), rng.randint(0, 99)
      out.append(f"def f{a}(x):\n  return x + {b}\n")
  return out


def tiny_config_dict(tokenizer: str, steps: int = 6) -> dict:
  """A 2-layer Gemma 2-style model on two in-memory sources, two stages."""
  return {
    "model": {
      "preset": "tiny-gemma2",
      "num_layers": 2,
      "d_model": 32,
      "mlp_dim": 64,
      "num_heads": 2,
      "num_kv_heads": 1,
      "head_dim": 16,
      "vocab_size": 512,
      "sliding_window": 8,
    },
    "data": {
      "seq_len": 32,
      "tokenizer": tokenizer,
      "sources": {
        "prose": {
          "kind": "memory",
          "texts": texts(2, 60, "prose"),
          "eval_texts": texts(3, 8, "prose"),
        },
        "code": {
          "kind": "memory",
          "texts": texts(4, 60, "code"),
          "eval_texts": texts(5, 8, "code"),
        },
      },
      "stages": [
        {"start_step": 0, "weights": {"prose": 1, "code": 1}},
        {"start_step": 4, "weights": {"prose": 3, "code": 1}},
      ],
    },
    "optimizer": {"learning_rate": 1e-2, "warmup_steps": 1},
    "train": {
      "steps": steps,
      "batch_size": 8,
      "log_every": 1,
      "eval_every": 0,
      "eval_batches": 1,
    },
    "checkpoint": {"save_every": 2, "keep": 2, "export_params": False},
  }


def subprocess_env(
  cache_dir: str, devices: int = 2, loop_emitters: bool = True
) -> dict:
  """os.environ for a `gemma-jax train` process on `devices` CPU devices
  that shares the persistent XLA cache `cache_dir`. Compiled for compile
  time, as in tests/conftest.py (LLVM's optimisations skipped, XLA's older
  loop emitters instead of its fusion emitters: a cold tiny run 24.4 ->
  16.3 s of CPU for the second alone), and every run of a comparison uses
  the same flags. `loop_emitters=False` keeps XLA's default emitters (what
  a real run compiles with)."""
  import os

  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={devices} "
      "--xla_backend_optimization_level=0"
      + (" --xla_cpu_use_fusion_emitters=false" if loop_emitters else "")
    ),
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    PYTHONUNBUFFERED="1",
  )
  return env


RESUME_STEPS = 40
# How long a test waits for a tiny run (a checkpoint, its end) before it
# fails: only a bound on a hang, so generous enough for a loaded machine
# with every core running tests (launch/test.sh runs several at once).
RUN_TIMEOUT_S = 600


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
    [
      sys.executable,
      "-m",
      "gemma_jax.cli",
      "train",
      config,
      "--workdir",
      str(workdir),
      *extra,
    ],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def free_port() -> int:
  """A TCP port nobody listens on now (for a jax.distributed coordinator)."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_processes(
  n, config, workdir, cache, *extra, devices=1, env=None, loop_emitters=True
):
  """`n` local `gemma-jax train` processes of one jax.distributed run (one
  plain process when n == 1), each with `devices` CPU devices and `env`
  (subprocess_env's `loop_emitters`)."""
  port = free_port()
  procs = []
  for i in range(n):
    e = subprocess_env(cache, devices, loop_emitters) | (env or {})
    if n > 1:
      e.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(n),
        JAX_PROCESS_ID=str(i),
      )
    procs.append(train_process(config, workdir, e, *extra))
  return procs


def finish(procs) -> list[str]:
  """Waits for every process (RUN_TIMEOUT_S) and asserts each exited 0;
  returns their outputs."""
  outs = [p.communicate(timeout=RUN_TIMEOUT_S)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  return outs


def losses(workdir) -> dict[int, float]:
  from gemma_jax.train.metrics import read_jsonl

  return {r["step"]: r["loss"] for r in read_jsonl(f"{workdir}/metrics.jsonl")}


def exported_params(workdir):
  import jax

  from gemma_jax.checkpoint import native

  params, _ = native.load(f"{workdir}/params")
  return jax.tree_util.tree_leaves_with_path(params)
