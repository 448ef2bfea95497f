"""Typed, frozen configs built from plain dicts, with errors that name the key.

Every config in gemma_jax is a frozen dataclass. `from_dict` builds one from a
nested dict (parsed YAML), checking each key and value against the field's
type hint, so that an unknown key or a wrong type fails at load time with the
dotted path of the key and the valid choices. `apply_overrides` edits a nested
dict with `key.sub=value` strings from the command line before it is built.
"""

import dataclasses
import math
import os
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

from gemma_jax.errors import ConfigError

# A YAML 1.2 number that PyYAML (YAML 1.1) leaves as a string, e.g. 1e-3.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp) -> str:
  if typing.get_origin(tp) is Literal:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
  """Checks `value` against type hint `tp` and converts lists to tuples."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if tp is Any:
    return value
  if origin in (Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _convert(value, arg, path)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(
      errors[0]
      if len(errors) == 1
      else f"{path}: {value!r} is not a valid {_type_name(tp)}"
    )
  if origin is Literal:
    if value not in args:
      raise ConfigError(
        f"{path}: {value!r} is not a valid choice; valid "
        f"choices: {', '.join(repr(a) for a in args)}"
      )
    return value
  if isinstance(tp, type) and dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, dict):
      raise ConfigError(
        f"{path}: expected a mapping for {tp.__name__}, got {value!r}"
      )
    return from_dict(tp, value, path)
  if origin in (tuple, list):
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
      raise ConfigError(f"{path}: expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(
        _convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)
      )
    if args and len(args) != len(value):
      raise ConfigError(f"{path}: expected {len(args)} items, got {value!r}")
    if not args:
      return tuple(value)
    return tuple(
      _convert(v, a, f"{path}[{i}]")
      for i, (v, a) in enumerate(zip(value, args))
    )
  if origin is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"{path}: expected a mapping, got {value!r}")
    kt, vt = args
    return {
      _convert(k, kt, f"{path}"): _convert(v, vt, f"{path}.{k}")
      for k, v in value.items()
    }
  if tp is float:
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
      value = float(value)  # PyYAML reads `1e-3` (no dot) as a string
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{path}: expected a number, got {value!r}")
    if not math.isfinite(value):
      raise ConfigError(f"{path}: must be a finite number, got {value!r}")
    return float(value)
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{path}: expected an integer, got {value!r}")
    return value
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{path}: expected true or false, got {value!r}")
    return value
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value
  raise TypeError(f"{path}: unsupported config type {tp}")


def from_dict(cls, data: dict, path: str = ""):
  """Builds dataclass `cls` from a nested dict; unknown keys are errors, and
  so are keys a config class lists in its `REMOVED_KEYS` {key: reason}."""
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  prefix = f"{path}." if path else ""
  removed = getattr(cls, "REMOVED_KEYS", {})
  for key in sorted(set(data) & set(removed)):
    raise ConfigError(f"{prefix}{key} was removed: {removed[key]}")
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise ConfigError(
      f"unknown key '{prefix}{unknown[0]}'; valid keys under "
      f"'{path or '<top>'}': {', '.join(sorted(fields))}"
    )
  kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
  missing = [
    n
    for n, f in fields.items()
    if n not in kwargs
    and f.default is dataclasses.MISSING
    and f.default_factory is dataclasses.MISSING
  ]
  if missing:
    raise ConfigError(f"missing required key '{prefix}{missing[0]}'")
  try:
    return cls(**kwargs)
  except ConfigError as e:
    # Validation inside __post_init__ names the field; add the section path.
    msg = str(e)
    raise ConfigError(
      msg if not path or msg.startswith(path) else f"{prefix}{msg}"
    ) from None


def check_ranges(config, section: str, **ranges) -> None:
  """ConfigError naming `section.key` for the first field of `config` out
  of its range. Each range is (low, high): inclusive bounds, None for none;
  a high bound given as a one-item list is exclusive ([1.0]: below 1).
  None values (a field's "unset") are not checked. For __post_init__."""
  for key, (low, high) in ranges.items():
    value = getattr(config, key)
    if value is None:
      continue
    below = isinstance(high, list)
    top = high[0] if below else high
    if (low is None or value >= low) and (
      top is None or (value < top if below else value <= top)
    ):
      continue
    if top is None:
      raise ConfigError(f"{section}.{key} must be >= {low}, got {value}")
    bounds = f"[{low}, {top}{')' if below else ']'}"
    raise ConfigError(f"{section}.{key} must be in {bounds}, got {value}")


def to_dict(config) -> dict:
  """Inverse of `from_dict`: plain, YAML/JSON-serialisable nested data."""

  def plain(v):
    if dataclasses.is_dataclass(v):
      return {
        f.name: plain(getattr(v, f.name))
        for f in dataclasses.fields(v)
        if f.init
      }
    if isinstance(v, (list, tuple)):
      return [plain(x) for x in v]
    if isinstance(v, dict):
      return {k: plain(x) for k, x in v.items()}
    return v

  return plain(config)


def parse_override(text: str) -> tuple[list[str], Any]:
  """'a.b.c=value' -> (['a', 'b', 'c'], parsed YAML value)."""
  key, sep, raw = text.partition("=")
  if not sep or not key.strip():
    raise ConfigError(f"override {text!r} is not of the form key.path=value")
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError as e:
    raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
  return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
  """Returns a copy of nested dict `data` with dotted overrides applied."""
  import copy

  data = copy.deepcopy(data)
  for text in overrides:
    keys, value = parse_override(text)
    node = data
    for k in keys[:-1]:
      if not isinstance(node.setdefault(k, {}), dict):
        raise ConfigError(f"override {text!r}: '{k}' is not a section")
      node = node[k]
    node[keys[-1]] = value
  return data


def _read_yaml(path):
  try:
    with open(os.path.expanduser(os.fspath(path)), encoding="utf-8") as f:
      return yaml.safe_load(f)
  except FileNotFoundError:
    raise ConfigError(f"config file not found: {path}") from None
  except IsADirectoryError:
    raise ConfigError(
      f"config file {path} is a directory; give the path of a YAML file"
    ) from None
  except UnicodeDecodeError as e:
    raise ConfigError(
      f"config file {path} is not UTF-8 text (byte "
      f"{e.start}); give the path of a YAML file"
    ) from None
  except OSError as e:
    raise ConfigError(
      f"config file {path}: cannot read it ({e.strerror or e})"
    ) from None
  except yaml.YAMLError as e:
    # PyYAML's message spans lines (the offending line and a caret).
    first = str(e).strip().splitlines()
    raise ConfigError(
      f"config file {path} is not valid YAML: "
      f"{' '.join(x.strip() for x in first)}"
    ) from None


def load_yaml(path) -> dict:
  """A YAML file whose top level is a mapping ({} when empty)."""
  data = _read_yaml(path)
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(f"config file {path}: top level must be a mapping")
  return data


def load_yaml_list(path) -> list:
  """A YAML file whose top level is a list."""
  data = _read_yaml(path)
  if not isinstance(data, list):
    raise ConfigError(f"{path}: top level must be a list")
  return data
