"""Peak memory of `gemma-jax merge` against loading whole checkpoints.

    python scripts/bench_merge.py --workdir /tmp/bench_merge [--dtype bfloat16]

Writes three random native checkpoints of a ~220M-parameter Gemma 2 shape
(12 layers, d_model 1024, MLP 4096, vocab 32000), then runs, each in its own
process: a linear merge of two, a SLERP of two relative to the third, and,
for comparison, `native.load` of one and of two whole checkpoints. Prints
each one's peak resident memory (VmHWM) and peak anonymous memory (RssAnon,
sampled every 5 ms), the size of one checkpoint and of its largest leaf.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

# The model of bench_init_from.py (run as a script, scripts/ is on sys.path).
from bench_init_from import FIELDS

LOAD = (
  "import sys; from gemma_jax.checkpoint import native\n"
  "trees = [native.load(p)[0] for p in sys.argv[1:]]\n"
)


def make_checkpoints(workdir: pathlib.Path, dtype: str) -> None:
  import numpy as np

  from gemma_jax.checkpoint import layout, native
  from gemma_jax.model import preset

  cfg = preset("tiny-gemma2", param_dtype=dtype, **FIELDS)
  for i, name in enumerate(("a", "b", "base")):
    if (workdir / name).exists():
      continue
    rng = np.random.default_rng(i)
    params = {
      p: rng.standard_normal(s, np.float32).astype(dtype)
      for p, s in layout.param_shapes(cfg).items()
    }
    native.save(workdir / name, layout.unflatten(params), cfg)


def _status(pid: int) -> dict[str, int]:
  out = {}
  try:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
      key, _, value = line.partition(":")
      if key in ("VmHWM", "RssAnon"):
        out[key] = int(value.split()[0]) * 1024
  except (FileNotFoundError, ProcessLookupError):
    pass
  return out


def measure(argv: list[str]) -> dict:
  """Runs argv; returns wall seconds and peak VmHWM / RssAnon in MiB."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  start = time.perf_counter()
  proc = subprocess.Popen(
    argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  peak = {"VmHWM": 0, "RssAnon": 0}

  def poll():
    while proc.poll() is None:
      for k, v in _status(proc.pid).items():
        peak[k] = max(peak[k], v)
      time.sleep(0.005)

  thread = threading.Thread(target=poll)
  thread.start()
  _, err = proc.communicate()
  thread.join()
  if proc.returncode:
    raise SystemExit(f"{argv} failed:\n{err}")
  return {
    "seconds": round(time.perf_counter() - start, 1),
    "peak_rss_mib": round(peak["VmHWM"] / 2**20),
    "peak_anon_mib": round(peak["RssAnon"] / 2**20),
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()
  work = pathlib.Path(args.workdir)
  make_checkpoints(work, args.dtype)
  from gemma_jax.checkpoint import layout, native

  cfg = native.load_config(work / "a")
  itemsize = 4 if args.dtype == "float32" else 2
  shapes = layout.param_shapes(cfg)
  sizes = {p: itemsize * __import__("math").prod(s) for p, s in shapes.items()}
  merge = [sys.executable, "-m", "gemma_jax.cli", "merge", "--force"]
  results = {
    "params": cfg.param_count(),
    "dtype": args.dtype,
    "checkpoint_mib": round(sum(sizes.values()) / 2**20),
    "largest_leaf": max(sizes, key=sizes.get),
    "largest_leaf_mib": round(max(sizes.values()) / 2**20),
    "import_only": measure(
      [sys.executable, "-c", "import gemma_jax.checkpoint.merge"]
    ),
    "load_one_whole": measure([sys.executable, "-c", LOAD, str(work / "a")]),
    "load_two_whole": measure(
      [sys.executable, "-c", LOAD, str(work / "a"), str(work / "b")]
    ),
    "merge_linear_2": measure(
      merge + [str(work / "a"), str(work / "b"), "--out", str(work / "lin")]
    ),
    "merge_slerp_2_base": measure(
      merge
      + [
        str(work / "a"),
        str(work / "b"),
        "--method",
        "slerp",
        "--base",
        str(work / "base"),
        "--eta",
        "0.5",
        "--out",
        str(work / "slerp"),
      ]
    ),
  }
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
