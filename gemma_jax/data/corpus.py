"""The default corpus: built on the user's machine, nothing downloaded.

Three sources, each a tfds ArrayRecord dataset with `train` and `eval` splits:
  prose  the docstrings of the Python standard library, one document per module
  code   the standard library's source files, one document per file
  math   generated arithmetic with worked answers (the high-quality source
         that a late stage upweights)
plus a Gemma-style tokenizer trained on a sample of all three. Held-out
documents are chosen by a hash of the file name (prose, code) or by index
(math), so the split is the same on every machine with the same Python.

    cfg = build_default_corpus("~/.cache/gemma_jax/corpus")  # data config dict

Building takes well under a minute and is cached: a second call with the same
arguments only reads the manifest.
"""

import ast
import glob
import json
import os
import random
import sysconfig
import zlib

from gemma_jax.data import prepare
from gemma_jax.tokenizer import Tokenizer, train_tokenizer

DEFAULT_DIR = "~/.cache/gemma_jax/corpus"
VERSION = 1
SOURCES = ("prose", "code", "math")
EVAL_EVERY = 20  # 1 in 20 files / documents is held out


def stdlib_files(max_chars: int) -> list[str]:
  """Sorted standard-library .py files (tests and site-packages excluded)."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for path in sorted(
    glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
  ):
    rel = os.path.relpath(path, root)
    if rel.startswith(("site-packages", "test", "idlelib")) or "/test" in rel:
      continue
    files.append(path)
  out, total = [], 0
  for path in files:
    total += os.path.getsize(path)
    if total > max_chars:
      break
    out.append(path)
  return out


def _read(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def module_docstrings(source: str) -> str:
  """All docstrings of one module, as prose separated by blank lines."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return ""
  kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  docs = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds)]
  return "\n\n".join(d for d in docs if d and len(d) > 40)


def math_documents(
  num_docs: int, seed: int = 0, problems_per_doc: int = 8
) -> list[str]:
  """Arithmetic problems with their answers, worked step by step."""
  rng = random.Random(seed)
  return [
    "".join(_problem(rng) for _ in range(problems_per_doc))
    for _ in range(num_docs)
  ]


def _problem(rng: random.Random) -> str:
  a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 99)
  kind = rng.randrange(5)
  if kind == 0:
    return f"{a} + {b} = {a + b}\n"
  if kind == 1:
    return f"{a} - {b} = {a - b}\n"
  if kind == 2:
    return f"{a} * {c} = {a * c}\n"
  if kind == 3:
    q, r = divmod(a, c)
    return f"{a} divided by {c} is {q} remainder {r}\n"
  return (
    f"Compute ({a} + {b}) * {c}. First {a} + {b} = {a + b}. "
    f"Then {a + b} * {c} = {(a + b) * c}. The answer is "
    f"{(a + b) * c}.\n"
  )


def _split_by_name(paths, texts) -> dict[str, list[str]]:
  """Holds out files by a hash of their name (at least one file)."""
  hashes = [
    zlib.crc32(os.path.basename(p).encode()) if t else None
    for p, t in zip(paths, texts)
  ]
  held = [h is not None and h % EVAL_EVERY == 0 for h in hashes]
  if not any(held):
    held[hashes.index(min(h for h in hashes if h is not None))] = True
  return {
    "train": [t for t, h in zip(texts, held) if t and not h],
    "eval": [t for t, h in zip(texts, held) if t and h],
  }


def corpus_texts(
  max_code_chars: int = 6_000_000, math_docs: int = 4000
) -> dict[str, dict[str, list[str]]]:
  """{source: {split: texts}} of the default corpus."""
  paths = stdlib_files(max_code_chars)
  code = [_read(p) for p in paths]
  prose = [module_docstrings(t) for t in code]
  return {
    "prose": _split_by_name(paths, prose),
    "code": _split_by_name(paths, code),
    "math": prepare.split_held_out(math_documents(math_docs), 1 / EVAL_EVERY),
  }


def data_config(out_dir: str, weights=None, seq_len: int = 128) -> dict:
  """A data config section reading the corpus in `out_dir`."""
  weights = weights or [
    {"start_step": 0, "weights": {"prose": 0.45, "code": 0.45, "math": 0.1}}
  ]
  return {
    "seq_len": seq_len,
    "tokenizer": os.path.join(out_dir, "tokenizer.model"),
    "sources": {
      s: {
        "kind": "tfds",
        "name": f"gemma_jax_{s}",
        "data_dir": os.path.join(out_dir, "tfds"),
        "split": "train",
        "eval_split": "eval",
      }
      for s in SOURCES
    },
    "stages": weights,
  }


def build_default_corpus(
  out_dir: str = DEFAULT_DIR,
  vocab_size: int = 2048,
  max_code_chars: int = 6_000_000,
  math_docs: int = 4000,
  force: bool = False,
) -> dict:
  """Builds (or finds cached) the default corpus; returns its data config.

  The tokenizer (`out_dir/tokenizer.model`) has `vocab_size` pieces, to
  match the `tiny-gemma2` preset (vocab_size 2048).
  """
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  manifest_path = os.path.join(out_dir, "manifest.json")
  args = {
    "version": VERSION,
    "vocab_size": vocab_size,
    "max_code_chars": max_code_chars,
    "math_docs": math_docs,
  }
  if not force and os.path.exists(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    if manifest.get("args") == args:
      return data_config(out_dir)
  texts = corpus_texts(max_code_chars, math_docs)
  tokenizer = _train(
    texts, vocab_size, os.path.join(out_dir, "tokenizer.model")
  )
  stats = {}
  for source in SOURCES:
    stats[source] = prepare.prepare_dataset(
      f"gemma_jax_{source}",
      os.path.join(out_dir, "tfds"),
      texts[source],
      tokenizer,
      overwrite=True,
    )
  tmp = manifest_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(
      {
        "args": args,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "sources": stats,
      },
      f,
      indent=1,
    )
  os.replace(tmp, manifest_path)
  return data_config(out_dir)


def _train(texts, vocab_size: int, path: str) -> Tokenizer:
  """A tokenizer trained on an equal-sized sample of each source."""
  rng = random.Random(0)
  sample = []
  for source in SOURCES:
    docs = list(texts[source]["train"])
    rng.shuffle(docs)
    chars = 0
    for doc in docs:
      sample.append(doc)
      chars += len(doc)
      if chars > 400_000:
        break
  return train_tokenizer(sample, vocab_size, path)
