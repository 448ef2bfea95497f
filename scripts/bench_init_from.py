"""Peak memory of starting a run from a Hugging Face or official checkpoint.

    python scripts/bench_init_from.py --workdir /tmp/bench_init_from

Writes a ~220M-parameter Gemma 2 shape (12 layers, d_model 1024, MLP 4096,
vocab 32000; float32, 0.88 GB) as an HF directory and as an official Flax
checkpoint, then builds the step-0 TrainState (params + AdamW moments) on 8
CPU devices (fsdp 8), each way in its own process:

  before  random init of the whole state, the checkpoint read into host
          numpy, `jax.device_put` into the shardings, the params replaced
          (what starting from a checkpoint cost before)
  after   `start.load_params` (each tensor into its shards as it is
          read) and `init_state(params=...)`: no random init

and prints each one's peak resident memory (VmHWM; on CPU the "devices" are
host memory too, so it counts both) and the bytes of the live jax arrays at
the end. One copy of the params is 0.88 GB.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

FIELDS = dict(
  num_layers=12,
  d_model=1024,
  mlp_dim=4096,
  num_heads=8,
  num_kv_heads=4,
  head_dim=128,
  vocab_size=32000,
)

RUN = r"""
import json, os, sys, time
import jax, numpy as np
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.program import TrainProgram
from gemma_jax.train import start
from gemma_jax.checkpoint import hf, kaggle
mode, fmt, path = sys.argv[1:4]
fields = json.loads(sys.argv[4])
cfg = config_from_dict({
    "model": {"preset": "tiny-gemma2", **fields},
    "mesh": {"ici_data": 1, "ici_fsdp": 8},
    "data": {"seq_len": 16,
             "sources": {"a": {"kind": "memory", "texts": ["x"]}}},
    "train": {"batch_size": 8}})
program = TrainProgram(cfg)
t = time.perf_counter()
if mode == "before":
  state = program.init_state()
  if fmt == "hf":
    params, _ = hf.load(path, cfg.model)
  else:
    params = kaggle.load(path, cfg.model)
  params = jax.device_put(params, program.param_shardings)
  state = state.replace(params=params)
  del params
else:
  params = start.load_params(path, fmt, program)
  state = program.init_state(params=params)
jax.block_until_ready(state)
seconds = time.perf_counter() - t
live = sum(x.nbytes for x in jax.live_arrays())
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"mode": mode, "format": fmt, "seconds": seconds,
                  "live_array_bytes": live,
                  "peak_rss_bytes": int(hwm.split()[1]) * 1024}))
"""


def make_checkpoints(workdir: pathlib.Path) -> None:
  import numpy as np

  from gemma_jax.checkpoint import hf, layout, testing
  from gemma_jax.model import preset

  cfg = preset("tiny-gemma2", **FIELDS)
  if not (workdir / "hf").exists():
    rng = np.random.default_rng(0)
    params = {
      p: rng.standard_normal(s, np.float32)
      for p, s in layout.param_shapes(cfg).items()
    }
    hf.save(workdir / "hf", layout.unflatten(params), cfg)
  if not (workdir / "kaggle").exists():
    testing.official_checkpoint(
      workdir / "kaggle", cfg, transposed_gating=False
    )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  make_checkpoints(workdir)
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  for fmt in ("hf", "kaggle"):
    for mode in ("before", "after"):
      out = subprocess.run(
        [
          sys.executable,
          "-c",
          RUN,
          mode,
          fmt,
          str(workdir / fmt),
          json.dumps(FIELDS),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
      )
      r = json.loads(out.stdout.strip().splitlines()[-1])
      print(
        f"{fmt:<7} {mode:<7} peak RSS {r['peak_rss_bytes'] / 1e9:5.2f} GB"
        f"  live arrays {r['live_array_bytes'] / 1e9:5.2f} GB"
        f"  {r['seconds']:6.1f} s"
      )


if __name__ == "__main__":
  main()
