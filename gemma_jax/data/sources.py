"""Sources: random access to the tokenized documents of one split.

A `Documents` object is what packing needs: the token count of every document
(known up front, so that any row can be located without reading the others)
and `doc(i)`, the int32 token ids of document i (without bos/eos).

tfds datasets are read through `tfds.data_source` (ArrayRecord, random access,
no TensorFlow). Datasets written by `gemma-jax data prepare` hold a `tokens`
feature, the tokenizer's fingerprint in their metadata and a lengths file, so
opening them reads nothing else; other tfds datasets are tokenized on open from
their text feature. Files and in-memory texts are tokenized on open.
"""

import functools
import os

import numpy as np
from etils import epath

from gemma_jax import fileio
from gemma_jax.data import formats

# The decoding API, re-exported from where it lived before formats.py.
from gemma_jax.data.formats import DECODE_POLICIES as DECODE_POLICIES
from gemma_jax.data.formats import DecodePolicy as DecodePolicy
from gemma_jax.data.formats import DecodeReport as DecodeReport
from gemma_jax.data.formats import decode_policy as decode_policy
from gemma_jax.errors import ConfigError, DataError

LENGTHS_FILE = "{split}_doc_lengths.npy"
FINGERPRINT_KEY = "tokenizer_fingerprint"


class Documents:
  """Tokenized documents of one split of one source.

  Attributes:
    name: source name (for messages).
    lengths: int64 [num_docs], tokens per document (without bos/eos).
    fingerprint: fingerprint of the tokenizer that made the tokens.
  """

  def __init__(self, name, lengths, get_doc, fingerprint):
    self.name = name
    self.lengths = np.asarray(lengths, np.int64)
    self._get_doc = get_doc
    self.fingerprint = fingerprint
    self._cache = None
    if len(self.lengths) == 0 or self.lengths.sum() == 0:
      raise DataError(
        f"data source {name!r} is empty: it has "
        f"{len(self.lengths)} documents and no tokens"
      )

  def __len__(self):
    return len(self.lengths)

  @property
  def num_tokens(self) -> int:
    return int(self.lengths.sum())

  def doc(self, i: int) -> np.ndarray:
    """int32 token ids [lengths[i]] of document i."""
    if self._cache is None:
      # A long document spans many rows, visited in shuffled order: keep
      # recent documents (1024 of ~1k tokens: ~4 MB per source).
      self._cache = functools.lru_cache(maxsize=1024)(self._get_doc)
    return self._cache(int(i))

  def __getstate__(self):
    # The doc cache is per process; worker processes start empty.
    return {**self.__dict__, "_cache": None}


class SourceKind:
  """How one kind of source (`SourceConfig.kind`) finds its documents.

  `required` names the config field the kind cannot do without (`needs`
  says what it holds) and `held_out` the one naming its held-out data.
  """

  required: str
  needs: str
  held_out: str

  def check(self, cfg) -> None:
    if not getattr(cfg, self.required):
      raise ConfigError(
        f"{self.required}: a {cfg.kind} source needs {self.needs}"
      )

  def has_held_out(self, cfg) -> bool:
    return bool(getattr(cfg, self.held_out))

  def location(self, cfg) -> dict:
    """Where the documents come from, for `Pipeline.describe`."""
    return {}

  def documents(self, name: str, cfg, tokenizer, split: str) -> "Documents":
    raise NotImplementedError


class MemorySource(SourceKind):
  required, needs, held_out = "texts", "documents", "eval_texts"

  def documents(self, name, cfg, tokenizer, split):
    texts = cfg.texts if split == "train" else cfg.eval_texts
    return _from_texts(name, list(texts), tokenizer)


class FileSource(SourceKind):
  required, needs, held_out = "paths", "at least one glob", "eval_paths"

  def location(self, cfg):
    return {"paths": list(cfg.paths)}

  def documents(self, name, cfg, tokenizer, split):
    globs = cfg.paths if split == "train" else cfg.eval_paths
    return _from_texts(
      name,
      read_text_files(globs, cfg.text_key, name, decode_policy(cfg)),
      tokenizer,
    )


class TfdsSource(SourceKind):
  required, needs, held_out = "name", "a dataset name", "eval_split"

  def location(self, cfg):
    return {"name": cfg.name, "data_dir": tfds_dir(cfg), "split": cfg.split}

  def documents(self, name, cfg, tokenizer, split):
    return _from_tfds(
      name, cfg, cfg.split if split == "train" else cfg.eval_split, tokenizer
    )


KINDS: dict[str, SourceKind] = {
  "tfds": TfdsSource(),
  "files": FileSource(),
  "memory": MemorySource(),
}


def open_documents(name: str, cfg, tokenizer, split: str) -> Documents:
  """Opens `split` ('train' or 'eval') of source `name`."""
  kind = KINDS[cfg.kind]
  if split != "train" and not kind.has_held_out(cfg):
    raise ConfigError(
      f"data.sources.{name}.{kind.held_out}: source has no held-out data"
    )
  return kind.documents(name, cfg, tokenizer, split)


def _from_texts(name, texts, tokenizer) -> Documents:
  docs = tokenizer.encode_batch(texts) if texts else []
  lengths = [len(d) for d in docs]
  return Documents(name, lengths, docs.__getitem__, tokenizer.fingerprint)


def read_text_files(
  globs,
  text_key: str,
  name: str = "",
  policy: DecodePolicy = formats.DEFAULT_POLICY,
  warn=None,
  reports: list[DecodeReport] | None = None,
) -> list[str]:
  """Documents of the files of `globs`, in any format of data/formats.py
  (.txt, .jsonl, compressed, parquet, Hugging Face datasets).

  Bytes that are not UTF-8 are handled by `policy` (see formats.py); each
  file holding some gets one `warn` line (default: stderr) and a
  DecodeReport appended to `reports`.
  """
  return formats.read_documents(globs, text_key, name, policy, warn, reports)


def tfds_dir(cfg) -> str:
  return os.path.expanduser(cfg.data_dir or "~/tensorflow_datasets")


def _from_tfds(name, cfg, split: str, tokenizer) -> Documents:
  import tensorflow_datasets as tfds  # slow import; only when needed

  data_dir = tfds_dir(cfg)
  fileio.check_remote(data_dir, f"data.sources.{name}.data_dir")
  if not epath.Path(data_dir, cfg.name.split(":")[0]).is_dir():
    raise DataError(
      f"data.sources.{name}: tfds dataset {cfg.name!r} not "
      f"found in data_dir {data_dir} (prepare it with "
      "`gemma-jax data prepare` or `gemma-jax data "
      "build-default`)"
    )
  try:
    builder = tfds.builder(cfg.name, data_dir=data_dir)
    splits = builder.info.splits
  except (
    tfds.core.registered.DatasetNotFoundError,
    FileNotFoundError,
    ValueError,
  ) as e:
    raise DataError(
      f"data.sources.{name}: cannot open tfds dataset "
      f"{cfg.name!r} in {data_dir}: "
      f"{str(e).splitlines()[0]}"
    ) from None
  if split not in splits:
    raise ConfigError(
      f"data.sources.{name}: tfds dataset {cfg.name!r} has "
      f"no split {split!r}; splits: {', '.join(splits)}"
    )
  source = builder.as_data_source(split)
  features = builder.info.features
  if "tokens" in features:
    fingerprint = (builder.info.metadata or {}).get(FINGERPRINT_KEY)
    lengths_path = epath.Path(
      builder.data_dir, LENGTHS_FILE.format(split=split)
    )
    if lengths_path.exists():
      with lengths_path.open("rb") as f:
        lengths = np.load(f)
    else:
      lengths = [len(source[i]["tokens"]) for i in range(len(source))]
    return Documents(
      name,
      lengths,
      lambda i: np.asarray(source[i]["tokens"], np.int32),
      fingerprint,
    )
  if cfg.text_key not in features:
    raise ConfigError(
      f"data.sources.{name}.text_key: tfds dataset "
      f"{cfg.name!r} has neither a 'tokens' nor a "
      f"{cfg.text_key!r} feature; features: "
      f"{', '.join(features)}"
    )
  texts = _tfds_texts(
    source,
    cfg.text_key,
    decode_policy(cfg),
    f"data.sources.{name} ({cfg.name}:{split})",
  )
  return _from_texts(name, texts, tokenizer)


def _tfds_texts(source, text_key: str, policy: DecodePolicy, where: str):
  """Text features, decoded under `policy` like files (one report)."""
  report = DecodeReport(where)
  texts = []
  for i in range(len(source)):
    value = source[i][text_key]
    if not isinstance(value, bytes):
      texts.append(formats.clean(value))
      continue
    text, bad = formats.decode(value)
    report.bytes += len(value)
    report.undecodable_bytes += bad
    if bad and report.first_offset is None:
      report.first_offset = f"{formats.first_bad(value)} of document {i}"
    if report.keep(bad, policy):
      texts.append(formats.clean(text))
  formats.refuse(report, policy, where)
  if report.undecodable_bytes:
    formats.warn(report.line())
  return texts
