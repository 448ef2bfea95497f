"""Sampling with a KV cache: greedy, temperature, top-k and top-p.

Prompts of different lengths are right-padded into one [B, P] prefill; pad
slots get segment id 0 so no real token ever attends to them. After that,
every row decodes one token per step into the same cache slot while its RoPE
position continues from its own prompt length, so the mask rule (same
segment, causal and windowed by position) is exact for every row.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.model.config import ModelConfig
from gemma_jax.model.transformer import Transformer, init_cache


def choose_tokens(
  logits,
  rng,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
):
  """Picks one token per row from float32 logits [B, V]."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    # Keep the smallest set of most likely tokens whose mass reaches top_p.
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def prefill(params, tokens, lengths, *, cfg: ModelConfig, cache_len: int):
  """tokens [B, P] right-padded, lengths [B] -> (logits after each row's
  last prompt token [B, V], the cache of cache_len slots)."""
  b, p = tokens.shape
  segments = (jnp.arange(p)[None] < lengths[:, None]).astype(jnp.int32)
  logits, cache = Transformer(cfg).apply(
    {"params": params},
    tokens,
    init_cache(cfg, b, cache_len),
    segment_ids=segments,
    method=Transformer.decode,
  )
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)
  return last[:, 0], cache


def decode_steps(
  params,
  last,
  cache,
  positions,
  done,
  rng,
  *,
  cfg: ModelConfig,
  steps: int,
  temperature: float,
  top_k: int | None,
  top_p: float | None,
  eos_id: int,
):
  """`steps` new tokens per row from the logits `last` [B, V]; positions
  [B] of the first; a row `done` [B] emits eos_id. Returns (tokens
  [B, steps], last, cache, done, rng), so decoding can go on from there."""
  model = Transformer(cfg)
  b = last.shape[0]

  def step(carry, i):
    last, cache, rng, done = carry
    rng, key = jax.random.split(rng)
    token = choose_tokens(last, key, temperature, top_k, top_p)
    token = jnp.where(done, eos_id, token)
    logits, cache = model.apply(
      {"params": params},
      token[:, None],
      cache,
      positions=(positions + i)[:, None],
      segment_ids=jnp.ones((b, 1), jnp.int32),
      method=Transformer.decode,
    )
    return (logits[:, 0], cache, rng, done | (token == eos_id)), token

  (last, cache, rng, done), tokens = jax.lax.scan(
    step, (last, cache, rng, done), jnp.arange(steps)
  )
  return tokens.T, last, cache, done, rng


@functools.partial(
  jax.jit,
  static_argnames=(
    "config",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "eos_id",
  ),
)
def _generate(
  params,
  tokens,
  lengths,
  rng,
  *,
  config: ModelConfig,
  max_new_tokens: int,
  temperature: float,
  top_k,
  top_p,
  eos_id,
):
  """tokens [B, P] right-padded, lengths [B] -> new tokens [B, max_new]."""
  b, p = tokens.shape
  last, cache = prefill(
    params, tokens, lengths, cfg=config, cache_len=p + max_new_tokens
  )
  new_tokens, *_ = decode_steps(
    params,
    last,
    cache,
    lengths,
    jnp.zeros((b,), bool),
    rng,
    cfg=config,
    steps=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    eos_id=eos_id,
  )
  return new_tokens


def generate(
  params,
  config: ModelConfig,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  seed: int = 0,
  eos_id: int | None = 1,
) -> list[list[int]]:
  """Continues each prompt (token ids, bos included) by up to max_new_tokens.

  Generation of a row stops after it emits `eos_id` (kept in the output).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (bos)")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), lengths.max()), np.int32)
  for row, prompt in zip(tokens, prompts):
    row[: len(prompt)] = prompt
  out = np.asarray(
    _generate(
      params,
      jnp.asarray(tokens),
      jnp.asarray(lengths),
      jax.random.key(seed),
      config=config,
      max_new_tokens=max_new_tokens,
      temperature=float(temperature),
      top_k=top_k,
      top_p=top_p,
      eos_id=-1 if eos_id is None else eos_id,
    )
  )
  results = []
  for row in out.tolist():
    if eos_id is not None and eos_id in row:
      row = row[: row.index(eos_id) + 1]
    results.append(row)
  return results
