"""Generates tests/fixtures/parity/*.npz from Hugging Face transformers.

The reference is independent of our code: transformers' Gemma / Gemma 2 /
Gemma 3 (Gemma3ForCausalLM) in torch on CPU, float32, eager attention, with
tiny random weights. Each file
holds the HF config (JSON), the HF state dict, a right-padded batch of tokens
with its attention mask, and HF's logits; tests/model/test_parity.py loads the
weights through gemma_jax.checkpoint.hf and compares, needing neither torch
nor transformers.

Weights are drawn wide (norm scales ~N(0, 0.5), projections with std ~1) so
that the norms change the activations and both soft-caps saturate on a real
share of values; the script measures that share on real (non-pad, causal)
entries, refuses to write a fixture where a cap does no work, and stores it.

    pip install /opt/wheels/torch-*+cpu-*.whl transformers   # the `hf` extra
    # Gemma 3 needs transformers >= 4.50; fixtures written with 5.25.
    python scripts/make_parity_fixtures.py [--out tests/fixtures/parity]
"""

import argparse
import pathlib
from unittest import mock

import numpy as np
import torch
import transformers

B, T = 2, 24  # batch of two; row 1 is right-padded
PAD_FROM = 17  # row 1 holds 17 real tokens

CASES = {
  # Gemma 1, multi-query attention.
  "gemma1_mqa": (
    "gemma",
    dict(
      vocab_size=128,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=1,
      head_dim=8,
    ),
  ),
  # Gemma 1, multi-head attention with heads * head_dim (64) != d_model (32).
  "gemma1_mha_wide_heads": (
    "gemma",
    dict(
      vocab_size=128,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=4,
      head_dim=16,
    ),
  ),
  # Gemma 2, grouped-query attention, window 8 < sequence 24, 3 layers
  # (local, global, local), query scale from head_dim.
  "gemma2_gqa_window": (
    "gemma2",
    dict(
      vocab_size=128,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=8,
      query_pre_attn_scalar=8,
      sliding_window=8,
      attn_logit_softcapping=50.0,
      final_logit_softcapping=30.0,
    ),
  ),
  # Gemma 2, the 27B rule: query scale (d_model / heads)^-0.5 = 12^-0.5,
  # not head_dim^-0.5 = 8^-0.5.
  "gemma2_27b_query_scale": (
    "gemma2",
    dict(
      vocab_size=128,
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=8,
      query_pre_attn_scalar=12,
      sliding_window=8,
      attn_logit_softcapping=50.0,
      final_logit_softcapping=30.0,
    ),
  ),
  # Gemma 3: QK-norm, no soft-caps, 5 local : 1 global over 8 layers
  # (local x5, global, local x2), window 8 < sequence 24, GQA; RoPE 10k on
  # local layers, 1M with linear scaling 8 on the global one (the 4B rule).
  "gemma3_gqa_window_rope_scaling": (
    "gemma3_text",
    dict(
      vocab_size=128,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=8,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=8,
      query_pre_attn_scalar=8,
      sliding_window=8,
      rope_parameters={
        "full_attention": {
          "rope_type": "linear",
          "factor": 8.0,
          "rope_theta": 1_000_000.0,
        },
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
      },
    ),
  ),
  # Gemma 3 as the 1B: MQA, no RoPE scaling; heads * head_dim (64) !=
  # d_model (32), query scale 12^-0.5 (not head_dim's), 7 layers, window 6.
  "gemma3_mqa_wide_heads": (
    "gemma3_text",
    dict(
      vocab_size=128,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=7,
      num_attention_heads=4,
      num_key_value_heads=1,
      head_dim=16,
      query_pre_attn_scalar=12,
      sliding_window=6,
      rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
      },
    ),
  ),
}
# Packed rows (Gemma 3 fixtures): HF's logits of two documents, each alone
# (row 0's first 13 tokens, row 1's first 9); the test packs them into one
# row of ours.
PACKED = (13, 9)


def build(model_type: str, fields: dict, seed: int):
  torch.manual_seed(seed)
  config_cls = {
    "gemma": transformers.GemmaConfig,
    "gemma2": transformers.Gemma2Config,
    "gemma3_text": transformers.Gemma3TextConfig,
  }[model_type]
  config = config_cls(
    hidden_act="gelu_pytorch_tanh",
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=64,
    **fields,
  )
  config._attn_implementation = "eager"
  model_cls = {
    "gemma": transformers.GemmaForCausalLM,
    "gemma2": transformers.Gemma2ForCausalLM,
    "gemma3_text": transformers.Gemma3ForCausalLM,
  }[model_type]
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "layernorm" in name:
        p.normal_(0.0, 0.5)  # (1 + w) far from 1
      elif "embed_tokens" in name:
        p.normal_(0.0, 2.5)  # final logits beyond the cap of 30
      elif "q_proj" in name or "k_proj" in name:
        p.normal_(0.0, 1.0)  # attention scores beyond the cap of 50
      else:
        p.normal_(0.0, 0.3)
  return config, model


def inputs(seed: int, vocab: int):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, size=(B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, PAD_FROM:] = 0
  tokens[mask == 0] = 0
  return tokens, mask


def run(model, tokens, mask):
  """HF logits, and the pre-tanh soft-cap inputs (via torch.tanh)."""
  seen = []
  real_tanh = torch.tanh

  def spy(x):
    seen.append(x.detach().clone())
    return real_tanh(x)

  with torch.no_grad(), mock.patch.object(torch, "tanh", spy):
    out = model(
      input_ids=torch.tensor(tokens, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
    )
  return out.logits.float().numpy(), seen


def capped_fractions(seen, mask):
  """Share of real entries whose pre-cap magnitude exceeds the cap."""
  real = torch.tensor(mask, dtype=torch.bool)
  causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
  attn_ok = causal[None, None] & real[:, None, :, None] & real[:, None, None, :]
  attn = [x.abs()[attn_ok.expand_as(x)] for x in seen if x.ndim == 4]
  final = [x.abs()[real] for x in seen if x.ndim == 3]
  frac = lambda xs: float((torch.cat(xs) > 1).float().mean()) if xs else 0.0
  return frac(attn), frac(final), len(attn)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="tests/fixtures/parity")
  parser.add_argument(
    "--cases", nargs="*", choices=sorted(CASES), help="default: all"
  )
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for seed, (name, (model_type, fields)) in enumerate(CASES.items()):
    if args.cases and name not in args.cases:
      continue  # seeds stay those of the full run
    config, model = build(model_type, fields, seed)
    tokens, mask = inputs(seed, config.vocab_size)
    logits, seen = run(model, tokens, mask)
    attn_frac, final_frac, n_attn = capped_fractions(seen, mask)
    if model_type == "gemma2":
      assert n_attn == config.num_hidden_layers, n_attn
      if not (attn_frac > 0.01 and final_frac > 0.01):
        raise SystemExit(
          f"{name}: soft-caps barely active (attention "
          f"{attn_frac:.3f}, final {final_frac:.3f}); widen"
        )
    state = {
      f"hf/{k}": v.float().numpy()
      for k, v in model.state_dict().items()
      if k != "lm_head.weight"
    }  # tied to the embedding
    extra = {}
    if model_type == "gemma3_text":
      docs = [tokens[row, :n] for row, n in enumerate(PACKED)]
      extra["packed_lengths"] = np.asarray(PACKED, np.int32)
      extra["packed_logits"] = np.concatenate(
        [run(model, d[None], np.ones_like(d)[None])[0][0] for d in docs]
      )
    real = mask.astype(bool)
    print(
      f"{name}: params {sum(v.size for v in state.values())}, "
      f"|logits| max {np.abs(logits[real]).max():.1f}, attention scores "
      f"beyond cap {attn_frac:.1%}, final logits beyond cap {final_frac:.1%}"
    )
    np.savez_compressed(
      out / f"{name}.npz",
      config_json=np.array(config.to_json_string()),
      tokens=tokens,
      mask=mask,
      logits=logits,
      attn_capped_frac=np.float32(attn_frac),
      final_capped_frac=np.float32(final_frac),
      transformers_version=np.array(transformers.__version__),
      torch_version=np.array(torch.__version__),
      **extra,
      **state,
    )
  sizes = sum(p.stat().st_size for p in out.glob("*.npz"))
  print(
    f"wrote {len(args.cases or CASES)} fixtures to {out} ({sizes / 1e6:.2f} MB)"
  )


if __name__ == "__main__":
  main()
