"""Throughput of the data pipeline on the default corpus, vs tiny CPU training.

    python scripts/bench_data.py [--corpus DIR] [--batch 8] [--seq-len 128]
        [--steps 400] [--workers 2] [--no-train]

Prints rows/s and tokens/s of: random-access `batch(step)`, `iterate` with
prefetch threads, and `iterate` with grain worker processes; then the tokens/s
that one tiny-gemma2 training step (forward, backward, AdamW) consumes on this
CPU, and the ratio.
"""

import argparse
import os
import time


def measure(fn, steps: int, rows: int, seq_len: int) -> tuple[float, float]:
  fn(0)  # warm up: opens epochs, spawns workers
  start = time.perf_counter()
  for i in range(1, steps + 1):
    fn(i)
  dt = time.perf_counter() - start
  return steps * rows / dt, steps * rows * seq_len / dt


def train_tokens_per_sec(batch: dict, steps: int = 10) -> float:
  """tiny-gemma2 train steps (value_and_grad + AdamW, jitted) on this CPU."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax.linen import meta

  from gemma_jax.model import Transformer, preset

  model = Transformer(preset("tiny-gemma2"))
  arrays = {k: jnp.asarray(v) for k, v in batch.items()}
  params = meta.unbox(model.init(jax.random.key(0), arrays["inputs"])["params"])
  opt = optax.adamw(1e-3)
  state = opt.init(params)

  def loss_fn(p, b):
    logits = model.apply(
      {"params": p}, b["inputs"], b["positions"], b["segment_ids"]
    )
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])
    return (nll * b["loss_mask"]).sum() / jnp.maximum(b["loss_mask"].sum(), 1)

  @jax.jit
  def step(p, s, b):
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  params, state, loss = step(params, state, arrays)
  loss.block_until_ready()
  start = time.perf_counter()
  for _ in range(steps):
    params, state, loss = step(params, state, arrays)
  loss.block_until_ready()
  return steps * batch["inputs"].size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--corpus", default=None)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--no-train", action="store_true")
  args = parser.parse_args()

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from gemma_jax import configlib
  from gemma_jax.data import DataConfig, build_pipeline, corpus

  data = corpus.build_default_corpus(args.corpus or corpus.DEFAULT_DIR)
  data = {
    **data,
    "seq_len": args.seq_len,
    "stages": [
      {"start_step": 0, "weights": {"prose": 0.4, "code": 0.4, "math": 0.2}},
      {
        "start_step": args.steps // 2,
        "weights": {"prose": 0.2, "code": 0.2, "math": 0.6},
      },
    ],
  }
  b, t = args.batch, args.seq_len
  results = {}
  pipe = build_pipeline(configlib.from_dict(DataConfig, data, "data"), b)
  results["batch(step), random access"] = measure(pipe.batch, args.steps, b, t)
  for workers in (0, args.workers):
    cfg = configlib.from_dict(
      DataConfig, {**data, "num_workers": workers}, "data"
    )
    stream = build_pipeline(cfg, b).iterate(0)
    results[f"iterate, {workers} worker processes"] = measure(
      lambda _, stream=stream: next(stream), args.steps, b, t
    )
    stream.close()
  print(f"batch {b} x seq_len {t}, {args.steps} steps, default corpus")
  for name, (rows, tokens) in results.items():
    print(f"  {name:32s} {rows:10.0f} rows/s {tokens:12.0f} tokens/s")
  if not args.no_train:
    train = train_tokens_per_sec(pipe.batch(0))
    slowest = min(tok for _, tok in results.values())
    print(
      f"  {'tiny-gemma2 train step (CPU)':32s} {train / t:10.0f} rows/s "
      f"{train:12.0f} tokens/s"
    )
    print(
      f"  slowest pipeline mode feeds {slowest / train:.0f}x what tiny "
      "training consumes"
    )


if __name__ == "__main__":
  main()
