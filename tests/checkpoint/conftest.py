"""Shared helpers: HF directories written from the committed parity fixtures."""

import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import save_file

PARITY = pathlib.Path(__file__).parents[1] / "fixtures" / "parity"


def write_hf_dir(name: str, directory: pathlib.Path, config_edit=None):
  """Writes fixture `name` as an HF directory; returns (npz data, state)."""
  data = np.load(PARITY / f"{name}.npz")
  config = json.loads(str(data["config_json"]))
  if config_edit:
    config_edit(config)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  state = {k[3:]: data[k] for k in data.files if k.startswith("hf/")}
  save_file(state, str(directory / "model.safetensors"))
  return data, state


@pytest.fixture
def hf_dir(tmp_path):
  def make(name="gemma2_gqa_window", config_edit=None, sub="hf"):
    data, state = write_hf_dir(name, tmp_path / sub, config_edit)
    return tmp_path / sub, data, state
  return make
