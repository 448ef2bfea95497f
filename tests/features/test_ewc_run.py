"""Continual pretraining end to end: a Fisher from the command line, a run
started from a Hugging Face checkpoint with EWC, a refused resume, and a
run continued with its optimizer."""

import json
import os

import jax
import numpy as np
import pytest
import yaml

from gemma_jax import cli
from gemma_jax.checkpoint import fisher as fisher_store
from gemma_jax.checkpoint import hf
from gemma_jax.checkpoint.testing import random_params
from gemma_jax.errors import ConfigError
from gemma_jax.train import start
from gemma_jax.train import trainer as trainer_lib
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.program import TrainProgram
from gemma_jax.train.testing import tiny_config_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tiny_tokenizer, tmp_path_factory):
  """(root, config dict, host params): random params saved as an HF
  directory, the start of every run here."""
  root = tmp_path_factory.mktemp("cpt")
  d = tiny_config_dict(tiny_tokenizer, steps=2)
  d["train"].update(eval_batches=0)
  d["optimizer"]["warmup_steps"] = 0  # step 2 starts away from the anchor
  d["checkpoint"].update(save_every=2, init_from=str(root / "hf"))
  cfg = config_from_dict(d).model
  params = random_params(cfg, scale=0.1)
  hf.save(root / "hf", params, cfg)
  return root, d, params


@pytest.fixture(scope="module")
def fisher_run(base):
  """`gemma-jax fisher` on 12 rows of `prose` (printed output, out dir)."""
  root, d, _ = base
  config = root / "fisher.yaml"
  config.write_text(yaml.safe_dump(d))
  import contextlib
  import io

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = cli.main(
      [
        "fisher",
        str(config),
        "--source",
        "prose",
        "--sequences",
        "12",
        "--out",
        str(root / "fisher"),
      ]
    )
  assert code == 0
  return out.getvalue(), root / "fisher"


def test_fisher_command_writes_the_checkpoint_and_its_story(base, fisher_run):
  root, d, _ = base
  printed, out = fisher_run
  meta = fisher_store.load_meta(out)
  assert meta["base"]["path"] == str(root / "hf")
  assert meta["base"]["fingerprint"].startswith("sha256:")
  assert meta["estimator"] == {"name": "per_example", "batch_size": 1}
  assert meta["num_examples"] == meta["num_units"] == 12
  assert meta["data"]["source"] == "prose" and meta["data"]["rows"] == 12
  assert meta["model"]["d_model"] == d["model"]["d_model"]
  assert 0 < meta["stats"]["top1pct_share"] < 1
  assert "layers/mlp/linear/w" in printed and "top 1% of entries" in printed
  values = fisher_store.load(out, config_from_dict(d).model)
  assert all(
    x.dtype == np.float32 and (x >= 0).all() for x in jax.tree.leaves(values)
  )


def fisher_json(args):
  import contextlib
  import io

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main(["fisher", *args, "--json"]) == 0
  return json.loads(out.getvalue().splitlines()[-1])


def test_fisher_on_benchmark_gold_answers_and_on_two_sources(base):
  root, d, _ = base
  config = root / "fisher_more.yaml"
  config.write_text(yaml.safe_dump(d))
  # A harness task over a local file, as the offline recipe writes one
  # (docs/evaluation.md): its own documents are its few-shot pool.
  tasks = root / "tasks"
  tasks.mkdir()
  mc = tasks / "mc.jsonl"
  mc.write_text(
    "".join(
      json.dumps(
        {"context": f"Question: {q}\nAnswer:", "choices": c, "gold": g}
      )
      + "\n"
      for q, c, g in [
        ("def or class?", ["def", "class"], 0),
        ("two words", ["print x", "return y"], 1),
        ("a number", ["one", "2", "three"], 1),
      ]
    )
  )
  (tasks / "mc.yaml").write_text(
    json.dumps(
      {
        "task": "mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(mc), "test": str(mc)}},
        "training_split": "train",
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc"}],
      }
    )
  )
  meta = fisher_json(
    [
      str(config),
      "--tasks",
      "mc",
      "--include-path",
      str(tasks),
      "--num-fewshot",
      "1",
      "--limit",
      "2",
      "--out",
      str(root / "fisher_task"),
    ]
  )
  data = meta["data"]
  assert data["kind"] == "task" and meta["num_examples"] == 2
  assert data["tasks"] == [
    {
      "name": "mc",
      "output_type": "multiple_choice",
      "num_fewshot": 1,
      "documents": 2,
    }
  ]
  assert data["harness"]["tasks"] == ["mc"]
  assert data["harness"]["num_fewshot"] == 1 and data["harness"]["limit"] == 2
  assert [f["path"] for f in data["data_files"]] == [str(mc)]
  assert len(data["data_files"][0]["sha256"]) == 64
  meta = fisher_json(
    [
      str(config),
      "--source",
      "prose",
      "--source",
      "code",
      "--sequences",
      "2",
      "--out",
      str(root / "fisher_sources"),
    ]
  )
  assert meta["num_examples"] == meta["num_units"] == 4
  assert [p["source"] for p in meta["data"]["parts"]] == ["prose", "code"]


def ewc_config(base, fisher_dir, **checkpoint):
  _, d, _ = base
  d = json.loads(json.dumps(d))
  d["continual"] = {"ewc_lambda": 100.0, "fisher": str(fisher_dir)}
  d["checkpoint"].update(checkpoint)
  return config_from_dict(d)


@pytest.fixture(scope="module")
def ewc_run(base, fisher_run, tmp_path_factory):
  """(config, workdir, trainer): two steps from the HF params with EWC on
  a copy of the command's Fisher, checkpointed at step 2."""
  import shutil

  root = tmp_path_factory.mktemp("ewc_run")
  shutil.copytree(fisher_run[1], root / "fisher")
  cfg = ewc_config(base, root / "fisher")
  trainer = trainer_lib.Trainer(cfg, str(root / "run"))
  start = jax.device_get(
    (trainer.state.params, trainer.program.frozen["ewc"]["anchor"])
  )
  trainer.run()
  return cfg, root / "run", start


def test_a_run_from_hf_with_ewc_then_a_changed_fisher_is_refused(base, ewc_run):
  _, _, params = base
  cfg, workdir, (start, anchor) = ewc_run
  # Started from the HF params, held to them.
  jax.tree.map(np.testing.assert_array_equal, start, params)
  jax.tree.map(np.testing.assert_array_equal, anchor, params)
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  last = records[-1]
  assert last["loss/ewc"] > 0 and last["loss/ce"] == last["loss"]
  from gemma_jax.train.checkpointing import Checkpointer

  ckpt = Checkpointer(str(workdir / "checkpoints"), cfg.checkpoint)
  meta = ckpt.restore_meta(2)
  ckpt.close()
  assert meta["continual"]["fisher"]["normalization"] == "mean"

  # Another Fisher at the same path: the resume is refused, nothing lost.
  fisher_dir = cfg.continual.fisher
  values = fisher_store.load(fisher_dir, cfg.model)
  fisher_store.save(
    fisher_dir, jax.tree.map(lambda x: 2 * x, values), cfg.model, {}, force=True
  )
  with pytest.raises(
    ConfigError,
    match="continual.fisher: fingerprint "
    "changed since the checkpoint at "
    "step 2",
  ):
    trainer_lib.Trainer(cfg, str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]


def test_continuing_a_run_keeps_its_moments_and_restarts_the_schedule(
  base, ewc_run
):
  _, d, _ = base
  first, workdir, _ = ewc_run
  d = json.loads(json.dumps(d))
  d["checkpoint"].update(init_from=str(workdir), init_optimizer=True)
  program = TrainProgram(config_from_dict(d))
  state = start.initial_state(program)
  ewc = {k: v for f in program.features for k, v in f.metadata().items()}
  assert ewc == {} and int(state.step) == 0
  from gemma_jax.train.checkpointing import Checkpointer

  ckpt = Checkpointer(str(workdir / "checkpoints"), first.checkpoint)
  saved = ckpt.restore(program.abstract_state, 2).state
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, state.params, saved.params)
  inject = state.opt_state[1]
  assert int(inject.count) == 0  # schedule restarts
  assert int(inject.inner_state[0].count) == 2  # Adam's own count
  jax.tree.map(
    np.testing.assert_array_equal,
    inject.inner_state[0].mu,
    saved.opt_state[1].inner_state[0].mu,
  )
  # Without init_optimizer the moments are fresh.
  d["checkpoint"]["init_optimizer"] = False
  state = start.initial_state(TrainProgram(config_from_dict(d)))
  assert not any(
    np.asarray(x).any()
    for x in jax.tree.leaves(state.opt_state[1].inner_state[0].mu)
  )
  jax.tree.map(np.testing.assert_array_equal, state.params, saved.params)
