"""Ahead-of-time compilation of the train step for a Cloud TPU topology.

Runs on any machine with libtpu installed (the `tpu` extra), no TPU needed:
the topology's devices are descriptions that XLA compiles for, so memory and
FLOPs of the real step are known before a pod is booked.

    report = compile_report(run_cfg, "v5e:16x16", num_slices=2)
"""

import dataclasses
import math
import os
import re
import time

import jax
import jax.extend

from gemma_jax.config import RunConfig
from gemma_jax.errors import ConfigError
from gemma_jax.sharding import mesh as mesh_lib
from gemma_jax.train import flops as flops_lib
from gemma_jax.train import metrics

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Product:
  """A Cloud TPU generation: its topology rule and HBM.

  Peak FLOP/s come from the trainer's table (train.metrics.PEAK_FLOPS), by
  the topology devices' `device_kind`, so both use the same numbers.
  """
  name: str
  dims: int                      # 2 (torus) or 3 (twisted torus, cubes)
  hbm_bytes: int                 # per device, as the compiler reports it
  max_chips: int
  shapes: tuple[str, ...]        # allowed shapes below full 4x4x4 cubes
  chip_config: str | None = None


PRODUCTS = {
    "v4": Product("v4", 3, int(30.75 * GiB), 4096,
                  ("2x2x1", "2x2x2", "2x2x4", "2x4x4"), "megacore"),
    "v5p": Product("v5p", 3, int(95.74 * GiB), 8960,
                   ("2x2x1", "2x2x2", "2x2x4", "2x4x4"), "megacore"),
    "v5e": Product("v5e", 2, int(15.75 * GiB), 256,
                   ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
    "v6e": Product("v6e", 2, int(31.25 * GiB), 256,
                   ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
}


def parse_topology(name: str) -> tuple[Product, tuple[int, ...]]:
  """'v5e:16x16' -> (product, (16, 16)); ConfigError for unreal slices.

  2D products (v5e, v6e) come in the listed shapes only (single-chip
  slices exist but libtpu does not compile for them: its hosts are 2x2). 3D products (v4,
  v5p) are either a listed small shape or built from 4x4x4 cubes: every
  dimension a multiple of 4, up to the product's largest pod.
  """
  gen, _, shape = name.partition(":")
  if gen not in PRODUCTS or not shape:
    raise ConfigError(
        f"--topology {name!r}: expected GENERATION:SHAPE such as v5e:16x16 "
        f"or v5p:4x4x8; generations: {', '.join(PRODUCTS)}")
  product = PRODUCTS[gen]
  try:
    sizes = tuple(int(s) for s in shape.split("x"))
  except ValueError:
    sizes = ()
  cube = (len(sizes) == 3 and all(s % 4 == 0 for s in sizes)
          and math.prod(sizes) <= product.max_chips)
  if len(sizes) != product.dims or not (shape in product.shapes or
                                        (product.dims == 3 and cube)):
    rule = (f"one of {', '.join(product.shapes)}" if product.dims == 2 else
            f"{', '.join(product.shapes)} or AxBxC with A, B, C multiples of "
            f"4 and at most {product.max_chips} chips")
    raise ConfigError(f"--topology {name!r}: {gen} slices are {rule}")
  return product, sizes


def topology_devices(name: str, num_slices: int = 1) -> list:
  """Device descriptions of `num_slices` slices of topology `name`."""
  product, _ = parse_topology(name)
  if num_slices < 1:
    raise ConfigError(f"--slices must be >= 1, got {num_slices}")
  # Lets this process load libtpu while another process holds it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  kwargs = {"chip_config_name": product.chip_config} if product.chip_config \
      else {}
  try:
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu",
                                        num_slices=num_slices, **kwargs)
  except Exception as e:  # jax raises plain RuntimeErrors here.
    if "not installed" in str(e) or "Unknown backend" in str(e):
      raise ConfigError("compiling for TPU needs libtpu: pip install "
                        "'gemma-jax[tpu]'") from None
    raise
  return list(topo.devices)


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")


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


class OutOfMemory(Exception):
  pass


def _compile(cfg: RunConfig, mesh):
  """(compiled train step, abstract state), raising OutOfMemory."""
  from gemma_jax.train import step as step_lib
  state = step_lib.abstract_train_state(cfg, mesh)
  batch = step_lib.abstract_batch(cfg, mesh)
  lowered = step_lib.make_train_step(cfg, mesh).lower(state, batch)
  try:
    return lowered.compile(), state
  except Exception as e:  # XlaRuntimeError
    if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
      raise OutOfMemory(str(e).strip().splitlines()[0]) from None
    raise


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
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
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


def loop_scaled_flops(cfg: RunConfig, mesh,
                      compiled_flops: float) -> tuple[float, float]:
  """(compiler FLOPs with every loop iteration counted, program FLOPs).

  XLA's cost analysis counts a loop body once, and the layers and the
  microbatches are both scans. The traced program's matmul FLOPs counted
  both ways give the factor to scale the compiler's count by. The program
  count itself (every dot of the traced step, remat recompute and masked
  attention blocks included, divided evenly over the devices) is returned
  as a second opinion.
  """
  from gemma_jax.train import step as step_lib
  jaxpr = step_lib.make_train_step(cfg, mesh).jaxpr(
      step_lib.abstract_train_state(cfg, mesh),
      step_lib.abstract_batch(cfg, mesh)).jaxpr
  full, once = matmul_flops(jaxpr), matmul_flops(jaxpr, loops=False)
  scaled = compiled_flops * (full / once if once else 1.0)
  return scaled, full / mesh.devices.size


def compile_report(cfg: RunConfig, topology: str, num_slices: int = 1,
                   mfu: float = 0.5, scale_flops: bool = True) -> dict:
  """Compiles the train step for `topology` and reports per-device numbers.

  Keys: fits, peak_bytes_per_device, hbm_bytes_per_device,
  flops_per_device (the compiler's count, every loop iteration counted),
  analytic_flops_per_device (6N + causal attention, no recompute),
  program_flops_per_device (every dot of the traced step, recompute and
  masked attention included), compiler_flops_per_device (loop bodies once), param_bytes_per_device,
  opt_state_bytes_per_device, collectives, mesh, step_time_s at `mfu`,
  compile_s; `error` when the compiler ran out of memory.
  """
  product, _ = parse_topology(topology)
  devices = topology_devices(topology, num_slices)
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  n = len(devices)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  analytic = flops_lib.model_flops_per_token(cfg.model,
                                             cfg.data.seq_len) * tokens / n
  report = dict(topology=topology, slices=num_slices, devices=n,
                mesh=dict(mesh.shape), model=cfg.model.name,
                params=cfg.model.param_count(),
                batch=[cfg.train.batch_size, cfg.data.seq_len],
                microbatches=cfg.train.microbatches,
                remat_policy=cfg.model.remat_policy,
                hbm_bytes_per_device=product.hbm_bytes,
                analytic_flops_per_device=analytic)
  start = time.perf_counter()
  try:
    compiled, state = _compile(cfg, mesh)
  except OutOfMemory as e:
    return report | dict(fits=False, error=str(e),
                         peak_bytes_per_device=_required_bytes(str(e)),
                         flops_per_device=None,
                         compile_s=time.perf_counter() - start)
  report["compile_s"] = time.perf_counter() - start
  mem = compiled.memory_analysis()
  peak = int(mem.peak_memory_in_bytes)
  raw = _flops(compiled)
  scaled, program = (loop_scaled_flops(cfg, mesh, raw) if scale_flops
                     else (raw, None))
  report |= dict(
      fits=peak <= product.hbm_bytes,
      peak_bytes_per_device=peak,
      argument_bytes_per_device=int(mem.argument_size_in_bytes),
      temp_bytes_per_device=int(mem.temp_size_in_bytes),
      param_bytes_per_device=_leaf_bytes(state.params),
      opt_state_bytes_per_device=_leaf_bytes(state.opt_state),
      compiler_flops_per_device=raw,
      flops_per_device=scaled,
      program_flops_per_device=program,
      collectives=count_collectives(compiled.as_text()),
      mfu=mfu,
      step_time_s=analytic / (
          metrics.peak_flops_per_device(devices[0]) * mfu),
      tokens_per_step=tokens)
  return report
