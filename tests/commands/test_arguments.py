"""Numbers on the command line: checked when parsed, refused in one line."""

import argparse

import pytest

from gemma_jax import cli
from gemma_jax.commands import number_type, positive_int, unit_float


@pytest.mark.parametrize(
  "parse, text, message",
  [
    (positive_int, "0", "must be >= 1, got 0"),
    (positive_int, "2.5", "expected an integer, got '2.5'"),
    (unit_float, "nan", "must be a finite number, got 'nan'"),
    (unit_float, "-inf", "must be a finite number, got '-inf'"),
    (unit_float, "1.01", "must be <= 1.0, got 1.01"),
    (number_type(float, above=0.0), "0", "must be > 0.0, got 0"),
  ],
)
def test_a_bad_number_is_refused_naming_why(parse, text, message):
  with pytest.raises(argparse.ArgumentTypeError, match=message):
    parse(text)


def test_good_numbers_pass():
  assert positive_int("3") == 3
  assert unit_float("0.25") == 0.25


def test_a_usage_error_is_one_line_without_the_usage(capsys):
  rc = cli.main(["merge", "a", "b", "--out", "c", "--weights", "nan", "1"])
  err = capsys.readouterr().err
  assert rc == 2
  assert err == (
    "gemma-jax merge: error: argument --weights: must be a finite number, "
    "got 'nan'\n"
  )
