"""Ahead-of-time compilation of the train step for a Cloud TPU topology.

Runs on any machine with libtpu installed (the `tpu` extra), no TPU needed:
the topology's devices are descriptions that XLA compiles for, so memory and
FLOPs of the real step are known before a pod is booked.

    report = compile_report(run_cfg, "v5e:16x16", num_slices=2)
"""

import math
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.extend

from gemma_jax import hardware
from gemma_jax.errors import ConfigError
from gemma_jax.sharding import rules
from gemma_jax.sharding.mesh import make_mesh
from gemma_jax.train import metrics
from gemma_jax.train.config import RunConfig
from gemma_jax.train.program import TrainProgram


def topology_devices(name: str, num_slices: int = 1) -> list:
  """Device descriptions of `num_slices` slices of topology `name`."""
  chip, _ = hardware.parse_topology(name)
  if num_slices < 1:
    raise ConfigError(f"--slices must be >= 1, got {num_slices}")
  # Lets this process load libtpu while another process holds it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  kwargs = {"chip_config_name": chip.chip_config} if chip.chip_config else {}
  try:
    topo = topologies.get_topology_desc(
      topology_name=name, platform="tpu", num_slices=num_slices, **kwargs
    )
  except Exception as e:  # jax raises plain RuntimeErrors here.
    if "not installed" in str(e) or "Unknown backend" in str(e):
      raise ConfigError(
        "compiling for TPU needs libtpu: pip install 'gemma-jax[tpu]'"
      ) from None
    raise
  return list(topo.devices)


_COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
)


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Collective ops in compiled HLO, async start/done pairs counted once."""
  counts = {}
  for op in _COLLECTIVES:
    n = len(re.findall(rf"= [^=\n]*? {op}(?:-start)?\(", hlo_text))
    if n:
      counts[op] = n
  return counts


def _leaf_bytes(tree) -> int:
  """Bytes per device of a tree of sharded ShapeDtypeStructs (max shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * x.dtype.itemsize
  return total


# How XLA says a program does not fit: the status, or (some releases, some
# paths) only "Ran out of memory in memory space hbm".
_OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Ran out of memory")


def fit_report(
  lower: Callable[[], jax.stages.Lowered], chip: hardware.Chip
) -> tuple[Any, dict]:
  """Lowers (`lower()`) and compiles a step: (the executable, or None where
  the compiler ran out of memory; a report).

  Report keys: fits (peak <= the `chip`'s HBM), peak_bytes_per_device (where
  the compiler ran out: what it said it required, or None), error (only
  then: its first line), compile_s (lowering included).
  """
  assert chip.hbm_bytes is not None  # every TPU in hardware.CHIPS has it
  start = time.perf_counter()
  try:
    compiled = lower().compile()
  except Exception as e:  # XlaRuntimeError
    message = str(e).strip()
    if not any(s in message for s in _OUT_OF_MEMORY):
      raise
    return None, dict(
      fits=False,
      error=message.splitlines()[0],
      peak_bytes_per_device=_required_bytes(message),
      compile_s=time.perf_counter() - start,
    )
  mem = compiled.memory_analysis()
  assert mem is not None  # TPU executables report their memory
  peak = int(mem.peak_memory_in_bytes)
  return compiled, dict(
    fits=peak <= chip.hbm_bytes,
    peak_bytes_per_device=peak,
    compile_s=time.perf_counter() - start,
  )


def _required_bytes(message: str) -> int | None:
  """'... required for HLO temporaries (139.39G) exceeds ...' -> bytes."""
  m = re.search(r"required[^(]*\((\d+(?:\.\d+)?)([KMGT])\)", message)
  if not m:
    return None
  return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _jaxprs(params):
  for v in params.values():
    for x in v if isinstance(v, (tuple, list)) else (v,):
      if isinstance(x, jax.extend.core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jax.extend.core.Jaxpr):
        yield x


def matmul_flops(jaxpr, loops: bool = True) -> float:
  """FLOPs of every dot_general in a jaxpr (2 per multiply-add).

  With loops=True a scan body counts `length` times, as it runs; with
  loops=False once, as XLA's cost analysis counts it. Of a cond's branches
  the most expensive counts.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
      continue
    subs = [matmul_flops(j, loops) for j in _jaxprs(eqn.params)]
    if not subs:
      continue
    if name == "cond":
      total += max(subs)
    else:
      times = eqn.params.get("length", 1) if name == "scan" and loops else 1
      total += times * sum(subs)
  return total


def loop_scaled_flops(
  program: TrainProgram, compiled_flops: float
) -> tuple[float, float]:
  """(compiler FLOPs with every loop iteration counted, program FLOPs).

  XLA's cost analysis counts a loop body once, and the layers and the
  microbatches are both scans. The traced program's matmul FLOPs counted
  both ways give the factor to scale the compiler's count by. The program
  count itself (every dot of the traced step, remat recompute and masked
  attention blocks included, divided evenly over the devices) is returned
  as a second opinion.
  """
  jaxpr = program.train_step_jaxpr().jaxpr
  full, once = matmul_flops(jaxpr), matmul_flops(jaxpr, loops=False)
  scaled = compiled_flops * (full / once if once else 1.0)
  return scaled, full / program.mesh.devices.size


def compile_report(
  cfg: RunConfig,
  topology: str,
  num_slices: int = 1,
  mfu: float = 0.5,
  scale_flops: bool = True,
) -> dict:
  """Compiles the train step for `topology` and reports per-device numbers.

  Keys: fits, peak_bytes_per_device, hbm_bytes_per_device,
  flops_per_device (the compiler's count, every loop iteration counted),
  analytic_flops_per_device (6N + causal attention, no recompute),
  program_flops_per_device (every dot of the traced step, recompute and
  masked attention included), compiler_flops_per_device (loop bodies once),
  param_bytes_per_device, opt_state_bytes_per_device,
  frozen_bytes_per_device (inputs the step reads but does not train: a LoRA
  base, a teacher, EWC's F), collectives, mesh, step_time_s at `mfu`,
  compile_s; `error` when the compiler ran out of memory.
  """
  chip, _ = hardware.parse_topology(topology)
  devices = topology_devices(topology, num_slices)
  program = TrainProgram(cfg, make_mesh(cfg.mesh, devices))
  n = len(devices)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  analytic = (
    metrics.model_flops_per_token(cfg.model, cfg.data.seq_len) * tokens / n
  )
  report = dict(
    topology=topology,
    slices=num_slices,
    devices=n,
    mesh=dict(program.mesh.shape),
    model=cfg.model.name,
    params=cfg.model.param_count(),
    batch=[cfg.train.batch_size, cfg.data.seq_len],
    microbatches=cfg.train.microbatches,
    remat_policy=cfg.model.remat_policy,
    hbm_bytes_per_device=chip.hbm_bytes,
    analytic_flops_per_device=analytic,
    unsharded=rules.unsharded_report(program.unsharded),
  )
  compiled, fit = fit_report(program.lower_train_step, chip)
  if compiled is None:
    return report | fit | dict(flops_per_device=None)
  report |= fit
  mem = compiled.memory_analysis()
  raw = _flops(compiled)
  scaled, traced = (
    loop_scaled_flops(program, raw) if scale_flops else (raw, None)
  )
  report |= dict(
    argument_bytes_per_device=int(mem.argument_size_in_bytes),
    temp_bytes_per_device=int(mem.temp_size_in_bytes),
    param_bytes_per_device=_leaf_bytes(program.abstract_state.params),
    opt_state_bytes_per_device=_leaf_bytes(program.abstract_state.opt_state),
    frozen_bytes_per_device=_leaf_bytes(program.abstract_frozen),
    compiler_flops_per_device=raw,
    flops_per_device=scaled,
    program_flops_per_device=traced,
    collectives=count_collectives(compiled.as_text()),
    mfu=mfu,
    step_time_s=analytic / (chip.peak_flops * mfu),
    tokens_per_step=tokens,
  )
  return report
