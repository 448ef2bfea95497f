"""configlib: numbers as YAML writes them, and non-finite values refused."""

import dataclasses

import pytest
import yaml

from gemma_jax import configlib
from gemma_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Cfg:
  rate: float = 1.0
  clip: float | None = None


@pytest.mark.parametrize(
  "text, value",
  [
    ("1e-3", 1e-3),
    ("1E+2", 100.0),
    ("-.5e-3", -5e-4),
    ("3", 3.0),
    ("2.5", 2.5),
  ],
)
def test_yaml_1_2_numbers_that_pyyaml_reads_as_strings_are_numbers(
  tmp_path, text, value
):
  path = tmp_path / "c.yaml"
  path.write_text(f"rate: {text}\nclip: {text}\n")
  cfg = configlib.from_dict(Cfg, configlib.load_yaml(path))
  assert cfg.rate == value and isinstance(cfg.rate, float)
  assert cfg.clip == value


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "nan", "inf"])
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, text):
  path = tmp_path / "c.yaml"
  path.write_text(f"rate: {text}\n")
  with pytest.raises(
    ConfigError, match="rate: (must be a finite number|expected a number)"
  ):
    configlib.from_dict(Cfg, configlib.load_yaml(path))
  with pytest.raises(
    ConfigError, match="clip: (must be a finite number|expected a number)"
  ):
    configlib.from_dict(Cfg, {"clip": yaml.safe_load(text)})


def test_a_string_that_is_not_a_number_is_named():
  with pytest.raises(ConfigError, match="rate: expected a number, got '1e-3x'"):
    configlib.from_dict(Cfg, {"rate": "1e-3x"})


def test_unreadable_config_files_are_one_line_errors(tmp_path):
  with pytest.raises(ConfigError, match="is a directory"):
    configlib.load_yaml(tmp_path)
  (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00rate")
  with pytest.raises(ConfigError, match="not UTF-8 text"):
    configlib.load_yaml(tmp_path / "bin.yaml")
  (tmp_path / "bad.yaml").write_text("a: [1,\n  b: 2\n")
  with pytest.raises(ConfigError) as info:
    configlib.load_yaml(tmp_path / "bad.yaml")
  assert "\n" not in str(info.value)


def test_check_ranges_names_the_key_and_the_bounds():
  import dataclasses

  import pytest

  from gemma_jax import configlib
  from gemma_jax.errors import ConfigError

  @dataclasses.dataclass(frozen=True)
  class Section:
    a: float = 0.5
    b: float | None = None

  def check(**values):
    configlib.check_ranges(Section(**values), "s", a=(0, [1]), b=(0, None))

  check(a=0.0, b=None)
  check(a=0.99, b=3.0)
  with pytest.raises(ConfigError, match=r"^s.a must be in \[0, 1\), got 1$"):
    check(a=1)
  with pytest.raises(ConfigError, match=r"^s.b must be >= 0, got -2$"):
    check(b=-2)
