"""gemma-jax merge: the command line, its summary and its one-line errors."""

import json

import numpy as np
import pytest

from gemma_jax import cli
from gemma_jax.checkpoint import layout, native
from gemma_jax.checkpoint.testing import random_flat
from gemma_jax.model.testing import TINY_GEMMA1_MQA

CFG = TINY_GEMMA1_MQA


def merge(*argv):
  return cli.main(["merge", *map(str, argv)])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli_merge")
  out = {}
  for seed, name in enumerate(("a", "b", "base")):
    flat = random_flat(CFG, seed)
    native.save(root / name, layout.unflatten(flat), CFG)
    out[name] = (root / name, flat)
  return out


def test_weighted_average_and_its_summary(ckpts, tmp_path, capsys):
  (a, fa), (b, fb) = ckpts["a"], ckpts["b"]
  assert (
    merge(a, b, "--weights", "1", "3", "--normalize", "--out", tmp_path / "m")
    == 0
  )
  summary = json.loads(capsys.readouterr().out)
  assert summary["weights"] == [0.25, 0.75]
  assert summary["method"] == "linear" and summary["dtype"] == "float32"
  assert summary["params"] == CFG.param_count()
  params, _ = native.load(tmp_path / "m")
  for p, x in layout.flatten(params):
    np.testing.assert_allclose(
      x, 0.25 * fa[p] + 0.75 * fb[p], rtol=1e-6, atol=1e-6
    )


def test_slerp_with_eta(ckpts, tmp_path, capsys):
  (a, _), (b, _), (base, _) = ckpts["a"], ckpts["b"], ckpts["base"]
  assert (
    merge(
      a,
      b,
      "--method",
      "slerp",
      "--base",
      base,
      "--t",
      "0.25",
      "--eta",
      "0.5",
      "--out",
      tmp_path / "w",
    )
    == 0
  )
  summary = json.loads(capsys.readouterr().out)
  assert (summary["t"], summary["eta"]) == (0.25, 0.5)
  assert native.load_config(tmp_path / "w") == CFG


@pytest.mark.parametrize(
  "argv, message, code",
  [
    (
      ["--weights", "0.5", "0.6"],
      "--weights sum to 1.1; without --base "
      "they must sum to 1 (pass --normalize",
      2,
    ),
    (
      ["--eta", "2", "--base", "{base}"],
      r"--eta must be in [0, 1], got 2.0",
      2,
    ),
    (
      ["--method", "slerp"],
      "slerp merges exactly 2 checkpoints relative to --base",
      2,
    ),
    (["--base", "{missing}"], "is not a native gemma_jax checkpoint", 1),
    (
      ["--to", "hf", "--max-shard-size", "lots"],
      "--max-shard-size: cannot parse 'lots'",
      2,
    ),
  ],
)
def test_errors_are_one_line(ckpts, tmp_path, capsys, argv, message, code):
  paths = {"base": ckpts["base"][0], "missing": tmp_path / "nope"}
  argv = [x.format(**paths) for x in argv]
  assert (
    merge(ckpts["a"][0], ckpts["b"][0], *argv, "--out", tmp_path / "out")
    == code
  )
  err = capsys.readouterr().err
  assert err.startswith("gemma-jax merge: error: ")
  assert message in err
  assert err.count("\n") == 1
  assert not (tmp_path / "out").exists()
