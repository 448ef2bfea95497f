"""`hf_dir`: an HF directory written from a committed parity fixture."""

import pathlib

import pytest

from gemma_jax.checkpoint.testing import write_hf_dir

PARITY = pathlib.Path(__file__).parents[1] / "fixtures" / "parity"


@pytest.fixture
def hf_dir(tmp_path):
  def make(name="gemma2_gqa_window", config_edit=None, sub="hf"):
    data, state = write_hf_dir(PARITY / f"{name}.npz", tmp_path / sub,
                               config_edit)
    return tmp_path / sub, data, state
  return make
