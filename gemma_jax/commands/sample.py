"""gemma-jax sample: continue a prompt with a checkpoint, using a KV cache.

    gemma-jax sample --checkpoint ckpt/ --tokenizer tokenizer.model \\
        --prompt "def add(a, b):" [--prompt ...] --max-new-tokens 64 \\
        [--temperature 0.8 --top-k 40 --top-p 0.95 --seed 0]

Temperature 0 (the default) is greedy decoding.
"""

from gemma_jax.commands import (
  nonnegative_float,
  number_type,
  positive_int,
)
from gemma_jax.errors import ConfigError

# Nucleus sampling keeps the smallest set of tokens whose probability
# reaches top_p: 0 would keep none.
top_p = number_type(float, above=0.0, maximum=1.0)

HELP = "generate text from a checkpoint (greedy, temperature, top-k, top-p)"


def add_arguments(parser):
  parser.add_argument(
    "--checkpoint", required=True, help="native checkpoint directory"
  )
  parser.add_argument(
    "--tokenizer", required=True, help="SentencePiece model file"
  )
  parser.add_argument(
    "--prompt",
    action="append",
    required=True,
    help="prompt text (repeatable: one row each)",
  )
  parser.add_argument("--max-new-tokens", type=positive_int, default=64)
  parser.add_argument("--temperature", type=nonnegative_float, default=0.0)
  parser.add_argument("--top-k", type=positive_int, default=None)
  parser.add_argument("--top-p", type=top_p, default=None)
  parser.add_argument("--seed", type=int, default=0)


def sample_texts(params, cfg, tokenizer, prompts, max_new_tokens, **kw):
  """Prompts (text) -> continuations (text); bos is prepended to each."""
  from gemma_jax.model.sampler import generate
  from gemma_jax.tokenizer import EOS_ID

  ids = [tokenizer.encode(p, add_bos=True).tolist() for p in prompts]
  out = generate(params, cfg, ids, max_new_tokens, eos_id=EOS_ID, **kw)
  return [tokenizer.decode([t for t in row if t != EOS_ID]) for row in out]


def main(args) -> int:
  if args.max_new_tokens <= 0:
    raise ConfigError(
      f"--max-new-tokens must be positive, got {args.max_new_tokens}"
    )
  if args.top_k is not None and args.top_k <= 0:
    raise ConfigError(f"--top-k must be positive, got {args.top_k}")
  from gemma_jax.checkpoint import native
  from gemma_jax.tokenizer import Tokenizer

  tokenizer = Tokenizer.load(args.tokenizer)
  params, cfg = native.load(args.checkpoint)
  tokenizer.check_vocab(cfg.vocab_size)
  if args.top_k is not None and args.top_k > cfg.vocab_size:
    raise ConfigError(
      f"--top-k {args.top_k} is more than the vocabulary of "
      f"{args.checkpoint} ({cfg.vocab_size} tokens); give at most that"
    )
  try:
    texts = sample_texts(
      params,
      cfg,
      tokenizer,
      args.prompt,
      args.max_new_tokens,
      temperature=args.temperature,
      top_k=args.top_k,
      top_p=args.top_p,
      seed=args.seed,
    )
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for prompt, text in zip(args.prompt, texts):
    print(f"{prompt}{text}")
  return 0
