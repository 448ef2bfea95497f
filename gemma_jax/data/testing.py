"""Tiny data for tests: a small tokenizer, memory sources, a small corpus.

    tok_path = tiny_tokenizer(tmp_path / "tok.model")          # ~0.5 s
    cfg = tiny_corpus(tmp_path / "corpus")   # data config dict, ~3 s

Both are deterministic and cached on disk (a second call returns at once).
"""

import os
import random

from gemma_jax.data import corpus
from gemma_jax.tokenizer import train_tokenizer


def sample_texts(num_docs: int = 200, seed: int = 0) -> list[str]:
  """Varied small documents: arithmetic, words and code-like lines."""
  rng = random.Random(seed)
  words = [
    "the",
    "model",
    "reads",
    "text",
    "and",
    "code",
    "while",
    "numbers",
    "add",
    "up",
    "to",
    "more",
    "tokens",
    "def",
    "return",
    "class",
    "import",
    "print",
    "value",
    "list",
  ]
  docs = corpus.math_documents(num_docs // 2, seed, problems_per_doc=3)
  for i in range(num_docs - len(docs)):
    n = rng.randint(3, 120)
    text = " ".join(rng.choice(words) for _ in range(n))
    docs.append(f"def f{i}(x):\n  return x + {i}\n" if i % 3 == 0 else text)
  return docs


def tiny_tokenizer(path, vocab_size: int = 512) -> str:
  """Trains (once) a Gemma-style tokenizer on `sample_texts`; returns path."""
  path = os.fspath(path)
  if not os.path.exists(path):
    train_tokenizer(sample_texts(400), vocab_size, path)
  return path


def tiny_corpus(out_dir, vocab_size: int = 512) -> dict:
  """A small default corpus (same code path, less text); data config dict."""
  return corpus.build_default_corpus(
    os.fspath(out_dir),
    vocab_size=vocab_size,
    max_code_chars=300_000,
    math_docs=400,
  )
