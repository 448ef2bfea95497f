"""The train and eval steps: pure functions over a TrainState and a batch.

    state, metrics = train_step(state, batch, model=..., optimizer=..., ...)

(`TrainProgram` jits them with their shardings; nothing here knows the mesh.)

A batch is a dict of int32 arrays: inputs, targets, segment_ids, positions,
loss_mask [B, T] and source [B]. The loss is the mean cross-entropy over
target tokens with loss_mask 1 in the whole global batch (all microbatches),
plus an optional z-loss z * mean(logsumexp^2). Gradients are accumulated over
`microbatches` with a scan, clipped by global norm and applied by the
optimizer. A step whose loss, gradients, new parameters or new optimizer
state are not finite is skipped: the state is kept and a counter raised.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from gemma_jax.train.optimizer import learning_rate
from gemma_jax.train.state import TrainState

BATCH_KEYS = (
  "inputs",
  "targets",
  "segment_ids",
  "positions",
  "loss_mask",
  "source",
)


def ce_and_lse(logits, targets):
  """Cross-entropy of `targets` and log-sum-exp, float32 [B, T]."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  # One-hot contraction keeps a vocab-sharded logits tensor sharded.
  onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
  return lse - jnp.einsum("btv,btv->bt", logits, onehot), lse


def masked_losses(ce, lse, batch, z_loss: float):
  """Cross-entropy and z-loss per token, float32 [B, T], 0 off the mask."""
  mask = batch["loss_mask"].astype(jnp.float32)
  return ce * mask, z_loss * jnp.square(lse) * mask


def token_losses(logits, batch, z_loss: float):
  """Cross-entropy and z-loss per token, float32 [B, T], 0 off the mask."""
  ce, lse = ce_and_lse(logits, batch["targets"])
  return masked_losses(ce, lse, batch, z_loss)


def loss_sums(ce, z, batch, num_sources: int) -> dict:
  """Sums over the batch of masked per-token ce and z [B, T]: ce, z, and
  per-source ce and target tokens."""
  row_ce = ce.sum(axis=1)
  row_tokens = batch["loss_mask"].astype(jnp.float32).sum(axis=1)
  per_source = lambda x: jnp.zeros(num_sources).at[batch["source"]].add(x)
  return dict(
    ce=row_ce.sum(),
    z=z.sum(),
    source_loss_sum=per_source(row_ce),
    source_tokens=per_source(row_tokens),
  )


def cross_entropy_sums(
  logits, batch, num_sources: int, z_loss: float = 0.0
) -> dict:
  """Sums over the batch: ce, z, and per-source ce and target tokens."""
  ce, z = token_losses(logits, batch, z_loss)
  return loss_sums(ce, z, batch, num_sources)


# A view: (params, frozen, batch) -> (the model's params, flax rngs).
View = Callable[[Any, Any, dict], tuple[Any, dict]]


@dataclasses.dataclass(frozen=True)
class Forward:
  """The model's forward pass over (params, frozen, batch), two ways:

      logits = forward(params, frozen, batch)          # [B, T, V] float32
      ce, lse = forward.losses(params, frozen, batch)  # [B, T] float32

  `losses` is the model's own loss path (Transformer.token_losses: with
  model.loss_chunk, fused and chunked, never storing the logits); `lm_loss`
  uses it. `views` turn the trained params and the frozen inputs into what
  the model applies (e.g. a frozen base with adapters), in order; a feature
  adds one with `with_view` and both ways keep it.
  """

  model: Any
  views: tuple[View, ...] = ()

  def with_view(self, view: View) -> "Forward":
    return dataclasses.replace(self, views=self.views + (view,))

  def _variables(self, params, frozen, batch):
    rngs: dict = {}
    for view in self.views:
      params, more = view(params, frozen, batch)
      rngs |= more
    return {"params": params}, rngs

  def __call__(self, params, frozen, batch):
    variables, rngs = self._variables(params, frozen, batch)
    return self.model.apply(
      variables,
      batch["inputs"],
      batch["positions"],
      batch["segment_ids"],
      rngs=rngs,
    )

  def losses(self, params, frozen, batch):
    variables, rngs = self._variables(params, frozen, batch)
    return self.model.apply(
      variables,
      batch["inputs"],
      batch["targets"],
      batch["positions"],
      batch["segment_ids"],
      rngs=rngs,
      method=type(self.model).token_losses,
    )


def model_forward(model) -> Forward:
  """The Forward of a plain model (the frozen inputs unused)."""
  return Forward(model)


def lm_loss(forward: Forward, num_sources: int, z_loss: float = 0.0):
  """The default objective: next-token cross-entropy plus z-loss.

  A loss function maps (params, batch, frozen) to (objective summed over the
  batch's target tokens, sums): sums holds ce, z, source_loss_sum,
  source_tokens and, for objectives with more terms, `terms` {name: sum}
  (logged as loss/<name> per target token). Uses `forward.losses`, the
  model's fused loss path.
  """

  def loss(params, batch, frozen):
    ce, lse = forward.losses(params, frozen, batch)
    sums = loss_sums(*masked_losses(ce, lse, batch, z_loss), batch, num_sources)
    return sums["ce"] + sums["z"], sums

  return loss


def split_microbatches(batch, m: int):
  """[B, ...] -> [m, B/m, ...]; microbatch j takes rows j, j+m, ... so that
  every device keeps its own rows (no data movement)."""

  def split(x):
    x = x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(
      x, (None, "act_batch") + (None,) * (x.ndim - 2)
    )

  return jax.tree.map(split, batch)


def accumulate(fn, batch, microbatches: int):
  """Sum of the pytree `fn(microbatch)` over the batch's microbatches."""
  if microbatches == 1:
    return fn(batch)
  parts = split_microbatches(batch, microbatches)
  first = jax.tree.map(lambda x: x[0], parts)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, first))
  total, _ = jax.lax.scan(
    lambda acc, mb: (jax.tree.map(jnp.add, acc, fn(mb)), None), zeros, parts
  )
  return total


def all_finite(tree) -> jax.Array:
  """True iff every float in `tree` is finite."""
  flags = [
    jnp.isfinite(x).all()
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.stack(flags).all() if flags else jnp.bool_(True)


def row_keys(state: TrainState, rows: int) -> jax.Array:
  """uint32 [rows, 2]: PRNG keys of this step, one per batch row, for
  objectives that draw random numbers (dropout); a pure function of
  the state, so a resumed run draws the same."""
  return jax.random.split(jax.random.fold_in(state.rng, state.step), rows)


def applied_updates(opt_state) -> jax.Array:
  """Updates the optimizer has applied: Adam's count (a skipped step keeps
  the optimizer state, so it is not counted, unlike state.step)."""
  counts = [
    v
    for path, v in optax.tree.get_all_with_path(opt_state, "count")
    if getattr(path[-1], "tuple_name", "") == "ScaleByAdamState"
  ]
  return counts[0]


def train_step(
  state: TrainState,
  batch,
  frozen,
  *,
  loss_fn,
  optimizer: optax.GradientTransformation,
  microbatches: int = 1,
  penalty_fn=None,
  extras_fn=None,
):
  """One optimizer update from a global batch: (new state, metrics).

  loss_fn(params, batch, frozen) -> (objective sum, sums) (see `lm_loss`);
  the objective is divided by the global batch's target tokens. penalty_fn
  (params, frozen) -> (penalty, {name: value}) is added once per step.
  `frozen` holds arrays the objective reads but never trains; it is not
  donated. The loss sees the batch with `rng` added: per-row keys
  (`row_keys`). extras_fn(extras, new params, new opt_state) -> extras
  updates the state's extras (per-step state of features) when the step
  is kept.

  metrics (device scalars unless noted): loss (cross-entropy per target
  token), z_loss, loss/<term> of extra terms and penalties (and then
  loss/ce, the same cross-entropy, beside them), grad_norm,
  learning_rate, tokens, skipped, nonfinite_in_row, source_loss_sum
  [sources], source_tokens [sources].
  """
  tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
  denom = jnp.maximum(tokens, 1.0)
  batch = dict(batch, rng=row_keys(state, batch["inputs"].shape[0]))

  def objective(params, mb):
    total, sums = loss_fn(params, mb, frozen)
    return total / denom, sums | {"total": total}

  def grads_and_sums(mb):
    (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(
      state.params, mb
    )
    return jax.tree.map(lambda g: g.astype(jnp.float32), grads), sums

  grads, sums = accumulate(grads_and_sums, batch, microbatches)
  terms = {k: v / denom for k, v in sums.get("terms", {}).items()}
  objective_value = sums["total"] / denom
  if penalty_fn is not None:
    (penalty, penalty_terms), penalty_grads = jax.value_and_grad(
      penalty_fn, has_aux=True
    )(state.params, frozen)
    grads = jax.tree.map(
      lambda g, p: g + p.astype(jnp.float32), grads, penalty_grads
    )
    terms |= penalty_terms
    objective_value = objective_value + penalty
  grad_norm = optax.tree.norm(grads)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = (
    jnp.isfinite(objective_value)
    & jnp.isfinite(grad_norm)
    & all_finite(params)
    & all_finite(opt_state)
  )
  keep = lambda new, old: jax.tree.map(
    lambda n, o: jnp.where(finite, n, o), new, old
  )
  extras = state.extras
  if extras_fn is not None:
    extras = keep(extras_fn(extras, params, opt_state), extras)
  new_state = TrainState(
    step=state.step + 1,
    params=keep(params, state.params),
    opt_state=keep(opt_state, state.opt_state),
    rng=state.rng,
    nonfinite_in_row=jnp.where(finite, 0, state.nonfinite_in_row + 1),
    extras=extras,
  )
  metrics = dict(
    loss=sums["ce"] / denom,
    z_loss=sums["z"] / denom,
    grad_norm=grad_norm,
    learning_rate=learning_rate(opt_state),
    tokens=tokens.astype(jnp.int32),
    skipped=(~finite).astype(jnp.int32),
    nonfinite_in_row=new_state.nonfinite_in_row,
    source_loss_sum=sums["source_loss_sum"],
    source_tokens=sums["source_tokens"],
    **{f"loss/{k}": v for k, v in terms.items()},
  )
  if terms:  # the cross-entropy beside the other terms of the objective
    metrics["loss/ce"] = metrics["loss"]
  return new_state, metrics


def eval_step(
  params, batch, frozen, *, forward, num_sources: int, microbatches: int = 1
):
  """Held-out sums: loss_sum (cross-entropy over target tokens, no z-loss),
  tokens, source_loss_sum and source_tokens [num_sources]."""
  sums = accumulate(
    lambda mb: cross_entropy_sums(forward(params, frozen, mb), mb, num_sources),
    batch,
    microbatches,
  )
  return dict(
    loss_sum=sums["ce"],
    tokens=jnp.sum(batch["loss_mask"].astype(jnp.float32)),
    source_loss_sum=sums["source_loss_sum"],
    source_tokens=sums["source_tokens"],
  )
