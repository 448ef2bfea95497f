"""gemma-jax score: logits and next-token log-probabilities under a checkpoint.

    gemma-jax score --checkpoint ckpt/ --tokens T.npy [--mask M.npy] --out O.npz
    gemma-jax score --checkpoint ckpt/ --tokenizer tokenizer.model \\
        --text "first text" --text "second" --out O.npz
    gemma-jax score --checkpoint ckpt/9b-int4 --tokens T.npy --out O.npz
    gemma-jax score --checkpoint ckpt/9b --adapter runs/lora/adapter ...

Writes float32 `logits` [B, T, V] and `logprobs` [B, T-1] (log p of token
t+1 given tokens <= t; 0 where token t+1 is padding), plus the `tokens` and
`mask` that were scored. Mask: 1 = real token, 0 = padding on the right.
Texts are encoded with a leading bos and right-padded with pad (0).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.checkpoint import native, publish
from gemma_jax.commands import positive_int
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.model import ModelConfig, Transformer

HELP = "score token arrays or texts: logits and next-token log-probs"


def add_arguments(parser):
  parser.add_argument(
    "--checkpoint",
    required=True,
    help="native checkpoint directory (gemma-jax convert), "
    "or a quantized one (gemma-jax quantize)",
  )
  parser.add_argument(
    "--adapter",
    help="a LoRA adapter directory (RUN/"
    "adapter) to run on top of the checkpoint",
  )
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--tokens", help=".npy of int token ids [B, T]")
  source.add_argument(
    "--text",
    action="append",
    help="a text to score (repeatable; needs --tokenizer)",
  )
  parser.add_argument("--mask", help=".npy of 0/1 [B, T] (with --tokens)")
  parser.add_argument("--tokenizer", help="SentencePiece model (with --text)")
  parser.add_argument("--out", required=True, help="output .npz")
  parser.add_argument(
    "--batch-size", type=positive_int, default=8, help="rows per forward pass"
  )
  parser.add_argument(
    "--logprobs-only",
    action="store_true",
    help="omit the [B, T, V] logits from the output",
  )


def check_inputs(tokens, mask, vocab_size: int, name: str = "tokens"):
  """Validates int tokens [B, T] and a right-padded 0/1 mask; returns both."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise DataError(
      f"{name}: expected integer token ids [B, T], got "
      f"{tokens.dtype} {list(tokens.shape)}"
    )
  if tokens.shape[1] < 2:
    raise DataError(
      f"{name}: need at least 2 tokens per row to score the "
      f"next token, got shape {list(tokens.shape)}"
    )
  mask = np.ones_like(tokens) if mask is None else np.asarray(mask)
  if mask.shape != tokens.shape:
    raise DataError(
      f"mask shape {list(mask.shape)} differs from {name} "
      f"shape {list(tokens.shape)}"
    )
  if not np.isin(mask, (0, 1)).all():
    raise DataError("mask must hold only 0 (padding) and 1 (real token)")
  later = np.diff(mask.astype(np.int8), axis=1) > 0
  if later.any():
    row, col = np.argwhere(later)[0]
    raise DataError(
      f"mask row {row} is not right-padded: a real token "
      f"follows padding at position {col + 1}"
    )
  bad = (tokens < 0) | (tokens >= vocab_size)
  if (bad & (mask == 1)).any():
    row, col = np.argwhere(bad & (mask == 1))[0]
    raise DataError(
      f"{name}: token id {tokens[row, col]} at [{row}, {col}]"
      f" is outside the model's vocabulary [0, {vocab_size})"
    )
  return np.where(mask == 1, tokens, 0).astype(np.int32), mask.astype(np.int32)


def score(params, cfg: ModelConfig, tokens, mask, batch_size: int = 8):
  """Returns float32 logits [B, T, V] and logprobs [B, T-1] (numpy)."""
  model = Transformer(cfg)

  @jax.jit
  def forward(params, tokens, mask):
    logits = model.apply({"params": params}, tokens, None, mask)
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return logits, jnp.where(mask[:, 1:] == 1, logp, 0.0)

  b = tokens.shape[0]
  pad = -b % batch_size if b > batch_size else 0
  step = min(b, batch_size)
  # Whole batches only (one compile): padding rows are all-mask-0.
  tokens = np.pad(tokens, ((0, pad), (0, 0)))
  mask = np.pad(mask, ((0, pad), (0, 0)))
  outs = [
    jax.device_get(forward(params, tokens[i : i + step], mask[i : i + step]))
    for i in range(0, len(tokens), step)
  ]
  logits = np.concatenate([o[0] for o in outs])[:b]
  logprobs = np.concatenate([o[1] for o in outs])[:b]
  return logits, logprobs


def _text_inputs(args, cfg):
  if not args.tokenizer:
    raise ConfigError("--text needs --tokenizer PATH")
  from gemma_jax.tokenizer import PAD_ID, Tokenizer

  tok = Tokenizer.load(args.tokenizer)
  tok.check_vocab(cfg.vocab_size)
  ids = [tok.encode(t, add_bos=True) for t in args.text]
  for i, (text, x) in enumerate(zip(args.text, ids)):
    if len(x) < 2:  # bos alone: no next token, a mean over nothing
      raise ConfigError(
        f"--text {text!r} (text {i + 1}) has no token to score; give a "
        f"non-empty text"
      )
  t = max(2, max(len(x) for x in ids))
  tokens = np.full((len(ids), t), PAD_ID, np.int32)
  mask = np.zeros((len(ids), t), np.int32)
  for row, x in enumerate(ids):
    tokens[row, : len(x)], mask[row, : len(x)] = x, 1
  return tokens, mask


def _load_npy(path, what):
  try:
    return np.load(path)
  except (OSError, ValueError) as e:
    raise DataError(f"{what} {path}: cannot read a .npy array ({e})") from None


def load_model(checkpoint, adapter_dir=None):
  """(params, config) of a native or quantized checkpoint, with a LoRA
  adapter on top when given."""
  from gemma_jax.checkpoint import adapter, quantized

  if quantized.is_quantized(checkpoint):
    params, cfg = quantized.load(checkpoint)
  else:
    params, cfg = native.load(checkpoint)
  if adapter_dir:
    from gemma_jax.model import lora

    adapters, cfg, _ = adapter.load(adapter_dir, base_cfg=cfg)
    params = lora.combine(params, adapters)
  return params, cfg


def main(args) -> int:
  if args.batch_size <= 0:
    raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
  if args.mask and not args.tokens:
    raise ConfigError("--mask goes with --tokens")
  params, cfg = load_model(args.checkpoint, args.adapter)
  if args.text:
    tokens, mask = _text_inputs(args, cfg)
    name = "--text"
  else:
    tokens = _load_npy(args.tokens, "--tokens")
    mask = _load_npy(args.mask, "--mask") if args.mask else None
    name = args.tokens
  tokens, mask = check_inputs(tokens, mask, cfg.vocab_size, name)
  if not mask[:, 1:].any():
    raise DataError(f"{name}: no row has a next token to score (see --mask)")
  logits, logprobs = score(params, cfg, tokens, mask, args.batch_size)
  out = {"logprobs": logprobs, "tokens": tokens, "mask": mask}
  if not args.logprobs_only:
    out["logits"] = logits
  publish.check_finite(out, args.out, source=args.checkpoint)
  tmp = args.out + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **out)
  os.replace(tmp, args.out)
  real = mask[:, 1:] == 1
  print(
    f"scored {int(real.sum())} next tokens in {len(tokens)} rows: mean "
    f"log-prob {logprobs[real].mean():.4f} -> {args.out}"
  )
  return 0
