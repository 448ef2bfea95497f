"""`gemma-jax compile`: compile the train step for a TPU pod on this machine.

    gemma-jax compile configs/pods/gemma-7b-v5e.yaml --topology v5e:16x16
    gemma-jax compile CONFIG --topology v5e:16x16 --slices 2 --json

Needs libtpu (`pip install 'gemma-jax[tpu]'`), not a TPU. Lowers and
compiles the very step `gemma-jax train` runs, for the devices of a real
Cloud TPU topology, and reports per device: compiler peak memory against
HBM, bytes of parameters and optimizer state, FLOPs of one step (every layer
counted, next to the analytic count) and the collectives used. Exits 1 when
the step does not fit in HBM.
"""

import json
import os

from gemma_jax.commands import add_overrides

HELP = "ahead-of-time compile the train step for a Cloud TPU topology"


def add_arguments(parser):
  parser.add_argument("config", help="run config YAML")
  parser.add_argument(
    "--topology",
    required=True,
    help="GENERATION:SHAPE, e.g. v5e:16x16, v4:4x4x8, v5p:8x8x16, v6e:8x16",
  )
  parser.add_argument(
    "--slices",
    type=int,
    default=1,
    help="number of slices (multi-slice over DCN)",
  )
  add_overrides(parser)
  parser.add_argument(
    "--mfu",
    type=float,
    default=0.5,
    help="model FLOPs utilisation for the implied step time",
  )
  parser.add_argument(
    "--no-flop-scaling",
    action="store_true",
    help="skip the two small compiles that count every "
    "layer (report the compiler's loop-once FLOPs)",
  )
  parser.add_argument(
    "--json",
    action="store_true",
    help="print one JSON object instead of a table",
  )


def _gib(x):
  return f"{x / 1024**3:.2f} GiB"


def _print_table(r):
  print(
    f"{r['model']} ({r['params'] / 1e9:.2f}B params) on {r['topology']}"
    f" x {r['slices']} slice(s) = {r['devices']} devices; mesh "
    + " x ".join(f"{a}={s}" for a, s in r["mesh"].items())
  )
  print(
    f"batch {r['batch'][0]} x {r['batch'][1]} tokens, "
    f"{r['microbatches']} microbatch(es), remat {r['remat_policy']}"
  )
  if not r["fits"] and "error" in r:
    print(
      f"DOES NOT FIT: the compiler ran out of HBM "
      f"({_gib(r['hbm_bytes_per_device'])} per device): {r['error']}"
    )
    # Unsharded dimensions are the usual cause: show them.
    for line in r.get("unsharded", []):
      print(f"note: {line}")
    return
  print(
    f"peak memory      {_gib(r['peak_bytes_per_device'])} of "
    f"{_gib(r['hbm_bytes_per_device'])} HBM per device"
    + ("" if r["fits"] else "  DOES NOT FIT")
  )
  print(f"parameters       {_gib(r['param_bytes_per_device'])} per device")
  print(f"optimizer state  {_gib(r['opt_state_bytes_per_device'])} per device")
  print(
    f"FLOPs per step   {r['flops_per_device']:.4g} per device "
    f"(analytic {r['analytic_flops_per_device']:.4g}, ratio "
    f"{r['flops_per_device'] / r['analytic_flops_per_device']:.3f}; "
    f"compiler, loops once: {r['compiler_flops_per_device']:.4g})"
  )
  if r.get("program_flops_per_device"):
    print(
      f"                 traced program: "
      f"{r['program_flops_per_device']:.4g} per device (remat recompute "
      f"and masked attention included)"
    )
  print(
    f"step time        {r['step_time_s']:.2f} s at {r['mfu']:.0%} MFU "
    f"({r['tokens_per_step'] / r['step_time_s']:.4g} tokens/s)"
  )
  print(
    "collectives      "
    + (", ".join(f"{k} x{v}" for k, v in r["collectives"].items()) or "none")
  )
  for line in r.get("unsharded", []):
    print(f"note: {line}")
  print(f"compile time     {r['compile_s']:.1f} s")


def main(args) -> int:
  # AOT compiles for TPU; the host backend only needs to be CPU.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import gemma_jax.features  # noqa: F401  (registers them with the core)
  from gemma_jax.train import aot
  from gemma_jax.train.config import load_config

  cfg = load_config(args.config, args.overrides)
  report = aot.compile_report(
    cfg,
    args.topology,
    args.slices,
    args.mfu,
    scale_flops=not args.no_flop_scaling,
  )
  if args.json:
    print(json.dumps(report))
  else:
    _print_table(report)
  return 0 if report["fits"] else 1
