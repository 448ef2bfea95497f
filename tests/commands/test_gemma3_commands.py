"""The commands on Gemma 3 checkpoints (TINY_GEMMA3): `merge` (average,
SLERP toward a base) against the formulas, `score` against the forward's
log-probs, greedy `sample` against the forward's argmax, and offline
distillation from a `distill dump` of a Gemma 3 teacher."""

import contextlib
import dataclasses
import functools
import io
import json
import math

import jax
import numpy as np
import pytest
import yaml

from gemma_jax import cli
from gemma_jax.checkpoint import layout, native
from gemma_jax.checkpoint.testing import random_flat
from gemma_jax.data.testing import tiny_tokenizer
from gemma_jax.features import distill as distillation
from gemma_jax.features import distill_loss as distill
from gemma_jax.model import Transformer
from gemma_jax.model.sampler import generate
from gemma_jax.model.testing import TINY_GEMMA3, model_section
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.testing import tiny_config_dict

pytestmark = pytest.mark.slow

CFG = TINY_GEMMA3


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """Three native Gemma 3 checkpoints of random weights."""
  root = tmp_path_factory.mktemp("gemma3_ckpts")
  out = {}
  for seed, name in enumerate(("a", "b", "base")):
    flat = random_flat(CFG, seed, scale=0.2)
    native.save(root / name, layout.unflatten(flat), CFG)
    out[name] = (root / name, flat)
  return out


def run(*argv):
  return cli.main([str(a) for a in argv])


@functools.cache
def forward(cfg):
  """The model's jitted forward (inputs[, positions, segment ids]) ->
  logits, one per config for the module: an eager forward would compile
  every op on its own."""
  model = Transformer(cfg)
  return jax.jit(lambda params, *args: model.apply({"params": params}, *args))


def test_merge_average_is_the_weighted_sum(ckpts, tmp_path, capsys):
  (a, fa), (b, fb) = ckpts["a"], ckpts["b"]
  assert (
    run(
      "merge",
      a,
      b,
      "--weights",
      "1",
      "3",
      "--normalize",
      "--out",
      tmp_path / "m",
    )
    == 0
  )
  assert json.loads(capsys.readouterr().out)["params"] == CFG.param_count()
  params, cfg = native.load(tmp_path / "m")
  assert cfg == CFG
  merged = dict(layout.flatten(params))
  assert "layers/attn/query_norm/scale" in merged
  for p, x in merged.items():
    np.testing.assert_allclose(
      x, 0.25 * fa[p] + 0.75 * fb[p], rtol=1e-6, atol=1e-6, err_msg=p
    )


def units(path, x):
  """The tensors SLERP takes angles over: a layer of a stacked leaf (and
  k / v, gate / up separately), a whole leaf outside the layers."""
  if not path.startswith("layers/"):
    return [()]
  paired = path.endswith(("kv_einsum/w", "gating_einsum/w"))
  return [
    (i, j) if paired else (i,)
    for i in range(x.shape[0])
    for j in (range(x.shape[1]) if paired else [0])
  ]


def test_merge_slerp_toward_the_base_is_the_formula(ckpts, tmp_path, capsys):
  (a, fa), (b, fb), (base, f0) = (ckpts[k] for k in ("a", "b", "base"))
  t, eta = 0.3, 0.6
  argv = ["merge", a, b, "--method", "slerp", "--base", base]
  argv += ["--t", t, "--eta", eta, "--out", tmp_path / "w"]
  assert run(*argv) == 0
  capsys.readouterr()
  params, _ = native.load(tmp_path / "w")
  for p, x in layout.flatten(params):
    want = np.empty_like(f0[p], np.float64)
    for u in units(p, x):
      d_a = (fa[p][u] - f0[p][u]).astype(np.float64)
      d_b = (fb[p][u] - f0[p][u]).astype(np.float64)
      cos = (d_a * d_b).sum() / np.sqrt((d_a**2).sum() * (d_b**2).sum())
      w = math.acos(np.clip(cos, -1, 1))
      delta = (math.sin((1 - t) * w) * d_a + math.sin(t * w) * d_b) / math.sin(
        w
      )
      want[u] = f0[p][u] + eta * delta
    np.testing.assert_allclose(x, want, rtol=2e-5, atol=2e-6, err_msg=p)


def log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_score_is_the_forwards_log_probs(ckpts, tmp_path):
  a, flat = ckpts["a"]
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, CFG.vocab_size, (3, 14)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 9:] = 0  # right-padded, still longer than the window
  np.save(tmp_path / "t.npy", tokens)
  np.save(tmp_path / "m.npy", mask)
  out = tmp_path / "o.npz"
  argv = ["score", "--checkpoint", a, "--tokens", tmp_path / "t.npy"]
  argv += ["--mask", tmp_path / "m.npy", "--out", out, "--batch-size", 2]
  assert run(*argv) == 0
  got = np.load(out)
  params = layout.unflatten(flat)
  for r in range(len(tokens)):
    n = int(mask[r].sum())  # each row alone, unpadded
    logits = forward(CFG)(params, tokens[r : r + 1, :n])
    lp = log_softmax(logits[0, :-1])
    want = np.take_along_axis(lp, tokens[r, 1:n, None], -1)[:, 0]
    np.testing.assert_allclose(got["logprobs"][r, : n - 1], want, atol=2e-5)
    assert (got["logprobs"][r, n - 1 :] == 0).all()
    np.testing.assert_allclose(got["logits"][r, :n], logits[0], atol=2e-5)
  # The harness's scorer (the gemma_jax lm-eval model) gives the same
  # numbers.
  from gemma_jax.evals import harness

  logprobs, _ = harness.token_logprobs(
    params, tokens[:, :-1], tokens[:, 1:], mask[:, 1:], cfg=CFG
  )
  np.testing.assert_allclose(logprobs, got["logprobs"], atol=2e-5)


def greedy_by_recomputation(params, cfg, prompt, steps, length):
  """Each next token the argmax of a forward over the whole prefix (zeros
  after it, which causal attention never sees: one compile of `length`)."""
  tokens = list(prompt)
  for _ in range(steps):
    row = np.zeros((1, length), np.int32)
    row[0, : len(tokens)] = tokens
    logits = forward(cfg)(params, row)
    tokens.append(int(np.argmax(logits[0, len(tokens) - 1])))
  return tokens[len(prompt) :]


def test_greedy_sampling_with_a_cache_is_the_forwards_argmax(ckpts):
  _, flat = ckpts["a"]
  params = layout.unflatten(flat)
  prompts = [[2, 17, 31, 99, 5], [2, 44], [2, 7, 8, 9, 10, 11, 12, 13]]
  steps = 4 * CFG.sliding_window  # past the window, with the global layer
  out = generate(params, CFG, prompts, steps, eos_id=None)
  length = max(map(len, prompts)) + steps
  for prompt, got in zip(prompts, out):
    assert got == greedy_by_recomputation(params, CFG, prompt, steps, length)


def test_sample_command_prints_the_greedy_continuation(tmp_path, capsys):
  cfg = dataclasses.replace(CFG, vocab_size=512)
  tok = tiny_tokenizer(tmp_path / "tok.model", vocab_size=512)
  params = layout.unflatten(random_flat(cfg, 3, scale=0.2))
  native.save(tmp_path / "ckpt", params, cfg)
  argv = ["sample", "--checkpoint", tmp_path / "ckpt", "--tokenizer", tok]
  assert run(*argv, "--prompt", "the model", "--max-new-tokens", 10) == 0
  tokenizer = Tokenizer.load(tok)
  ids = tokenizer.encode("the model", add_bos=True).tolist()
  new = generate(params, cfg, [ids], 10, eos_id=1)[0]
  text = tokenizer.decode([t for t in new if t != 1])
  assert capsys.readouterr().out == f"the model{text}\n"


def student_config(tokenizer, teacher, dump=None, topk=512):
  d = tiny_config_dict(tokenizer, steps=2)
  d["model"] = model_section(CFG, vocab_size=512)
  d["distill"] = {
    "teacher": teacher,
    "teacher_dtype": "float32",
    "topk": topk,
    "alpha": 0.5,
    "dump": dump,
  }
  return d


def test_offline_distillation_from_a_gemma3_dump_is_the_online_loss(
  tiny_tokenizer, tmp_path, capsys
):
  teacher_cfg = dataclasses.replace(
    CFG, vocab_size=512, num_layers=8, d_model=48
  )
  teacher = layout.unflatten(random_flat(teacher_cfg, 1, scale=0.2))
  native.save(tmp_path / "teacher", teacher, teacher_cfg)
  config = tmp_path / "run.yaml"
  d = student_config(tiny_tokenizer, str(tmp_path / "teacher"))
  config.write_text(yaml.safe_dump(d, sort_keys=False))
  with contextlib.redirect_stdout(io.StringIO()):
    assert run("distill", "dump", config, "--out", tmp_path / "d") == 0
  # k = V: the dump holds the teacher's whole distribution.
  cfg = config_from_dict(
    student_config(tiny_tokenizer, None, str(tmp_path / "d"))
  )
  from gemma_jax.data import pipeline_for
  from gemma_jax.train.program import TrainProgram

  program, pipe = TrainProgram(cfg), pipeline_for(cfg)
  distillation.attach(program, pipe, cfg.train.steps)
  batch = pipe.batch(0)
  # Random student params from the host: the model's random init would
  # compile a program of its own, and any student will do.
  student = layout.unflatten(random_flat(cfg.model, 2, scale=0.2))
  state = program.init_state(
    params=jax.device_put(student, program.param_shardings)
  )
  apply = lambda c, p: forward(c)(
    p, batch["inputs"], batch["positions"], batch["segment_ids"]
  )
  logits = apply(cfg.model, jax.device_get(state.params))
  online = np.asarray(
    jax.jit(distill.distill_token_losses)(logits, apply(teacher_cfg, teacher))
  )
  mask = batch["loss_mask"]
  _, m = program.compile_train_step()(state, program.put(batch))
  assert float(m["loss/distill"]) == pytest.approx(
    float((online * mask).sum() / mask.sum()), rel=2e-3
  )
