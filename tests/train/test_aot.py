"""Ahead-of-time compiles for TPU topologies (needs the `tpu` extra)."""

import json

import pytest
import yaml

from gemma_jax import cli, hardware
from gemma_jax.model.testing import TINY_GEMMA2_WIDE, model_section
from gemma_jax.train import aot

pytest.importorskip("libtpu", reason="AOT compiles need the tpu extra")

TINY = {
  "model": model_section(
    TINY_GEMMA2_WIDE,
    sliding_window=16,
    dtype="bfloat16",
    remat_policy="full",
  ),
  "mesh": {"ici_data": -1, "ici_tensor": 2},
  "data": {"seq_len": 64},
  "train": {"batch_size": 8, "microbatches": 2},
}


def compile_cli(tmp_path, capsys, config, *args):
  path = tmp_path / "run.yaml"
  path.write_text(yaml.safe_dump(config))
  code = cli.main(["compile", str(path), *args, "--json"])
  return code, json.loads(capsys.readouterr().out)


@pytest.mark.tpu_compile
def test_tiny_step_compiles_for_v5e_2x2_and_reports_per_device(
  tmp_path, capsys
):
  code, r = compile_cli(tmp_path, capsys, TINY, "--topology", "v5e:2x2")
  assert code == 0 and r["fits"] and r["devices"] == 4
  assert r["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
  assert r["hbm_bytes_per_device"] == int(15.75 * 2**30)
  assert 0 < r["peak_bytes_per_device"] < r["hbm_bytes_per_device"]
  # Every layer and microbatch counted: near the analytic count (which
  # leaves out full remat's recompute and the masked half of attention).
  ratio = r["flops_per_device"] / r["analytic_flops_per_device"]
  assert 1.0 < ratio < 1.8, ratio
  assert r["flops_per_device"] > 1.5 * r["compiler_flops_per_device"]
  # Tensor parallelism all-reduces activations; data parallelism gradients.
  assert r["collectives"].get("all-reduce", 0) > 0


@pytest.mark.tpu_compile
def test_a_step_that_does_not_fit_says_so_and_fails(tmp_path, capsys):
  big = dict(
    TINY,
    model=dict(
      TINY["model"],
      d_model=4096,
      mlp_dim=65536,
      num_heads=16,
      head_dim=256,
      num_kv_heads=16,
    ),
    mesh={"ici_data": -1},
  )
  code, r = compile_cli(
    tmp_path, capsys, big, "--topology", "v5e:2x2", "--no-flop-scaling"
  )
  assert code == 1 and r["fits"] is False
  assert "HBM" in r["error"] or "memory" in r["error"]
  assert r["peak_bytes_per_device"] > r["hbm_bytes_per_device"]


def test_collectives_are_counted_from_hlo():
  hlo = (
    "%a = f32[8] all-reduce-start(%x)\n%b = f32[8] all-reduce-done(%a)\n"
    "%c = bf16[4,8] all-gather(%y), dimensions={0}\n"
  )
  assert aot.count_collectives(hlo) == {"all-reduce": 1, "all-gather": 1}


@pytest.mark.tpu_compile
def test_fisher_compile_only_reports_the_same_fit_keys(tmp_path, capsys):
  path = tmp_path / "run.yaml"
  path.write_text(yaml.safe_dump(TINY))
  code = cli.main(["fisher", str(path), "--topology", "v5e:2x2"])
  r = json.loads(capsys.readouterr().out)
  assert code == 0 and r["fits"]
  assert 0 < r["peak_bytes_per_device"] < r["hbm_bytes_per_device"]
  assert r["compile_s"] > 0


def _raises(message):
  def lower():
    raise RuntimeError(message)

  return lower


V5E = hardware.parse_topology("v5e:2x2")[0]


@pytest.mark.parametrize(
  "message",
  [
    "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory "
    "in memory space hbm. Used 139.39G of 15.75G hbm.\n"
    "Total hbm usage >= 139.39G: required for HLO temporaries (139.39G) ...",
    "INTERNAL: Ran out of memory in memory space hbm; program requires "
    "more than is available; required for HLO temporaries (139.39G)",
  ],
)
def test_running_out_of_memory_is_a_report_in_either_words(message):
  compiled, r = aot.fit_report(_raises(message), V5E)
  assert compiled is None and r["fits"] is False
  assert r["error"] == message.splitlines()[0]
  assert r["peak_bytes_per_device"] == int(139.39 * 2**30)
  assert set(r) == {"fits", "error", "peak_bytes_per_device", "compile_s"}


def test_other_compile_errors_are_raised():
  with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
    aot.fit_report(_raises("INVALID_ARGUMENT: bad sharding"), V5E)


def test_a_program_that_fits_reports_its_peak():
  import jax
  import jax.numpy as jnp

  lowered = jax.jit(lambda x: x @ x).lower(jnp.ones((64, 64)))
  compiled, r = aot.fit_report(lambda: lowered, V5E)
  peak = compiled.memory_analysis().peak_memory_in_bytes
  assert r["fits"] and r["peak_bytes_per_device"] == peak > 0
  assert set(r) == {"fits", "peak_bytes_per_device", "compile_s"}
