"""Official Gemma Flax checkpoints (Kaggle "flax" variants) <-> native params.

They are orbax PyTree checkpoints of a flat dict whose keys contain '/':

    transformer/embedder                  input_embedding [R, D]  (R = 256128;
                                                  Gemma 3: 262144)
    transformer/final_norm                scale [D]
    transformer/layer_{i}/attn/q_einsum   w [N, D, H]      } kv heads != heads
    transformer/layer_{i}/attn/kv_einsum  w [2, K, D, H]   }
    transformer/layer_{i}/attn/qkv_einsum w [3, N, D, H]   kv heads == heads
    transformer/layer_{i}/attn/attn_vec_einsum  w [N, H, D]
    transformer/layer_{i}/mlp/gating_einsum     w [2, D, F], or [2, F, D]
                                                  (Gemma 2 9B and 27B)
    transformer/layer_{i}/mlp/linear      w [F, D]
    transformer/layer_{i}/{pre,post}_{attention,ffw}_norm  scale [D]
    transformer/layer_{i}/attn/_query_norm, _key_norm      scale [H]
                                                  (Gemma 3's QK-norm)

Gemma 3 (the `gemma` package 3.3.0, gm/nn/_gemma.py and gm/ckpts): gating is
[2, F, D] at every size and the embedding has 262,144 rows; the multimodal
releases (4B/12B/27B) also hold a vision encoder ('SigLiPFromPatches_0/...')
and its projection into the embedder ('transformer/embedder/mm_*'), which
are not read. A model with more embedding rows (the HF text config's
262,208) gets zeros in the rows past the stored ones.

`save` writes native params in this layout (the releases' flat keys), which
the official library's `gm.ckpts.load_params` reads for its own
`TransformerConfig` of the same sizes.

The file holds no config: the caller names it (a preset or a config file).
Which gating layout a checkpoint has is read from its shape when D != F
(always so for real models); `transposed_gating` states it explicitly, and
must then agree with the shape. Layers are restored one at a time (orbax
partial restore) into the stacked native arrays, on the host or straight into
their device shards (gemma_jax.checkpoint.placement), so memory holds the
output plus one layer.
"""

import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.linen import meta

from gemma_jax import fileio
from gemma_jax.checkpoint import layout, placement, publish
from gemma_jax.errors import CheckpointError
from gemma_jax.model.config import ModelConfig

# Presets whose official checkpoints store gating as [2, F, D].
TRANSPOSED_GATING_PRESETS = (
  "gemma2-9b",
  "gemma2-27b",
  "gemma3-1b",
  "gemma3-4b",
  "gemma3-12b",
  "gemma3-27b",
)
# Vision-encoder keys of the multimodal Gemma 3 releases: not the text model.
_VISION_PREFIXES = ("SigLiPFromPatches_0/", "transformer/embedder/mm_")
EMBEDDING = "transformer/embedder/input_embedding"
OFFICIAL_GEMMA3_ROWS = 262_144  # the official Gemma 3 configs' num_embed
_NORMS = (
  "pre_attention_norm",
  "pre_ffw_norm",
  "post_attention_norm",
  "post_ffw_norm",
)


def _layer_keys(
  cfg: ModelConfig, i: int, fused_qkv: bool, transposed: bool
) -> dict[str, tuple[int, ...]]:
  """{'transformer/layer_i/.../leaf': shape} of one official layer."""
  N, K, H, D, F = (
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.d_model,
    cfg.mlp_dim,
  )
  p = f"transformer/layer_{i}/"
  keys = {
    p + "attn/attn_vec_einsum/w": (N, H, D),
    p + "mlp/gating_einsum/w": (2, F, D) if transposed else (2, D, F),
    p + "mlp/linear/w": (F, D),
  }
  if fused_qkv:
    keys[p + "attn/qkv_einsum/w"] = (3, N, D, H)
  else:
    keys[p + "attn/q_einsum/w"] = (N, D, H)
    keys[p + "attn/kv_einsum/w"] = (2, K, D, H)
  norms = _NORMS if cfg.sandwich_norms else _NORMS[:2]
  keys.update({f"{p}{n}/scale": (D,) for n in norms})
  if cfg.qk_norm:
    keys[p + "attn/_query_norm/scale"] = (H,)
    keys[p + "attn/_key_norm/scale"] = (H,)
  return keys


def _gating_layout(cfg, found, transposed):
  """[2, D, F] (False) or [2, F, D] (True): the shape decides when D != F."""
  key = "transformer/layer_0/mlp/gating_einsum/w"
  D, F = cfg.d_model, cfg.mlp_dim
  by_shape = (
    None
    if D == F
    else {(2, D, F): False, (2, F, D): True}.get(tuple(found.get(key, ())))
  )
  if transposed is None:
    if by_shape is not None:
      return by_shape
    if cfg.name in TRANSPOSED_GATING_PRESETS:
      return True
    if D == F:
      raise CheckpointError(
        f"{key}: d_model == mlp_dim == {D}, so the gating layout cannot be "
        "read from the shape; pass --kaggle-gating DF or FD"
      )
    return False  # a wrong shape is reported by the shape check
  if by_shape is not None and by_shape != transposed:
    raise CheckpointError(
      f"{key}: shape {found[key]} is {'[2, F, D]' if by_shape else '[2, D, F]'}"
      f" but the gating layout was given as {'FD' if transposed else 'DF'}"
    )
  return transposed


def expected_shapes(
  cfg: ModelConfig, fused_qkv: bool, transposed: bool, embed_rows=None
):
  """{key: shape} of an official checkpoint; `embed_rows` stored rows
  (default the model's)."""
  keys = {
    EMBEDDING: (embed_rows or cfg.num_embed_rows, cfg.d_model),
    "transformer/final_norm/scale": (cfg.d_model,),
  }
  for i in range(cfg.num_layers):
    keys.update(_layer_keys(cfg, i, fused_qkv, transposed))
  return keys


def _restore(ckptr, path, keys, dtype):
  """Restores only `keys` ('module/leaf' paths) as numpy arrays."""
  tree, args = {}, {}
  for key in keys:
    module, leaf = key.rsplit("/", 1)
    tree.setdefault(module, {})[leaf] = 0
    args.setdefault(module, {})[leaf] = ocp.RestoreArgs(
      restore_type=np.ndarray, dtype=dtype
    )
  flat = ckptr.restore(
    path,
    args=ocp.args.PyTreeRestore(
      item=tree, restore_args=args, partial_restore=True
    ),
  )
  return {
    f"{m}/{leaf}": v for m, leaves in flat.items() for leaf, v in leaves.items()
  }


def _open(ckptr, path, dtype):
  """({'module/leaf': shape}, read(keys) -> {'module/leaf': array}).

  Reads shapes from the checkpoint's tree metadata and restores only the
  keys asked for. Checkpoints whose metadata this orbax cannot describe
  (older writers) are restored whole once, and each read hands its arrays
  over (pop), so memory still holds one copy.
  """
  try:
    tree = ckptr.metadata(path).item_metadata.tree
    shapes = {
      f"{module}/{leaf}": tuple(m.shape)
      for module, leaves in tree.items()
      for leaf, m in leaves.items()
    }
    return shapes, lambda keys: _restore(ckptr, path, keys, dtype)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: not an orbax checkpoint") from None
  except (AttributeError, TypeError, ValueError, KeyError):
    whole = {
      f"{module}/{leaf}": v
      for module, leaves in ckptr.restore(path).items()
      for leaf, v in leaves.items()
    }
    shapes = {k: tuple(np.shape(v)) for k, v in whole.items()}

    def read(keys):
      return {k: np.asarray(whole.pop(k), dtype) for k in keys}

    return shapes, read


def load(
  directory,
  cfg: ModelConfig,
  *,
  transposed_gating: bool | None = None,
  dtype=None,
  shardings=None,
) -> dict:
  """Reads an official checkpoint into native params for `cfg`: numpy
  arrays, or jax.Arrays placed by `shardings` (a params-shaped tree of
  NamedShardings) as each layer is read."""
  path = epath.Path(directory)
  if not path.exists():
    raise CheckpointError(f"{directory}: no such checkpoint directory")
  with ocp.PyTreeCheckpointer() as ckptr:
    found, read = _open(ckptr, path, dtype)
    found = {
      k: v for k, v in found.items() if not k.startswith(_VISION_PREFIXES)
    }
    fused = "transformer/layer_0/attn/qkv_einsum/w" in found
    transposed = _gating_layout(cfg, found, transposed_gating)
    layout.check_shapes(
      found,
      expected_shapes(cfg, fused, transposed, _embed_rows(cfg, found)),
      f"{directory} (model {cfg.name})",
    )
    top = read([EMBEDDING, "transformer/final_norm/scale"])
    emb = top.pop(EMBEDDING)
    # Every leaf in the stored dtype unless `dtype` (the embedding's rules).
    out = placement.target(
      layout.param_shapes(cfg), shardings, dtype or emb.dtype
    )
    # Rows past the stored ones (if any) stay zero.
    whole = len(emb) == cfg.num_embed_rows
    out.set("embedder/embedding", () if whole else (slice(0, len(emb)),), emb)
    del emb
    out.set("final_norm/scale", (), top["transformer/final_norm/scale"])
    for i in range(cfg.num_layers):
      keys = _layer_keys(cfg, i, fused, transposed)
      layer = {k.split("/", 2)[2]: v for k, v in read(list(keys)).items()}
      _fill_layer(out, i, layer, fused, transposed)
  return out.tree()


def _embed_rows(cfg: ModelConfig, found) -> int:
  """The stored embedding rows to expect: the model's, or fewer if the
  checkpoint holds fewer but at least the tokenizer's 262,144 of a Gemma 3
  model whose table is HF's 262,208 rows."""
  rows = found.get(EMBEDDING, (cfg.num_embed_rows,))[0]
  if cfg.qk_norm and OFFICIAL_GEMMA3_ROWS <= rows < cfg.num_embed_rows:
    return rows
  return cfg.num_embed_rows


def _fill_layer(out, i, layer, fused, transposed):
  """Writes one official layer (keys 'attn/q_einsum/w', ...) into the
  target `out` (gemma_jax.checkpoint.placement)."""
  if fused:
    qkv = layer.pop("attn/qkv_einsum/w")
    out.set("layers/attn/q_einsum/w", (i,), qkv[0])
    out.set("layers/attn/kv_einsum/w", (i,), qkv[1:])
  else:
    out.set("layers/attn/q_einsum/w", (i,), layer.pop("attn/q_einsum/w"))
    out.set("layers/attn/kv_einsum/w", (i,), layer.pop("attn/kv_einsum/w"))
  gating = layer.pop("mlp/gating_einsum/w")
  out.set(
    "layers/mlp/gating_einsum/w",
    (i,),
    gating.transpose(0, 2, 1) if transposed else gating,
  )
  for name, ours in (("_query_norm", "query_norm"), ("_key_norm", "key_norm")):
    if f"attn/{name}/scale" in layer:  # Gemma 3
      out.set(
        f"layers/attn/{ours}/scale", (i,), layer.pop(f"attn/{name}/scale")
      )
  for key, value in layer.items():  # norms, attn_vec_einsum, linear
    out.set(f"layers/{key}", (i,), value)


def official_flat(
  params,
  cfg: ModelConfig,
  *,
  transposed_gating: bool | None = None,
  embed_rows: int | None = None,
  dtype=None,
) -> dict:
  """Native params -> the official flat dict {module: {leaf: array}}.

  transposed_gating: [2, F, D] gating; default as the official checkpoints
    of that model (Gemma 2 9B/27B presets and every Gemma 3 model).
  embed_rows: embedding rows to write; default the model's, or the official
    262,144 for a Gemma 3 model with the HF text config's 262,208.
  """
  flat = {
    k: np.asarray(v, dtype) for k, v in layout.flatten(meta.unbox(params))
  }
  layout.check_shapes(
    {k: v.shape for k, v in flat.items()}, layout.param_shapes(cfg), "params"
  )
  if transposed_gating is None:
    transposed_gating = cfg.qk_norm or cfg.name in TRANSPOSED_GATING_PRESETS
  if embed_rows is None:
    embed_rows = cfg.num_embed_rows
    if cfg.qk_norm and embed_rows > OFFICIAL_GEMMA3_ROWS:
      embed_rows = OFFICIAL_GEMMA3_ROWS
  out = {
    "transformer/embedder": {
      "input_embedding": flat["embedder/embedding"][:embed_rows]
    },
    "transformer/final_norm": {"scale": flat["final_norm/scale"]},
  }
  norms = _NORMS if cfg.sandwich_norms else _NORMS[:2]
  for i in range(cfg.num_layers):
    p = f"transformer/layer_{i}/"
    q = flat["layers/attn/q_einsum/w"][i]
    kv = flat["layers/attn/kv_einsum/w"][i]
    if cfg.num_heads == cfg.num_kv_heads:  # the library's qkv_einsum
      out[p + "attn/qkv_einsum"] = {"w": np.concatenate([q[None], kv])}
    else:
      out[p + "attn/q_einsum"] = {"w": q}
      out[p + "attn/kv_einsum"] = {"w": kv}
    out[p + "attn/attn_vec_einsum"] = {
      "w": flat["layers/attn/attn_vec_einsum/w"][i]
    }
    gating = flat["layers/mlp/gating_einsum/w"][i]
    out[p + "mlp/gating_einsum"] = {
      "w": gating.transpose(0, 2, 1) if transposed_gating else gating
    }
    out[p + "mlp/linear"] = {"w": flat["layers/mlp/linear/w"][i]}
    for n in norms:
      out[p + n] = {"scale": flat[f"layers/{n}/scale"][i]}
    if cfg.qk_norm:
      for name, ours in (
        ("_query_norm", "query_norm"),
        ("_key_norm", "key_norm"),
      ):
        out[f"{p}attn/{name}"] = {"scale": flat[f"layers/attn/{ours}/scale"][i]}
  return out


def save(
  directory,
  params,
  cfg: ModelConfig,
  *,
  transposed_gating: bool | None = None,
  embed_rows: int | None = None,
  dtype=None,
  force: bool = False,
) -> None:
  """Writes `params` as an official Flax checkpoint (official_flat's
  layout); atomic: `directory` appears only once complete."""
  flat = official_flat(
    params,
    cfg,
    transposed_gating=transposed_gating,
    embed_rows=embed_rows,
    dtype=dtype,
  )
  publish.check_finite(flat, directory)  # before anything is written
  with (
    fileio.atomic_directory(directory, overwrite=force) as tmp,
    ocp.PyTreeCheckpointer() as ckptr,
  ):
    ckptr.save(tmp, args=ocp.args.PyTreeSave(flat), force=True)
