"""`gemma-jax data prepare`: files to a tfds ArrayRecord dataset, in parallel,
restartable, with the same output whatever runs it.

    meta = prepare_files("web", "gs://bkt/tfds", ["gs://bkt/fw/*.parquet"],
                         "tokenizer.model", Options(eval_fraction=0.001),
                         workers=8)

Every input file is a unit of work, in the order of `expand_inputs`. Two
passes, each a pure function of its inputs, so one process, N processes
(`workers`) or a Beam pipeline (data/beam.py) write the same bytes:

  1. tokenize  each unit, on its own: decode (data/formats.py), clean,
               tokenize, and keep in the work directory its tokens (raw
               int32), document lengths, document hashes and decoding counts;
               its `.json` is written last and marks the unit done.
  2. write     each unit's documents into its own shards: the `layout`
               (computed once all units are done) numbers the documents
               over all units, drops repeats (`dedup`: exact, by a 128-bit
               hash of the cleaned text; the first one is kept), holds out
               every k-th document (k = 1 / eval_fraction, as
               `split_held_out`) and gives each unit one train and one eval
               shard (none when it has no such documents).

A killed prepare started again with the same arguments reuses the units the
work directory holds (checked against the file's size and mtime, the options
and the tokenizer) and tokenizes the rest; shards are written again from
them, so none is duplicated or lost. The work directory is removed once the
dataset is complete.
"""

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import tempfile

import numpy as np
from etils import epath

from gemma_jax import fileio
from gemma_jax.data import arrayrecord, formats, prepare
from gemma_jax.data.sources import FINGERPRINT_KEY, LENGTHS_FILE
from gemma_jax.errors import ConfigError, DataError

WORK_VERSION = 1
DEFAULT_WORK_ROOT = "~/.cache/gemma_jax/prepare"
# Documents tokenized at once: SentencePiece's batch encode is threaded,
# and the batch bounds memory.
BATCH_DOCS = 512
BATCH_CHARS = 8 << 20


@dataclasses.dataclass(frozen=True)
class Options:
  """What decides the dataset besides the input and the tokenizer."""

  text_key: str = "text"
  on_decode_error: str = "error"
  max_undecodable_fraction: float = 0.0
  fix_mojibake: bool = False
  normalize: prepare.Normalization | None = None
  eval_fraction: float = 0.0
  dedup: bool = False

  def __post_init__(self):
    self.policy()  # checks the decoding options
    prepare.clean_texts([], normalize=self.normalize)  # checks normalize
    if not 0 <= self.eval_fraction < 1:
      raise ConfigError(
        f"eval fraction must be in [0, 1), got {self.eval_fraction}"
      )

  def policy(self) -> formats.DecodePolicy:
    return formats.DecodePolicy(
      self.on_decode_error, self.max_undecodable_fraction
    )

  @property
  def eval_every(self) -> int:
    """k: document i is held out when i % k == 0 (0: none)."""
    if self.eval_fraction == 0:
      return 0
    return max(2, round(1 / self.eval_fraction))


@dataclasses.dataclass(frozen=True)
class Unit:
  """One input file: what its tokenized form in the work dir was made of."""

  index: int
  path: str
  size: int
  mtime: float

  def key(self, options: Options, tokenizer_fingerprint: str) -> dict:
    return {
      "version": WORK_VERSION,
      "path": self.path,
      "size": self.size,
      "mtime": self.mtime,
      "options": _tokenize_options(options),
      "tokenizer": tokenizer_fingerprint,
    }


def _tokenize_options(options: Options) -> dict:
  """The options pass 1 depends on (not eval_fraction or dedup)."""
  d = dataclasses.asdict(options)
  del d["eval_fraction"], d["dedup"]
  return d


def plan(inputs, name: str) -> list[Unit]:
  """The units of `inputs` (globs), in order: a pure function of them."""
  units = []
  for i, path in enumerate(formats.expand_inputs(inputs, name)):
    try:
      stat = epath.Path(path).stat()
    except OSError as e:
      raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    units.append(Unit(i, path, int(stat.length), float(stat.mtime or 0)))
  return units


# --- Pass 1: tokenize one unit.


@dataclasses.dataclass
class Tokenized:
  """A unit's pass-1 result (what its `.json` and `.npz` hold). A summary
  (`summary()`, what Beam gathers on one worker) drops the arrays."""

  unit: Unit
  num_docs: int
  digest: str  # sha256 of the documents' hashes, in order
  report: dict  # formats.DecodeReport as a dict
  cleaning: dict
  lengths: np.ndarray | None = None  # int64 [docs]
  hashes: np.ndarray | None = None  # uint8 [docs, 16]
  reused: bool = False

  @classmethod
  def of(cls, unit, lengths, hashes, report, cleaning, reused=False):
    digest = hashlib.sha256(hashes.tobytes()).hexdigest()
    return cls(
      unit, len(lengths), digest, report, cleaning, lengths, hashes, reused
    )

  def summary(self, with_hashes: bool) -> "Tokenized":
    return dataclasses.replace(
      self, lengths=None, hashes=self.hashes if with_hashes else None
    )


def _unit_files(work_dir, unit: Unit) -> tuple[epath.Path, ...]:
  base = epath.Path(work_dir) / f"unit-{unit.index:06d}"
  return tuple(
    base.with_name(base.name + ext) for ext in (".json", ".npz", ".tokens")
  )


def load_tokenized(work_dir, unit, options, fingerprint) -> Tokenized | None:
  """The unit's result from an earlier run, if that run finished it with
  the same file, options and tokenizer."""
  meta_path, _, _ = _unit_files(work_dir, unit)
  if not meta_path.exists():
    return None
  try:
    meta = json.loads(meta_path.read_text())
    if meta["key"] != json.loads(json.dumps(unit.key(options, fingerprint))):
      return None
    lengths, hashes = load_arrays(work_dir, unit)
  except (OSError, ValueError, KeyError):
    return None  # torn by a kill: tokenize again
  return Tokenized.of(
    unit, lengths, hashes, meta["report"], meta["cleaning"], reused=True
  )


def load_arrays(work_dir, unit: Unit) -> tuple[np.ndarray, np.ndarray]:
  """(lengths, hashes) of a tokenized unit."""
  _, arrays_path, _ = _unit_files(work_dir, unit)
  with np.load(io.BytesIO(arrays_path.read_bytes())) as arrays:
    return arrays["lengths"], arrays["hashes"]


def tokenize_unit(unit: Unit, options: Options, tokenizer, work_dir):
  """Pass 1 for `unit` (or its earlier result): a Tokenized."""
  done = load_tokenized(work_dir, unit, options, tokenizer.fingerprint)
  if done is not None:
    return done
  meta_path, arrays_path, tokens_path = _unit_files(work_dir, unit)
  report = formats.DecodeReport(unit.path)
  docs = formats.iter_documents(
    unit.path, options.text_key, options.policy(), report
  )
  lengths: list[int] = []
  hashes: list[bytes] = []
  cleaning: dict = {}
  with _writer(tokens_path) as out:
    for texts in _batches(docs):
      texts, counts = prepare.clean_texts(
        texts, options.fix_mojibake, options.normalize
      )
      for k, v in counts.items():
        cleaning[k] = cleaning.get(k, 0) + v
      for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        ids = np.asarray(ids, np.int32)
        out.write(ids.astype("<i4").tobytes())
        lengths.append(len(ids))
        hashes.append(_hash(text))
  result = Tokenized.of(
    unit,
    np.asarray(lengths, np.int64),
    np.frombuffer(b"".join(hashes), np.uint8).reshape(-1, 16),
    dataclasses.asdict(report),
    cleaning or {"documents": 0},
  )
  buf = io.BytesIO()
  np.savez(buf, lengths=result.lengths, hashes=result.hashes)
  fileio.atomic_write(arrays_path, buf.getvalue())
  fileio.atomic_write(
    meta_path,
    json.dumps(
      {
        "key": unit.key(options, tokenizer.fingerprint),
        "report": result.report,
        "cleaning": result.cleaning,
      }
    ),
  )
  return result


def _hash(text: str) -> bytes:
  return hashlib.blake2b(
    text.encode("utf-8", "surrogatepass"), digest_size=16
  ).digest()


def _batches(docs):
  batch, chars = [], 0
  for text in docs:
    batch.append(text)
    chars += len(text)
    if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
      yield batch
      batch, chars = [], 0
  if batch:
    yield batch


@contextlib.contextmanager
def _writer(path: epath.Path):
  """A binary file at `path` that appears only once written whole."""
  if fileio.is_local(path):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
      with open(tmp, "wb") as f:
        yield f
      os.replace(tmp, path)
    finally:
      with contextlib.suppress(OSError):
        os.remove(tmp)
  else:
    with path.open("wb") as f:  # an object appears when its upload ends
      yield f


def read_tokens(work_dir, unit: Unit, lengths: np.ndarray):
  """The unit's documents (int32 arrays), read a chunk at a time."""
  _, _, tokens_path = _unit_files(work_dir, unit)
  with tokens_path.open("rb") as f:
    for n in lengths:
      yield np.frombuffer(f.read(4 * int(n)), "<i4").astype(np.int32)


# --- The layout: documents numbered over all units.


@dataclasses.dataclass(frozen=True)
class UnitLayout:
  """Where pass 2 puts the documents of one unit."""

  keep: np.ndarray  # bool [docs]: not a repeat
  held_out: np.ndarray  # bool [docs]: in split 'eval'
  # split -> (shard index, shard count) for splits the unit has documents of
  shards: dict


def first_occurrences(hashes: np.ndarray) -> np.ndarray:
  """bool [n]: whether row i of `hashes` (uint8 [n, 16]) is the first of
  its value; vectorised (about 40 bytes a document, no Python set)."""
  words = np.ascontiguousarray(hashes).view("<u8").reshape(-1, 2)
  # Sorted by value, then index: the first of each run is the first seen.
  order = np.lexsort((np.arange(len(words)), words[:, 1], words[:, 0]))
  ranked = words[order]
  first = np.ones(len(words), bool)
  first[1:] = (ranked[1:] != ranked[:-1]).any(axis=1)
  keep = np.zeros(len(words), bool)
  keep[order[first]] = True
  return keep


def layout(results: list[Tokenized], options: Options) -> list[UnitLayout]:
  """Pass 2's plan, from every unit's pass-1 result, in unit order."""
  k = options.eval_every
  sizes = [r.num_docs for r in results]
  keep_all = np.ones(sum(sizes), bool)
  if options.dedup and len(keep_all):
    hashes = [r.hashes for r in results if r.hashes is not None]
    assert len(hashes) == len(results), "summaries without hashes"
    keep_all = first_occurrences(np.concatenate(hashes))
  number = np.cumsum(keep_all) - 1  # of each document among kept ones
  held_all = keep_all & (number % k == 0) if k else np.zeros_like(keep_all)
  bounds = np.cumsum(sizes)[:-1]
  keeps, helds = np.split(keep_all, bounds), np.split(held_all, bounds)
  splits = ["train", "eval"] if k else ["train"]
  has = {
    "train": [bool((kp & ~h).any()) for kp, h in zip(keeps, helds)],
    "eval": [bool(h.any()) for h in helds],
  }
  count = {s: sum(has[s]) for s in splits}
  seen_shards = dict.fromkeys(splits, 0)
  out = []
  for i in range(len(results)):
    shards = {}
    for s in splits:
      if has[s][i]:
        shards[s] = (seen_shards[s], count[s])
        seen_shards[s] += 1
    out.append(UnitLayout(keeps[i], helds[i], shards))
  return out


# --- Pass 2: write one unit's shards.


def write_unit(
  name: str,
  dataset_dir,
  work_dir,
  result: Tokenized,
  unit_layout: UnitLayout,
) -> dict:
  """Writes the unit's shards into `dataset_dir`; returns {split: (records,
  bytes, lengths)}."""
  serialize = arrayrecord.features().serialize_example
  lengths = result.lengths
  if lengths is None:  # a summary
    lengths, _ = load_arrays(work_dir, result.unit)
  out = {}
  for split, (i, n) in unit_layout.shards.items():
    held = unit_layout.held_out if split == "eval" else ~unit_layout.held_out
    want = unit_layout.keep & held
    docs = (
      doc
      for doc, w in zip(read_tokens(work_dir, result.unit, lengths), want)
      if w
    )
    nbytes = 0

    def counted(example):
      nonlocal nbytes
      data = serialize(example)
      nbytes += len(data)
      return data

    arrayrecord.write_shard(
      epath.Path(dataset_dir) / arrayrecord.shard_name(name, split, i, n),
      docs,
      counted,
    )
    out[split] = (int(want.sum()), nbytes, lengths[want])
  return out


# --- The whole preparation.


def default_work_dir(name: str, data_dir: str) -> str:
  """A local folder per (name, data_dir): a rerun finds it."""
  where = hashlib.sha256(fileio.absolute(data_dir).encode()).hexdigest()[:12]
  return os.path.join(os.path.expanduser(DEFAULT_WORK_ROOT), f"{name}-{where}")


def input_fingerprint(results, options: Options, fingerprint: str) -> str:
  """sha256 of the tokenizer, the options and every unit's documents."""
  h = hashlib.sha256()
  h.update(f"files v{WORK_VERSION}\0{fingerprint}\0".encode())
  h.update(repr(sorted(dataclasses.asdict(options).items())).encode())
  for r in results:
    h.update(f"\0{r.num_docs}\0{r.digest}".encode())
  return h.hexdigest()


def inputs_key(units, options: Options, fingerprint: str) -> str:
  """sha256 of the unit keys: equal means the same files, unchanged."""
  keys = [u.key(options, fingerprint) for u in units]
  return hashlib.sha256(
    json.dumps([keys, dataclasses.asdict(options)]).encode()
  ).hexdigest()


_WORKER_TOKENIZER: dict = {}


def _worker_tokenize(args):
  unit, options, tokenizer_path, work_dir = args
  from gemma_jax.tokenizer import Tokenizer

  tok = _WORKER_TOKENIZER.get(tokenizer_path)
  if tok is None:
    tok = _WORKER_TOKENIZER[tokenizer_path] = Tokenizer.load(tokenizer_path)
  # Only what the parent needs travels back: hashes only for dedup.
  return tokenize_unit(unit, options, tok, work_dir).summary(options.dedup)


def _worker_write(args):
  return write_unit(*args)


@contextlib.contextmanager
def _mapper(workers: int):
  """map(fn, items) in order: in this process, or over `workers` ones."""
  if workers <= 1:
    yield map
    return
  import multiprocessing

  # spawn: the parent may hold threads (tfds, gcsfs) that fork would copy
  # mid-operation.
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    yield lambda fn, items: pool.imap(fn, items, chunksize=1)


def prepare_files(
  name: str,
  data_dir: str,
  inputs,
  tokenizer,
  options: Options = Options(),
  workers: int = 1,
  work_dir: str | None = None,
  overwrite: bool = False,
  warn=None,
) -> dict:
  """Prepares dataset `name` in `data_dir` from the files of `inputs`.

  `tokenizer` is a loaded Tokenizer (its `path` is what worker processes
  load). Returns the dataset's metadata, as `prepare.prepare_dataset`
  does, plus `dedup` counts. An existing dataset made from the same input
  is returned as it is; one made from other input is refused unless
  `overwrite`.
  """
  if workers < 1:
    raise ConfigError(f"--workers must be >= 1, got {workers}")
  prepare.check_name(name)
  warn = warn or formats.warn
  data_dir = fileio.absolute(data_dir)
  fileio.check_remote(data_dir, "--data-dir")
  units = plan(inputs, name)
  fp = tokenizer.fingerprint
  key = inputs_key(units, options, fp)
  existing = prepare.existing_metadata(name, data_dir)
  if (
    existing is not None and not overwrite and existing.get("inputs_key") == key
  ):
    return existing
  if existing is not None and not overwrite and "inputs_key" not in existing:
    raise DataError(
      f"dataset {name!r} already exists in {data_dir}, prepared from texts "
      f"in memory or by an earlier gemma-jax, so its input cannot be "
      f"compared with these files; pass --overwrite to replace it, or "
      f"choose another --name"
    )
  work_dir = work_dir or default_work_dir(name, data_dir)
  epath.Path(work_dir).mkdir(parents=True, exist_ok=True)
  with _mapper(workers) as run:  # one pool for both passes
    try:
      results = _tokenize_all(units, options, tokenizer, work_dir, run, warn)
    except BaseException:
      _remove_if_empty(work_dir)
      raise
    meta = assemble_metadata(results, options, fp, key)
    plan_out = layout(results, options)
    if existing is not None and not overwrite:
      fileio.remove_tree(work_dir)
      if existing.get("input_fingerprint") == meta["input_fingerprint"]:
        return existing
      raise DataError(
        f"dataset {name!r} already exists in {data_dir} with different "
        f"input ({prepare.counts_line(existing)} there, "
        f"{_split_counts(plan_out)} now); pass --overwrite to replace it, "
        f"or choose another --name"
      )
    with _staging(name, data_dir) as dataset_dir:
      # Summaries: a worker reads the unit's lengths from the work dir.
      items = [
        (name, os.fspath(dataset_dir), work_dir, r.summary(False), lay)
        for r, lay in zip(results, plan_out)
      ]
      written = list(run(_worker_write, items))
      finish(dataset_dir, name, meta, written)
  fileio.remove_tree(work_dir)
  return meta


def _split_counts(plan_out: list[UnitLayout]) -> str:
  """'eval: N documents, train: M documents', as prepare's messages say."""
  train = sum(int((u.keep & ~u.held_out).sum()) for u in plan_out)
  held = sum(int(u.held_out.sum()) for u in plan_out)
  counts = {"train": train, **({"eval": held} if held else {})}
  return ", ".join(f"{k}: {v} documents" for k, v in sorted(counts.items()))


def _tokenize_all(units, options, tokenizer, work_dir, run, warn):
  results = []
  if run is map:  # in this process (tests replace tokenize_unit)
    items = (tokenize_unit(u, options, tokenizer, work_dir) for u in units)
  else:
    items = run(
      _worker_tokenize, [(u, options, tokenizer.path, work_dir) for u in units]
    )
  for r in items:
    report = formats.DecodeReport(**r.report)
    if report.undecodable_bytes:
      warn(report.line())
    results.append(r)
  return results


def _remove_if_empty(work_dir):
  """Removes a work dir that holds no finished unit."""
  path = epath.Path(work_dir)
  if path.exists() and not any(path.glob("unit-*.json")):
    fileio.remove_tree(path)


def assemble_metadata(results, options, fingerprint, key) -> dict:
  """The dataset's metadata, but the split counts (`finish` adds them)."""
  reports = [formats.DecodeReport(**r.report) for r in results]
  bad = [r for r in reports if r.undecodable_bytes]
  cleaning: dict = {}
  for r in results:
    for k, v in r.cleaning.items():
      cleaning[k] = cleaning.get(k, 0) + v
  return {
    FINGERPRINT_KEY: fingerprint,
    "input_fingerprint": input_fingerprint(results, options, fingerprint),
    "inputs_key": key,
    "options": dataclasses.asdict(options),
    "decoding": {
      "undecodable_bytes": sum(r.undecodable_bytes for r in reports),
      "skipped_documents": sum(r.skipped_documents for r in reports),
      "replaced_documents": sum(r.replaced_documents for r in reports),
      "files": [dataclasses.asdict(r) for r in bad[:100]],
    },
    "cleaning": cleaning,
    "input_files": len(results),
    "input_documents": int(sum(r.num_docs for r in results)),
  }


def finish(dataset_dir, name: str, meta: dict, written: list[dict]) -> None:
  """Adds split counts and dedup counts to `meta` and writes the lengths
  files and dataset_info.json (last: it makes the dataset readable)."""
  splits = ["train", "eval"] if meta["options"]["eval_fraction"] else ["train"]
  shards: dict[str, list] = {s: [] for s in splits}
  lengths: dict[str, list] = {s: [] for s in splits}
  for w in written:
    for split, (records, nbytes, sizes) in w.items():
      shards[split].append((records, nbytes))
      lengths[split].append(sizes)
  for split in splits:
    docs = np.concatenate(lengths[split] or [np.zeros(0, np.int64)])
    meta[split] = {"num_docs": len(docs), "num_tokens": int(docs.sum())}
    if not len(docs):
      raise DataError(f"dataset {name!r}: split {split!r} has no documents")
    if not docs.sum():
      raise DataError(f"dataset {name!r}: split {split!r} has no tokens")
    with (epath.Path(dataset_dir) / LENGTHS_FILE.format(split=split)).open(
      "wb"
    ) as f:
      np.save(f, docs.astype(np.int64))
  kept = sum(meta[s]["num_docs"] for s in splits)
  meta["dedup"] = {
    "enabled": bool(meta["options"]["dedup"]),
    "removed_documents": meta["input_documents"] - kept,
  }
  arrayrecord.write_info(dataset_dir, name, shards, meta)


@contextlib.contextmanager
def _staging(name: str, data_dir: str):
  """A folder that becomes `<data_dir>/<name>/<version>` on success."""
  final = epath.Path(data_dir) / name / arrayrecord.VERSION
  if fileio.is_local(data_dir):
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = fileio.fresh_temporary_sibling(final)
    try:
      yield tmp
    except BaseException:
      fileio.remove_tree(tmp)
      raise
    fileio.replace_directory(tmp, final)
  else:
    with tempfile.TemporaryDirectory(prefix="gemma-jax-prepare-") as tmp:
      yield epath.Path(tmp)
      fileio.publish_directory(tmp, final)
