"""The training data pipeline: batch(step) is a pure function of the step.

    pipe = build_pipeline(cfg.data, global_batch=256, shard_index=s,
                          shard_count=S, vocab_size=cfg.model.vocab_size)
    pipe = pipeline_for(cfg, *data_shard(program.batch_sharding, B))
    for step, batch in pipe.iterate(start_step): ...

Composition (grain): one `PackedRows` MapDataset per source ->
`MapDataset.select_from_datasets` routed by the staged schedule, restricted to
this data shard's rows -> `.batch(B / S)`. Batch t of shard s holds global
rows [t*B + s*B/S, t*B + (s+1)*B/S), so the global batch does not depend on
the number of shards, and resuming needs only the step. A data shard is a
row block of the batch sharding (sharding/data_shards.py): the processes
whose devices hold the same rows (a batch shard spanning hosts) read the same
shard, so S is the number of distinct blocks, not the process count.
"""

import itertools

import grain
import numpy as np

from gemma_jax.data import mixture, packing, sources
from gemma_jax.data.config import DataConfig
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.tokenizer import Tokenizer

# How rows are spread over sources (see mixture.py); part of `describe()`,
# so that a checkpoint written under another rule is not resumed silently.
MIXING = "exactly per batch (EDF, within one row at every step)"


def check_global_batch(
  global_batch: int, shard_count: int, mesh: object = None
) -> None:
  """ConfigError unless every data shard gets the same whole number of rows
  (B / S each): what a pod config must satisfy for its topology."""
  if global_batch < 1 or global_batch % shard_count:
    on = f" of the mesh {mesh}" if mesh is not None else ""
    raise ConfigError(
      f"train.batch_size ({global_batch}) must be a positive multiple of "
      f"the number of data shards ({shard_count}; the distinct row blocks "
      f"that the processes{on} hold)"
    )


class Pipeline:
  """Batches of the rows of one data shard; see module docstring.

  Batches are dicts of int32 numpy arrays: inputs, targets, segment_ids,
  positions, loss_mask [B/S, T] and source [B/S] (index into source_names).
  """

  def __init__(
    self,
    cfg: DataConfig,
    global_batch: int,
    shard_index: int = 0,
    shard_count: int = 1,
    vocab_size: int | None = None,
  ):
    check_global_batch(global_batch, shard_count)
    if not 0 <= shard_index < shard_count:
      raise ConfigError(
        f"shard_index {shard_index} is not in [0, {shard_count})"
      )
    if not cfg.sources:
      raise ConfigError("data.sources: the data config names no source")
    if not cfg.tokenizer:
      raise ConfigError(
        "data.tokenizer: path to a SentencePiece model is required"
      )
    self.cfg = cfg
    self.global_batch = global_batch
    self.local_batch = global_batch // shard_count
    self.shard_index, self.shard_count = shard_index, shard_count
    self.tokenizer = Tokenizer.load(cfg.tokenizer)
    if vocab_size is not None:
      self.tokenizer.check_vocab(vocab_size)
    self.source_names = tuple(cfg.sources)
    self.stages = cfg.resolved_stages()
    self._docs = {n: self._open(n, "train") for n in self.source_names}
    # Held-out splits are opened now so that a bad one fails at start-up,
    # not at the first evaluation.
    self._eval_rows = {
      n: packing.PackedRows(
        self._open(n, "eval"),
        cfg.seq_len,
        self.source_names.index(n),
        shuffle=False,
      )
      for n in self.eval_sources
    }
    self._rows = [
      packing.PackedRows(self._docs[n], cfg.seq_len, i, cfg.seed)
      for i, n in enumerate(self.source_names)
    ]
    weights = [
      [st.weights.get(n, 0.0) for n in self.source_names] for st in self.stages
    ]
    self.schedule = mixture.StageSchedule(
      [st.start_step for st in self.stages], weights, global_batch, cfg.seed
    )
    rows = grain.MapDataset.select_from_datasets(
      self._rows,
      mixture.ProcessRows(
        self.schedule, global_batch, shard_index, shard_count
      ),
    )
    self._batches = rows.batch(self.local_batch)

  def _open(self, name: str, split: str) -> sources.Documents:
    docs = sources.open_documents(
      name, self.cfg.sources[name], self.tokenizer, split
    )
    if docs.fingerprint not in (None, self.tokenizer.fingerprint):
      raise DataError(
        f"data.sources.{name}: its tokens were made by a tokenizer with "
        f"fingerprint {docs.fingerprint[:12]}..., but data.tokenizer "
        f"({self.cfg.tokenizer}) has {self.tokenizer.fingerprint[:12]}...; "
        "prepare the source again with this tokenizer"
      )
    return docs

  def batch(self, step: int) -> dict:
    """This process's rows of global batch `step`."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    return self._batches[step]

  def add_batch_keys(self, fn) -> None:
    """Adds `fn(step, batch)` {key: array [B/P, ...]} to every training
    batch, e.g. a teacher's entries stored per row. fn must be a pure
    function of the step (resume stays exact) and picklable (worker
    processes)."""
    self._batches = self._batches.map_with_index(_AddKeys(fn))

  def iterate(self, start_step: int = 0):
    """Yields (step, batch) from `start_step` on, prefetched (worker
    processes when data.num_workers > 0); equal to `batch(step)`."""
    ds = self._batches[start_step:].to_iter_dataset(
      grain.ReadOptions(
        num_threads=2, prefetch_buffer_size=max(self.cfg.prefetch, 1)
      )
    )
    if self.cfg.num_workers > 0:
      _mark_absl_flags_parsed()
      ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(
          num_workers=self.cfg.num_workers,
          per_worker_buffer_size=max(self.cfg.prefetch, 1),
        )
      )
    return _numbered(iter(ds), start_step)

  def eval_batches(self, source: str, n: int):
    """Up to `n` batches of the held-out split of `source`, in order and
    without repeats; rows past the split's end are padding (loss_mask 0).
    A source configured without held-out data yields no batches."""
    if source not in self.cfg.sources:
      raise ConfigError(
        f"eval source {source!r} is not one of {', '.join(self.source_names)}"
      )
    if source not in self._eval_rows:
      return
    rows = self._eval_rows[source]
    total = rows.rows_per_epoch
    num = min(n, -(-total // self.global_batch))
    offset = self.shard_index * self.local_batch
    for g in range(num):
      first = g * self.global_batch + offset
      examples = [
        rows[i]
        if i < total
        else packing.padding_example(self.cfg.seq_len, rows.source_id)
        for i in range(first, first + self.local_batch)
      ]
      yield {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  @property
  def eval_sources(self) -> tuple[str, ...]:
    """Sources configured with held-out data (eval_split / eval_paths /
    eval_texts)."""
    return tuple(
      n for n in self.source_names if self.cfg.sources[n].has_held_out
    )

  def source_tokens(self, batch: dict) -> np.ndarray:
    """Tokens (non-padding inputs) per source in `batch`: int64 [S].

    Mixture weights are shares of these; the trainer sums them to log the
    realized shares (per-source loss uses `loss_mask` and `source`)."""
    per_row = (batch["segment_ids"] > 0).sum(axis=1)
    return np.bincount(
      batch["source"], weights=per_row, minlength=len(self.source_names)
    ).astype(np.int64)

  def target_shares(self, step: int) -> dict[str, float]:
    """The token shares of the stage in force at `step`."""
    starts = [s.start_step for s in self.stages]
    stage = self.stages[int(np.searchsorted(starts, step, side="right")) - 1]
    shares = stage.shares()
    return {n: shares.get(n, 0.0) for n in self.source_names}

  def check_resume(self, saved: dict, step: int) -> None:
    """ConfigError unless resuming at `step` continues the stream a
    checkpoint's `describe()` (`saved`) recorded."""
    check_resume(saved, self.describe(), step)

  def describe(self) -> dict:
    """JSON-able description; `check_resume` compares two of these."""
    return {
      "seq_len": self.cfg.seq_len,
      "global_batch": self.global_batch,
      "seed": self.cfg.seed,
      "mixing": MIXING,
      "tokenizer": {
        "path": self.tokenizer.path,
        "fingerprint": self.tokenizer.fingerprint,
        "vocab_size": self.tokenizer.vocab_size,
      },
      "source_names": list(self.source_names),
      "sources": {
        n: _describe_source(self.cfg.sources[n], d)
        for n, d in self._docs.items()
      },
      "stages": [
        {"start_step": s.start_step, "weights": s.shares()} for s in self.stages
      ],
    }


def _describe_source(cfg, docs: sources.Documents) -> dict:
  return {
    "kind": cfg.kind,
    **sources.KINDS[cfg.kind].location(cfg),
    "num_docs": len(docs),
    "num_tokens": docs.num_tokens,
  }


class _AddKeys:
  """(step, batch) -> batch with fn(step, batch)'s keys added."""

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, step: int, batch: dict) -> dict:
    return batch | self.fn(step, batch)


def build_pipeline(
  cfg: DataConfig,
  global_batch: int,
  shard_index: int = 0,
  shard_count: int = 1,
  vocab_size: int | None = None,
) -> Pipeline:
  """The pipeline of `cfg`; `vocab_size` (the model's) checks the tokenizer."""
  return Pipeline(cfg, global_batch, shard_index, shard_count, vocab_size)


def pipeline_for(
  cfg, shard_index: int | None = None, shard_count: int | None = None
) -> Pipeline:
  """The training pipeline of a run config (a RunConfig: its data section,
  train.batch_size and model.vocab_size) for data shard `shard_index` of
  `shard_count`; by default this JAX process's shard under the batch
  sharding of `cfg.mesh` over all devices (what TrainProgram(cfg) uses;
  a caller with another mesh passes `data_shard(its batch sharding, B)`)."""
  if shard_index is None or shard_count is None:
    shard_index, shard_count = default_data_shard(cfg)
  return build_pipeline(
    cfg.data,
    global_batch=cfg.train.batch_size,
    shard_index=shard_index,
    shard_count=shard_count,
    vocab_size=cfg.model.vocab_size,
  )


def default_data_shard(cfg) -> tuple[int, int]:
  """(index, count) of this process's data shard under the batch sharding
  of `cfg.mesh` on all devices; (0, 1) in a single process."""
  import jax

  if jax.process_count() == 1:
    return 0, 1
  from jax.sharding import NamedSharding

  from gemma_jax.sharding import rules
  from gemma_jax.sharding.data_shards import data_shard
  from gemma_jax.sharding.mesh import make_mesh

  mesh = make_mesh(cfg.mesh)
  sharding = NamedSharding(mesh, rules.batch_spec(cfg.mesh))
  return data_shard(sharding, cfg.train.batch_size)


def _numbered(iterator, start_step: int):
  """(step, batch) pairs; closing the generator stops grain's prefetch
  threads and worker processes."""
  try:
    for step in itertools.count(start_step):
      # Plain copies: batches from worker processes live in shared memory
      # that grain frees when the array is dropped (not at interpreter exit).
      yield step, {k: np.array(v) for k, v in next(iterator).items()}
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


def _mark_absl_flags_parsed():
  # grain's worker processes read absl flags; outside an absl app mark them
  # parsed so that they use their defaults.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def check_resume(saved: dict, current: dict, step: int) -> None:
  """Raises ConfigError if resuming at `step` under `current` would not
  continue the stream described by `saved` (a past `describe()`).

  Stages starting after `step` may be edited, added or removed; sources may
  be added. Everything that decides the rows already seen must stay.
  An empty `saved` (a checkpoint without a data description) is accepted.
  """
  if not saved:
    return
  if saved.get("mixing") != current.get("mixing"):
    raise ConfigError(
      f"the checkpoint's data stream was mixed "
      f"{saved.get('mixing') or 'in blocks of data.block_size rows'}, "
      f"this version mixes {current.get('mixing')}: resuming at step "
      f"{step} would not continue the same rows; use a fresh --workdir"
    )
  for key in ("seq_len", "global_batch", "seed"):
    if saved.get(key) != current.get(key):
      name = "train.batch_size" if key == "global_batch" else f"data.{key}"
      raise ConfigError(
        f"{name} changed from {saved.get(key)} to "
        f"{current.get(key)}: resuming at step {step} would "
        "not continue the same data stream"
      )
  if saved["tokenizer"]["fingerprint"] != current["tokenizer"]["fingerprint"]:
    raise ConfigError(
      "data.tokenizer: the tokenizer differs from the one "
      "this run was trained with (fingerprint changed)"
    )
  names = list(saved["source_names"])
  if list(current["source_names"])[: len(names)] != names:
    raise ConfigError(
      f"data.sources: sources {names} must keep their names "
      f"and order (new ones go after them); got "
      f"{current['source_names']}"
    )
  for n in names:
    old, new = saved["sources"][n], current["sources"][n]
    if (old["num_docs"], old["num_tokens"]) != (
      new["num_docs"],
      new["num_tokens"],
    ):
      raise ConfigError(
        f"data.sources.{n}: the source's contents changed "
        f"({old['num_docs']} docs / {old['num_tokens']} "
        f"tokens -> {new['num_docs']} / {new['num_tokens']})"
      )
  past_old = _past_stages(saved["stages"], step)
  past_new = _past_stages(current["stages"], step)
  if past_old != past_new:
    raise ConfigError(
      f"data.stages: stages starting at or before step {step} cannot be "
      f"edited on resume (only later ones); was {past_old}, now {past_new}"
    )


def _past_stages(stages, step):
  return [
    (
      s["start_step"],
      {k: round(v, 9) for k, v in s["weights"].items() if v > 0},
    )
    for s in stages
    if s["start_step"] <= step
  ]
