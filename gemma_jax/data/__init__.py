"""Data: sources, packed rows, staged mixtures, exactly resumable pipelines."""

from gemma_jax.data.config import DataConfig, SourceConfig, StageConfig
from gemma_jax.data.pipeline import (
  Pipeline,
  build_pipeline,
  check_resume,
  pipeline_for,
)

__all__ = [
  "DataConfig",
  "Pipeline",
  "SourceConfig",
  "StageConfig",
  "build_pipeline",
  "check_resume",
  "pipeline_for",
]
