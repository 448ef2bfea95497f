"""Gemma 1 and Gemma 2 in Flax: one config-driven transformer."""

from gemma_jax.model.config import PRESETS, ModelConfig, preset
from gemma_jax.model.transformer import Transformer, init_cache

__all__ = ["PRESETS", "ModelConfig", "Transformer", "init_cache", "preset"]
