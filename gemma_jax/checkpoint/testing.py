"""Checkpoints for tests, built without downloads: random weights in our
layout or the official one, and HF directories from the committed parity
fixtures."""

import json
import pathlib

import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file

from gemma_jax.checkpoint import layout
from gemma_jax.model.config import ModelConfig


def random_flat(cfg: ModelConfig, seed=0, scale=1.0, dtype=np.float32):
  """{param path: scale * N(0, 1)} for every parameter of `cfg`."""
  return random_arrays(layout.param_shapes(cfg), seed, scale, dtype)


def random_arrays(shapes: dict, seed=0, scale=1.0, dtype=np.float32):
  """{path: scale * N(0, 1) of that shape}, drawn from default_rng(seed) in
  the order of `shapes`."""
  rng = np.random.default_rng(seed)
  return {
    p: (scale * rng.standard_normal(s)).astype(dtype) for p, s in shapes.items()
  }


def random_params(cfg: ModelConfig, seed=0, scale=1.0):
  """random_flat as the nested params tree."""
  return layout.unflatten(random_flat(cfg, seed, scale))


def official_checkpoint(
  path, cfg: ModelConfig, transposed_gating: bool, seed: int = 0
) -> dict:
  """Saves random weights in the official Flax layout; returns the flat dict.

  Keys as in docs/checkpoints.md: qkv_einsum when kv heads == heads,
  gating [2, F, D] when `transposed_gating`; padding embedding rows are 0.
  """
  rng = np.random.default_rng(seed)
  N, K, H, D, F = (
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.d_model,
    cfg.mlp_dim,
  )

  def r(*shape):
    return rng.standard_normal(shape).astype(np.float32)

  emb = r(cfg.num_embed_rows, D)
  emb[cfg.vocab_size :] = 0
  flat = {
    "transformer/embedder": {"input_embedding": emb},
    "transformer/final_norm": {"scale": r(D)},
  }
  norms = ["pre_attention_norm", "pre_ffw_norm"]
  if cfg.sandwich_norms:
    norms += ["post_attention_norm", "post_ffw_norm"]
  for i in range(cfg.num_layers):
    p = f"transformer/layer_{i}/"
    if N == K:
      flat[p + "attn/qkv_einsum"] = {"w": r(3, N, D, H)}
    else:
      flat[p + "attn/q_einsum"] = {"w": r(N, D, H)}
      flat[p + "attn/kv_einsum"] = {"w": r(2, K, D, H)}
    flat[p + "attn/attn_vec_einsum"] = {"w": r(N, H, D)}
    flat[p + "mlp/gating_einsum"] = {
      "w": r(2, F, D) if transposed_gating else r(2, D, F)
    }
    flat[p + "mlp/linear"] = {"w": r(F, D)}
    flat.update({p + n: {"scale": r(D)} for n in norms})
    if cfg.qk_norm:  # Gemma 3
      flat[p + "attn/_query_norm"] = {"scale": r(H)}
      flat[p + "attn/_key_norm"] = {"scale": r(H)}
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(path, args=ocp.args.PyTreeSave(flat))
  return flat


def write_hf_dir(fixture, directory, config_edit=None):
  """Writes a parity fixture (.npz) as an HF directory.

  Returns (npz data, {HF name: array}). `config_edit(config_dict)` may
  change config.json first.
  """
  data = np.load(fixture)
  config = json.loads(str(data["config_json"]))
  if config_edit:
    config_edit(config)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  state = {k[3:]: data[k] for k in data.files if k.startswith("hf/")}
  save_file(state, str(directory / "model.safetensors"))
  return data, state
