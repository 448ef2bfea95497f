"""Low-rank adapters (LoRA) on the attention and MLP projections.

A target projection y = x W (W [in..., out...]) gains two parameters,
A [in..., r] and B [r, out...], and computes

    y = x W + (alpha / r) * (dropout(x) A) B

with B initialised to zero, so a fresh adapter leaves the model unchanged.
The base weights are not touched: the trainer keeps them frozen (see
gemma_jax.features.lora) and only A and B are trained. `merge` folds the
adapters into the base weights: W' = W + (alpha / r) A B.

Targets and where they live (k/v and gate/up share one fused weight; each
has its own adapter on its slot of the fused axis C):

    q     layers/attn/q_einsum        slot of [N, D, H]       in D
    k, v  layers/attn/kv_einsum       slot 0, 1 of [2, K, D, H]  in D
    o     layers/attn/attn_vec_einsum [N, H, D]               in N, H
    gate, up  layers/mlp/gating_einsum  slot 0, 1 of [2, D, F]  in D
    down  layers/mlp/linear           [F, D]                  in F

Adapter parameters sit beside the weight: `<module>/lora_<target>_a` and
`lora_<target>_b`, stacked over layers like every layer parameter. Logical
axes: the weight's axes for the in/out dimensions, None (replicated) for the
rank.
"""

import dataclasses
import math

import jax.numpy as jnp
from flax import linen as nn

from gemma_jax.errors import ConfigError
from gemma_jax.model import quant as quant_lib


@dataclasses.dataclass(frozen=True)
class Projection:
  module: str  # path of the Einsum under the params root
  slot: int | None  # index on the fused axis C (axis 0), if fused
  in_axes: tuple[int, ...]  # fan-in axes of the (slot) weight


PROJECTIONS = {
  "q": Projection("layers/attn/q_einsum", None, (1,)),
  "k": Projection("layers/attn/kv_einsum", 0, (1,)),
  "v": Projection("layers/attn/kv_einsum", 1, (1,)),
  "o": Projection("layers/attn/attn_vec_einsum", None, (0, 1)),
  "gate": Projection("layers/mlp/gating_einsum", 0, (0,)),
  "up": Projection("layers/mlp/gating_einsum", 1, (0,)),
  "down": Projection("layers/mlp/linear", None, (0,)),
}
TARGETS = tuple(PROJECTIONS)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """The `model.lora` section. alpha None means alpha = rank (scale 1)."""

  rank: int
  alpha: float | None = None
  targets: tuple[str, ...] = TARGETS
  dropout: float = 0.0

  def __post_init__(self):
    bad = [t for t in self.targets if t not in PROJECTIONS]
    if bad:
      raise ConfigError(
        f"targets: unknown target {bad[0]!r}; valid targets: "
        f"{', '.join(TARGETS)}"
      )
    if not self.targets:
      raise ConfigError(f"targets: name at least one of {', '.join(TARGETS)}")
    if len(set(self.targets)) != len(self.targets):
      raise ConfigError(f"targets: {list(self.targets)} names a target twice")
    if self.rank <= 0:
      raise ConfigError(f"rank must be positive, got {self.rank}")
    if self.alpha is not None and not 0 < self.alpha < math.inf:
      raise ConfigError(
        f"alpha must be a positive number (or null: the rank), got {self.alpha}"
      )
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

  @property
  def scale(self) -> float:
    return (self.alpha if self.alpha is not None else self.rank) / self.rank


def slot_shape(model_cfg, target: str) -> tuple[int, ...]:
  """Shape of the target's weight (its slot of a fused weight), one layer."""
  proj = PROJECTIONS[target]
  shape, _, _ = model_cfg.einsum_weights()[proj.module]
  return shape if proj.slot is None else shape[1:]


def adapter_shapes(model_cfg, target: str):
  """(A shape, B shape) of one layer's adapter on `target`."""
  shape = slot_shape(model_cfg, target)
  in_axes = PROJECTIONS[target].in_axes
  r = model_cfg.lora.rank
  a = (*tuple(shape[i] for i in in_axes), r)
  b = (r, *tuple(s for i, s in enumerate(shape) if i not in in_axes))
  return a, b


def check(lora: LoraConfig, model_cfg) -> None:
  """ConfigError if the rank exceeds a target projection's in or out size."""
  for target in lora.targets:
    shape = slot_shape(model_cfg, target)
    in_axes = PROJECTIONS[target].in_axes
    fan_in = math.prod(shape[i] for i in in_axes)
    fan_out = math.prod(shape) // fan_in
    if lora.rank > min(fan_in, fan_out):
      raise ConfigError(
        f"lora.rank: {lora.rank} is larger than projection {target!r} "
        f"({fan_in} in, {fan_out} out); a rank-r adapter needs r <= "
        f"{min(fan_in, fan_out)}"
      )


def adapter_paths(model_cfg) -> dict[str, tuple[int, ...]]:
  """Flat {path: shape} of every adapter parameter (layers stacked)."""
  out = {}
  for target in model_cfg.lora.targets:
    module = PROJECTIONS[target].module
    a, b = adapter_shapes(model_cfg, target)
    out[f"{module}/lora_{target}_a"] = (model_cfg.num_layers, *a)
    out[f"{module}/lora_{target}_b"] = (model_cfg.num_layers, *b)
  return out


def is_adapter(path: str) -> bool:
  return path.rsplit("/", 1)[-1].startswith("lora_")


def _targets_of(module_name: str, lora: LoraConfig):
  return [
    (t, PROJECTIONS[t])
    for t in lora.targets
    if PROJECTIONS[t].module.rsplit("/", 1)[-1] == module_name
  ]


def _free_letter(equation: str) -> str:
  return next(c for c in "RZYXWVUQ" if c not in equation)


def adapter_delta(
  module: nn.Module,
  equation: str,
  x,
  shape,
  axes,
  in_axis,
  lora: LoraConfig,
  param_dtype,
  dtype,
):
  """The adapters' term of `module`'s einsum output, or None if it has none.

  Called inside an Einsum's compact __call__: creates lora_<t>_a/_b there.
  x: the einsum's input; shape/axes/in_axis: those of the full weight.
  """
  targets = _targets_of(module.name or "", lora)
  if not targets:
    return None
  xs, rest = equation.split(",")
  ws, outs = rest.split("->")
  rank_letter = _free_letter(equation)
  deltas = {}
  for target, proj in targets:
    fused = proj.slot is not None
    w_spec = ws[1:] if fused else ws
    w_axes = axes[1:] if fused else axes
    w_shape = shape[1:] if fused else shape
    out_spec = outs.replace(ws[0], "") if fused else outs
    in_spec = "".join(w_spec[i] for i in proj.in_axes)
    out_letters = "".join(
      c for i, c in enumerate(w_spec) if i not in proj.in_axes
    )
    a_shape, b_shape = (
      tuple(w_shape[i] for i in proj.in_axes),
      tuple(s for i, s in enumerate(w_shape) if i not in proj.in_axes),
    )
    fan_in = math.prod(a_shape)
    a = module.param(
      f"lora_{target}_a",
      nn.with_logical_partitioning(
        nn.initializers.normal(fan_in**-0.5),
        (*tuple(w_axes[i] for i in proj.in_axes), None),
      ),
      (*a_shape, lora.rank),
      param_dtype,
    )
    b = module.param(
      f"lora_{target}_b",
      nn.with_logical_partitioning(
        nn.initializers.zeros_init(),
        (
          None,
          *tuple(ax for i, ax in enumerate(w_axes) if i not in proj.in_axes),
        ),
      ),
      (lora.rank, *b_shape),
      param_dtype,
    )
    h_spec = "".join(c for c in xs if c not in in_spec) + rank_letter
    inputs = x
    if lora.dropout:
      inputs = nn.Dropout(lora.dropout, name=f"lora_{target}_dropout")(
        x, deterministic=not module.has_rng("dropout")
      )
    h = jnp.einsum(
      f"{xs},{in_spec}{rank_letter}->{h_spec}", inputs, jnp.asarray(a, dtype)
    )
    delta = jnp.einsum(
      f"{h_spec},{rank_letter}{out_letters}->{out_spec}",
      h,
      jnp.asarray(b, dtype),
    )
    deltas[proj.slot] = delta * jnp.asarray(lora.scale, dtype)
  if None in deltas:
    return deltas[None]
  # Fused weight: stack the slots' terms (zero where a slot has no adapter).
  some = next(iter(deltas.values()))
  slots = [deltas.get(i, jnp.zeros_like(some)) for i in range(shape[0])]
  return jnp.stack(slots, axis=outs.index(ws[0]))


def delta(a, b, target: str, scale: float):
  """float32 scale * (A B) [L, slot shape...]: what the adapter adds to
  its target's (slot of the) weight."""
  proj = PROJECTIONS[target]
  slot_ndim = a.ndim + b.ndim - 4
  letters = "abcdefgh"[:slot_ndim]
  in_spec = "".join(letters[i] for i in proj.in_axes)
  out_spec = "".join(c for i, c in enumerate(letters) if i not in proj.in_axes)
  return (
    jnp.einsum(
      f"z{in_spec}r,zr{out_spec}->z{letters}",
      a.astype(jnp.float32),
      b.astype(jnp.float32),
    )
    * scale
  )


def delta_sq_norm(a, b, scale: float):
  """float32 sum of delta(a, b, ...)**2, without forming it: per layer
  ||A B||^2 = sum((A^T A) * (B B^T)), two [r, r] Gram matrices."""
  layers, rank = a.shape[0], a.shape[-1]
  a = a.astype(jnp.float32).reshape(layers, -1, rank)
  b = b.astype(jnp.float32).reshape(layers, rank, -1)
  gram_a = jnp.einsum("lir,lis->lrs", a, a)
  gram_b = jnp.einsum("lro,lso->lrs", b, b)
  return jnp.sum(gram_a * gram_b) * scale**2


def merged_weight(w, a, b, target: str, scale: float):
  """w [L, ...] + scale * (A B) on the target's slot; float32 math."""
  proj = PROJECTIONS[target]
  delta_w = delta(a, b, target, scale)
  w32 = jnp.asarray(w, jnp.float32)
  if proj.slot is None:
    return (w32 + delta_w).astype(w.dtype)
  return w32.at[:, proj.slot].add(delta_w).astype(w.dtype)


# Whole parameter trees (nested dicts; adapters are the `lora_*` leaves).
def split(tree):
  """(adapters, base): the `lora_*` leaves and all the others, two trees
  of the same nesting (empty dicts dropped)."""

  def part(t, keep):
    out = {}
    for k, v in t.items():
      if isinstance(v, dict):
        sub = part(v, keep)
        if sub:
          out[k] = sub
      elif keep(k):
        out[k] = v
    return out

  adapter = lambda k: k.startswith("lora_")
  return part(tree, adapter), part(tree, lambda k: not adapter(k))


def combine(base, adapters):
  """The union of two trees from `split` (the model's full tree)."""
  out = dict(base)
  for k, v in adapters.items():
    out[k] = combine(out.get(k, {}), v) if isinstance(v, dict) else v
  return out


def merged_config(model_cfg):
  """The config of the merged model: no adapters; float weights when the
  base was held as integers (they are dequantized to merge)."""
  quant = model_cfg.quant
  if quant is not None and quant.weights == "int":
    quant = None
  return dataclasses.replace(model_cfg, lora=None, quant=quant)


def merge_params(base, adapters, model_cfg):
  """Base params + adapters -> params of `merged_config(model_cfg)`:
  W' = W + (alpha / r) A B on every target (integer bases dequantized to
  param_dtype first)."""
  if model_cfg.quant is not None and model_cfg.quant.weights == "int":
    base = quant_lib.dequantize_params(
      base, model_cfg, jnp.dtype(model_cfg.param_dtype)
    )
  updates = {}
  for target in model_cfg.lora.targets:
    module = PROJECTIONS[target].module
    path = f"{module}/w"
    w = updates.get(path, quant_lib.get_path(base, path))
    node = quant_lib.get_path(adapters, module)
    updates[path] = merged_weight(
      w,
      node[f"lora_{target}_a"],
      node[f"lora_{target}_b"],
      target,
      model_cfg.lora.scale,
    )
  return quant_lib.with_paths(base, updates)
