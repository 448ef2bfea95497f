"""Learning-rate schedules and the AdamW optimizer, from OptimizerConfig.

Every schedule starts with a linear warmup from 0 to the peak over
`warmup_steps`, then:
  cosine   cosine decay to min_lr_ratio * peak at decay_steps
  wsd      warmup-stable-decay: flat at the peak, then linear decay to
           min_lr_ratio * peak over the last wsd_decay_fraction of decay_steps
  linear   linear decay to min_lr_ratio * peak at decay_steps
  constant the peak
  rsqrt    peak * sqrt(warmup / step) (inverse square root) after warmup
After decay_steps a decaying schedule stays at its final value.
"""

import jax
import jax.numpy as jnp
import optax

from gemma_jax.train.config import OptimizerConfig


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the optimizer step (0-based)."""
  peak = cfg.learning_rate
  end = peak * cfg.min_lr_ratio
  warmup = cfg.warmup_steps
  decay_steps = max(cfg.decay_steps or total_steps, warmup + 1)
  after = decay_steps - warmup  # steps after warmup until the end value
  if cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, after, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(peak, end, after)
  elif cfg.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif cfg.schedule == "wsd":
    decay = max(int(round(decay_steps * cfg.wsd_decay_fraction)), 1)
    stable = max(after - decay, 0)
    main = optax.join_schedules(
        [optax.constant_schedule(peak),
         optax.linear_schedule(peak, end, decay)], [stable])
  elif cfg.schedule == "rsqrt":
    w = max(warmup, 1)
    main = lambda n: peak * jnp.sqrt(w / jnp.maximum(n + warmup, w))
  else:  # Unreachable: OptimizerConfig checks the name.
    raise ValueError(f"unknown schedule {cfg.schedule!r}")
  if not warmup:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(params):
  """Weight decay on weight matrices only: not on norm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any("norm" in str(getattr(k, "key", ""))
                              for k in path), params)


def make_optimizer(cfg: OptimizerConfig,
                   total_steps: int) -> tuple[optax.GradientTransformation,
                                              optax.Schedule]:
  """(AdamW with global-norm clipping, its schedule).

  The learning rate is an injected hyperparameter: the optimizer state holds
  the rate of the last update (`learning_rate(opt_state)`), which lags the
  step count by the skipped steps, since a skipped step keeps the state.
  """
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  adamw = optax.inject_hyperparams(
      optax.adamw,
      static_args=("b1", "b2", "eps", "eps_root", "weight_decay", "mask"))
  parts.append(adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule


def learning_rate(opt_state) -> jax.Array:
  """The learning rate the last update of `opt_state` applied."""
  return optax.tree.get(opt_state, "learning_rate",
                        filtering=lambda _, v: isinstance(v, jax.Array))
