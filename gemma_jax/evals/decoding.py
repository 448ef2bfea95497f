"""KV-cache decoding in chunks of steps, so a batch stops once every row is
done (eos or a stop string), as the harness's HF model stops a batch.

    dec = ChunkedDecoder(cfg, chunk=16)
    new = dec.generate(params, tokens, lengths, key, max_new=256,
                       eos_id=1, done_fn=lambda row: STOP in decode(row))

Each step is the one gemma_jax.model.sampler takes (the same prefill, the
same per-step choice of token and RNG split), so the tokens up to where a
row is done equal the sampler's; only the number of steps differs. The
decode of one chunk is one compiled program (positions are data), reused
for every chunk and every batch of the same width.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gemma_jax.model import sampler
from gemma_jax.model.config import ModelConfig

# One compiled program each (positions are data), reused for every chunk and
# every batch of the same width; the chunk's cache is donated.
prefill = jax.jit(sampler.prefill, static_argnames=("cfg", "cache_len"))
decode_chunk = jax.jit(
  sampler.decode_steps,
  static_argnames=("cfg", "steps", "temperature", "top_k", "top_p", "eos_id"),
  donate_argnames=("cache",),
)


class ChunkedDecoder:
  """Generates for a batch `chunk` steps at a time until every row is done
  or max_new tokens are out. `steps_run` counts decode steps (all calls)."""

  def __init__(self, cfg: ModelConfig, chunk: int = 16):
    self.cfg, self.chunk = cfg, chunk
    self.steps_run = 0

  def generate(
    self,
    params,
    tokens,
    lengths,
    rng,
    *,
    max_new: int,
    eos_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    done_fn: Callable[[Sequence[int]], bool] = lambda _: False,
    active: Sequence[bool] | None = None,
  ) -> np.ndarray:
    """tokens [B, P] (placed as the caller shards them), lengths [B] ->
    new tokens [B, <= max_new rounded up to chunk] (numpy). A row is done at
    eos or when done_fn(its new tokens so far) holds; rows not `active`
    (filler) count as done. Stops after the chunk in which every row is."""
    b, p = tokens.shape
    chunks = -(-max_new // self.chunk)
    # Room for a power of two of new tokens, as the sampler's callers give
    # it: one cache shape per prompt width, whatever max_new is.
    room = 1 << (chunks * self.chunk - 1).bit_length()
    last, cache = prefill(
      params, tokens, lengths, cfg=self.cfg, cache_len=p + room
    )
    positions = jnp.asarray(lengths, jnp.int32)
    done = positions < 0  # all False, sharded as the rows
    finished = np.array(
      [False] * b if active is None else [not a for a in active]
    )
    out = np.zeros((b, 0), np.int32)
    for _ in range(chunks):
      new, last, cache, done, rng = decode_chunk(
        params,
        last,
        cache,
        positions,
        done,
        rng,
        cfg=self.cfg,
        steps=self.chunk,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
      )
      self.steps_run += self.chunk
      positions = positions + self.chunk
      if jax.process_count() > 1:  # rows are split over the processes
        new = multihost_utils.process_allgather(new, tiled=True)
      out = np.concatenate([out, np.asarray(jax.device_get(new))], axis=1)
      for r in range(b):
        if not finished[r]:
          row = out[r, :max_new].tolist()
          finished[r] = eos_id in row or done_fn(row)
      if finished.all():
        break
    return out
