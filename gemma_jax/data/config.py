"""Data config: sources, the staged mixture, and row layout.

data:
  seq_len: 128
  tokenizer: ~/.cache/gemma_jax/corpus/tokenizer.model
  sources:
    prose: {kind: tfds, name: gemma_jax_prose, eval_split: eval,
            data_dir: ~/.cache/gemma_jax/corpus/tfds}
    notes: {kind: files, paths: [notes/*.txt, more/*.jsonl]}
  stages:
    - {start_step: 0, weights: {prose: 0.8, notes: 0.2}}
    - {start_step: 1000, weights: {prose: 0.3, notes: 0.7}}
"""

import dataclasses
import math
from typing import ClassVar, Literal

from gemma_jax.data.sources import KINDS, decode_policy
from gemma_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One named source of documents.

  kind=tfds: an ArrayRecord tensorflow-datasets dataset (`name`, `data_dir`),
    holding a `tokens` feature (written by `gemma-jax data prepare`) or a text
    feature `text_key`, read with random access.
  kind=files: globs, local or gs://, in the formats of data/formats.py:
    JSON lines (.jsonl, .jsonl.gz, .jsonl.zst, .json.gz) one document per
    line (field `text_key`), parquet files and Hugging Face `datasets`
    directories one per row (column `text_key`), any other file (.txt,
    .txt.gz) one document.
  kind=memory: the documents are `texts` (tests, tiny experiments).
  """

  kind: str = "tfds"  # one of gemma_jax.data.sources.KINDS
  name: str = ""  # tfds dataset name (kind=tfds)
  data_dir: str | None = None  # tfds data_dir
  split: str = "train"
  eval_split: str | None = None  # held-out split for evaluation
  paths: tuple[str, ...] = ()  # globs (kind=files): see data/formats.py
  eval_paths: tuple[str, ...] = ()  # held-out globs (kind=files)
  text_key: str = "text"  # JSON field / parquet, Arrow column / tfds feature
  texts: tuple[str, ...] = ()  # documents (kind=memory)
  eval_texts: tuple[str, ...] = ()  # held-out documents (kind=memory)
  # Bytes that are not UTF-8 (files, tfds text): see data/sources.py.
  on_decode_error: Literal["error", "skip_document", "replace"] = "error"
  max_undecodable_fraction: float = 0.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(
        f"kind: {self.kind!r} is not a valid choice; valid "
        f"choices: {', '.join(map(repr, KINDS))}"
      )
    KINDS[self.kind].check(self)
    decode_policy(self)  # checks max_undecodable_fraction

  @property
  def has_held_out(self) -> bool:
    return KINDS[self.kind].has_held_out(self)


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """From `start_step` on, draw tokens from sources in these shares."""

  start_step: int
  weights: dict[str, float]

  def __post_init__(self):
    if self.start_step < 0:
      raise ConfigError(f"start_step must be >= 0, got {self.start_step}")
    for name, w in self.weights.items():
      if not math.isfinite(w) or w < 0:
        raise ConfigError(
          f"weights.{name}: must be a finite number >= 0, got {w}"
        )
    if not self.weights or sum(self.weights.values()) <= 0:
      raise ConfigError(
        f"weights: stage at step {self.start_step} has no "
        f"positive weight: {self.weights}"
      )

  def shares(self) -> dict[str, float]:
    total = sum(self.weights.values())
    return {k: v / total for k, v in self.weights.items()}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  seq_len: int = 128
  tokenizer: str = ""  # path to a SentencePiece model
  sources: dict[str, SourceConfig] = dataclasses.field(default_factory=dict)
  stages: tuple[StageConfig, ...] = ()  # empty: one stage, equal weights
  seed: int = 0
  num_workers: int = 0  # grain worker processes (0 = in process)
  prefetch: int = 4  # batches buffered ahead by `iterate`

  # Keys of earlier versions: a config that still sets one gets the reason.
  REMOVED_KEYS: ClassVar[dict[str, str]] = {
    "block_size": "every global batch is now mixed exactly (within one "
    "row per source), so delete the key"
  }

  def __post_init__(self):
    if self.seq_len <= 1:
      raise ConfigError(f"seq_len must be > 1, got {self.seq_len}")
    if self.num_workers < 0:
      raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
    for i, stage in enumerate(self.stages):
      unknown = sorted(set(stage.weights) - set(self.sources))
      if unknown:
        raise ConfigError(
          f"stages[{i}].weights: unknown source {unknown[0]!r}; sources: "
          f"{', '.join(self.sources) or '(none)'}"
        )
    starts = [s.start_step for s in self.stages]
    if starts and starts[0] != 0:
      raise ConfigError(f"stages[0].start_step must be 0, got {starts[0]}")
    for i in range(1, len(starts)):
      if starts[i] <= starts[i - 1]:
        raise ConfigError(
          f"stages[{i}].start_step: stages must start at increasing steps, "
          f"got {starts[i]} after {starts[i - 1]}"
        )

  def resolved_stages(self) -> tuple[StageConfig, ...]:
    """The stages, or one stage of equal weights when none are given."""
    if self.stages:
      return self.stages
    if not self.sources:
      raise ConfigError("sources: the data config names no source")
    return (StageConfig(0, dict.fromkeys(self.sources, 1.0)),)
