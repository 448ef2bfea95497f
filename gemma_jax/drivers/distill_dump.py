"""Writes a distillation dump: the teacher's top-k (or a sample of k ids,
`distill.select: sample`) for a run's batches.

    write_dump(cfg, "dumps/run", steps)    # `gemma-jax distill dump`

The format, and how a run reads it back, are gemma_jax.features.distill's
(offline distillation); this driver builds a TrainProgram with the online
teacher and runs its forward over the batches of steps [0, steps).
"""

import contextlib
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from gemma_jax import configlib, distributed, fileio
from gemma_jax.checkpoint import publish
from gemma_jax.errors import ConfigError
from gemma_jax.features import distill_loss as distill
from gemma_jax.features.distill import (
  DUMP_FORMAT,
  MANIFEST,
  attach,
  check_dump,
  chunk_file,
  installed_teacher_config,
  read_manifest,
  run_fingerprint,
  teacher_logits,
)
from gemma_jax.model import Transformer
from gemma_jax.sharding.data_shards import data_shards
from gemma_jax.train import step as step_lib
from gemma_jax.train.program import TrainProgram


def _unsplit(x, m: int):
  """Inverse of step.split_microbatches: [m, B/m, ...] -> [B, ...]."""
  return x.swapaxes(0, 1).reshape((-1, *x.shape[2:]))


SAMPLE_SEED = 0  # a sampled dump's key: fold_in(key(SAMPLE_SEED), step, row)


def make_encoder(program):
  """jit (frozen, batch, step) -> TopK of the teacher at
  distill.temperature, its forward run one microbatch at a time
  (train.microbatches).

  A sampled dump draws the ids of global row r of step s with the key
  fold_in(fold_in(key(SAMPLE_SEED), s), r): the same entries however the
  dump is chunked, resumed, split over processes or microbatches."""
  d = program.cfg.distill
  teacher = Transformer(installed_teacher_config(program))
  m = program.cfg.train.microbatches

  def one(frozen, batch, step_key):
    logits = teacher_logits(teacher, frozen, batch)
    if d.select == "topk":
      return distill.encode_topk(logits, d.topk, d.temperature)
    keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(batch["row"])
    return jax.vmap(
      lambda x, key: distill.encode_sample(x, d.topk, d.temperature, key)
    )(logits, keys)

  def encode(frozen, batch, step):
    batch = {k: batch[k] for k in step_lib.BATCH_KEYS}
    batch["row"] = jnp.arange(batch["inputs"].shape[0], dtype=jnp.int32)
    step_key = jax.random.fold_in(jax.random.key(SAMPLE_SEED), step)
    if m == 1:
      return one(frozen, batch, step_key)
    parts = step_lib.split_microbatches(batch, m)
    out = jax.lax.map(lambda mb: one(frozen, mb, step_key), parts)
    return jax.tree.map(lambda x: _unsplit(x, m), out)

  return jax.jit(
    encode,
    in_shardings=(program.frozen_shardings, program.batch_sharding, None),
    out_shardings=program.batch_sharding,
  )


def _local_rows(program, x) -> np.ndarray:
  """This process's rows of a batch-sharded global array."""
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(
    multihost_utils.global_array_to_host_local_array(
      x, program.mesh, program.batch_sharding.spec
    )
  )


def write_dump(
  cfg, directory, steps: int, steps_per_file: int = 100, log=print
) -> dict:
  """Writes (or extends to `steps`) the teacher's top-k for the training
  batches of steps [0, steps) into `directory`; returns the manifest.

  Every data shard's rows are written by one process (the first of those
  that read the shard, see sharding/data_shards.py); a chunk of
  `steps_per_file` steps is one ArrayRecord file per data shard (the
  manifest's "process_count" counts these writers), renamed into place when
  complete, and
  the manifest is rewritten after each chunk, so an interrupted dump
  continues from its last complete chunk.
  """
  from gemma_jax.data import pipeline_for

  if not cfg.distill.teacher:
    raise ConfigError(
      "distill.teacher: a dump needs the teacher's checkpoint directory"
    )
  if steps_per_file < 1:
    raise ConfigError(f"--steps-per-file must be >= 1, got {steps_per_file}")
  cfg = dataclasses.replace(
    cfg, distill=dataclasses.replace(cfg.distill, dump=None)
  )
  program = TrainProgram(cfg)
  shards = data_shards(program.batch_sharding, cfg.train.batch_size)
  shard, count = shards[jax.process_index()]
  pipe = pipeline_for(cfg, shard, count)
  writes = jax.process_index() == min(
    p for p, s in shards.items() if s == (shard, count)
  )
  expected = run_fingerprint(cfg, pipe)
  root = epath.Path(directory)
  teacher = installed_teacher_config(program)
  manifest = {
    "format": DUMP_FORMAT,
    "fingerprint": expected,
    "vocab_size": teacher.vocab_size,
    "teacher_model": configlib.to_dict(teacher),
    "tail_stored": True,
    "process_count": count,  # writers: one per data shard
    "global_batch": pipe.global_batch,
    "seq_len": cfg.data.seq_len,
    "steps": 0,
    "chunks": [],
    "bytes_per_position": distill.bytes_per_token(cfg.distill.topk),
  }
  if (root / MANIFEST).exists():
    manifest = read_manifest(directory)
    check_dump(directory, manifest, expected, cfg.model.vocab_size)
    if manifest["process_count"] != count:
      raise ConfigError(
        f"distill.dump {directory} was written in "
        f"{manifest['process_count']} data shards, this mesh reads {count}; "
        "extend it with a mesh and process count of as many"
      )
  root.mkdir(parents=True, exist_ok=True)
  if manifest["steps"] >= steps:
    log(f"{directory} already holds {manifest['steps']} steps")
    return manifest
  attach(program, pipe, steps)
  encode = make_encoder(program)
  with program.context():
    for first in range(manifest["steps"], steps, steps_per_file):
      end = min(first + steps_per_file, steps)
      _write_chunk(program, pipe, encode, root, first, end, writes)
      manifest["chunks"].append([first, end])
      manifest["steps"] = end
      distributed.barrier("distill_dump_chunk")
      if jax.process_index() == 0:
        fileio.atomic_write(root / MANIFEST, json.dumps(manifest, indent=1))
      log(f"dumped steps [{first}, {end}) into {directory}")
  return manifest


def _write_chunk(
  program, pipe, encode, root, first: int, end: int, writes: bool
):
  """Encodes steps [first, end) (a collective: every process runs it) and,
  where `writes`, stores this data shard's rows."""
  from array_record.python.array_record_module import ArrayRecordWriter

  name = chunk_file(first, end, pipe.shard_index, pipe.shard_count)
  tmp = os.fspath(root / f".{name}.tmp")
  writer = ArrayRecordWriter(tmp, "group_size:1") if writes else None
  try:
    for step in range(first, end):
      batch = pipe.batch(step)
      topk = encode(
        program.frozen,
        program.put({k: batch[k] for k in step_lib.BATCH_KEYS}),
        np.int32(step),
      )
      topk = distill.TopK(*(_local_rows(program, x) for x in topk))
      teacher = f"the teacher's output at step {step}"
      publish.check_finite(topk._asdict(), root / name, teacher, True)
      if writer is None:
        continue
      for r in range(pipe.local_batch):
        writer.write(
          distill.encode_record(
            distill.TopK(topk.logprobs[r], topk.ids[r], topk.tail[r]),
            distill.row_checksum(batch, r),
          )
        )
  except BaseException:
    if writer is not None:
      with contextlib.suppress(Exception):  # the error in flight is reported
        writer.close()
    raise
  if writer is not None:
    writer.close()
    os.replace(tmp, os.fspath(root / name))


def dump_files_bytes(directory) -> int:
  """Bytes of a dump's ArrayRecord files."""
  return sum(
    f.stat().length for f in epath.Path(directory).glob("*.array_record")
  )
