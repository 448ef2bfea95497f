"""Knowledge distillation, online and offline: the teacher, the loss, dumps.

The `Distill` feature (the `distill:` section) adds the teacher or a dump's
batch arrays and the objective to a TrainProgram, and before training loads
the teacher or checks the dump (`attach`). The dump is written by
gemma_jax.drivers.distill_dump (`gemma-jax distill dump`); its losses and
record format are gemma_jax.features.distill_loss.

Online (`distill.teacher`): the teacher's params are a frozen input of the
train step (program.frozen["teacher"]), sharded by the mesh rules from the
teacher's own logical axes, in `distill.teacher_dtype`, with no optimizer
state and no gradient. Its forward runs per microbatch inside the step;
nothing in it depends on the student's params, so autodiff keeps none of
its activations for the backward pass, only the softmax of its logits that
the loss's gradient needs (`gemma-jax compile` shows the memory).

Offline (`distill.dump`): the student reads the teacher's top-k log-probs,
ids and log tail mass (gemma_jax.features.distill_loss: encode_topk,
pack_topk), or with `distill.select: sample` k sampled ids, their log-probs
and the sample's threshold (encode_sample), from an ArrayRecord dump as
extra batch keys. The dump is keyed by global
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
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_jax.checkpoint import preflight
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.features import distill_loss as distill
from gemma_jax.features.base import Feature
from gemma_jax.model import ModelConfig, Transformer
from gemma_jax.sharding import rules
from gemma_jax.train import state as state_lib
from gemma_jax.train import step as step_lib

TEACHER = "teacher"  # the key of program.frozen
DUMP_KEYS = ("teacher_logprobs", "teacher_ids", "teacher_tail")
DUMP_FORMAT = "gemma_jax.distill_dump/1"
MANIFEST = "dump.json"
TOKENIZER_FILE = "tokenizer.model"  # shipped with HF and Kaggle releases


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
  [B, T] (see gemma_jax.features.distill_loss).
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
  """The teacher's config of an online-distillation `program`."""
  teacher = next(
    (f.teacher_config for f in program.features if isinstance(f, Distill)),
    None,
  )
  assert teacher is not None, "no online teacher installed"
  return teacher


def offline_token_losses(temperature: float, tail: str, select: str = "topk"):
  def token_losses(logits, batch, frozen):
    del frozen
    if select == "sample":
      return distill.sampled_distill_token_losses(
        logits,
        batch["teacher_logprobs"],
        batch["teacher_ids"],
        batch["teacher_tail"],  # the sample's threshold
        temperature,
      )
    return distill.topk_distill_token_losses(
      logits,
      batch["teacher_logprobs"],
      batch["teacher_ids"],
      temperature,
      tail,
      teacher_tail_logmass=batch["teacher_tail"],
    )

  return token_losses


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
    record = distill.record_bytes(cfg.data.seq_len, d.topk)
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
        pipe.shard_index,
      )
    )


# Dumps.
def run_fingerprint(cfg, pipe, with_teacher: bool = True) -> dict:
  """What a dump must agree with: data, tokenizer, teacher, k, temperature,
  how its ids were selected. The teacher's part is left out when
  `with_teacher` is False."""
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
    "select": d.select,
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
  got = {"select": "topk"} | got  # dumps written before `select` existed
  for key in ("topk", "temperature", "select"):
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
  """Steps [first, end) of data shard `part` of `parts` (its one writer)."""
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
    shard_index: int,
  ):
    self.directory = os.fspath(directory)
    self.k = manifest["fingerprint"]["topk"]
    self.chunks = manifest["chunks"]
    self.parts = manifest["process_count"]
    self.global_batch, self.local_batch = global_batch, local_batch
    self.first_row = shard_index * local_batch
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
      crc, topk = distill.decode_record(rec, self.k)
      if crc != distill.row_checksum(batch, r):
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


class Distill(Feature):
  """The `distill:` section: online, the teacher (a frozen input, loaded by
  `attach`; the eval step does without it) and the loss; offline, the
  dump's batch keys and the loss."""

  name = "distill"

  def __init__(self, cfg):
    super().__init__(cfg)
    d = cfg.distill
    self.teacher_config = teacher_config(cfg) if d.mode == "online" else None

  def frozen(self, program) -> dict:
    if self.teacher_config is None:
      return {}
    boxed = state_lib.abstract_params(self.teacher_config)
    specs, _ = rules.mesh_specs(boxed, program.mesh, self.cfg.mesh)
    abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(program.mesh, s)
      ),
      rules.values(boxed),
      specs,
      is_leaf=lambda x: isinstance(x, P),
    )
    return {TEACHER: abstract}

  def batch_keys(self, program) -> dict:
    if self.cfg.distill.mode != "offline":
      return {}
    cfg = self.cfg
    return distill.dump_batch(
      cfg.train.batch_size,
      cfg.data.seq_len,
      cfg.distill.topk,
      program.batch_sharding,
    )

  def loss(self, program, loss_fn):
    d = self.cfg.distill
    if self.teacher_config is not None:
      token_losses = online_token_losses(
        Transformer(self.teacher_config), d.temperature
      )
    else:
      token_losses = offline_token_losses(d.temperature, d.tail, d.select)
    return distill_loss(
      program.forward,
      token_losses,
      program.num_sources,
      d.alpha,
      self.cfg.train.z_loss,
    )

  @classmethod
  def check_inputs(cls, cfg, fresh: bool) -> None:
    d = cfg.distill
    if d.teacher:
      preflight.check_params_source(
        d.teacher, d.teacher_model, "auto", "distill.teacher"
      )

  def prepare(self, program, pipe) -> None:
    attach(program, pipe, self.cfg.train.steps)
