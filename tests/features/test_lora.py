"""LoRA training: the state and the optimizer hold only the adapters, the
base stays frozen (float or int4), exports merge, and resume keeps the base."""

import dataclasses

import jax
import numpy as np
import pytest

from gemma_jax.checkpoint import adapter, native
from gemma_jax.errors import ConfigError
from gemma_jax.features import lora
from gemma_jax.model import lora as lora_model
from gemma_jax.model.testing import TINY_GEMMA2_MQA, model_section
from gemma_jax.train import state as state_lib
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.program import TrainProgram

MODEL = model_section(TINY_GEMMA2_MQA, vocab_size=128)
ROWS, T = 8, 16
SOURCES = {"a": {"kind": "memory", "texts": ["x"]}}


def run_config(model=None, **sections):
  return config_from_dict(
    {
      "model": MODEL | (model or {}),
      "data": {"seq_len": T, "sources": SOURCES},
      "optimizer": {"learning_rate": 3e-2, "warmup_steps": 0},
      "train": {"batch_size": ROWS, "steps": 2},
    }
    | sections
  )


def batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 128, (ROWS, T + 1))
  ones = np.ones((ROWS, T), np.int32)
  return dict(
    inputs=tokens[:, :-1].astype(np.int32),
    targets=tokens[:, 1:].astype(np.int32),
    segment_ids=ones,
    positions=np.tile(np.arange(T, dtype=np.int32), (ROWS, 1)),
    loss_mask=ones,
    source=np.zeros(ROWS, np.int32),
  )


def nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_the_optimizer_state_scales_with_the_adapters_on_gemma2_9b():
  # Abstract shapes only: the real model's sizes, nothing allocated.
  full = TrainProgram(config_from_dict({"model": "gemma2-9b"}))
  adapted = TrainProgram(
    config_from_dict({"model": {"preset": "gemma2-9b", "lora": {"rank": 16}}})
  )
  adapters = nbytes(adapted.abstract_state.params)
  count = sum(
    np.prod(s) for s in lora_model.adapter_paths(adapted.cfg.model).values()
  )
  assert adapters == 4 * count  # float32 adapters only
  # AdamW: two moments per trained parameter, nothing for the base.
  assert nbytes(adapted.abstract_state.opt_state) == pytest.approx(
    2 * adapters, rel=1e-6
  )
  assert (
    nbytes(full.abstract_state.opt_state)
    / nbytes(adapted.abstract_state.opt_state)
    > 100
  )
  assert nbytes(adapted.abstract_frozen["base"]) == nbytes(
    full.abstract_state.params
  )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """Two LoRA steps (dropout on) over a saved random base."""
  root = tmp_path_factory.mktemp("lora")
  base_cfg = run_config()
  base = jax.jit(state_lib.init_params, static_argnums=0)(
    base_cfg.model, jax.random.PRNGKey(7)
  )
  native.save(root / "base", base, base_cfg.model)
  cfg = run_config(
    {"lora": {"rank": 4, "alpha": 8, "dropout": 0.1}},
    checkpoint={"init_from": str(root / "base")},
  )
  program = TrainProgram(cfg)
  info = lora.install_base(program, cfg.checkpoint.init_from)
  state = program.init_state()
  step = program.compile_train_step()
  for i in range(2):
    state, metrics = step(state, program.put(batch(i)))
  return root, program, info, base, state, metrics


@pytest.mark.slow
def test_only_the_adapters_train_and_the_base_stays_as_loaded(lora_run):
  _, program, _, base, state, metrics = lora_run
  assert int(metrics["skipped"]) == 0
  trained = {
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_leaves_with_path(state.params)
  }
  assert trained and all("lora_" in p for p in trained)
  for x, y in zip(
    jax.tree.leaves(program.frozen["base"]), jax.tree.leaves(base)
  ):
    np.testing.assert_array_equal(x, y)
  # B left zero: the adapters moved.
  b = state.params["layers"]["mlp"]["linear"]["lora_down_b"]
  assert np.abs(np.asarray(b)).max() > 0


@pytest.mark.slow
def test_the_export_merges_and_the_adapter_reloads(lora_run, tmp_path):
  _, program, info, _, state, _ = lora_run
  adapter_dir, params_dir = lora.export(
    program, state.params, str(tmp_path), info
  )
  merged, merged_cfg = native.load(params_dir)
  assert merged_cfg.lora is None and merged_cfg == dataclasses.replace(
    program.cfg.model, lora=None
  )
  _adapters, cfg, facts = adapter.load(adapter_dir, base_cfg=merged_cfg)
  assert cfg == program.cfg.model and facts == info
  # The merged export is the base with A B folded in, nothing else.
  expected = lora_model.merge_params(
    jax.device_get(program.frozen["base"]),
    jax.device_get(state.params),
    program.cfg.model,
  )
  for (p, x), (_, y) in zip(
    jax.tree_util.tree_leaves_with_path(merged),
    jax.tree_util.tree_leaves_with_path(expected),
  ):
    np.testing.assert_allclose(x, y, rtol=1e-6, err_msg=str(p))
  assert (
    np.abs(
      merged["layers"]["mlp"]["linear"]["w"]
      - jax.device_get(program.frozen["base"]["layers"]["mlp"]["linear"]["w"])
    ).max()
    > 0
  )


@pytest.mark.slow
def test_resume_refuses_another_base_and_accepts_a_moved_copy(lora_run):
  _root, program, info, _, _, _ = lora_run
  lora.check_base(info, dict(info, path="/elsewhere/base"), 2)
  random_base = lora.install_base(program, None)
  with pytest.raises(
    ConfigError,
    match=r"step 2 trained its adapters on base "
    r".*base, and this run's base \(random init\) differs at",
  ):
    lora.check_base(info, random_base, 2)
  lora.install_base(program, info["path"])  # leave the fixture as it was


@pytest.mark.slow
def test_qlora_holds_the_frozen_base_as_int4():
  cfg = run_config(
    {
      "lora": {"rank": 2, "targets": ["q", "v"]},
      "quant": {"bits": 4, "block_size": 16, "weights": "int"},
    }
  )
  program = TrainProgram(cfg)
  abstract = program.abstract_frozen["base"]["layers"]["attn"]["q_einsum"]
  assert str(abstract["w"].dtype) == "int4"
  assert abstract["scale"].shape == (2, 2, 2, 16)
  lora.install_base(program, None)
  held = program.frozen["base"]["layers"]["attn"]["q_einsum"]["w"]
  values = np.asarray(held).astype(np.int8)
  assert values.min() >= -7 and values.max() <= 7 and values.any()


@pytest.mark.tpu_compile
def test_the_9b_pod_config_holds_per_device_only_the_adapters_moments():
  # The shardings `gemma-jax compile` reports for configs/pods (no compile).
  pytest.importorskip("libtpu", reason="TPU topologies need the tpu extra")
  from gemma_jax.sharding.mesh import make_mesh
  from gemma_jax.train import aot
  from gemma_jax.train.config import load_config

  cfg = load_config("configs/pods/gemma2-9b-lora-v4.yaml")
  full_cfg = dataclasses.replace(
    cfg, model=dataclasses.replace(cfg.model, lora=None)
  )
  devices = aot.topology_devices("v4:4x4x8")
  adapted, full = (
    TrainProgram(c, make_mesh(c.mesh, devices)) for c in (cfg, full_cfg)
  )
  per_device = aot._leaf_bytes  # the largest shard of every leaf
  moments = per_device(adapted.abstract_state.opt_state)
  # Two float32 moments per adapter parameter, split over all 128 chips.
  count = sum(np.prod(s) for s in lora_model.adapter_paths(cfg.model).values())
  assert 2 * 4 * count / 128 <= moments <= 1.05 * 2 * 4 * count / 128
  assert per_device(full.abstract_state.opt_state) / moments > 100
  # The frozen base is the full run's params, sharded the same way.
  assert per_device(adapted.abstract_frozen["base"]) == per_device(
    full.abstract_state.params
  )
