"""gemma_jax as an lm-evaluation-harness model (gemma_jax/evals/harness.py).

The harness's own task configs (ARC, Belebele, GSM8K, HellaSwag, MMLU,
TruthfulQA mc1/mc2, Winogrande) are pointed at tiny local files in each
task's format; `--model gemma_jax` must then give what `--model hf` gives on
the same model exported to Hugging Face: every request's log-likelihood
(float32, <= 1e-4), is_greedy, generation, and every metric.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="needs the `eval` extra (lm-eval)")

import lm_eval
from lm_eval.tasks import TaskManager

from gemma_jax.checkpoint import hf, native
from gemma_jax.errors import ConfigError
from gemma_jax.evals import harness
from gemma_jax.evals.testing import TASKS, write_tasks

# The harness reads local files only (no Hub look-ups).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

HAS_HF = all(
  importlib.util.find_spec(m) is not None
  for m in ("torch", "transformers", "accelerate")
)
needs_hf = pytest.mark.skipif(
  not HAS_HF, reason="needs torch, transformers and accelerate"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok, random_model):
  """The random model as an HF directory (with its tokenizer) and as a
  native checkpoint."""
  params, cfg = random_model
  root = tmp_path_factory.mktemp("model")
  hf.save(root / "hf", params, cfg, tokenizer=tok)
  native.save(root / "native", params, cfg)
  return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  return write_tasks(tmp_path_factory.mktemp("tasks"))


def test_bucket_widths_are_few():
  assert [harness.bucket(n) for n in (1, 16, 17, 100, 129)] == [
    16,
    16,
    32,
    128,
    256,
  ]
  assert harness.bucket(300, cap=200) == 300  # never below what is needed
  assert harness.bucket(100, cap=64) == 100
  assert harness.bucket(20, cap=24) == 24


def test_mesh_and_unknown_args_are_named(exported, tok_path):
  assert harness.parse_mesh("-1x1x1").ici_data == -1
  with pytest.raises(ConfigError, match="DATAxFSDPxTENSOR"):
    harness.parse_mesh("4,2")
  with pytest.raises(ConfigError, match=r"unknown model_args \['colour'\]"):
    harness.GemmaJaxLM(checkpoint=str(exported / "hf"), colour="red")
  with pytest.raises(ConfigError, match="no tokenizer"):
    harness.GemmaJaxLM(checkpoint=str(exported / "native"))


def test_registered_with_the_harness():
  from lm_eval.api.registry import get_model

  assert get_model("gemma_jax") is harness.GemmaJaxLM


@pytest.mark.slow
def test_native_hf_and_live_params_score_alike(exported, tok, random_model):
  from lm_eval.api.instance import Instance

  params, cfg = random_model
  reqs = [
    Instance("loglikelihood", {}, ("The cat ", "sat on the mat."), 0),
    Instance("loglikelihood", {}, ("", "Hello"), 1),
    Instance("loglikelihood", {}, ("One two", " three"), 2),
  ]
  rolling = [Instance("loglikelihood_rolling", {}, ("a long text " * 9,), 0)]
  models = [
    harness.GemmaJaxLM(checkpoint=str(exported / "hf")),
    harness.GemmaJaxLM(
      checkpoint=str(exported / "native"),
      tokenizer=str(exported / "hf" / "tokenizer.model"),
    ),
    harness.GemmaJaxLM(params=params, model_config=cfg, tokenizer=tok),
    # Model parallel: heads split over a tensor axis of 2.
    harness.GemmaJaxLM(
      params=params, model_config=cfg, tokenizer=tok, mesh="-1x1x2"
    ),
    harness.GemmaJaxLM(
      params=params, model_config=cfg, tokenizer=tok, mesh="1x1x1"
    ),
  ]
  assert [m.batch_size for m in models] == [8, 8, 8, 8, 8]
  assert dict(models[3].mesh.shape)["tensor"] == 2
  assert models[4].mesh.size == 1
  first = models[0].loglikelihood(reqs)
  assert all(ll < 0 for ll, _ in first)
  for m in models[1:]:
    got = m.loglikelihood(reqs)
    np.testing.assert_allclose([g[0] for g in got], [f[0] for f in first], 1e-5)
    assert [g[1] for g in got] == [f[1] for f in first]
  # Rolling windows of 16 tokens add up to the whole text's log-likelihood.
  whole = models[0].loglikelihood_rolling(rolling)
  short = harness.GemmaJaxLM(
    params=params, model_config=cfg, tokenizer=tok, max_length=16
  )
  windows = short.loglikelihood_rolling(rolling)
  assert np.isfinite(whole[0]) and np.isfinite(windows[0])


@pytest.mark.slow
def test_generation_stops_and_samples(random_model, tok):
  from lm_eval.api.instance import Instance

  params, cfg = random_model
  lm = harness.GemmaJaxLM(params=params, model_config=cfg, tokenizer=tok)
  greedy = {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}
  sampled = {"max_gen_toks": 12, "do_sample": True, "temperature": 1.0}
  reqs = [
    Instance("generate_until", {}, ("Once upon", greedy), 0),
    Instance("generate_until", {}, ("Once upon", sampled), 1),
    Instance(
      "generate_until", {}, ("A much longer prompt than the", greedy), 2
    ),
  ]
  a = lm.generate_until(reqs)
  b = lm.generate_until(reqs)
  assert a[0] == b[0] and a[2] == b[2]  # greedy is deterministic
  assert all("\n" not in t for t in (a[0], a[2]))
  assert isinstance(a[1], str) and isinstance(b[1], str)
  odd = {"max_gen_toks": 4, "repetition_penalty": 1.1}
  with pytest.raises(ConfigError, match=r"\['repetition_penalty'\] are not"):
    lm.generate_until([Instance("generate_until", {}, ("Hi", odd), 0)])


@pytest.mark.slow
def test_a_batch_stops_once_every_row_is_done(random_model, tok):
  """Stopping early at eos or a stop string changes the number of decode
  steps, never the generations (those of the sampler's full-length
  decode, cut the same way)."""
  from lm_eval.api.instance import Instance

  from gemma_jax.model import sampler

  params, cfg = random_model
  lm = harness.GemmaJaxLM(params=params, model_config=cfg, tokenizer=tok)
  prompts = ["Once upon", "A much longer prompt than the", "The cat"]
  # Stop strings the greedy text reaches early: its own first characters.
  full = sampler.generate(
    params, cfg, [lm.tok_encode(p) for p in prompts], 64, eos_id=None
  )
  texts = []
  for new in full:  # the new tokens of each prompt
    texts.append(lm.tok_decode(new[: new.index(1)] if 1 in new else new))
  stops = [t.strip()[:2] for t in texts]
  assert all(stops), texts
  for until in ([], stops):
    reqs = [
      Instance(
        "generate_until", {}, (p, {"until": until, "max_gen_toks": 64}), i
      )
      for i, p in enumerate(prompts)
    ]
    lm.decoder.steps_run = 0
    got = lm.generate_until(reqs)
    expected = []
    for t in texts:
      for s in until:
        t = t.split(s)[0]
      expected.append(t)
    assert got == expected
    if until:
      assert lm.decoder.steps_run == 16 < 64  # one chunk
    else:
      assert lm.decoder.steps_run == 64


def _samples(results):
  """{task: [(doc_id, resps, filtered_resps)]} of a run's logged samples."""
  return {
    task: sorted(
      (s["doc_id"], s["resps"], s["filtered_resps"], s["arguments"])
      for s in samples
    )
    for task, samples in results["samples"].items()
  }


def _run(model, model_args, task_dir, batch_size):
  return lm_eval.simple_evaluate(
    model=model,
    model_args=model_args,
    tasks=[f"local_{name}" for name in TASKS],
    batch_size=batch_size,
    log_samples=True,
    gen_kwargs="max_gen_toks=24",
    device="cpu",
    task_manager=TaskManager(
      include_path=str(task_dir), include_defaults=False
    ),
    random_seed=0,
    numpy_random_seed=0,
    torch_random_seed=0,
    fewshot_random_seed=0,
  )


def _compare(ours, theirs):
  """Every request's answer and every metric agree."""
  a, b = _samples(ours), _samples(theirs)
  assert sorted(a) == sorted(b)
  for task in a:
    assert len(a[task]) == len(b[task]), task
    for (doc, resps, filt, args), (doc2, resps2, filt2, args2) in zip(
      a[task], b[task]
    ):
      assert (doc, args) == (doc2, args2), task
      if any(isinstance(r[0], str) for r in resps):  # generations
        assert (resps, filt) == (resps2, filt2), (task, doc)
        continue
      for r, r2 in zip(resps, resps2):
        if not isinstance(r[0], tuple):  # loglikelihood_rolling: a sum
          assert abs(float(r[0]) - float(r2[0])) <= 1e-4, (task, doc)
          continue
        (ll, greedy), (ll2, greedy2) = r[0], r2[0]
        assert abs(float(ll) - float(ll2)) <= 1e-4, (task, doc, ll, ll2)
        assert bool(greedy) == bool(greedy2), (task, doc)
  for task, metrics in ours["results"].items():
    for key, value in metrics.items():
      other = theirs["results"][task][key]
      if isinstance(value, float):
        # rtol: perplexities are exp of sums that agree to ~1e-5.
        np.testing.assert_allclose(value, other, 1e-5, 1e-6, err_msg=key)
      else:
        assert value == other or key == "alias", (task, key)


@pytest.mark.slow
@needs_hf
@pytest.mark.parametrize("batch_size", [1, 8])
def test_equal_to_the_harness_hf_model(exported, task_dir, batch_size):
  import torch

  torch.set_num_threads(1)
  directory = str(exported / "hf")
  # Batch size 1 on one device; 8 rows split over the 8 test devices, and
  # requests cut to 128 tokens (GSM8K and TruthfulQA prompts lose their
  # start; a wikitext page spans several rolling windows).
  ours_args = ",mesh=1x1x1" if batch_size == 1 else ",max_length=128"
  hf_args = "" if batch_size == 1 else ",max_length=128"
  ours = _run(
    "gemma_jax", f"checkpoint={directory}{ours_args}", task_dir, batch_size
  )
  theirs = _run(
    "hf",
    f"pretrained={directory},dtype=float32,attn_implementation=eager" + hf_args,
    task_dir,
    batch_size,
  )
  _compare(ours, theirs)


@pytest.mark.slow
def test_is_greedy_on_the_models_own_continuation(random_model, tok):
  params, cfg = random_model
  lm = harness.GemmaJaxLM(params=params, model_config=cfg, tokenizer=tok)
  from gemma_jax.model import sampler

  context = lm.tok_encode("Once upon a time")
  greedy = sampler.generate(params, cfg, [context], 6, eos_id=None)[0]
  other = [(t + 1) % cfg.vocab_size for t in greedy]
  (ll, is_greedy), (ll2, is_greedy2) = lm._loglikelihood_tokens(
    [(None, context, greedy), (None, context, other)]
  )
  assert is_greedy and not is_greedy2 and ll > ll2


def test_bad_dtype_is_named(random_model):
  _, cfg = random_model
  with pytest.raises(ConfigError, match="dtype='float64'; valid choices"):
    harness._with_dtype(cfg, "float64")
  assert harness._with_dtype(cfg, "bfloat16").param_dtype == "bfloat16"


def test_command_passes_every_argument_to_the_harness(monkeypatch):
  import lm_eval.__main__

  from gemma_jax import cli

  seen = {}

  def fake_cli():
    from lm_eval.api.registry import get_model

    seen["argv"] = list(sys.argv)
    seen["model"] = get_model("gemma_jax")

  monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fake_cli)
  monkeypatch.setattr(sys, "argv", ["gemma-jax"])
  args = ["--model", "gemma_jax", "--tasks", "arc_easy", "-h", "--limit", "2"]
  assert cli.main(["lm-eval", *args]) == 0
  assert seen == {"argv": ["lm-eval", *args], "model": harness.GemmaJaxLM}


@pytest.mark.slow
def test_kaggle_checkpoint_needs_and_takes_a_config(
  tmp_path, random_model, tok, tok_path
):
  import yaml

  from gemma_jax.checkpoint import kaggle
  from gemma_jax.checkpoint.testing import official_checkpoint

  _, cfg = random_model
  official_checkpoint(tmp_path / "k", cfg, transposed_gating=False)
  with pytest.raises(ConfigError, match="has no config; name its model"):
    harness.GemmaJaxLM(checkpoint=str(tmp_path / "k"), tokenizer=tok_path)
  model = {
    "preset": "tiny-gemma2",
    "num_layers": 2,
    "d_model": 32,
    "mlp_dim": 64,
    "num_heads": 2,
    "num_kv_heads": 1,
    "head_dim": 16,
    "sliding_window": 8,
    "vocab_size": tok.vocab_size,
  }
  (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": model}))
  from lm_eval.api.instance import Instance

  reqs = [Instance("loglikelihood", {}, ("The cat ", "sat."), 0)]
  ours = harness.GemmaJaxLM(
    checkpoint=str(tmp_path / "k"),
    config=str(tmp_path / "run.yaml"),
    tokenizer=tok_path,
  ).loglikelihood(reqs)
  live = harness.GemmaJaxLM(
    params=kaggle.load(tmp_path / "k", cfg), model_config=cfg, tokenizer=tok
  ).loglikelihood(reqs)
  np.testing.assert_allclose(ours[0][0], live[0][0], rtol=1e-6)


def test_only_process_zero_prints_and_writes(monkeypatch, tmp_path, capsys):
  import jax
  import lm_eval.__main__
  from lm_eval.loggers import EvaluationTracker

  from gemma_jax import cli

  def fake_cli():
    # What the harness's `run` does with results: print, then save.
    print("| Tasks | Version |")
    tracker = EvaluationTracker(output_path=str(tmp_path / "out"))
    tracker.general_config_tracker.model_name_sanitized = "m"
    tracker.save_results_aggregated(results={"results": {}}, samples=None)

  monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fake_cli)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert cli.main(["lm-eval", "--tasks", "x"]) == 0
  assert capsys.readouterr().out == "" and not (tmp_path / "out").exists()
  # The harness's tracker is itself again afterwards, and process 0 writes.
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert cli.main(["lm-eval", "--tasks", "x"]) == 0
  assert "| Tasks |" in capsys.readouterr().out
  assert list((tmp_path / "out").rglob("results_*.json"))


@pytest.mark.slow
def test_generation_keeps_request_order_and_truncates_prompts_left(
  random_model, tok
):
  """Prompts keep their last max_length - max_gen_toks tokens; rows run
  longest first and come back in request order."""
  from lm_eval.api.instance import Instance

  from gemma_jax.evals import decoding
  from gemma_jax.model import sampler

  params, cfg = random_model
  lm = harness.GemmaJaxLM(
    params=params, model_config=cfg, tokenizer=tok, max_length=12
  )
  prompts = ["def f(x):", "the model reads text and code while numbers add"]
  ids = [lm.tok_encode(p)[-8:] for p in prompts]  # keeps 12 - 4
  assert len(ids[0]) < 8 < len(lm.tok_encode(prompts[1]))
  kw = {"until": [], "max_gen_toks": 4}
  got = lm.generate_until(
    [Instance("generate_until", {}, (p, kw), i) for i, p in enumerate(prompts)]
  )
  new = sampler.generate(params, cfg, ids, 4)
  assert got == [lm.tok_decode(row) for row in new]
  assert got[0] != got[1]
  # Both prompts fit one width: one prefill program for the batch.
  before = decoding.prefill._cache_size()
  lm.generate_until(
    [Instance("generate_until", {}, (p, kw), 0) for p in ("a", "abcde")]
  )
  assert decoding.prefill._cache_size() == before


def test_every_process_is_the_harness_rank_zero_of_one(
  monkeypatch, tok, harness_tasks
):
  """Process 1 of 2 still gets every request from the harness (our scoring
  is SPMD: each process builds every batch whole) and the whole results."""
  import jax

  from gemma_jax.evals import benchmarks

  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  lm = harness.RequestTokens(tok)
  assert (lm.rank, lm.world_size) == (0, 1)
  seen = []
  scored = lm._loglikelihood_tokens
  monkeypatch.setattr(
    lm, "_loglikelihood_tokens", lambda r, **kw: seen.extend(r) or scored(r)
  )
  opts = benchmarks.Options(
    tasks=("local_arc",),
    include_path=(str(harness_tasks),),
    bootstrap_iters=0,
  )
  results = benchmarks.evaluate(lm, opts)
  assert results["n-samples"]["local_arc"]["effective"] == 3
  assert len(seen) == 3 * 4  # every choice of every document
