"""Optimizer, training-loop and checkpointing configs."""

import dataclasses
from typing import Literal

from gemma_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-4
  schedule: Literal["cosine", "wsd", "linear", "constant", "rsqrt"] = "cosine"
  warmup_steps: int = 0
  decay_steps: int | None = None   # None: the run's train.steps
  min_lr_ratio: float = 0.1        # final lr as a fraction of the peak
  wsd_decay_fraction: float = 0.1  # share of steps spent decaying (wsd)
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float | None = 1.0

  def __post_init__(self):
    if self.learning_rate < 0:
      raise ConfigError(f"optimizer.learning_rate must be >= 0, got "
                        f"{self.learning_rate}")
    if self.warmup_steps < 0:
      raise ConfigError("optimizer.warmup_steps must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100
  batch_size: int = 8              # global batch, rows
  microbatches: int = 1            # gradient accumulation
  z_loss: float = 0.0
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0              # 0: only at the end
  eval_batches: int = 4
  max_nonfinite_in_row: int = 3
  peak_flops_per_device: float | None = None  # None: from the device table
  prefetch: int = 2                # batches placed on the devices ahead
  sample_prompts: tuple[str, ...] = ()  # printed with a continuation at the end
  sample_tokens: int = 32

  def __post_init__(self):
    if self.steps < 0:
      raise ConfigError(f"train.steps must be >= 0, got {self.steps}")
    if self.batch_size <= 0:
      raise ConfigError(f"train.batch_size must be positive")
    if self.microbatches <= 0 or self.batch_size % self.microbatches:
      raise ConfigError(
          f"train.batch_size ({self.batch_size}) must be divisible by "
          f"train.microbatches ({self.microbatches})")
    for key in ("log_every", "eval_every", "eval_batches",
                "max_nonfinite_in_row", "sample_tokens"):
      if getattr(self, key) < 0:
        raise ConfigError(f"train.{key} must be >= 0, got "
                          f"{getattr(self, key)}")
    if self.log_every == 0:
      raise ConfigError("train.log_every must be positive")
    if self.prefetch < 1:
      raise ConfigError(f"train.prefetch must be >= 1, got {self.prefetch}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  save_every: int = 100
  keep: int = 3
  async_save: bool = True
  init_from: str | None = None     # params to start from (continual pretraining)
  export_params: bool = True       # params-only export to WORKDIR/params at the end

  def __post_init__(self):
    if self.save_every < 0:
      raise ConfigError(f"checkpoint.save_every must be >= 0 (0: only at the "
                        f"end), got {self.save_every}")
    if self.keep < 1:
      raise ConfigError(f"checkpoint.keep must be >= 1, got {self.keep}")
