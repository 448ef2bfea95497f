"""The shapes of the native parameter tree, and checks that name the tensor.

The tree is the one `gemma_jax.model.Transformer` creates with scanned layers
(leading axis L on everything under 'layers'):

    embedder/embedding                 [R, D]      R = cfg.num_embed_rows
    final_norm/scale                   [D]
    layers/pre_attention_norm/scale    [L, D]
    layers/attn/q_einsum/w             [L, N, D, H]
    layers/attn/kv_einsum/w            [L, 2, K, D, H]
    layers/attn/attn_vec_einsum/w      [L, N, H, D]
    layers/attn/query_norm/scale       [L, H]      (QK-norm only)
    layers/attn/key_norm/scale         [L, H]      (QK-norm only)
    layers/post_attention_norm/scale   [L, D]      (sandwich norms only)
    layers/pre_ffw_norm/scale          [L, D]
    layers/post_ffw_norm/scale         [L, D]      (sandwich norms only)
    layers/mlp/gating_einsum/w         [L, 2, D, F] (0 = gate, 1 = up)
    layers/mlp/linear/w                [L, F, D]

Converters address leaves by '/'-joined paths such as 'layers/mlp/linear/w'.
"""

from collections.abc import Iterator
from typing import Any

from gemma_jax.errors import CheckpointError
from gemma_jax.model.config import SHAPE_FIELDS as SHAPE_FIELDS  # re-export
from gemma_jax.model.config import ModelConfig


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Flat {path: shape} of every parameter of a model with config `cfg`."""
  L, D, F = cfg.num_layers, cfg.d_model, cfg.mlp_dim
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  shapes = {
    "embedder/embedding": (cfg.num_embed_rows, D),
    "final_norm/scale": (D,),
    "layers/pre_attention_norm/scale": (L, D),
    "layers/attn/q_einsum/w": (L, N, D, H),
    "layers/attn/kv_einsum/w": (L, 2, K, D, H),
    "layers/attn/attn_vec_einsum/w": (L, N, H, D),
    "layers/pre_ffw_norm/scale": (L, D),
    "layers/mlp/gating_einsum/w": (L, 2, D, F),
    "layers/mlp/linear/w": (L, F, D),
  }
  if cfg.sandwich_norms:
    shapes["layers/post_attention_norm/scale"] = (L, D)
    shapes["layers/post_ffw_norm/scale"] = (L, D)
  if cfg.qk_norm:
    shapes["layers/attn/query_norm/scale"] = (L, H)
    shapes["layers/attn/key_norm/scale"] = (L, H)
  return shapes


def flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """Yields ('a/b/c', leaf) for a nested dict of arrays."""
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from flatten(value, path + "/")
    else:
      yield path, value


def unflatten(flat: dict[str, Any]) -> dict:
  """Inverse of `flatten`: {'a/b': x} -> {'a': {'b': x}}."""
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def check_shapes(
  found: dict[str, tuple[int, ...]],
  expected: dict[str, tuple[int, ...]],
  source: str,
) -> None:
  """Raises CheckpointError listing missing, unexpected and misshapen leaves."""
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  problems = [
    f"{p}: expected shape {expected[p]}, found {tuple(found[p])}"
    for p in expected
    if p in found and tuple(found[p]) != tuple(expected[p])
  ]
  if missing:
    problems.append("missing tensors: " + ", ".join(missing))
  if extra:
    problems.append("unexpected tensors: " + ", ".join(extra))
  if problems:
    raise CheckpointError(
      f"{source} does not match the model config: " + "; ".join(problems)
    )
