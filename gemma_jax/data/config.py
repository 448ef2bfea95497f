"""Data config: sources, the staged mixture, and row layout."""

import dataclasses
from typing import Literal

from gemma_jax.configlib import ConfigError


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One named source of documents."""
  kind: Literal["tfds", "files", "memory"] = "tfds"
  name: str = ""                 # tfds dataset name (kind=tfds)
  data_dir: str | None = None    # tfds data_dir
  split: str = "train"
  eval_split: str | None = None  # held-out split for evaluation
  paths: tuple[str, ...] = ()    # globs (kind=files): .txt or .jsonl
  text_key: str = "text"         # field of a JSON line / tfds feature


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """From `start_step` on, draw tokens from sources in these shares."""
  start_step: int
  weights: dict[str, float]


@dataclasses.dataclass(frozen=True)
class DataConfig:
  seq_len: int = 128
  tokenizer: str = ""            # path to a SentencePiece model
  sources: dict[str, SourceConfig] = dataclasses.field(default_factory=dict)
  stages: tuple[StageConfig, ...] = ()
  seed: int = 0
  block_size: int = 64           # rows per exactly-mixed block
  num_workers: int = 0           # grain worker processes (0 = in process)

  def __post_init__(self):
    if self.seq_len <= 1:
      raise ConfigError(f"data.seq_len must be > 1, got {self.seq_len}")
