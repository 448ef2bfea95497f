"""Merging checkpoints: the formulas (merge_math) and the streamed merge."""

import dataclasses
import json
import math

import ml_dtypes
import numpy as np
import pytest

from gemma_jax.checkpoint import hf, layout, merge, merge_math, native
from gemma_jax.checkpoint.testing import random_flat
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model import preset
from gemma_jax.model.testing import TINY_GEMMA2_MQA

BF16 = ml_dtypes.bfloat16
CFG = dataclasses.replace(TINY_GEMMA2_MQA, vocab_size=96)


def save(path, flat, cfg=CFG):
  dtype = next(iter(flat.values())).dtype.name
  native.save(
    path, layout.unflatten(flat), dataclasses.replace(cfg, param_dtype=dtype)
  )
  return path


def load_flat(path):
  params, cfg = native.load(path)
  return dict(layout.flatten(params)), cfg


def slerp_reference(a, b, t):
  """Shoemake's formula on the task vectors, float64, angle from arccos."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  cos = np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)
  w = math.acos(np.clip(cos, -1, 1))
  return (math.sin((1 - t) * w) * a + math.sin(t * w) * b) / math.sin(w)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """Three random float32 checkpoints of CFG: a, b and a base."""
  root = tmp_path_factory.mktemp("merge_inputs")
  flats = {n: random_flat(CFG, i) for i, n in enumerate(("a", "b", "base"))}
  return {n: (save(root / n, f), f) for n, f in flats.items()}


# --- The formulas ----------------------------------------------------------


def test_linear_is_the_weighted_average():
  rng = np.random.default_rng(0)
  xs = [rng.standard_normal((7, 5)).astype(np.float32) for _ in range(3)]
  w = (0.2, 0.3, 0.5)
  np.testing.assert_allclose(
    merge_math.linear(xs, w),
    sum(wi * x for wi, x in zip(w, xs)),
    rtol=1e-6,
    atol=1e-6,
  )
  base = rng.standard_normal((7, 5)).astype(np.float32)
  np.testing.assert_allclose(
    merge_math.linear(xs, (0.7, 0.7, 0.1), anchor=base),
    base + sum(wi * (x - base) for wi, x in zip((0.7, 0.7, 0.1), xs)),
    rtol=1e-6,
    atol=1e-6,
  )


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_linear_merge_of_identical_tensors_is_bitwise_the_identity(dtype):
  x = np.random.default_rng(1).standard_normal(4096).astype(dtype)
  for w in [(0.2, 0.3, 0.5), (1 / 3,) * 3, (1.5, -0.25, -0.25)]:
    out = np.empty_like(x)
    merge.merge_into(
      out, merge.resolve(merge.Recipe(weights=w), 3, False), [x, x, x], None
    )
    np.testing.assert_array_equal(out, x)
  # Why the merge works on differences: the plain float32 sum is not exact.
  naive = sum(np.float32(w) * x.astype(np.float32) for w in (0.2, 0.3, 0.5))
  assert dtype is BF16 or not np.array_equal(naive, x)


def test_slerp_matches_the_formula_and_hits_its_endpoints():
  rng = np.random.default_rng(2)
  a, b = (rng.standard_normal((33, 17)).astype(np.float32) for _ in range(2))
  for t in (0.0, 0.25, 0.5, 0.9, 1.0):
    np.testing.assert_allclose(
      merge_math.slerp(a, b, t), slerp_reference(a, b, t), rtol=1e-5, atol=1e-5
    )
  np.testing.assert_array_equal(merge_math.slerp(a, b, 0.0), a)
  np.testing.assert_array_equal(merge_math.slerp(a, b, 1.0), b)


@pytest.mark.parametrize("dtype, atol", [(BF16, 0.0), (np.float32, 5e-7)])
def test_slerp_endpoints_of_a_merge_are_the_inputs(dtype, atol):
  rng = np.random.default_rng(9)
  xa, xb, base = (rng.standard_normal((40, 24)).astype(dtype) for _ in range(3))
  for t, expected in ((0.0, xa), (1.0, xb)):
    out = np.empty_like(xa)
    merge.merge_into(
      out, merge.resolve(merge.Recipe("slerp", t=t), 2, True), [xa, xb], base
    )
    np.testing.assert_allclose(
      out.astype(np.float32), expected.astype(np.float32), rtol=0, atol=atol
    )


def test_slerp_keeps_the_norm_of_equal_norm_vectors_where_lerp_shrinks_it():
  rng = np.random.default_rng(3)
  a, b = (rng.standard_normal(1000).astype(np.float32) for _ in range(2))
  b *= np.linalg.norm(a) / np.linalg.norm(b)
  w = merge_math.angle(a, b)
  for t in (0.25, 0.5, 0.75):
    assert np.linalg.norm(merge_math.slerp(a, b, t)) == pytest.approx(
      np.linalg.norm(a), rel=1e-5
    )
  assert np.linalg.norm(merge_math.lerp(a, b, 0.5)) == pytest.approx(
    np.linalg.norm(a) * math.cos(w / 2), rel=1e-5
  )


@pytest.mark.parametrize("scale", [2.5, -0.5, 0.0])
def test_slerp_of_parallel_antiparallel_or_zero_vectors_is_linear(scale):
  a = np.random.default_rng(4).standard_normal(500).astype(np.float32)
  b = np.float32(scale) * a
  for t in (0.0, 0.3, 0.7, 1.0):
    np.testing.assert_array_equal(
      merge_math.slerp(a, b, t), merge_math.lerp(a, b, t)
    )
    np.testing.assert_allclose(
      merge_math.slerp(a, b, t), (1 - t) * a + t * b, rtol=1e-6, atol=1e-6
    )


def test_angle_is_accurate_for_nearly_parallel_vectors():
  rng = np.random.default_rng(5)
  a = rng.standard_normal(10_000).astype(np.float32)
  o = rng.standard_normal(10_000)
  o -= np.dot(o, a) / np.dot(a, a) * a  # orthogonal to a
  o *= 3e-4 * np.linalg.norm(a) / np.linalg.norm(o)
  b = (a + o).astype(np.float32)
  expected = math.atan(3e-4)
  assert merge_math.angle(a, b) == pytest.approx(expected, rel=1e-3)
  # arccos of the float32 cosine would be off by a large factor here.
  cos32 = np.float32(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
  assert abs(math.acos(min(1.0, cos32)) - expected) > 0.1 * expected


def test_interpolation_toward_the_base():
  rng = np.random.default_rng(6)
  base, merged = (rng.standard_normal(300).astype(np.float32) for _ in range(2))
  np.testing.assert_array_equal(merge_math.toward_base(base, merged, 0.0), base)
  np.testing.assert_array_equal(
    merge_math.toward_base(base, merged, 1.0), merged
  )
  np.testing.assert_allclose(
    merge_math.toward_base(base, merged, 0.3),
    0.7 * base + 0.3 * merged,
    rtol=1e-6,
    atol=1e-6,
  )


def test_tensor_units_are_the_hugging_face_tensors():
  for cfg in (CFG, preset("tiny-gemma", num_layers=3)):
    units = {
      (p, i)
      for p, s in layout.param_shapes(cfg).items()
      for i in merge.tensor_units(p, s)
    }
    hf_units = {
      (e.path, e.index if e.path != "embedder/embedding" else ())
      for e in hf.tensor_map(cfg)
    }
    assert units == hf_units


@pytest.mark.parametrize(
  "recipe, n, base, message",
  [
    (merge.Recipe(weights=(0.5, 0.6)), 2, False, "sum to 1.1; without --base"),
    (merge.Recipe(weights=(0.5,)), 2, False, "1 weights for 2 checkpoints"),
    (merge.Recipe(), 1, False, "at least 2 checkpoints"),
    (merge.Recipe(eta=0.5), 2, False, "--eta .* pass --base"),
    (merge.Recipe(eta=1.5), 2, True, r"--eta must be in \[0, 1\], got 1.5"),
    (merge.Recipe("slerp"), 2, False, "exactly 2 checkpoints relative to"),
    (merge.Recipe("slerp"), 3, True, "exactly 2 checkpoints relative to"),
    (merge.Recipe("slerp", t=-0.1), 2, True, r"--t must be in \[0, 1\]"),
    (merge.Recipe("slerp", weights=(1, 0)), 2, True, "--weights is for"),
    (merge.Recipe("ties"), 2, True, "unknown 'ties'; valid: linear, slerp"),
    (merge.Recipe(weights=(1, -1), normalize=True), 2, False, "cannot divide"),
  ],
)
def test_invalid_recipes(recipe, n, base, message):
  with pytest.raises(ConfigError, match=message):
    merge.resolve(recipe, n, base)


def test_weights_normalize_or_are_free_with_a_base():
  assert merge.resolve(
    merge.Recipe(weights=(1, 3), normalize=True), 2, False
  ).weights == (0.25, 0.75)
  assert merge.resolve(merge.Recipe(), 4, False).weights == (0.25,) * 4
  assert merge.resolve(merge.Recipe(weights=(0.7, 0.7)), 2, True).weights == (
    0.7,
    0.7,
  )


# --- The streamed merge ----------------------------------------------------


def test_linear_merge_of_checkpoints(ckpts, tmp_path, monkeypatch):
  reads = []
  read = merge._Reader.read
  monkeypatch.setattr(
    merge._Reader,
    "read",
    lambda self, p: reads.append((self.name, p)) or read(self, p),
  )
  (a, fa), (b, fb) = ckpts["a"], ckpts["b"]
  cfg = merge.merge([a, b], tmp_path / "m", merge.Recipe(weights=(0.3, 0.7)))
  # Leaf by leaf: every input's copy of a leaf read once, nothing else.
  assert sorted(reads) == sorted((str(d), p) for d in (a, b) for p in fa)
  out, out_cfg = load_flat(tmp_path / "m")
  assert out_cfg == cfg == CFG
  for p in fa:
    assert out[p].dtype == np.float32
    np.testing.assert_allclose(
      out[p], 0.3 * fa[p] + 0.7 * fb[p], rtol=1e-6, atol=1e-6, err_msg=p
    )
  assert sorted(x.name for x in tmp_path.iterdir()) == ["m"]


def test_slerp_then_toward_the_base(ckpts, tmp_path):
  (a, fa), (b, fb), (base, fbase) = ckpts["a"], ckpts["b"], ckpts["base"]
  merge.merge(
    [a, b], tmp_path / "w", merge.Recipe("slerp", t=0.3, eta=0.6), base=base
  )
  out, _ = load_flat(tmp_path / "w")
  for p, shape in layout.param_shapes(CFG).items():
    for i in merge.tensor_units(p, shape):  # per HF tensor
      delta = slerp_reference(
        fa[p][i] - fbase[p][i], fb[p][i] - fbase[p][i], 0.3
      )
      np.testing.assert_allclose(
        out[p][i],
        fbase[p][i] + 0.6 * delta,
        rtol=1e-5,
        atol=1e-5,
        err_msg=f"{p}{i}",
      )


def test_eta_zero_gives_the_base_and_one_the_merge(ckpts, tmp_path):
  (a, _), (b, _), (base, fbase) = ckpts["a"], ckpts["b"], ckpts["base"]
  recipe = merge.Recipe(weights=(0.5, 0.5), eta=0.0)
  merge.merge([a, b], tmp_path / "e0", recipe, base=base)
  out, _ = load_flat(tmp_path / "e0")
  for p in fbase:
    np.testing.assert_array_equal(out[p], fbase[p])


@pytest.mark.slow
def test_identical_bf16_checkpoints_merge_to_themselves(tmp_path):
  flat = random_flat(CFG, 7, dtype=BF16)
  src = save(tmp_path / "x", flat)
  merge.merge(
    [src, src, src], tmp_path / "lin", merge.Recipe(weights=(0.2, 0.3, 0.5))
  )
  merge.merge(
    [src, src],
    tmp_path / "sl",
    merge.Recipe("slerp", t=0.4),
    base=save(tmp_path / "base", random_flat(CFG, 8, dtype=BF16)),
  )
  for name in ("lin", "sl"):
    out, cfg = load_flat(tmp_path / name)
    assert cfg.param_dtype == "bfloat16"
    for p in flat:
      assert out[p].dtype == BF16
      np.testing.assert_array_equal(out[p], flat[p], err_msg=p)


def test_hf_output_and_dtype(ckpts, tmp_path):
  (a, fa), (b, fb) = ckpts["a"], ckpts["b"]
  merge.merge(
    [a, b], tmp_path / "hf", merge.Recipe(), to="hf", dtype="bfloat16"
  )
  config = json.loads((tmp_path / "hf" / hf.CONFIG).read_text())
  assert config["dtype"] == "bfloat16"
  params, cfg = hf.load(tmp_path / "hf")
  assert cfg.num_layers == CFG.num_layers
  for p, x in layout.flatten(params):
    assert x.dtype == BF16
    # Float32 arithmetic, then one rounding to bfloat16.
    expected = fa[p] + np.float32(0.5) * (fb[p] - fa[p])
    np.testing.assert_array_equal(x, expected.astype(BF16), err_msg=p)
  assert sorted(x.name for x in tmp_path.iterdir()) == ["hf"]


def test_different_models_name_the_fields_and_first_shape(ckpts, tmp_path):
  other = dataclasses.replace(CFG, num_layers=3)
  src = save(tmp_path / "other", random_flat(other, 0), other)
  with pytest.raises(
    CheckpointError,
    match=(
      r"other is not the same model as .*a \(model config: num_layers 2 vs "
      r"3\); first mismatched parameter layers/pre_attention_norm/scale: "
      r"\(2, 32\) vs \(3, 32\)"
    ),
  ):
    merge.merge([ckpts["a"][0], src], tmp_path / "m", merge.Recipe())
  assert not (tmp_path / "m").exists()


def test_mixed_dtypes_need_an_explicit_dtype(ckpts, tmp_path):
  src = save(tmp_path / "bf", random_flat(CFG, 9, dtype=BF16))
  with pytest.raises(ConfigError, match="float32 and bfloat16 .* --dtype"):
    merge.merge([ckpts["a"][0], src], tmp_path / "m", merge.Recipe())
  with pytest.raises(ConfigError, match="already exists"):
    merge.merge(
      [ckpts["a"][0], src], ckpts["b"][0], merge.Recipe(), dtype="float32"
    )
