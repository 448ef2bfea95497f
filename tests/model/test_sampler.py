"""Sampling with a KV cache equals recomputation without one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.model import Transformer
from gemma_jax.model.sampler import choose_tokens, generate
from gemma_jax.model.testing import TINY_GEMMA2_WIDE, init_params

pytestmark = pytest.mark.slow

CFG = dataclasses.replace(TINY_GEMMA2_WIDE, sliding_window=6)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, seed=1)


@jax.jit
def full_forward(params, tokens):
  return Transformer(CFG).apply({"params": params}, tokens)


def greedy_without_cache(params, prompt, steps, length):
  """Recomputes every step from scratch, with no cache.

  The row has a fixed length (one compile for every prompt and step);
  causal attention makes the zeros after the current token irrelevant to
  its logits.
  """
  tokens = np.zeros((1, length), np.int32)
  tokens[0, : len(prompt)] = prompt
  for n in range(len(prompt), len(prompt) + steps):
    # numpy: an eager jnp index compiles a program per position.
    logits = np.asarray(full_forward(params, jnp.asarray(tokens)))
    tokens[0, n] = int(np.argmax(logits[0, n - 1]))
  return tokens[0, len(prompt) : len(prompt) + steps].tolist()


def test_greedy_with_cache_equals_recomputation_past_the_window(params):
  prompts = [[2, 17, 31, 99, 5], [2, 44], [2, 7, 8, 9, 10, 11, 12, 13]]
  steps = 3 * CFG.sliding_window  # well past the window
  cached = generate(params, CFG, prompts, steps, eos_id=None)
  length = max(map(len, prompts)) + steps
  for prompt, out in zip(prompts, cached):
    assert out == greedy_without_cache(params, prompt, steps, length)


def test_generation_stops_at_eos(params):
  free = generate(params, CFG, [[2, 17, 31]], 12, eos_id=None)[0]
  eos = free[4]
  stopped = generate(params, CFG, [[2, 17, 31]], 12, eos_id=eos)[0]
  assert stopped == free[: free.index(eos) + 1]


def test_top_k_one_and_tiny_top_p_are_greedy():
  logits = jax.random.normal(jax.random.key(0), (16, 50)) * 3
  greedy = choose_tokens(logits, None)
  for kw in ({"top_k": 1}, {"top_p": 1e-6}):
    sampled = choose_tokens(logits, jax.random.key(1), temperature=2.0, **kw)
    np.testing.assert_array_equal(sampled, greedy)


def test_top_k_and_top_p_restrict_the_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  top2 = choose_tokens(logits, keys, temperature=1.0, top_k=2)
  assert set(np.unique(top2)) == {0, 1}
  top_p = choose_tokens(logits, keys, temperature=1.0, top_p=0.7)
  assert set(np.unique(top_p)) == {0, 1}  # 0.5 + 0.3 reaches 0.7
  full = choose_tokens(logits, keys, temperature=1.0)
  assert set(np.unique(full)) == {0, 1, 2, 3}
  freq = np.bincount(np.asarray(full), minlength=4) / 2000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_sampling_is_reproducible_per_seed(params):
  kw = dict(temperature=1.0, top_p=0.9)
  a = generate(params, CFG, [[2, 5, 6]], 10, seed=3, eos_id=None, **kw)
  b = generate(params, CFG, [[2, 5, 6]], 10, seed=3, eos_id=None, **kw)
  c = generate(params, CFG, [[2, 5, 6]], 10, seed=4, eos_id=None, **kw)
  assert a == b and a != c
  assert all(0 <= t < CFG.vocab_size for t in a[0])


def test_bad_arguments_are_refused(params):
  with pytest.raises(ValueError, match="at least one token"):
    generate(params, CFG, [[]], 4)
  with pytest.raises(ValueError, match="top_p"):
    generate(params, CFG, [[2]], 4, temperature=1.0, top_p=1.5)
