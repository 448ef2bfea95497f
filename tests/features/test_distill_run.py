"""Offline distillation end to end: `gemma-jax distill dump` of a native
teacher, training from the dump with an EMA, exact resume, refusals."""

import contextlib
import errno
import io
import json
import os
import shutil

import jax
import numpy as np
import pytest
import yaml

from gemma_jax import cli
from gemma_jax.checkpoint import native
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.features import distill as distillation
from gemma_jax.features import distill_loss as distill
from gemma_jax.model import Transformer
from gemma_jax.sharding import rules
from gemma_jax.train import state as state_lib
from gemma_jax.train import trainer as trainer_lib
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.testing import losses, tiny_config_dict

pytestmark = pytest.mark.slow

STEPS, V = 4, 512


def random_params(cfg, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: (
      0.3 * rng.standard_normal(x.shape) / np.sqrt(x.shape[-1])
    ).astype(x.dtype),
    rules.values(state_lib.abstract_params(cfg)),
  )


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A native checkpoint of a wider, deeper random teacher."""
  d = tiny_config_dict("unused")["model"] | {"num_layers": 3, "d_model": 48}
  cfg = config_from_dict({"model": d}).model
  path = tmp_path_factory.mktemp("teacher") / "teacher"
  native.save(path, random_params(cfg, 1), cfg)
  return str(path)


def config_dict(tokenizer, teacher, dump=None, **train):
  d = tiny_config_dict(tokenizer, steps=STEPS)
  d["train"].update(ema_decay=0.5, eval_every=0, **train)
  d["checkpoint"].update(save_every=2, export_params=True)
  # k = V: the dump holds the whole distribution.
  d["distill"] = {
    "teacher": teacher,
    "teacher_dtype": "float32",
    "topk": V,
    "alpha": 0.5,
    "dump": dump,
  }
  return d


@pytest.fixture(scope="module")
def dump(tiny_tokenizer, teacher_dir, compile_cache, tmp_path_factory):
  """The teacher's dump of steps [0, 4) in two files, and the summary the
  command printed."""
  root = tmp_path_factory.mktemp("dump")
  path = root / "run.yaml"
  path.write_text(
    yaml.safe_dump(config_dict(tiny_tokenizer, teacher_dir), sort_keys=False)
  )
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert (
      cli.main(
        [
          "distill",
          "dump",
          str(path),
          "--out",
          str(root / "d"),
          "--steps-per-file",
          "3",
        ]
      )
      == 0
    )
  return str(root / "d"), json.loads(out.getvalue().splitlines()[-1])


def offline_config(tokenizer, dump_dir, teacher=None, **train):
  return config_from_dict(config_dict(tokenizer, teacher, dump_dir, **train))


def attached(cfg):
  """(program, pipeline) as the trainer sets them up, checks included."""
  from gemma_jax.data import pipeline_for
  from gemma_jax.train.program import TrainProgram

  program = TrainProgram(cfg)
  pipe = pipeline_for(cfg)
  distillation.attach(program, pipe, cfg.train.steps)
  return program, pipe


@pytest.fixture(scope="module")
def runs(tiny_tokenizer, dump, tmp_path_factory):
  """Offline runs: 4 steps (saved at 2 and 4); and a copy of it that lost
  everything after step 2 (as if killed there), resumed to 4."""
  whole = str(tmp_path_factory.mktemp("whole"))
  trainer_lib.Trainer(offline_config(tiny_tokenizer, dump[0]), whole).run()
  resumed = str(tmp_path_factory.mktemp("resumed") / "run")
  shutil.copytree(whole, resumed)
  for lost in ("checkpoints/4", "params", "params_ema"):
    shutil.rmtree(os.path.join(resumed, lost))
  trainer = trainer_lib.Trainer(
    offline_config(tiny_tokenizer, dump[0]), resumed
  )
  assert trainer.start_step == 2
  trainer.run()
  return whole, resumed


def test_dump_files_and_bytes_per_position(dump):
  path, summary = dump
  with open(os.path.join(path, "dump.json")) as f:
    manifest = json.load(f)
  assert manifest["chunks"] == [[0, 3], [3, 4]]
  assert sorted(n for n in os.listdir(path) if n.endswith(".array_record")) == [
    distillation.chunk_file(0, 3, 0, 1),
    distillation.chunk_file(3, 4, 0, 1),
  ]
  assert summary["positions"] == STEPS * 8 * 32
  assert summary["record_bytes_per_position"] == 6 * V + 4
  # ArrayRecord compresses the records (zstd); never much above them.
  assert 0 < summary["bytes_per_position"] < 1.1 * (6 * V + 4)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_offline_with_k_equal_vocab_is_the_online_loss(
  runs, dump, teacher_dir, tiny_tokenizer
):
  """Step 1's loss/distill from the dump is the online loss of the initial
  student against the teacher on the same rows (bfloat16 log-probs)."""
  whole, _ = runs
  cfg = offline_config(tiny_tokenizer, dump[0])
  program, pipe = attached(cfg)
  batch = pipe.batch(0)
  student = program.init_state().params
  teacher, tcfg = native.load(teacher_dir)

  @jax.jit
  def losses_of(student, teacher):
    apply = lambda cfg, p: Transformer(cfg).apply(
      {"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    logits = apply(cfg.model, student)
    online = distill.distill_token_losses(logits, apply(tcfg, teacher))
    offline = distill.topk_distill_token_losses(
      logits,
      batch["teacher_logprobs"],
      batch["teacher_ids"],
      1.0,
      "bucket",
      teacher_tail_logmass=batch["teacher_tail"],
    )
    return online, offline

  online, offline = losses_of(student, teacher)
  mask = batch["loss_mask"]
  np.testing.assert_allclose(
    offline * mask, online * mask, rtol=2e-3, atol=1e-3
  )
  logged = read_jsonl(f"{whole}/metrics.jsonl")[0]
  assert logged["loss/distill"] == pytest.approx(
    float((online * mask).sum() / mask.sum()), rel=1e-3
  )


def test_resume_from_the_dump_is_exact(runs):
  whole, resumed = runs
  assert losses(resumed) == losses(whole)  # bitwise, every step
  assert sorted(losses(whole)) == list(range(1, STEPS + 1))
  for name in ("params", "params_ema"):
    a, b = (native.load(f"{w}/{name}")[0] for w in (whole, resumed))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_metrics_eval_and_export_with_distillation_and_ema(runs):
  whole, _ = runs
  record = read_jsonl(f"{whole}/metrics.jsonl")[-1]
  for key in ("loss", "loss/distill", "loss/ce", "loss/prose", "loss/code"):
    assert np.isfinite(record[key]), key
  assert record["loss"] == record["loss/ce"]
  evals = read_jsonl(f"{whole}/eval.jsonl")[-1]
  for source in ("prose", "code"):
    assert evals[f"eval_ema/{source}/loss"] > 0
    assert evals[f"eval_ema/{source}/loss"] != evals[f"eval/{source}/loss"]
  ema, _ = native.load(f"{whole}/params_ema")
  params, _ = native.load(f"{whole}/params")
  assert jax.tree.map(lambda x: x.dtype, ema) == jax.tree.map(
    lambda x: x.dtype, params
  )
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(params))
  )


def test_dump_that_does_not_match_is_refused_naming_which(
  runs, dump, teacher_dir, tiny_tokenizer, tmp_path
):
  from gemma_jax.tokenizer import train_tokenizer
  from gemma_jax.train.testing import texts

  path, _ = dump
  workdir = str(tmp_path / "w")
  # Another data stream (a different shuffle seed).
  d = config_dict(tiny_tokenizer, None, path)
  d["data"]["seed"] = 7
  with pytest.raises(DataError, match=r"written for other data: data.seed"):
    trainer_lib.Trainer(config_from_dict(d), workdir)
  # Another tokenizer.
  other_tok = str(tmp_path / "other.model")
  train_tokenizer(texts(9, 200, "prose"), vocab_size=300, out_path=other_tok)
  with pytest.raises(DataError, match=r"another tokenizer \(fingerprint "):
    trainer_lib.Trainer(offline_config(other_tok, path), workdir)
  # Another teacher: any change to its files.
  other = tmp_path / "teacher"
  shutil.copytree(teacher_dir, other)
  with open(other / "model_config.json", "a") as f:
    f.write("\n")
  with pytest.raises(DataError, match=r"written from another teacher"):
    trainer_lib.Trainer(
      offline_config(tiny_tokenizer, path, str(other)), workdir
    )
  attached(offline_config(tiny_tokenizer, path, teacher_dir))  # the same
  # Too few steps, another k.
  with pytest.raises(DataError, match=r"holds 4 steps but train.steps is 6"):
    trainer_lib.Trainer(offline_config(tiny_tokenizer, path, steps=6), workdir)
  d = config_dict(tiny_tokenizer, None, path)
  d["distill"]["topk"] = 64
  with pytest.raises(ConfigError, match=r"distill.topk is 64 .* with 512"):
    trainer_lib.Trainer(config_from_dict(d), workdir)
  # A teacher that ships another tokenizer (online).
  shutil.copy(other_tok, other / "tokenizer.model")
  cfg = config_from_dict(config_dict(tiny_tokenizer, str(other)))
  with pytest.raises(
    ConfigError,
    match=r"its tokenizer .* \(fingerprint "
    r"\w+\.\.\.\) is not data.tokenizer .* \(fingerprint",
  ):
    distillation.check_teacher_tokenizer(cfg)


def test_a_record_read_for_other_rows_is_refused(
  dump, tiny_tokenizer, tmp_path
):
  path, _ = dump
  _, pipe = attached(offline_config(tiny_tokenizer, path))
  manifest = distillation.read_manifest(path)
  reader = distillation.DumpReader(path, manifest, 8, 8, 0)
  batch = pipe.batch(1)
  reader(1, batch)
  with pytest.raises(DataError, match=r"step 2, row 0 was written for other"):
    reader(2, batch)


def test_a_nonfinite_teacher_is_the_one_line_even_if_closing_fails(
  tiny_tokenizer, teacher_dir, capsys, monkeypatch, tmp_path
):
  # The teacher's NaN stops the dump before its file is complete; the
  # writer's close failing too (a full disk) does not replace that line,
  # and no chunk file is published.
  from array_record.python import array_record_module

  from gemma_jax.drivers import distill_dump

  real_encoder = distill_dump.make_encoder

  def nan_encoder(program):
    encode = real_encoder(program)

    def encode_nan(*args):
      topk = encode(*args)
      return topk._replace(logprobs=topk.logprobs * np.nan)

    return encode_nan

  class FullDiskWriter:
    def __init__(self, path, options):
      open(path, "wb").close()

    def write(self, record):
      pass

    def close(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(distill_dump, "make_encoder", nan_encoder)
  monkeypatch.setattr(array_record_module, "ArrayRecordWriter", FullDiskWriter)
  path = tmp_path / "run.yaml"
  path.write_text(
    yaml.safe_dump(config_dict(tiny_tokenizer, teacher_dir), sort_keys=False)
  )
  capsys.readouterr()
  out = tmp_path / "d"
  rc = cli.main(["distill", "dump", str(path), "--out", str(out)])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and len(err) == 1, err
  assert "holds NaN or inf" in err[0], err[0]
  assert not [n for n in os.listdir(out) if n.endswith(".array_record")]
