"""Tokenize text once into a tensorflow-datasets ArrayRecord dataset.

This module prepares texts held in memory (the default corpus, tests);
`gemma-jax data prepare` reads files with data/prepare_files.py, which
writes the same layout file by file, in parallel and restartably.

The dataset holds one `tokens` feature (int32 [n], no bos/eos) per document,
records the tokenizer's fingerprint and per-split document and token counts
in its metadata, and keeps each split's document lengths in
`<split>_doc_lengths.npy` beside the records, so that a pipeline opens it
without reading the records. Read it back with `SourceConfig(kind="tfds",
name=..., data_dir=...)`.

Optional cleaning before tokenizing (off by default; what changed is counted
in the metadata under "cleaning"): `fix_mojibake` repairs UTF-8 text that
was once decoded as cp1252/Latin-1 ("cafÃ©" -> "café", the "ã®" pattern of
Japanese web text) with ftfy's `fix_encoding` (nothing else of ftfy: quotes,
ligatures and line breaks are left alone); `normalize` applies Unicode NFC
or NFKC.

The metadata also records an `input_fingerprint` (sha256 of the texts, the
tokenizer and the cleaning options): preparing a name that exists with other
input is refused unless `overwrite`, and the same input is not tokenized
again.

A gs:// data_dir is written locally first and then uploaded, its
dataset_info.json last (array_record's writer opens local files only; its
reader, and so training, reads gs:// directly).
"""

import hashlib
import os
import re
import tempfile
import unicodedata
from typing import Literal

import numpy as np
from etils import epath

from gemma_jax import fileio
from gemma_jax.data.sources import FINGERPRINT_KEY, LENGTHS_FILE
from gemma_jax.errors import ConfigError, DataError

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


Normalization = Literal["NFC", "NFKC"]
NORMALIZATIONS: tuple[Normalization, ...] = ("NFC", "NFKC")


def clean_texts(
  texts: list[str],
  fix_mojibake: bool = False,
  normalize: Normalization | None = None,
) -> tuple[list[str], dict]:
  """(cleaned texts, counts of documents each step changed)."""
  if normalize is not None and normalize not in NORMALIZATIONS:
    raise ConfigError(
      f"--normalize: {normalize!r} is not one of {', '.join(NORMALIZATIONS)}"
    )
  counts = {"documents": len(texts)}
  if fix_mojibake:
    import ftfy

    fixed = [ftfy.fix_encoding(t) for t in texts]
    counts["mojibake_fixed_documents"] = sum(
      a != b for a, b in zip(texts, fixed)
    )
    texts = fixed
  if normalize:
    normal = [unicodedata.normalize(normalize, t) for t in texts]
    counts[f"{normalize}_changed_documents"] = sum(
      a != b for a, b in zip(texts, normal)
    )
    texts = normal
  return texts, counts


def check_name(name: str) -> None:
  if not _NAME.match(name):
    raise ConfigError(
      f"dataset name {name!r} must be lower_snake_case "
      "(letters, digits, underscores)"
    )


def input_fingerprint(
  splits: dict[str, list[str]], tokenizer, options: dict
) -> str:
  """sha256 of the texts of every split, the tokenizer and `options`."""
  h = hashlib.sha256()
  h.update(tokenizer.fingerprint.encode())
  h.update(repr(sorted(options.items())).encode())
  for split in sorted(splits):
    h.update(f"\0split {split} {len(splits[split])}\0".encode())
    for text in splits[split]:
      h.update(text.encode("utf-8", "surrogatepass"))
      h.update(b"\0")
  return h.hexdigest()


def prepare_dataset(
  name: str,
  data_dir: str,
  splits: dict[str, list[str]],
  tokenizer,
  overwrite: bool = False,
  extra_metadata: dict | None = None,
) -> dict:
  """Writes `splits` ({split: texts}) tokenized as tfds dataset `name`.

  Returns the dataset's metadata: tokenizer fingerprint, input fingerprint,
  `extra_metadata` (e.g. decoding and cleaning counts) and, per split,
  num_docs and num_tokens. An existing dataset made from the same input is
  returned as it is; one made from other input is refused unless
  `overwrite` (DataError naming --overwrite).
  """
  check_name(name)
  for split, texts in splits.items():
    if not texts:
      raise DataError(f"dataset {name!r}: split {split!r} has no documents")
  data_dir = os.path.expanduser(data_dir)
  fileio.check_remote(data_dir, "--data-dir")
  extra_metadata = dict(extra_metadata or {})
  fingerprint = input_fingerprint(
    splits, tokenizer, extra_metadata.get("options", {})
  )
  existing = existing_metadata(name, data_dir)
  if existing is not None and not overwrite:
    if existing.get("input_fingerprint") == fingerprint:
      return existing
    raise DataError(
      f"dataset {name!r} already exists in {data_dir} with different input "
      f"({counts_line(existing)} there, {_counts_of(splits)} now); pass "
      f"--overwrite to replace it, or choose another --name"
    )
  tokens = {s: tokenizer.encode_batch(t) for s, t in splits.items()}
  metadata = {
    FINGERPRINT_KEY: tokenizer.fingerprint,
    "input_fingerprint": fingerprint,
    **extra_metadata,
  }
  for split, docs in tokens.items():
    metadata[split] = {
      "num_docs": len(docs),
      "num_tokens": int(sum(len(d) for d in docs)),
    }
    if metadata[split]["num_tokens"] == 0:
      raise DataError(f"dataset {name!r}: split {split!r} has no tokens")
  if fileio.is_local(data_dir):
    _write(name, data_dir, tokens, metadata)
  else:
    with tempfile.TemporaryDirectory(prefix="gemma-jax-prepare-") as tmp:
      local = _write(name, tmp, tokens, metadata)
      fileio.publish_directory(
        local, os.path.join(data_dir, os.path.relpath(local, tmp))
      )
  return metadata


def _write(name: str, data_dir: str, tokens: dict, metadata: dict) -> str:
  """Writes the dataset into local `data_dir`; returns its directory."""
  import tensorflow_datasets as tfds  # slow import; only when preparing

  builder = _builder_class(name, tokens, metadata)(
    data_dir=data_dir, file_format="array_record"
  )
  if os.path.isdir(builder.data_dir):
    fileio.remove_tree(builder.data_dir)
    builder = _builder_class(name, tokens, metadata)(
      data_dir=data_dir, file_format="array_record"
    )
  tfds.disable_progress_bar()
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(verify_ssl=False)
  )
  for split, docs in tokens.items():
    np.save(
      os.path.join(builder.data_dir, LENGTHS_FILE.format(split=split)),
      np.array([len(d) for d in docs], np.int64),
    )
  return os.fspath(builder.data_dir)


def existing_metadata(name: str, data_dir: str) -> dict | None:
  """The metadata of dataset `name` in `data_dir`, if one is there."""
  if not epath.Path(data_dir, name).is_dir():
    return None
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=data_dir)
    return dict(builder.info.metadata or {})
  except Exception:  # a torn dataset: its files are there
    return {"input_fingerprint": None}


def counts_line(metadata: dict) -> str:
  splits = {
    k: v for k, v in metadata.items() if isinstance(v, dict) and "num_docs" in v
  }
  return (
    ", ".join(
      f"{k}: {v['num_docs']} documents" for k, v in sorted(splits.items())
    )
    or "unknown input"
  )


def _counts_of(splits: dict) -> str:
  return ", ".join(
    f"{k}: {len(v)} documents" for k, v in sorted(splits.items())
  )


def _builder_class(name: str, tokens: dict, metadata: dict):
  """A GeneratorBasedBuilder named `name` that writes `tokens`."""
  import tensorflow_datasets as tfds

  # tfds ships no type information, so mypy checks the class keyword
  # against object.__init_subclass__, not tfds's RegisteredDataset one.
  class TokenizedText(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg]
    VERSION = tfds.core.Version("1.0.0")
    # No checksums file to find: this builder downloads nothing (looking for
    # one beside a packaged module needs the optional importlib_resources).
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        description="Documents tokenized by gemma-jax data prepare.",
        features=tfds.features.FeaturesDict(
          {"tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)}
        ),
        metadata=tfds.core.MetadataDict(metadata),
        # Keep the generator's order, which the lengths file follows.
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      return {
        split: self._generate_examples(docs) for split, docs in tokens.items()
      }

    def _generate_examples(self, docs):
      for i, doc in enumerate(docs):
        yield i, {"tokens": doc}

  TokenizedText.name = name
  return TokenizedText


def split_held_out(
  texts: list[str], eval_fraction: float
) -> dict[str, list[str]]:
  """{'train': ..., 'eval': every k-th document} with k = 1 / eval_fraction."""
  if not 0 <= eval_fraction < 1:
    raise ConfigError(f"eval fraction must be in [0, 1), got {eval_fraction}")
  if eval_fraction == 0:
    return {"train": texts}
  k = max(2, round(1 / eval_fraction))
  return {
    "train": [t for i, t in enumerate(texts) if i % k],
    "eval": [t for i, t in enumerate(texts) if i % k == 0],
  }
