"""Train-step benchmark: tokens/s, MFU and time to the first step.

    python scripts/bench_train.py                     # tiny-gemma2, CPU or any
    python scripts/bench_train.py --model gemma2-2b --batch 8 --seq-len 2048 \
        --set model.dtype=bfloat16 --set model.remat_policy=full

The documented small configuration is the default: `tiny-gemma2` (4 layers,
d_model 128, vocab 2048), batch 16 x 128 tokens, float32, one data-parallel
mesh over all devices, synthetic tokens (the data pipeline is benchmarked by
scripts/bench_data.py). It prints

  * time to the first step: state initialisation + compile + one step;
  * tokens/s and step time over `--steps` timed steps (after `--warmup`);
  * MFU against the measured matrix-multiply peak of the same devices (a
    large matmul timed here: float32 on CPU, bfloat16 elsewhere), and
    against the device table's peak where the device is known.

Model FLOPs per token come from gemma_jax.train.metrics (attention counted
with each layer's sliding window). The same script runs unchanged on CPU,
GPU and TPU.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def measured_matmul_peak(device, n: int | None = None, repeats: int = 5):
  """FLOP/s of an n x n x n matmul chain on one device."""
  cpu = device.platform == "cpu"
  n = n or (1024 if cpu else 8192)
  dtype = jnp.float32 if cpu else jnp.bfloat16
  a = jax.device_put(jnp.ones((n, n), dtype) / n, device)
  b = jax.device_put(jnp.ones((n, n), dtype), device)

  @jax.jit
  def chain(a, b):
    for _ in range(4):  # keeps the device busy between host calls
      a = a @ b
    return a

  chain(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    chain(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 4 * 2 * n**3 / best, str(jnp.dtype(dtype))


def synthetic_batch(rng, batch: int, seq_len: int, vocab: int) -> dict:
  tokens = rng.integers(4, vocab, size=(batch, seq_len + 1), dtype=np.int32)
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "segment_ids": np.ones((batch, seq_len), np.int32),
    "positions": np.broadcast_to(
      np.arange(seq_len, dtype=np.int32), (batch, seq_len)
    ).copy(),
    "loss_mask": np.ones((batch, seq_len), np.int32),
    "source": np.zeros((batch,), np.int32),
  }


def main(argv=None):
  from gemma_jax import hardware
  from gemma_jax.train import metrics
  from gemma_jax.train.config import load_config
  from gemma_jax.train.program import TrainProgram

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="tiny-gemma2", help="model preset")
  p.add_argument("--batch", type=int, default=16, help="global batch (rows)")
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--steps", type=int, default=20, help="timed steps")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument(
    "--set",
    dest="overrides",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override a run-config key",
  )
  p.add_argument("--json", action="store_true", help="print one JSON line")
  args = p.parse_args(argv)

  from gemma_jax import distributed

  distributed.initialize_distributed()
  cfg = load_config(
    None,
    [
      f"model.preset={args.model}",
      f"train.batch_size={args.batch}",
      f"data.seq_len={args.seq_len}",
      f"train.steps={args.warmup + args.steps}",
      *args.overrides,
    ],
  )
  rng = np.random.default_rng(0)
  local = args.batch // jax.process_count()
  batches = [
    synthetic_batch(rng, local, args.seq_len, cfg.model.vocab_size)
    for _ in range(2)
  ]

  # Time to the first step: init on devices + compile + one step.
  t0 = time.perf_counter()
  program = TrainProgram(cfg)
  put = program.put
  state = program.init_state(seed=0)
  jax.block_until_ready(state)
  t_init = time.perf_counter() - t0
  compiled = program.compile_train_step()
  t_compile = time.perf_counter() - t0 - t_init
  state, m = compiled(state, put(batches[0]))
  float(m["loss"])
  t_first = time.perf_counter() - t0

  for i in range(args.warmup):
    state, m = compiled(state, put(batches[i % 2]))
  float(m["loss"])
  device_batches = [put(b) for b in batches]
  t = time.perf_counter()
  for i in range(args.steps):
    state, m = compiled(state, device_batches[i % 2])
  float(m["loss"])  # one sync at the end
  elapsed = time.perf_counter() - t

  n_dev = jax.device_count()
  tokens_per_sec = args.batch * args.seq_len * args.steps / elapsed
  fpt = metrics.model_flops_per_token(cfg.model, args.seq_len)
  peak, peak_dtype = measured_matmul_peak(jax.local_devices()[0])
  table = hardware.peak_flops_per_device(jax.devices()[0])
  result = {
    "device": jax.devices()[0].device_kind,
    "devices": n_dev,
    "model": args.model,
    "params": cfg.model.param_count(),
    "batch": args.batch,
    "seq_len": args.seq_len,
    "dtype": cfg.model.dtype,
    "time_to_first_step_s": round(t_first, 2),
    "init_s": round(t_init, 2),
    "compile_s": round(t_compile, 2),
    "step_time_ms": round(1000 * elapsed / args.steps, 2),
    "tokens_per_sec": round(tokens_per_sec, 1),
    "model_flops_per_token": fpt,
    "measured_matmul_peak_flops_per_device": peak,
    "matmul_peak_dtype": peak_dtype,
    "mfu_vs_measured_peak": metrics.mfu(fpt, tokens_per_sec, n_dev, peak),
    "table_peak_flops_per_device": table,
    "mfu_vs_table_peak": metrics.mfu(fpt, tokens_per_sec, n_dev, table),
  }
  if jax.process_index() != 0:
    return
  if args.json:
    print(json.dumps(result))
    return
  for k, v in result.items():
    if isinstance(v, float) and (v > 1e6 or v < 1e-2):
      v = f"{v:.3e}"
    print(f"{k:<40} {v}")


if __name__ == "__main__":
  from gemma_jax.hugepages import reexec_with_hugepages

  reexec_with_hugepages()  # as `gemma-jax` runs (gemma_jax/hugepages.py)
  main()
