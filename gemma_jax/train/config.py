"""The run config: small typed sub-configs composed into one, from YAML.

    config = load_config("configs/tiny.yaml", ["train.steps=10"])

Sections: `model` (gemma_jax.model.config), `mesh` (gemma_jax.sharding.config),
`data` (gemma_jax.data.config), `runtime` (gemma_jax.distributed), `distill`
and the training sections defined here: `optimizer`, `train`,
`checkpoint`, `distill` and `continual` (EWC; docs/continual.md).
`RunConfig.features()` names the features a config turns on
(gemma_jax.features).
The model section may name a preset and
override any of its fields:

    model: {preset: gemma2-2b, remat_policy: full}
"""

import dataclasses
from typing import Literal

import yaml

from gemma_jax import configlib
from gemma_jax.data.config import DataConfig
from gemma_jax.distributed import RuntimeConfig
from gemma_jax.errors import ConfigError
from gemma_jax.model.config import PRESETS, DType, ModelConfig
from gemma_jax.sharding.config import MeshConfig

TAILS = ("renormalize", "bucket")  # see gemma_jax.features.distill_loss
Tail = Literal["renormalize", "bucket"]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-4
  schedule: Literal["cosine", "wsd", "linear", "constant", "rsqrt"] = "cosine"
  warmup_steps: int = 0
  decay_steps: int | None = None  # None: the run's train.steps
  min_lr_ratio: float = 0.1  # final lr as a fraction of the peak
  wsd_decay_fraction: float = 0.1  # share of steps spent decaying (wsd)
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float | None = 1.0

  def __post_init__(self):
    if self.learning_rate < 0:
      raise ConfigError(
        f"optimizer.learning_rate must be >= 0, got {self.learning_rate}"
      )
    if self.warmup_steps < 0:
      raise ConfigError("optimizer.warmup_steps must be >= 0")
    # Out of these, Adam divides by zero or the schedule runs backwards.
    configlib.check_ranges(
      self,
      "optimizer",
      min_lr_ratio=(0, 1),
      wsd_decay_fraction=(0, 1),
      b1=(0, [1]),
      b2=(0, [1]),
      eps=(0, None),
      weight_decay=(0, None),
      grad_clip_norm=(0, None),
      decay_steps=(1, None),
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100
  batch_size: int = 8  # global batch, rows
  microbatches: int = 1  # gradient accumulation
  z_loss: float = 0.0
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0  # 0: only at the end
  eval_batches: int = 4
  max_nonfinite_in_row: int = 3
  peak_flops_per_device: float | None = None  # None: from the device table
  prefetch: int = 2  # batches placed on the devices ahead
  sample_prompts: tuple[str, ...] = ()  # printed with a continuation at the end
  sample_tokens: int = 32
  ema_decay: float = 0.0  # EMA of the weights (0: none)
  ema_debias: bool = True  # false: anchored at the start (WARP)

  def __post_init__(self):
    if self.steps < 0:
      raise ConfigError(f"train.steps must be >= 0, got {self.steps}")
    if self.batch_size <= 0:
      raise ConfigError("train.batch_size must be positive")
    if self.microbatches <= 0 or self.batch_size % self.microbatches:
      raise ConfigError(
        f"train.batch_size ({self.batch_size}) must be divisible by "
        f"train.microbatches ({self.microbatches})"
      )
    for key in (
      "log_every",
      "eval_every",
      "eval_batches",
      "max_nonfinite_in_row",
      "sample_tokens",
    ):
      if getattr(self, key) < 0:
        raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
    if self.log_every == 0:
      raise ConfigError("train.log_every must be positive")
    if self.prefetch < 1:
      raise ConfigError(f"train.prefetch must be >= 1, got {self.prefetch}")
    configlib.check_ranges(
      self, "train", z_loss=(0, None), peak_flops_per_device=(1, None)
    )
    if not 0.0 <= self.ema_decay < 1.0:
      raise ConfigError(
        f"train.ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}"
      )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  save_every: int = 100
  keep: int = 3
  async_save: bool = True
  init_from: str | None = None  # params to start from (continual pretraining)
  # Format of init_from: detected, or named (a gemma_jax run directory is
  # `run`; see gemma_jax.train.start).
  init_format: Literal["auto", "native", "hf", "kaggle", "run"] = "auto"
  # With init_from a run directory: continue its AdamW moments too (the
  # learning-rate schedule still restarts at step 0).
  init_optimizer: bool = False
  export_params: bool = True  # params-only export to WORKDIR/params at the end

  def __post_init__(self):
    if self.save_every < 0:
      raise ConfigError(
        f"checkpoint.save_every must be >= 0 (0: only at the "
        f"end), got {self.save_every}"
      )
    if self.keep < 1:
      raise ConfigError(f"checkpoint.keep must be >= 1, got {self.keep}")
    if self.init_optimizer and not self.init_from:
      raise ConfigError(
        "checkpoint.init_optimizer needs checkpoint.init_from "
        "(a gemma_jax run directory)"
      )
    if self.init_optimizer and self.init_format not in ("auto", "run"):
      raise ConfigError(
        f"checkpoint.init_optimizer restores the optimizer of "
        f"a gemma_jax run; checkpoint.init_format "
        f"{self.init_format!r} holds params only"
      )


@dataclasses.dataclass(frozen=True)
class ContinualConfig:
  """Elastic Weight Consolidation: the loss gains
  ewc_lambda / 2 * sum_i F_i (theta_i - anchor_i)^2 (docs/continual.md).

  ewc_lambda > 0 without a `fisher` is L2-SP (F = 1).
  """

  ewc_lambda: float = 0.0
  fisher: str | None = None  # a `gemma-jax fisher` output directory
  anchor: str | None = None  # params to hold (default: init_from)
  anchor_format: Literal["auto", "native", "hf", "kaggle", "run"] = "auto"
  # F as used: divided by its mean over all entries ("mean", so that
  # mean F = 1 and ewc_lambda is the average stiffness, whatever the data
  # and estimator), by its largest entry ("max"), or raw ("none").
  fisher_normalization: Literal["mean", "max", "none"] = "mean"
  # Storage of F and the anchor on the devices (bfloat16 halves it).
  dtype: Literal["float32", "bfloat16"] = "float32"

  def __post_init__(self):
    if self.ewc_lambda < 0:
      raise ConfigError(
        f"continual.ewc_lambda must be >= 0, got {self.ewc_lambda}"
      )

  @property
  def enabled(self) -> bool:
    return self.ewc_lambda > 0


@dataclasses.dataclass(frozen=True)
class HarnessConfig:
  """lm-evaluation-harness tasks scored on the live params every `every`
  steps (0: at the end only) and logged to eval.jsonl (the feature:
  gemma_jax/features/harness_eval.py; docs/evaluation.md). The other keys
  are lm_eval's options of the same names."""

  tasks: tuple[str, ...] = ()
  every: int = 0
  limit: float | None = None  # documents per task (< 1: a fraction)
  num_fewshot: int | None = None
  gen_kwargs: str | None = None
  include_path: tuple[str, ...] = ()  # folders of further task YAMLs
  batch_size: int = 8
  max_length: int = 8192  # tokens per request (HFLM's for our HF exports)

  def __post_init__(self):
    for key in ("every", "batch_size", "max_length"):
      low = 0 if key == "every" else 1
      if getattr(self, key) < low:
        raise ConfigError(
          f"harness.{key} must be >= {low}, got {getattr(self, key)}"
        )
    if self.limit is not None and not self.limit > 0:
      raise ConfigError(f"harness.limit must be > 0, got {self.limit}")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """The run config's `distill:` section (README "Distillation").

  Online (`teacher`): the teacher's forward runs inside the train step.
  Offline (`dump`): the student reads the teacher's top-k from a dump that
  `gemma-jax distill dump` wrote. Off when neither is set (nor
  `teacher_model`, which alone lets `gemma-jax compile` size a run).

  teacher: checkpoint directory of the teacher: native, Hugging Face, or
    official Flax (that one needs `teacher_model`). Any size; its
    vocabulary must be the student's.
  teacher_model: the teacher's model section (a preset name or fields);
    default: the checkpoint's own config. `gemma-jax compile` reads only it.
  teacher_dtype: the teacher's parameter and compute dtype.
  temperature: tau of both softmaxes (the loss is scaled by tau^2).
  alpha: objective = alpha * distill + (1 - alpha) * cross-entropy.
  topk, tail: what a dump stores per position and how its tail is used.
  select: how a dump picks its `topk` ids per position: "topk", the most
    likely; "sample", drawn without replacement in proportion to the
    teacher's probabilities (Gemma 3's dumps; `tail` is not used), with an
    unbiased loss (gemma_jax.features.distill_loss).
  dump: a dump directory: train from it (offline).
  """

  teacher: str | None = None
  teacher_model: ModelConfig | None = None
  teacher_dtype: DType = "bfloat16"
  temperature: float = 1.0
  alpha: float = 0.5
  topk: int = 64
  tail: Tail = "bucket"
  select: Literal["topk", "sample"] = "topk"
  dump: str | None = None

  def __post_init__(self):
    if self.temperature <= 0:
      raise ConfigError(
        f"distill.temperature must be > 0, got {self.temperature}"
      )
    if not 0.0 <= self.alpha <= 1.0:
      raise ConfigError(f"distill.alpha must be in [0, 1], got {self.alpha}")
    if self.topk < 1:
      raise ConfigError(f"distill.topk must be >= 1, got {self.topk}")

  @property
  def mode(self) -> str | None:
    """The mode: "offline", "online" or None (off)."""
    if self.dump:
      return "offline"
    if self.teacher or self.teacher_model is not None:
      return "online"
    return None


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelConfig
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  runtime: RuntimeConfig = RuntimeConfig()
  distill: DistillConfig = DistillConfig()
  continual: ContinualConfig = ContinualConfig()
  harness: HarnessConfig = HarnessConfig()

  def __post_init__(self):
    c, d = self.continual, self.distill
    if d.mode is not None and d.topk > self.model.vocab_size:
      raise ConfigError(
        f"distill.topk ({d.topk}) must be <= model.vocab_size "
        f"({self.model.vocab_size}): there are no more tokens to keep"
      )
    if self.model.lora is not None:
      self._check_lora()
    if c.enabled and not (c.anchor or self.checkpoint.init_from):
      raise ConfigError(
        "continual.ewc_lambda > 0 holds the params near an "
        "anchor: set continual.anchor or "
        "checkpoint.init_from"
      )

  def features(self) -> tuple[str, ...]:
    """The features (gemma_jax.features) this config turns on."""
    on = {
      "lora": self.model.lora is not None,
      "distill": self.distill.mode is not None,
      "ewc": self.continual.enabled,
      "ema": self.train.ema_decay > 0,
      "harness": bool(self.harness.tasks),
    }
    return tuple(name for name, is_on in on.items() if is_on)

  def _check_lora(self):
    c, ck = self.continual, self.checkpoint
    if ck.init_optimizer:
      raise ConfigError(
        "checkpoint.init_optimizer: with model.lora the optimizer holds the "
        "adapters only and checkpoint.init_from is their frozen base, so "
        "there are no moments to keep; remove init_optimizer"
      )
    if c.enabled and not ck.init_from:
      raise ConfigError(
        "continual.ewc_lambda > 0 with model.lora holds the adapted weights "
        "near their frozen base: set checkpoint.init_from to the base"
      )
    if c.enabled and c.anchor and c.anchor != ck.init_from:
      raise ConfigError(
        f"continual.anchor: with model.lora the EWC anchor is the frozen "
        f"base the adapters move away from (checkpoint.init_from "
        f"{ck.init_from}), so it cannot be {c.anchor}; remove "
        f"continual.anchor"
      )


def model_config_from_dict(data: dict, path: str = "model") -> ModelConfig:
  """A model section: all fields, or `preset:` plus fields to override."""
  data = dict(data)
  name = data.pop("preset", None)
  if name is not None:
    if name not in PRESETS:
      raise ConfigError(
        f"{path}.preset: unknown preset {name!r}; valid "
        f"choices: {', '.join(PRESETS)}"
      )
    data = {**configlib.to_dict(PRESETS[name]), **data}
  return configlib.from_dict(ModelConfig, data, path)


def config_from_dict(data: dict) -> RunConfig:
  data = dict(data)
  if "model" not in data:
    raise ConfigError("missing required key 'model' (a preset name or fields)")
  model = data.pop("model")
  if isinstance(model, str):
    model = {"preset": model}
  if not isinstance(model, dict):
    raise ConfigError(
      f"model: expected a preset name or a mapping, got {model!r}"
    )
  distill = data.get("distill")
  if isinstance(distill, dict) and distill.get("teacher_model") is not None:
    teacher = distill["teacher_model"]
    teacher = {"preset": teacher} if isinstance(teacher, str) else teacher
    if not isinstance(teacher, dict):
      raise ConfigError(
        f"distill.teacher_model: expected a preset name or a "
        f"mapping, got {teacher!r}"
      )
    data["distill"] = distill | {
      "teacher_model": model_config_from_dict(teacher, "distill.teacher_model")
    }
  return configlib.from_dict(
    RunConfig, data | {"model": model_config_from_dict(model)}
  )


def load_config(path=None, overrides=()) -> RunConfig:
  """Loads a YAML run config and applies `key.path=value` overrides."""
  data = configlib.load_yaml(path) if path else {}
  for override in overrides:
    # `model: gemma2-2b` is short for `model: {preset: gemma2-2b}`; expand it
    # so that `model.num_layers=2` can override a field of the preset.
    if isinstance(data.get("model"), str):
      data["model"] = {"preset": data["model"]}
    distill = data.get("distill")
    if isinstance(distill, dict) and isinstance(
      distill.get("teacher_model"), str
    ):
      distill["teacher_model"] = {"preset": distill["teacher_model"]}
    data = configlib.apply_overrides(data, [override])
  return config_from_dict(data)


def to_dict(config: RunConfig) -> dict:
  return configlib.to_dict(config)


def to_yaml(config: RunConfig) -> str:
  """YAML that `load_config` reads back into an equal config."""
  return yaml.safe_dump(to_dict(config), sort_keys=False)
