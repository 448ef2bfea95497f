"""Knowledge distillation wired into training: the teacher, the loss, dumps.

    distillation.install(program)         # TrainProgram.__init__, one call
    distillation.attach(program, pipe, steps)  # the Trainer, before compiling
    write_dump(cfg, "dumps/run", steps)    # `gemma-jax distill dump`

Online (`distill.teacher`): the teacher's params are a frozen input of the
train step (program.frozen["teacher"]), sharded by the mesh rules from the
teacher's own logical axes, in `distill.teacher_dtype`, with no optimizer
state and no gradient. Its forward runs per microbatch inside the step;
nothing in it depends on the student's params, so autodiff keeps none of
its activations for the backward pass, only the softmax of its logits that
the loss's gradient needs (`gemma-jax compile` shows the memory).

Offline (`distill.dump`): the student reads the teacher's top-k log-probs,
ids and log tail mass (gemma_jax.train.distill: encode_topk, pack_topk)
from an ArrayRecord dump as extra batch keys. The dump is keyed by global
row (step * global_batch + row): batch(step) of the pipeline is a pure
function of the step, so a resumed run reads exactly the entries of its
rows, and every record carries a CRC-32 of its row's tokens, checked on
read. The dump's manifest holds a fingerprint of the data stream (the
pipeline's describe()), the tokenizer and the teacher checkpoint; a dump
that does not match the run is refused, naming which.

The objective per target token (both summed with the loss mask and divided
by the global batch's target tokens, like the cross-entropy):
alpha * distill + (1 - alpha) * cross-entropy (+ z-loss); the step logs
loss/distill and loss/ce.
"""

import dataclasses
import hashlib
import json
import os
import struct
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_jax import configlib, distributed, fileio
from gemma_jax.checkpoint import preflight, publish
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.model import ModelConfig, Transformer
from gemma_jax.sharding import rules
from gemma_jax.train import distill
from gemma_jax.train import state as state_lib
from gemma_jax.train import step as step_lib

TEACHER = "teacher"  # the key of program.frozen
DUMP_KEYS = ("teacher_logprobs", "teacher_ids", "teacher_tail")
DUMP_FORMAT = "gemma_jax.distill_dump/1"
MANIFEST = "dump.json"
TOKENIZER_FILE = "tokenizer.model"  # shipped with HF and Kaggle releases
_CRC = struct.Struct("<I")  # per-record CRC-32 of the row's tokens


# The teacher checkpoint.
def checkpoint_format(path) -> str:
  """The format of a checkpoint directory: native (model_config.json),
  hf (config.json) or kaggle (neither)."""
  from gemma_jax.checkpoint import hf, native

  p = epath.Path(path)
  if not p.is_dir():
    raise ConfigError(f"distill.teacher: {path} is not a checkpoint directory")
  if (p / native.CONFIG_FILE).exists():
    return "native"
  return "hf" if (p / hf.CONFIG).exists() else "kaggle"


def teacher_config(cfg) -> ModelConfig:
  """The teacher's model config in `distill.teacher_dtype`, checked against
  the student's vocabulary.

  From the checkpoint's own config (native or Hugging Face), checked against
  `distill.teacher_model` when both are given; else `teacher_model` (needed
  for an official Flax checkpoint, and all `gemma-jax compile` reads).
  """
  from gemma_jax.checkpoint import hf, hf_config, native

  d = cfg.distill
  model = d.teacher_model
  if d.teacher:
    kind = checkpoint_format(d.teacher)
    if kind == "kaggle" and model is None:
      raise ConfigError(
        f"distill.teacher: {d.teacher} holds no config (an "
        "official Flax checkpoint?); set "
        "distill.teacher_model to its preset"
      )
    if kind != "kaggle":
      stored = (
        native.load_config(d.teacher)
        if kind == "native"
        else hf.load_config(d.teacher)
      )
      if model is not None:
        hf_config.check_same_architecture(
          model, stored, "distill.teacher_model", d.teacher
        )
      model = stored
  if model.vocab_size != cfg.model.vocab_size:
    raise ConfigError(
      f"distill: the teacher's vocabulary has {model.vocab_size} tokens, "
      f"the student's (model.vocab_size) {cfg.model.vocab_size}; "
      "distillation needs one vocabulary"
    )
  return dataclasses.replace(
    model,
    param_dtype=d.teacher_dtype,
    dtype=d.teacher_dtype,
    remat_policy="none",
  )


def check_teacher_tokenizer(cfg) -> None:
  """ConfigError, with both fingerprints, if the teacher ships a
  tokenizer.model other than data.tokenizer."""
  from gemma_jax.tokenizer import Tokenizer

  path = epath.Path(cfg.distill.teacher) / TOKENIZER_FILE
  if not path.exists() or not cfg.data.tokenizer:
    return
  theirs = Tokenizer(path.read_bytes(), str(path)).fingerprint
  ours = Tokenizer.load(cfg.data.tokenizer).fingerprint
  if theirs != ours:
    raise ConfigError(
      f"distill.teacher: its tokenizer {path} (fingerprint {theirs[:12]}"
      f"...) is not data.tokenizer {cfg.data.tokenizer} (fingerprint "
      f"{ours[:12]}...); distillation needs the student's tokenizer"
    )


def load_teacher(cfg, model: ModelConfig, shardings):
  """The teacher's params on the devices, in `model`'s dtype."""
  from gemma_jax.checkpoint import hf, kaggle, native

  path, dtype = cfg.distill.teacher, jnp.dtype(model.param_dtype)
  if not path:
    raise ConfigError(
      "distill.teacher: online distillation needs the "
      "teacher's checkpoint directory"
    )
  kind = checkpoint_format(path)
  if kind == "native":
    params, _ = native.load(path, shardings=shardings, dtype=dtype)
    return params
  if kind == "hf":
    params, _ = hf.load(path, model, dtype=dtype, model_name="distill.teacher")
  else:
    params = kaggle.load(path, model, dtype=dtype)
  return jax.device_put(params, shardings)


def checkpoint_fingerprint(path) -> str:
  """sha256 of a checkpoint directory: every file's relative path and
  contents (reads the whole checkpoint once)."""
  root = epath.Path(path)
  digest = hashlib.sha256()

  def files(folder):
    for f in folder.iterdir():
      yield from files(f) if f.is_dir() else [f]

  for name, f in sorted((str(f.relative_to(root)), f) for f in files(root)):
    digest.update(name.encode() + b"\0")
    with f.open("rb") as stream:
      while chunk := stream.read(1 << 24):
        digest.update(chunk)
  return digest.hexdigest()


# The objective.
def distill_loss(
  forward, token_losses, num_sources: int, alpha: float, z_loss: float = 0.0
):
  """A TrainProgram loss_fn: alpha * distill + (1 - alpha) * ce (+ z-loss),
  summed over the batch's target tokens; terms `distill` and `ce`.

  token_losses(logits, batch, frozen) -> distillation loss per position
  [B, T] (see gemma_jax.train.distill).
  """

  def loss(params, batch, frozen):
    logits = forward(params, frozen, batch)
    sums = step_lib.cross_entropy_sums(logits, batch, num_sources, z_loss)
    per_token = token_losses(logits, batch, frozen)
    d = jnp.where(batch["loss_mask"] > 0, per_token, 0.0).sum()
    total = alpha * d + (1.0 - alpha) * sums["ce"] + sums["z"]
    return total, sums | {"terms": {"distill": d, "ce": sums["ce"]}}

  return loss


def teacher_logits(teacher: Transformer, frozen, batch):
  """The teacher's float32 logits [B, T, V], a constant for autodiff."""
  logits = teacher.apply(
    {"params": frozen[TEACHER]},
    batch["inputs"],
    batch["positions"],
    batch["segment_ids"],
  )
  return jax.lax.stop_gradient(logits)


def online_token_losses(teacher: Transformer, temperature: float):
  def token_losses(logits, batch, frozen):
    return distill.distill_token_losses(
      logits, teacher_logits(teacher, frozen, batch), temperature
    )

  return token_losses


def installed_teacher_config(program) -> ModelConfig:
  """The teacher's config that `install` set on an online-distillation
  `program`."""
  assert program.teacher_config is not None, "no online teacher installed"
  return program.teacher_config


def offline_token_losses(temperature: float, tail: str):
  def token_losses(logits, batch, frozen):
    del frozen
    return distill.topk_distill_token_losses(
      logits,
      batch["teacher_logprobs"],
      batch["teacher_ids"],
      temperature,
      tail,
      teacher_tail_logmass=batch["teacher_tail"],
    )

  return token_losses


def install(program) -> None:
  """Sets up `program` (a TrainProgram) for its config's `distill` section:
  online, the abstract teacher in program.frozen (load it with `attach`)
  and the loss; offline, the dump's batch keys and the loss."""
  cfg = program.cfg
  d = cfg.distill
  if d.mode is None:
    return
  if d.mode == "online":
    program.teacher_config = teacher_config(cfg)
    boxed = state_lib.abstract_params(program.teacher_config)
    specs, _ = rules.mesh_specs(boxed, program.mesh, cfg.mesh)
    program.frozen[TEACHER] = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(program.mesh, s)
      ),
      rules.values(boxed),
      specs,
      is_leaf=lambda x: isinstance(x, P),
    )
    program.train_only_frozen.add(TEACHER)
    token_losses = online_token_losses(
      Transformer(program.teacher_config), d.temperature
    )
  else:
    program.abstract_batch |= dump_batch(
      cfg.train.batch_size, cfg.data.seq_len, d.topk, program.batch_sharding
    )
    token_losses = offline_token_losses(d.temperature, d.tail)
  program.loss_fn = distill_loss(
    program.forward,
    token_losses,
    program.num_sources,
    d.alpha,
    cfg.train.z_loss,
  )


def dump_batch(rows: int, t: int, k: int, sharding) -> dict:
  """The batch keys a dump adds: log-probs bfloat16 [B, T, K], ids int32
  [B, T, K] and the log tail mass float32 [B, T]."""
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(
    shape, dtype, sharding=sharding
  )
  return dict(
    teacher_logprobs=spec((rows, t, k), distill.LOGPROB_DTYPE),
    teacher_ids=spec((rows, t, k), jnp.int32),
    teacher_tail=spec((rows, t), jnp.float32),
  )


def attach(program, pipe, steps: int) -> None:
  """Before training: online, checks the teacher's tokenizer and loads its
  params into program.frozen; offline, checks the dump against this run
  (data, tokenizer, teacher, k, temperature, enough steps) and adds its
  entries to the pipeline's batches."""
  cfg = program.cfg
  d = cfg.distill
  if d.mode == "online":
    check_teacher_tokenizer(cfg)
    program.frozen[TEACHER] = load_teacher(
      cfg, installed_teacher_config(program), program.frozen_shardings[TEACHER]
    )
  elif d.mode == "offline":
    manifest = read_manifest(d.dump)
    check_dump(
      d.dump,
      manifest,
      run_fingerprint(cfg, pipe, with_teacher=bool(d.teacher)),
      cfg.model.vocab_size,
    )
    record = _CRC.size + cfg.data.seq_len * distill.bytes_per_token(d.topk)
    preflight.check_record_files(
      d.dump, dump_files(manifest, pipe.global_batch), record, "distill.dump"
    )
    if manifest["steps"] < steps:
      raise DataError(
        f"distill.dump {d.dump} holds {manifest['steps']} steps but "
        f"train.steps is {steps}; extend it with `gemma-jax distill dump "
        f"CONFIG --steps {steps}`"
      )
    pipe.add_batch_keys(
      DumpReader(
        d.dump,
        manifest,
        pipe.global_batch,
        pipe.local_batch,
        pipe.process_index,
      )
    )


# Dumps.
def run_fingerprint(cfg, pipe, with_teacher: bool = True) -> dict:
  """What a dump must agree with: data, tokenizer, teacher, k, temperature.
  The teacher's part is left out when `with_teacher` is False."""
  d = cfg.distill
  teacher = None
  if with_teacher:
    teacher = {
      "path": d.teacher,
      "fingerprint": checkpoint_fingerprint(d.teacher),
    }
  return {
    "data": pipe.describe(),
    "tokenizer": pipe.tokenizer.fingerprint,
    "teacher": teacher,
    "topk": d.topk,
    "temperature": d.temperature,
  }


def check_dump(
  directory, manifest: dict, expected: dict, vocab_size: int
) -> None:
  """Refuses a dump written for another run, naming what differs."""
  from gemma_jax.data import pipeline

  got = manifest["fingerprint"]
  if got["tokenizer"] != expected["tokenizer"]:
    raise DataError(
      f"distill.dump {directory} was written with another tokenizer "
      f"(fingerprint {got['tokenizer'][:12]}..., data.tokenizer has "
      f"{expected['tokenizer'][:12]}...); dump again"
    )
  if expected["teacher"] is not None and (
    got["teacher"]["fingerprint"] != expected["teacher"]["fingerprint"]
  ):
    raise DataError(
      f"distill.dump {directory} was written from another teacher "
      f"({got['teacher']['path']}, fingerprint "
      f"{got['teacher']['fingerprint'][:12]}...; distill.teacher "
      f"{expected['teacher']['path']} has "
      f"{expected['teacher']['fingerprint'][:12]}...); dump again"
    )
  try:
    pipeline.check_resume(
      got["data"], expected["data"], max(manifest["steps"] - 1, 0)
    )
  except ConfigError as e:
    raise DataError(
      f"distill.dump {directory} was written for other data: {e}"
    ) from None
  for key in ("topk", "temperature"):
    if got[key] != expected[key]:
      raise ConfigError(
        f"distill.{key} is {expected[key]} but distill.dump "
        f"{directory} was written with {got[key]}"
      )
  if manifest["vocab_size"] != vocab_size:
    raise ConfigError(
      f"distill.dump {directory}: the teacher's vocabulary has "
      f"{manifest['vocab_size']} tokens, the student's (model.vocab_size) "
      f"{vocab_size}"
    )


def read_manifest(directory) -> dict:
  path = epath.Path(directory) / MANIFEST
  if not path.exists():
    raise DataError(
      f"distill.dump {directory}: no {MANIFEST}; write it with "
      "`gemma-jax distill dump`"
    )
  manifest = preflight.check_json_file(path, f"distill.dump {directory}")
  if manifest.get("format") != DUMP_FORMAT:
    raise DataError(
      f"{path}: unknown format {manifest.get('format')!r}; "
      f"expected {DUMP_FORMAT!r}"
    )
  return manifest


def chunk_file(first: int, end: int, part: int, parts: int) -> str:
  """Steps [first, end) of writer process `part` of `parts`."""
  return (
    f"steps-{first:08d}-{end:08d}.part-{part:05d}-of-{parts:05d}.array_record"
  )


def dump_files(manifest: dict, global_batch: int) -> dict[str, int]:
  """{file name: records} of every file a dump's manifest lists."""
  parts = manifest["process_count"]
  return {
    chunk_file(first, end, part, parts): (end - first) * (global_batch // parts)
    for first, end in manifest["chunks"]
    for part in range(parts)
  }


def row_checksum(batch: dict, row: int) -> int:
  """CRC-32 of one row's tokens and layout: ties a record to its row."""
  crc = 0
  for key in ("inputs", "targets", "segment_ids", "loss_mask"):
    crc = zlib.crc32(
      np.ascontiguousarray(batch[key][row], np.int32).tobytes(), crc
    )
  return crc


def encode_record(topk: distill.TopK, crc: int) -> bytes:
  """One row's record: CRC-32 of its tokens, then the packed top-k."""
  return _CRC.pack(crc) + distill.pack_topk(topk)


def decode_record(record: bytes, k: int) -> tuple[int, distill.TopK]:
  return _CRC.unpack_from(record)[0], distill.unpack_topk(
    record[_CRC.size :], k
  )


class DumpReader:
  """fn(step, batch) -> the dump's entries of this process's rows of
  `batch` (see Pipeline.add_batch_keys); DataError when a record's CRC does
  not match its row. Files open lazily (the reader crosses processes)."""

  def __init__(
    self,
    directory,
    manifest: dict,
    global_batch: int,
    local_batch: int,
    process_index: int,
  ):
    self.directory = os.fspath(directory)
    self.k = manifest["fingerprint"]["topk"]
    self.chunks = manifest["chunks"]
    self.parts = manifest["process_count"]
    self.global_batch, self.local_batch = global_batch, local_batch
    self.first_row = process_index * local_batch
    self._readers: dict[str, Any] = {}  # file name -> ArrayRecordReader

  def __getstate__(self):
    return self.__dict__ | {"_readers": {}}

  def _reader(self, name):
    from array_record.python.array_record_module import ArrayRecordReader

    if name not in self._readers:
      self._readers[name] = ArrayRecordReader(
        os.path.join(self.directory, name)
      )
    return self._readers[name]

  def _locate(self, step: int, row: int) -> tuple[str, int]:
    """(file, record index) of global row `row` of batch `step`."""
    per_part = self.global_batch // self.parts
    part, offset = divmod(row, per_part)
    for first, end in self.chunks:
      if first <= step < end:
        name = chunk_file(first, end, part, self.parts)
        return name, (step - first) * per_part + offset
    raise DataError(
      f"distill.dump {self.directory} holds no entries for step {step}"
    )

  def __call__(self, step: int, batch: dict) -> dict:
    wanted: dict[str, list[tuple[int, int]]] = {}  # file: [(row, record)]
    for r in range(self.local_batch):
      name, index = self._locate(step, self.first_row + r)
      wanted.setdefault(name, []).append((r, index))
    records: list[bytes | None] = [None] * self.local_batch
    for name, pairs in wanted.items():
      for (r, _), rec in zip(
        pairs, self._reader(name).read([i for _, i in pairs])
      ):
        records[r] = rec
    out = []
    for r, rec in enumerate(records):
      assert rec is not None  # `wanted` located every row
      crc, topk = decode_record(rec, self.k)
      if crc != row_checksum(batch, r):
        raise DataError(
          f"distill.dump {self.directory}: the entry of step {step}, row "
          f"{self.first_row + r} was written for other tokens; the dump "
          "does not match this data stream"
        )
      out.append(topk)
    return dict(
      teacher_logprobs=np.stack([t.logprobs for t in out]),
      teacher_ids=np.stack([t.ids for t in out]),
      teacher_tail=np.stack([t.tail for t in out]),
    )


def _unsplit(x, m: int):
  """Inverse of step.split_microbatches: [m, B/m, ...] -> [B, ...]."""
  return x.swapaxes(0, 1).reshape((-1, *x.shape[2:]))


def make_encoder(program):
  """jit (frozen, batch) -> TopK of the teacher at distill.temperature, its
  forward run one microbatch at a time (train.microbatches)."""
  d = program.cfg.distill
  teacher = Transformer(installed_teacher_config(program))
  m = program.cfg.train.microbatches

  def one(frozen, batch):
    return distill.encode_topk(
      teacher_logits(teacher, frozen, batch), d.topk, d.temperature
    )

  def encode(frozen, batch):
    batch = {k: batch[k] for k in step_lib.BATCH_KEYS}
    if m == 1:
      return one(frozen, batch)
    parts = step_lib.split_microbatches(batch, m)
    out = jax.lax.map(lambda mb: one(frozen, mb), parts)
    return jax.tree.map(lambda x: _unsplit(x, m), out)

  return jax.jit(
    encode,
    in_shardings=(program.frozen_shardings, program.batch_sharding),
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

  Every process writes its own rows; a chunk of `steps_per_file` steps is
  one ArrayRecord file per process, renamed into place when complete, and
  the manifest is rewritten after each chunk, so an interrupted dump
  continues from its last complete chunk.
  """
  from gemma_jax.data import build_pipeline
  from gemma_jax.train.program import TrainProgram

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
  pipe = build_pipeline(
    cfg.data,
    global_batch=cfg.train.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    vocab_size=cfg.model.vocab_size,
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
    "process_count": jax.process_count(),
    "global_batch": pipe.global_batch,
    "seq_len": cfg.data.seq_len,
    "steps": 0,
    "chunks": [],
    "bytes_per_position": distill.bytes_per_token(cfg.distill.topk),
  }
  if (root / MANIFEST).exists():
    manifest = read_manifest(directory)
    check_dump(directory, manifest, expected, cfg.model.vocab_size)
    if manifest["process_count"] != jax.process_count():
      raise ConfigError(
        f"distill.dump {directory} was written by "
        f"{manifest['process_count']} processes; extend it with as many"
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
      _write_chunk(program, pipe, encode, root, first, end)
      manifest["chunks"].append([first, end])
      manifest["steps"] = end
      distributed.barrier("distill_dump_chunk")
      if jax.process_index() == 0:
        fileio.atomic_write(root / MANIFEST, json.dumps(manifest, indent=1))
      log(f"dumped steps [{first}, {end}) into {directory}")
  return manifest


def _write_chunk(program, pipe, encode, root, first: int, end: int):
  from array_record.python.array_record_module import ArrayRecordWriter

  name = chunk_file(first, end, jax.process_index(), jax.process_count())
  tmp = os.fspath(root / f".{name}.tmp")
  writer = ArrayRecordWriter(tmp, "group_size:1")
  try:
    for step in range(first, end):
      batch = pipe.batch(step)
      topk = encode(
        program.frozen, program.put({k: batch[k] for k in step_lib.BATCH_KEYS})
      )
      topk = distill.TopK(*(_local_rows(program, x) for x in topk))
      teacher = f"the teacher's output at step {step}"
      publish.check_finite(topk._asdict(), root / name, teacher, True)
      for r in range(pipe.local_batch):
        writer.write(
          encode_record(
            distill.TopK(topk.logprobs[r], topk.ids[r], topk.tail[r]),
            row_checksum(batch, r),
          )
        )
  finally:
    writer.close()
  os.replace(tmp, os.fspath(root / name))


def dump_files_bytes(directory) -> int:
  """Bytes of a dump's ArrayRecord files."""
  return sum(
    f.stat().length for f in epath.Path(directory).glob("*.array_record")
  )
