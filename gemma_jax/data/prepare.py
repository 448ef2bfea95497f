"""Tokenize text once into a tensorflow-datasets ArrayRecord dataset.

The dataset holds one `tokens` feature (int32 [n], no bos/eos) per document,
records the tokenizer's fingerprint and per-split document and token counts
in its metadata, and keeps each split's document lengths in
`<split>_doc_lengths.npy` beside the records, so that a pipeline opens it
without reading the records. Read it back with `SourceConfig(kind="tfds",
name=..., data_dir=...)`.
"""

import os
import re
import shutil

import numpy as np

from gemma_jax.errors import ConfigError, DataError
from gemma_jax.data.sources import FINGERPRINT_KEY, LENGTHS_FILE

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def prepare_dataset(name: str, data_dir: str, splits: dict[str, list[str]],
                    tokenizer, overwrite: bool = False) -> dict:
  """Writes `splits` ({split: texts}) tokenized as tfds dataset `name`.

  Returns the dataset's metadata: tokenizer fingerprint and, per split,
  num_docs and num_tokens. An existing dataset is kept unless `overwrite`.
  """
  import tensorflow_datasets as tfds  # slow import; only when preparing
  if not _NAME.match(name):
    raise ConfigError(f"dataset name {name!r} must be lower_snake_case "
                      "(letters, digits, underscores)")
  for split, texts in splits.items():
    if not texts:
      raise DataError(f"dataset {name!r}: split {split!r} has no documents")
  data_dir = os.path.expanduser(data_dir)
  tokens = {s: tokenizer.encode_batch(t) for s, t in splits.items()}
  metadata = {FINGERPRINT_KEY: tokenizer.fingerprint}
  for split, docs in tokens.items():
    metadata[split] = {"num_docs": len(docs),
                       "num_tokens": int(sum(len(d) for d in docs))}
    if metadata[split]["num_tokens"] == 0:
      raise DataError(f"dataset {name!r}: split {split!r} has no tokens")
  builder = _builder_class(name, tokens, metadata)(
      data_dir=data_dir, file_format="array_record")
  if os.path.isdir(builder.data_dir):
    if not overwrite:
      return dict(builder.info.metadata)
    shutil.rmtree(builder.data_dir)
    builder = _builder_class(name, tokens, metadata)(
        data_dir=data_dir, file_format="array_record")
  tfds.disable_progress_bar()
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(verify_ssl=False))
  for split, docs in tokens.items():
    np.save(os.path.join(builder.data_dir, LENGTHS_FILE.format(split=split)),
            np.array([len(d) for d in docs], np.int64))
  return metadata


def _builder_class(name: str, tokens: dict, metadata: dict):
  """A GeneratorBasedBuilder named `name` that writes `tokens`."""
  import tensorflow_datasets as tfds

  class TokenizedText(tfds.core.GeneratorBasedBuilder,
                      skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    # No checksums file to find: this builder downloads nothing (looking for
    # one beside a packaged module needs the optional importlib_resources).
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description="Documents tokenized by gemma-jax data prepare.",
          features=tfds.features.FeaturesDict({
              "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)}),
          metadata=tfds.core.MetadataDict(metadata),
          # Keep the generator's order, which the lengths file follows.
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(docs)
              for split, docs in tokens.items()}

    def _generate_examples(self, docs):
      for i, doc in enumerate(docs):
        yield i, {"tokens": doc}

  TokenizedText.name = name
  return TokenizedText


def split_held_out(texts: list[str], eval_fraction: float
                   ) -> dict[str, list[str]]:
  """{'train': ..., 'eval': every k-th document} with k = 1 / eval_fraction."""
  if not 0 <= eval_fraction < 1:
    raise ConfigError(f"eval fraction must be in [0, 1), got {eval_fraction}")
  if eval_fraction == 0:
    return {"train": texts}
  k = max(2, round(1 / eval_fraction))
  return {"train": [t for i, t in enumerate(texts) if i % k],
          "eval": [t for i, t in enumerate(texts) if i % k == 0]}
