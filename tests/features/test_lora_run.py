"""LoRA runs through the Trainer: a two-source mixture with a stage change,
EWC on the adapters' weight change with a Fisher, dropout, a resume that
matches the uninterrupted run bit for bit, and the configs it refuses."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from gemma_jax.checkpoint import fisher as fisher_store
from gemma_jax.checkpoint import layout, native
from gemma_jax.checkpoint.testing import random_params
from gemma_jax.errors import ConfigError
from gemma_jax.features import ema as ema_lib
from gemma_jax.features import ewc
from gemma_jax.model import lora as lora_model
from gemma_jax.train import trainer as trainer_lib
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.testing import tiny_config_dict

pytestmark = pytest.mark.slow

LAMBDA = 100.0  # the penalty is about the cross-entropy by step 4


def lora_dict(tokenizer, base, fisher, steps=4) -> dict:
  d = tiny_config_dict(tokenizer, steps=steps)
  d["model"]["lora"] = {
    "rank": 2,
    "alpha": 4,
    "dropout": 0.1,
    "targets": ["q", "v", "gate", "down"],
  }
  d["data"]["stages"][1]["start_step"] = 3  # the mixture changes at 3
  d["checkpoint"].update(init_from=str(base), export_params=True)
  d["continual"] = {"ewc_lambda": LAMBDA, "fisher": str(fisher)}
  d["train"]["ema_decay"] = 0.5
  return d


@pytest.fixture(scope="module")
def runs(tiny_tokenizer, compile_cache, tmp_path_factory):
  """(root, config, whole, resumed): 4 steps saved at 2 and 4; and a copy
  that lost everything after step 2, resumed to 4."""
  del compile_cache  # the second Trainer compiles the same step
  root = tmp_path_factory.mktemp("lora_run")
  d = lora_dict(tiny_tokenizer, root / "base", root / "fisher")
  base_cfg = config_from_dict(d | {"continual": {}}).model
  base_cfg = lora_model.merged_config(base_cfg)
  # Random on the host: no init program to compile.
  base = random_params(base_cfg, seed=3, scale=0.1)
  native.save(root / "base", base, base_cfg)
  rng = np.random.default_rng(0)
  fisher = {
    p: rng.uniform(0.0, 2.0, s).astype(np.float32)
    for p, s in layout.param_shapes(base_cfg).items()
  }
  fisher_store.save(
    root / "fisher", layout.unflatten(fisher), base_cfg, {"estimator": "test"}
  )
  cfg = config_from_dict(d)
  whole = root / "whole"
  trainer = trainer_lib.Trainer(cfg, str(whole))
  trainer.run()
  resumed = root / "resumed"
  shutil.copytree(whole, resumed)
  for lost in (
    "checkpoints/4",
    "params",
    "adapter",
    "params_ema",
    "adapter_ema",
  ):
    shutil.rmtree(resumed / lost)
  again = trainer_lib.Trainer(cfg, str(resumed))
  assert again.start_step == 2
  again.run()
  return root, trainer, whole, resumed


def records(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def test_a_resumed_lora_run_with_a_mixture_and_ewc_matches_bit_for_bit(runs):
  _, _, whole, resumed = runs
  a, b = records(whole), records(resumed)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
  timeless = lambda r: {
    k: v
    for k, v in r.items()
    if k.startswith(("loss", "grad_norm", "learning_rate", "skipped"))
    or k == "tokens"
  }
  assert [timeless(r) for r in a] == [timeless(r) for r in b]
  # B starts at zero and step 1 warms up at learning rate 0: the weights
  # first move in step 2, and the penalty grows from step 3.
  assert [r["loss/ewc"] > 0 for r in a] == [False, False, True, True]
  # The mixture changed at step index 3 (prose 3 : code 1).
  assert a[2]["share/prose"] == 0.5 and a[3]["share/prose"] > 0.7
  for name in ("adapter", "params", "adapter_ema", "params_ema"):
    for (p, x), (_, y) in zip(
      jax.tree_util.tree_leaves_with_path(_load(whole / name)),
      jax.tree_util.tree_leaves_with_path(_load(resumed / name)),
    ):
      np.testing.assert_array_equal(x, y, err_msg=f"{name} {p}")


def _load(path):
  from gemma_jax.checkpoint import adapter

  if path.name.startswith("adapter"):
    return adapter.load(path)[0]
  return native.load(path)[0]


def test_the_ema_export_is_the_base_with_the_adapters_ema_merged(runs):
  _, trainer, whole, _ = runs
  ema = _load(whole / "adapter_ema")
  jax.tree.map(
    np.testing.assert_array_equal,
    ema,
    jax.device_get(ema_lib.params_of(trainer.program, trainer.state)),
  )
  expected = lora_model.merge_params(
    jax.device_get(trainer.program.frozen["base"]),
    ema,
    trainer.program.cfg.model,
  )
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
    _load(whole / "params_ema"),
    expected,
  )
  assert not np.array_equal(
    ema["layers"]["mlp"]["linear"]["lora_down_b"],
    _load(whole / "adapter")["layers"]["mlp"]["linear"]["lora_down_b"],
  )


def test_ewc_holds_the_fisher_of_the_adapted_weights_and_no_anchor(runs):
  root, trainer, _, _ = runs
  program = trainer.program
  ewc = program.frozen["ewc"]
  assert list(ewc) == ["fisher"]  # the anchor is the frozen base itself
  assert sorted(p for p, _ in layout.flatten(ewc["fisher"])) == [
    "layers/attn/kv_einsum/w",
    "layers/attn/q_einsum/w",
    "layers/mlp/gating_einsum/w",
    "layers/mlp/linear/w",
  ]
  # Normalised by the mean over the whole Fisher, as without LoRA.
  raw = dict(
    layout.flatten(
      fisher_store.load(
        root / "fisher", lora_model.merged_config(program.cfg.model)
      )
    )
  )
  mean = sum(x.sum() for x in raw.values()) / sum(x.size for x in raw.values())
  for p, f in layout.flatten(ewc["fisher"]):
    np.testing.assert_allclose(f, raw[p] / mean, rtol=1e-5)


def test_the_penalty_is_the_fisher_weighted_change_of_the_merged_weights(runs):
  _, trainer, _, _ = runs
  program = trainer.program
  adapters = jax.device_get(trainer.state.params)
  base = jax.device_get(program.frozen["base"])
  merged = dict(
    layout.flatten(lora_model.merge_params(base, adapters, program.cfg.model))
  )
  fisher = dict(layout.flatten(jax.device_get(program.frozen["ewc"]["fisher"])))
  expected, plain = 0.0, 0.0
  for p, w in layout.flatten(base):
    change = np.asarray(merged[p], np.float64) - np.asarray(w, np.float64)
    plain += np.sum(change**2)
    if p in fisher:
      expected += np.sum(fisher[p] * change**2)
    else:
      assert not change.any(), p  # only adapted weights move
  value, terms = program.penalty_fn(trainer.state.params, program.frozen)
  np.testing.assert_allclose(float(value), LAMBDA / 2 * expected, rtol=1e-4)
  assert float(terms["ewc"]) == float(value)
  # Without a Fisher (F = 1) the Gram-matrix form gives the plain sum.
  gram = ewc.lora_penalty(adapters, {}, LAMBDA, program.cfg.model)
  np.testing.assert_allclose(float(gram), LAMBDA / 2 * plain, rtol=1e-4)


def test_lora_configs_that_cannot_mean_anything_are_refused(tmp_path):
  d = lora_dict("tok.model", tmp_path / "base", tmp_path / "fisher")
  refusals = [
    (
      {"checkpoint": d["checkpoint"] | {"init_optimizer": True}},
      "checkpoint.init_optimizer: with model.lora the optimizer holds the "
      "adapters only",
    ),
    (
      {"continual": d["continual"] | {"anchor": str(tmp_path / "other")}},
      "continual.anchor: with model.lora the EWC anchor is the frozen base",
    ),
    (
      {"checkpoint": d["checkpoint"] | {"init_from": None}},
      "ewc_lambda > 0 with model.lora .* set checkpoint.init_from",
    ),
  ]
  for change, message in refusals:
    with pytest.raises(ConfigError, match=message):
      config_from_dict(d | change)
  # The anchor may be named when it is the base.
  config_from_dict(
    d | {"continual": d["continual"] | {"anchor": d["checkpoint"]["init_from"]}}
  )


def test_a_run_directory_cannot_be_the_base(runs, tiny_tokenizer, tmp_path):
  root, _, whole, _ = runs
  d = lora_dict(tiny_tokenizer, whole, root / "fisher")
  del d["continual"]
  with pytest.raises(
    ConfigError,
    match="a run directory cannot be the base "
    "of LoRA .* point it at the run's export",
  ):
    trainer_lib.Trainer(config_from_dict(d), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "2")


def test_bad_lora_sections_name_the_key_and_what_is_valid():
  model = {"preset": "tiny-gemma2"}  # q: 128 in, 128 out
  for lora, message in [
    (
      {"rank": 4, "targets": ["q", "qkv"]},
      "model.lora.targets: unknown target 'qkv'; valid targets: q, k, v, "
      "o, gate, up, down",
    ),
    ({"rank": -1}, "model.lora.rank must be positive, got -1"),
    ({"rank": 0}, "model.lora.rank must be positive, got 0"),
    (
      {"rank": 129, "targets": ["q"]},
      r"model.lora.rank: 129 is larger than projection 'q' \(128 in, 128 "
      r"out\); a rank-r adapter needs r <= 128",
    ),
  ]:
    with pytest.raises(ConfigError, match=message):
      config_from_dict({"model": model | {"lora": lora}})
  config_from_dict({"model": model | {"lora": {"rank": 128, "targets": ["q"]}}})
