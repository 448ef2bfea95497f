"""gemma-jax convert: every direction, round trips, errors (exit code 2)."""

import json

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from gemma_jax import cli
from gemma_jax.checkpoint import hf, layout, native
from gemma_jax.checkpoint.testing import official_checkpoint
from gemma_jax.model import preset
from gemma_jax.model.testing import TINY_GEMMA2_PADDED, model_section


def convert(*argv):
  return cli.main(["convert", *map(str, argv)])


def test_hf_to_native_to_hf_gives_identical_tensors(hf_dir, tmp_path):
  src, _, state = hf_dir("gemma1_mha_wide_heads")
  assert convert("--from", "hf", "--to", "native", src, tmp_path / "n") == 0
  _, cfg = native.load(tmp_path / "n")
  assert cfg.num_kv_heads == cfg.num_heads == 4 and cfg.head_dim == 16
  assert (
    convert(
      "--from",
      "native",
      "--to",
      "hf",
      "--max-shard-size",
      "60KB",
      tmp_path / "n",
      tmp_path / "hf2",
    )
    == 0
  )
  assert (tmp_path / "hf2" / hf.INDEX).exists()  # 132 KB -> sharded
  back = {}
  for f in (tmp_path / "hf2").glob("*.safetensors"):
    back.update(load_file(str(f)))
  assert sorted(back) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_kaggle_to_native_to_hf_to_native(tmp_path):
  official_checkpoint(
    tmp_path / "k", TINY_GEMMA2_PADDED, transposed_gating=True
  )
  model = tmp_path / "model.yaml"
  model.write_text(yaml.safe_dump({"model": model_section(TINY_GEMMA2_PADDED)}))
  assert (
    convert(
      "--from",
      "kaggle",
      "--to",
      "native",
      "--model",
      model,
      tmp_path / "k",
      tmp_path / "n1",
    )
    == 0
  )
  assert (
    convert("--from", "native", "--to", "hf", tmp_path / "n1", tmp_path / "hf")
    == 0
  )
  # Back from HF into the padded-embedding config.
  assert (
    convert(
      "--from",
      "hf",
      "--to",
      "native",
      "--model",
      model,
      tmp_path / "hf",
      tmp_path / "n2",
    )
    == 0
  )
  p1, c1 = native.load(tmp_path / "n1")
  p2, c2 = native.load(tmp_path / "n2")
  assert c1 == c2 and c1.num_embed_rows == 160
  p2 = dict(layout.flatten(p2))
  for path, value in layout.flatten(p1):
    np.testing.assert_array_equal(p2[path], value, err_msg=path)


def test_dtype_option(hf_dir, tmp_path):
  src, _, _ = hf_dir()
  assert (
    convert(
      "--from",
      "hf",
      "--to",
      "native",
      "--dtype",
      "bfloat16",
      src,
      tmp_path / "n",
    )
    == 0
  )
  params, cfg = native.load(tmp_path / "n")
  assert cfg.param_dtype == "bfloat16"
  assert params["layers"]["mlp"]["linear"]["w"].dtype.name == "bfloat16"
  assert (
    convert("--from", "native", "--to", "hf", tmp_path / "n", tmp_path / "out")
    == 0
  )
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["dtype"] == "bfloat16"


@pytest.mark.parametrize(
  "argv, message, code",
  [
    (["--from", "kaggle", "--to", "native"], "--from kaggle needs --model", 2),
    (
      ["--from", "hf", "--to", "native", "--model", "gemma2-2b"],
      "num_layers: --model gemma2-2b has 26",
      2,
    ),
    (
      ["--from", "hf", "--to", "native", "--model", "nope"],
      "neither a preset",
      2,
    ),
    (
      ["--from", "native", "--to", "hf"],
      "not a native gemma_jax checkpoint",
      1,
    ),
  ],
)
def test_errors_are_one_line_naming_the_problem(
  hf_dir, tmp_path, capsys, argv, message, code
):
  src, _, _ = hf_dir()
  assert convert(*argv, src, tmp_path / "out") == code
  err = capsys.readouterr().err
  assert message in err
  assert err.count("\n") == 1
  assert not (tmp_path / "out").exists()


def test_existing_destination_needs_force(hf_dir, tmp_path, capsys):
  src, _, _ = hf_dir()
  (tmp_path / "n").mkdir()
  assert convert("--from", "hf", "--to", "native", src, tmp_path / "n") == 2
  assert "already exists" in capsys.readouterr().err
  assert (
    convert("--from", "hf", "--to", "native", "--force", src, tmp_path / "n")
    == 0
  )


@pytest.fixture
def run_export(tmp_path):
  """A run directory: RUN/params (native) and RUN/config.yaml naming the
  tokenizer in data.tokenizer."""
  from gemma_jax.data import testing

  tok = testing.tiny_tokenizer(tmp_path / "tok" / "tokenizer.model")
  cfg = preset("tiny-gemma", num_layers=1, vocab_size=512)
  params = layout.unflatten(
    {p: np.zeros(s, np.float32) for p, s in layout.param_shapes(cfg).items()}
  )
  native.save(tmp_path / "run" / "params", params, cfg)
  (tmp_path / "run" / "config.yaml").write_text(
    yaml.safe_dump(
      {"model": {"preset": "tiny-gemma"}, "data": {"tokenizer": tok}}
    )
  )
  return tmp_path / "run", tok


def test_to_hf_writes_the_given_tokenizer(run_export, tmp_path, capsys):
  run, tok = run_export
  other = tmp_path / "copy.model"
  other.write_bytes(open(tok, "rb").read())
  assert (
    convert(
      "--from",
      "native",
      "--to",
      "hf",
      "--tokenizer",
      other,
      run / "params",
      tmp_path / "hf",
    )
    == 0
  )
  assert json.loads(capsys.readouterr().out)["tokenizer"] == str(other)
  assert (
    tmp_path / "hf" / "tokenizer.model"
  ).read_bytes() == other.read_bytes()
  assert (tmp_path / "hf" / "tokenizer_config.json").exists()


def test_a_runs_params_export_brings_its_tokenizer(
  run_export, tmp_path, capsys
):
  run, tok = run_export
  assert (
    convert("--from", "native", "--to", "hf", run / "params", tmp_path / "hf")
    == 0
  )
  assert json.loads(capsys.readouterr().out)["tokenizer"] == tok
  assert (tmp_path / "hf" / "special_tokens_map.json").exists()
  # Without a run config beside it there is nothing to find.
  native.save(tmp_path / "bare", *native.load(run / "params"))
  assert (
    convert(
      "--from", "native", "--to", "hf", tmp_path / "bare", tmp_path / "hf2"
    )
    == 0
  )
  assert not (tmp_path / "hf2" / "tokenizer.model").exists()


def test_tokenizer_only_goes_with_to_hf(run_export, tmp_path, capsys):
  run, tok = run_export
  assert (
    convert(
      "--from",
      "native",
      "--to",
      "native",
      "--tokenizer",
      tok,
      run / "params",
      tmp_path / "n",
    )
    == 2
  )
  assert "--tokenizer goes with --to hf" in capsys.readouterr().err


def test_a_gs_runs_params_export_brings_its_tokenizer(
  run_export, gcs_bucket, tmp_path, capsys
):
  from gemma_jax import fileio

  run, tok = run_export
  fileio.copy_tree(run, f"{gcs_bucket}/run")
  src = f"{gcs_bucket}/run/params"
  assert convert("--from", "native", "--to", "hf", src, tmp_path / "hf") == 0
  assert json.loads(capsys.readouterr().out)["tokenizer"] == tok
  assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (
    open(tok, "rb").read()
  )


def test_a_run_whose_tokenizer_is_gone_says_the_export_has_none(
  run_export, tmp_path, capsys
):
  run, _ = run_export
  (run / "config.yaml").write_text(
    yaml.safe_dump({"data": {"tokenizer": str(tmp_path / "gone.model")}})
  )
  assert (
    convert("--from", "native", "--to", "hf", run / "params", tmp_path / "hf")
    == 0
  )
  out, err = capsys.readouterr()
  assert json.loads(out)["tokenizer"] is None
  assert err.count("\n") == 1 and "gone.model" in err
  assert "pass --tokenizer PATH" in err
  assert not (tmp_path / "hf" / "tokenizer.model").exists()


def test_to_gguf_writes_one_file_with_the_runs_tokenizer(
  run_export, tmp_path, capsys
):
  pytest.importorskip("gguf")
  run, tok = run_export
  out = tmp_path / "m.gguf"
  argv = ["--from", "native", "--to", "gguf", "--gguf-type", "q8_0"]
  assert convert(*argv, run / "params", out) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["gguf_type"] == "q8_0" and summary["tokenizer"] == tok
  assert summary["bytes"] == out.stat().st_size
  assert out.read_bytes()[:4] == b"GGUF"
  # Without a tokenizer (a bare checkpoint) there is no vocabulary to write.
  bare = tmp_path / "bare"
  bare.mkdir()
  (run / "params").rename(bare / "params")
  assert convert("--from", "native", "--to", "gguf", bare / "params", out) == 2
  assert "--to gguf needs the tokenizer" in capsys.readouterr().err
  argv = ["--from", "native", "--to", "hf", "--gguf-type", "f16"]
  assert convert(*argv, bare / "params", tmp_path / "hf") == 2
  assert "--gguf-type goes with --to gguf" in capsys.readouterr().err
