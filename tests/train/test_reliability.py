"""Reliability of a run: no non-finite state saved, good checkpoints named
and resumable with --from-step, damaged checkpoints set aside, the workdir
lease honoured by every writer, no-op runs said so."""

import glob
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from gemma_jax import cli
from gemma_jax.checkpoint.lease import LeaseLost
from gemma_jax.errors import CheckpointError, TrainingStopped
from gemma_jax.train import checkpointing
from gemma_jax.train import trainer as trainer_lib
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.program import TrainProgram
from gemma_jax.train.testing import tiny_config_dict

pytestmark = pytest.mark.slow


def _dict(tok, **checkpoint):
  # The train section matches tests/train/test_trainer.py: one compile.
  d = tiny_config_dict(tok, steps=4)
  d["train"].update(eval_every=2)
  d["checkpoint"].update({"save_every": 1, "keep": 5, **checkpoint})
  return d


def _cfg(tok, **checkpoint):
  return config_from_dict(_dict(tok, **checkpoint))


@pytest.fixture(scope="module")
def run(tiny_tokenizer, compile_cache, tmp_path_factory):
  """Checkpoints 1..4 of an uninterrupted run."""
  workdir = tmp_path_factory.mktemp("reliable") / "run"
  trainer = trainer_lib.Trainer(_cfg(tiny_tokenizer), str(workdir))
  trainer.run()
  assert not (workdir / "LOCK").exists()
  return workdir


@pytest.fixture(scope="module")
def program(tiny_tokenizer):
  return TrainProgram(_cfg(tiny_tokenizer))


def _losses(workdir):
  return {
    r["step"]: r["loss"]
    for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
  }


# Damaged checkpoints.
def _largest(pattern):
  return max(glob.glob(pattern), key=os.path.getsize)


def _delete(path):
  os.remove(path)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _wrong_checksum(path):
  meta = json.load(open(path))
  key = next(k for k in meta["checksums"] if "embedding" in k)
  meta["checksums"][key] ^= 1
  json.dump(meta, open(path, "w"))


S = "checkpoints/4/state"
DAMAGE = [
  ("data_file_deleted", _delete, f"{S}/ocdbt.process_0/d/*", r"array "),
  ("data_file_truncated", _truncate, f"{S}/ocdbt.process_0/d/*", r"array "),
  (
    "METADATA_truncated",
    _truncate,
    f"{S}/_METADATA",
    r"4/state/_METADATA: not valid JSON",
  ),
  (
    "METADATA_deleted",
    _delete,
    f"{S}/_METADATA",
    r"4/state/_METADATA: missing",
  ),
  (
    "manifest_deleted",
    _delete,
    f"{S}/manifest.ocdbt",
    r"4/state/manifest.ocdbt: missing or empty",
  ),
  (
    "meta_truncated",
    _truncate,
    "checkpoints/4/meta/metadata",
    r"4/meta/metadata: not valid JSON",
  ),
  (
    "checksum_differs",
    _wrong_checksum,
    "checkpoints/4/meta/metadata",
    r"array \.params\['embedder'\]\['embedding'\]: its data does not "
    r"match the checksum",
  ),
  # Orbax needs neither of these to restore: not damage.
  (
    "CHECKPOINT_METADATA_deleted",
    _delete,
    "checkpoints/4/_CHECKPOINT_METADATA",
    None,
  ),
  (
    "process_manifest_deleted",
    _delete,
    f"{S}/ocdbt.process_0/manifest.ocdbt",
    None,
  ),
]


@pytest.mark.parametrize(
  "name, damage, pattern, message", DAMAGE, ids=[d[0] for d in DAMAGE]
)
def test_a_damaged_checkpoint_is_named_set_aside_and_the_one_before_used(
  run, program, tmp_path, name, damage, pattern, message
):
  copy = tmp_path / "run"
  shutil.copytree(run / "checkpoints", copy / "checkpoints")
  damage(_largest(str(copy / pattern)))
  warnings = []
  ckpt = checkpointing.Checkpointer(
    str(copy / "checkpoints"), _cfg("x").checkpoint
  )
  step, restored = checkpointing.restore_newest_intact(
    ckpt,
    program.abstract_state,
    damaged_dir=str(copy / "damaged"),
    warn=warnings.append,
  )
  ckpt.close()
  if message is None:
    assert step == 4 and warnings == []
    return
  assert step == 3 and int(restored.state.step) == 3
  assert len(warnings) == 1
  assert re.search(
    rf"checkpoint {copy}/checkpoints/4 is damaged: {message}", warnings[0]
  ), warnings[0]
  assert f"moved it to {copy}/damaged/4" in warnings[0]
  assert os.listdir(copy / "damaged") == ["4"]  # kept, not deleted
  assert sorted(os.listdir(copy / "checkpoints")) == ["1", "2", "3"]


def test_when_every_checkpoint_is_damaged_the_error_says_so(
  run, program, tmp_path
):
  copy = tmp_path / "checkpoints"
  shutil.copytree(run / "checkpoints", copy)
  for meta in glob.glob(str(copy / "*/state/_METADATA")):
    os.remove(meta)
  ckpt = checkpointing.Checkpointer(str(copy), _cfg("x").checkpoint)
  with pytest.raises(
    CheckpointError,
    match="no intact checkpoint .* checkpoints 4, 3, 2, 1 are damaged",
  ):
    checkpointing.restore_newest_intact(ckpt, program.abstract_state)
  ckpt.close()


def test_train_resumes_past_a_torn_checkpoint_with_one_warning(
  run, tiny_tokenizer, tmp_path, capsys
):
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  _truncate(_largest(str(copy / S / "ocdbt.process_0/d/*")))
  config = tmp_path / "cfg.yaml"
  config.write_text(yaml.safe_dump(_dict(tiny_tokenizer), sort_keys=False))
  capsys.readouterr()
  code = cli.main(["train", str(config), "--workdir", str(copy)])
  out, err = capsys.readouterr()
  assert code == 0, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "checkpoints/4 is damaged: array" in lines[0]
  assert f"resumed from {copy}/checkpoints/3" in out
  assert os.listdir(copy / "checkpoints.damaged") == ["4"]
  assert _losses(copy) == _losses(run)  # step 4 redone, bitwise


def test_eval_names_a_damaged_checkpoint_and_uses_the_one_before(
  run, tmp_path, capsys
):
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  os.remove(copy / S / "_METADATA")
  before = sorted(os.listdir(copy))
  capsys.readouterr()
  assert cli.main(["eval", "--workdir", str(copy)]) == 0
  out, err = capsys.readouterr()
  assert out.startswith("step 3") and "4/state/_METADATA: missing" in err
  assert sorted(os.listdir(copy)) == before  # a reader moves nothing
  assert cli.main(["eval", "--workdir", str(copy), "--step", "4"]) == 1
  assert "4/state/_METADATA: missing" in capsys.readouterr().err


# Goodness, divergence and --from-step.
def _poison_after(step, fn):
  def hook(trainer, s):
    if s == step:
      trainer.state = trainer.state.replace(
        params=jax.tree.map(fn, trainer.state.params)
      )

  return hook


def test_a_diverged_checkpoint_is_recorded_and_from_step_resumes_before_it(
  tiny_tokenizer, compile_cache, tmp_path, capsys
):
  cfg = _cfg(tiny_tokenizer, keep=2)
  trainer = trainer_lib.Trainer(cfg, str(tmp_path))
  # Finite but far too large params, as after a too-high learning rate.
  trainer.add_hook(_poison_after(2, lambda x: x * 1e4), 1)
  trainer.run()
  ckpt = checkpointing.Checkpointer(
    str(tmp_path / "checkpoints"), cfg.checkpoint, read_only=True
  )
  good = {s: ckpt.good(s) for s in ckpt.all_steps()}
  ckpt.close()
  # keep=2, but the newest good one (2) is kept past the two diverged ones.
  assert sorted(good) == [2, 3, 4]
  assert good[2]["good"] and not good[3]["good"] and not good[4]["good"]
  assert (
    good[4]["params_finite"]
    and good[4]["loss"] > 2 * good[4]["best_recent_loss"]
  )
  assert (
    "checkpoint 3 is not good: the loss of its params"
    in capsys.readouterr().err
  )
  # A plain rerun refuses to continue from a diverged state...
  with pytest.raises(
    TrainingStopped,
    match=r"latest checkpoint \(4\) is not "
    r"good .*newest good checkpoint is step 2.*resume with "
    r"--from-step 2",
  ):
    trainer_lib.Trainer(cfg, str(tmp_path))
  assert not (tmp_path / "LOCK").exists()
  # ...and --from-step 2 continues from the good one, keeping the others.
  resumed = trainer_lib.Trainer(cfg, str(tmp_path), from_step=2)
  assert resumed.start_step == 2
  aside = glob.glob(str(tmp_path / "checkpoints.discarded/*"))
  assert len(aside) == 1
  assert sorted(os.listdir(aside[0])) == [
    "3",
    "4",
    "eval.jsonl",
    "metrics.jsonl",
  ]
  assert sorted(_losses(tmp_path)) == [1, 2]  # metrics truncated to 2
  resumed.run()
  assert sorted(_losses(tmp_path)) == [1, 2, 3, 4]
  ckpt = checkpointing.Checkpointer(
    str(tmp_path / "checkpoints"), cfg.checkpoint, read_only=True
  )
  assert all(ckpt.is_good(s) for s in ckpt.all_steps())
  ckpt.close()


def test_from_step_zero_starts_over_and_a_missing_step_is_refused(
  run, tiny_tokenizer, tmp_path, monkeypatch
):
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  stub = lambda self: lambda state, batch: None
  monkeypatch.setattr(TrainProgram, "compile_train_step", stub)
  with pytest.raises(
    trainer_lib.ConfigError,
    match="--from-step 7: no "
    "checkpoint at that step .*steps: 1, 2, 3, 4; 0 starts",
  ):
    trainer_lib.Trainer(_cfg(tiny_tokenizer), str(copy), from_step=7)
  fresh = trainer_lib.Trainer(_cfg(tiny_tokenizer), str(copy), from_step=0)
  fresh.close()
  assert fresh.start_step == 0 and fresh.restored_step is None
  aside = glob.glob(str(copy / "checkpoints.discarded/*"))
  assert sorted(os.listdir(aside[0]))[:4] == ["1", "2", "3", "4"]


# The lease, seen by the trainer.
def test_a_trainer_whose_lease_is_taken_over_stops_writing(
  tiny_tokenizer, tmp_path, monkeypatch
):
  monkeypatch.setattr(
    TrainProgram, "compile_train_step", lambda self: lambda state, batch: None
  )
  trainer = trainer_lib.Trainer(
    _cfg(tiny_tokenizer, export_params=True), str(tmp_path)
  )
  holder = json.loads((tmp_path / "LOCK").read_text())
  assert holder["pid"] == os.getpid()
  # Another trainer takes the workdir over (this one hung past the timeout).
  (tmp_path / "LOCK").write_text(
    json.dumps(dict(holder, token="other", host="elsewhere"))
  )
  for write, what in [
    (trainer.save_checkpoint, "checkpoint"),
    (trainer.export_params, "params export"),
    (lambda s: trainer.writer.write({"step": s}), "metrics.jsonl"),
  ]:
    with pytest.raises(
      LeaseLost,
      match=f"not writing the {what}: the lease "
      ".* is now held by .* on elsewhere",
    ):
      write(1)
  trainer.close()
  assert os.listdir(tmp_path / "checkpoints") == []
  assert not (tmp_path / "params").exists()
  assert json.loads((tmp_path / "LOCK").read_text())["token"] == "other"


# The step itself.
def test_an_update_that_overflows_is_skipped(
  program, tiny_tokenizer, compile_cache
):
  from gemma_jax.data import pipeline_for

  cfg = program.cfg
  state = program.init_state()
  # Adam's first moment near float32's limit: loss and gradient are finite
  # but the update (and so the new params) overflows, as with a huge rate.
  opt_state = jax.tree_util.tree_map_with_path(
    lambda p, x: (
      jnp.full_like(x, 3e38) if "mu" in jax.tree_util.keystr(p) else x
    ),
    state.opt_state,
  )
  state = state.replace(opt_state=opt_state)
  before = jax.device_get(state)
  pipe = pipeline_for(cfg)
  after, m = program.compile_train_step()(state, program.put(pipe.batch(0)))
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert int(m["skipped"]) == 1 and int(after.nonfinite_in_row) == 1
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(after.params), before.params
  )


# No-op runs.
@pytest.mark.parametrize(
  "edit, warning",
  [
    (
      lambda d: d["train"].update(steps=0),
      "train.steps is 0: nothing is "
      "trained; the initial params are saved and exported unchanged",
    ),
    (
      lambda d: d["optimizer"].update(learning_rate=0),
      "optimizer.learning_rate is 0: the params will not change",
    ),
  ],
)
def test_a_run_that_trains_nothing_says_so(
  tiny_tokenizer, tmp_path, capsys, monkeypatch, edit, warning
):
  monkeypatch.setattr(
    TrainProgram, "compile_train_step", lambda self: lambda state, batch: None
  )
  d = _dict(tiny_tokenizer)
  edit(d)
  trainer_lib.Trainer(config_from_dict(d), str(tmp_path)).close()
  assert f"gemma-jax: warning: {warning}" in capsys.readouterr().err


def test_resuming_a_finished_run_says_there_is_nothing_to_train(
  run, tiny_tokenizer, tmp_path, capsys, monkeypatch
):
  monkeypatch.setattr(
    TrainProgram, "compile_train_step", lambda self: lambda state, batch: None
  )
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  trainer_lib.Trainer(_cfg(tiny_tokenizer), str(copy)).close()
  assert (
    "already at train.steps=4: nothing to train; raise --steps"
    in capsys.readouterr().err
  )


# The same on gs:// (the emulator of tests/conftest.py), where nothing can be
# renamed: setting a checkpoint aside copies its objects and deletes them.
def test_on_gs_damage_is_set_aside_and_from_step_resumes_bitwise(
  run, program, tiny_tokenizer, tmp_path, gcs_bucket
):
  from etils import epath

  from gemma_jax import fileio

  copy = f"{gcs_bucket}/run"
  fileio.copy_tree(run, copy)
  manifest = epath.Path(f"{copy}/{S}/manifest.ocdbt")
  manifest.unlink()
  warnings = []
  ckpt = checkpointing.Checkpointer(f"{copy}/checkpoints", _cfg("x").checkpoint)
  step, _ = checkpointing.restore_newest_intact(
    ckpt,
    program.abstract_state,
    damaged_dir=f"{copy}/damaged",
    warn=warnings.append,
  )
  ckpt.close()
  assert step == 3
  assert warnings == [
    f"checkpoint {copy}/checkpoints/4 is damaged: 4/state/"
    f"manifest.ocdbt: missing or empty; moved it to "
    f"{copy}/damaged/4; trying the checkpoint before it"
  ]
  assert [p.name for p in epath.Path(f"{copy}/damaged").iterdir()] == ["4"]

  resumed = trainer_lib.Trainer(_cfg(tiny_tokenizer), copy, from_step=2)
  assert resumed.start_step == 2
  aside = list(epath.Path(f"{copy}/checkpoints.discarded").iterdir())
  assert sorted(p.name for p in aside[0].iterdir()) == [
    "3",
    "eval.jsonl",
    "metrics.jsonl",
  ]
  resumed.run()
  assert _losses_at(copy) == _losses(run)  # 3 and 4 redone
  assert not epath.Path(f"{copy}/LOCK").exists()


def _losses_at(workdir):
  from gemma_jax.train.metrics import read_jsonl

  return {r["step"]: r["loss"] for r in read_jsonl(f"{workdir}/metrics.jsonl")}
