"""`gemma-jax plot DIR`: PNG curves of a run's metrics.

PNG curves of a run from its metrics files (matplotlib, no display).

    plot_run("runs/tiny")
    # -> runs/tiny/plots/{loss,learning_rate,throughput}.png

The workdir and the output folder may be gs:// paths.
"""

import io
import os

from gemma_jax import fileio

HELP = "write PNG curves (loss per source, learning rate, throughput) of a run"


def add_arguments(parser):
  parser.add_argument("workdir", help="a run's --workdir (holds metrics.jsonl)")
  parser.add_argument(
    "--out", default=None, help="output folder (default: WORKDIR/plots)"
  )


def main(args) -> int:
  from gemma_jax.errors import ConfigError

  try:
    paths = plot_run(args.workdir, args.out)
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from None
  for p in paths:
    print(p)
  return 0


def _series(records, key):
  pts = [
    (r["step"], r[key])
    for r in records
    if r.get(key) is not None and "step" in r
  ]
  return [p[0] for p in pts], [p[1] for p in pts]


def _prefixed(records, prefix, suffix=""):
  keys = sorted(
    {
      k
      for r in records
      for k in r
      if k.startswith(prefix) and k.endswith(suffix)
    }
  )
  return keys


def plot_run(workdir: str, out_dir: str | None = None) -> list[str]:
  """Writes loss, learning-rate and throughput PNGs; returns their paths."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from gemma_jax.train.metrics import read_jsonl

  fileio.check_remote(workdir, "workdir")
  train = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  evals = read_jsonl(os.path.join(workdir, "eval.jsonl"))
  if not train and not evals:
    raise FileNotFoundError(f"no metrics.jsonl or eval.jsonl in {workdir}")
  out_dir = out_dir or os.path.join(workdir, "plots")
  if fileio.is_local(out_dir):
    os.makedirs(out_dir, exist_ok=True)
  written = []

  def save(fig, name):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    fileio.atomic_write(path, png.getvalue())
    written.append(path)

  # Loss: overall and per source (train), held-out per source (eval).
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.plot(*_series(train, "loss"), label="train", color="black", lw=1.5)
  sources = sorted(
    {k[5:] for k in _prefixed(train, "loss/")}
    | {k[5:-5] for k in _prefixed(evals, "eval/", "/loss")}
  )
  colors = {s: f"C{i}" for i, s in enumerate(sources)}
  for key in _prefixed(train, "loss/"):
    ax.plot(
      *_series(train, key),
      label=f"train {key[5:]}",
      lw=0.8,
      color=colors[key[5:]],
    )
  for key in _prefixed(evals, "eval/", "/loss"):
    ax.plot(
      *_series(evals, key),
      "o--",
      label=f"held-out {key[5:-5]}",
      ms=4,
      color=colors[key[5:-5]],
    )
  ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss per source")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  save(fig, "loss.png")

  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.plot(*_series(train, "learning_rate"))
  ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
  ax.grid(alpha=0.3)
  save(fig, "learning_rate.png")

  fig, ax1 = plt.subplots(figsize=(7, 3.5))
  ax1.plot(*_series(train, "tokens_per_sec"), color="tab:blue")
  ax1.set(xlabel="step", ylabel="tokens/s", title="Throughput")
  ax1.grid(alpha=0.3)
  steps, mfus = _series(train, "mfu")
  if mfus:
    ax2 = ax1.twinx()
    ax2.plot(steps, [100 * m for m in mfus], color="tab:orange", lw=0.8)
    ax2.set_ylabel("MFU (%)", color="tab:orange")
  save(fig, "throughput.png")
  return written
