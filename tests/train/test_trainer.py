"""The trainer in-process: one compile, metrics, eval, checkpoints, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import pytest
import yaml

from gemma_jax.train.testing import tiny_config_dict
from gemma_jax import cli
from gemma_jax.train.config import config_from_dict
from gemma_jax.train import trainer as trainer_lib


def _cfg(tokenizer, checkpoint=None, **train):
  d = tiny_config_dict(tokenizer, steps=4)
  d["train"].update(eval_every=2, **train)
  d["checkpoint"].update(checkpoint or {})
  return config_from_dict(d)


@pytest.fixture(scope="module")
def trained(tiny_tokenizer, compile_cache, tmp_path_factory):
  """4 steps, logging, evaluating and saving every 2; compiles counted."""
  workdir = str(tmp_path_factory.mktemp("run"))
  compiles = []
  listener = lambda name, *a, **k: compiles.append(name) if (
      name == "/jax/core/compile/backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    trainer = trainer_lib.Trainer(_cfg(tiny_tokenizer), workdir)
    seen = {}
    trainer.add_hook(lambda t, step: seen.setdefault(step, len(compiles)), 1)
    trainer.run()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return trainer, workdir, seen


def test_no_recompilation_after_the_first_step(trained):
  _, _, compiles_at_step = trained
  # The train step is compiled before the loop; the eval step at step 2.
  assert compiles_at_step[2] == compiles_at_step[3] == compiles_at_step[4]


def test_metrics_jsonl_has_every_documented_key(trained):
  _, workdir, _ = trained
  records = [json.loads(l) for l in open(os.path.join(workdir,
                                                      "metrics.jsonl"))]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for key in ("loss", "loss/prose", "loss/code", "share/prose", "share/code",
              "grad_norm", "learning_rate", "tokens", "tokens_per_sec",
              "step_time_s", "mfu", "skipped", "skipped_total", "elapsed_s"):
    assert key in records[-1], key
  assert records[-1]["share/prose"] + records[-1]["share/code"] == \
      pytest.approx(1.0)
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_eval_per_source_at_interval_and_end(trained):
  _, workdir, _ = trained
  records = [json.loads(l) for l in open(os.path.join(workdir, "eval.jsonl"))]
  assert [r["step"] for r in records] == [2, 4]
  for src in ("prose", "code"):
    r = records[-1]
    assert r[f"eval/{src}/perplexity"] == pytest.approx(
        float(jnp.exp(r[f"eval/{src}/loss"])), rel=1e-4)


def test_checkpoints_hold_state_data_position_and_config(trained):
  trainer, workdir, _ = trained
  assert trainer.checkpointer.all_steps() == [2, 4]
  meta = trainer.checkpointer.restore_meta(4)
  assert meta["step"] == 4
  assert meta["config"]["train"]["steps"] == 4
  assert meta["data"]["source_names"] == ["prose", "code"]
  assert yaml.safe_load(open(os.path.join(workdir, "config.yaml"))) == \
      meta["config"]


def _run_cli(config: dict, workdir, capsys, *extra):
  path = os.path.join(str(workdir), "cfg.yaml")
  with open(path, "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
  code = cli.main(["train", path, "--workdir", str(workdir), *extra])
  return code, capsys.readouterr().err


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["model"].update(d_model=48), "different model"),
    (lambda d: d["data"]["stages"][0]["weights"].update(code=5),
     "stage"),
    (lambda d: d["train"].update(batch_size=16), "train.batch_size"),
])
def test_resume_with_a_changed_past_fails_before_training(
    trained, tiny_tokenizer, capsys, change, expected):
  _, workdir, _ = trained
  d = tiny_config_dict(tiny_tokenizer, steps=8)
  change(d)
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  code, err = _run_cli(d, workdir, capsys)
  assert code == 2 and expected in err, err
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before


def test_invalid_config_and_unusable_workdir_fail_clearly(
    tiny_tokenizer, tmp_path, capsys):
  d = tiny_config_dict(tiny_tokenizer)
  d["train"]["stepz"] = 3
  code, err = _run_cli(d, tmp_path, capsys)
  assert code == 2 and "unknown key 'train.stepz'" in err
  a_file = tmp_path / "file"
  a_file.write_text("x")
  d["train"].pop("stepz")
  code, err = _run_cli(d, tmp_path, capsys, "--workdir", str(a_file))
  assert code == 2 and "not a directory" in err


def test_non_finite_steps_are_skipped_then_stop_without_saving(
    tiny_tokenizer, compile_cache, tmp_path):
  cfg = _cfg(tiny_tokenizer, checkpoint={"save_every": 1, "keep": 5},
             max_nonfinite_in_row=2)
  trainer = trainer_lib.Trainer(cfg, str(tmp_path))
  # A diverged model: every following update is non-finite and skipped.
  trainer.state = trainer.state.replace(params=jax.tree.map(
      lambda x: x * jnp.nan, trainer.state.params))
  with pytest.raises(trainer_lib.TrainingStopped,
                     match="2 steps in a row up to step 2.*no checkpoint is "
                     "good: lower optimizer.learning_rate.*--from-step 0"):
    trainer.run()
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["skipped"] for r in records] == [1, 1]
  assert records[-1]["skipped_total"] == 2
  # No state after a skipped step is ever saved.
  assert trainer.checkpointer.all_steps() == []


def test_the_stop_names_the_newest_good_checkpoint(tiny_tokenizer,
                                                   compile_cache, tmp_path):
  cfg = _cfg(tiny_tokenizer, checkpoint={"save_every": 1, "keep": 5},
             max_nonfinite_in_row=2)
  trainer = trainer_lib.Trainer(cfg, str(tmp_path))

  def diverge(t, step):   # at step 2 the params become NaN
    if step == 2:
      t.state = t.state.replace(params=jax.tree.map(
          lambda x: x * jnp.nan, t.state.params))
  trainer.add_hook(diverge, 1)
  with pytest.raises(trainer_lib.TrainingStopped, match=r"2 steps in a row "
                     r"up to step 4 .*the newest good checkpoint is step 2: "
                     r"lower optimizer.learning_rate.*--from-step 2"):
    trainer.run()
  assert trainer.checkpointer.all_steps() == [1, 2]


def test_eval_command_reproduces_the_final_eval(trained, tmp_path, capsys):
  _, workdir, _ = trained
  out = tmp_path / "eval.json"
  assert cli.main(["eval", "--workdir", workdir, "--out", str(out)]) == 0
  results = json.loads(out.read_text())
  final = [json.loads(l) for l in open(os.path.join(workdir, "eval.jsonl"))][-1]
  assert results["step"] == 4
  for src in ("prose", "code"):
    assert results["sources"][src]["loss"] == pytest.approx(
        final[f"eval/{src}/loss"], rel=1e-6)


def test_resume_onto_a_mesh_with_fewer_devices(trained, tiny_tokenizer,
                                               tmp_path):
  import shutil
  import numpy as np
  from gemma_jax.sharding import mesh as mesh_lib
  trainer8, workdir, _ = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  cfg = config_from_dict(tiny_config_dict(tiny_tokenizer, steps=5))
  trainer4 = trainer_lib.Trainer(
      cfg, str(copy), mesh=mesh_lib.make_mesh(cfg.mesh, jax.devices()[:4]))
  assert trainer4.start_step == 4
  for a, b in zip(jax.tree.leaves(trainer4.state.params),
                  jax.tree.leaves(trainer8.state.params)):
    assert a.sharding.mesh.devices.size == 4
    np.testing.assert_array_equal(a, b)
  trainer4.run()
  assert [r["step"] for r in map(json.loads, open(copy / "metrics.jsonl"))
          ] == [1, 2, 3, 4, 5]


def test_init_from_a_params_export(trained, tiny_tokenizer, tmp_path):
  import numpy as np
  from gemma_jax.checkpoint import native
  trainer, _, _ = trained
  native.save(str(tmp_path / "params"), trainer.state.params,
              trainer.cfg.model)
  d = tiny_config_dict(tiny_tokenizer, steps=4)
  d["checkpoint"]["init_from"] = str(tmp_path / "params")
  fresh = trainer_lib.Trainer(config_from_dict(d), str(tmp_path / "run"))
  assert fresh.start_step == 0
  for a, b in zip(jax.tree.leaves(fresh.state.params),
                  jax.tree.leaves(trainer.state.params)):
    np.testing.assert_array_equal(a, b)
