"""gemma_jax as an lm-evaluation-harness model (gemma_jax/evals/harness.py).

The harness's own task configs (ARC, Belebele, GSM8K, HellaSwag, MMLU,
TruthfulQA mc1/mc2, Winogrande) are pointed at tiny local files in each
task's format; `--model gemma_jax` must then give what `--model hf` gives on
the same model exported to Hugging Face: every request's log-likelihood
(float32, <= 1e-4), is_greedy, generation, and every metric.
"""

import importlib.util
import json
import os
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="needs the `eval` extra (lm-eval)")

import lm_eval
from lm_eval.tasks import TaskManager

from gemma_jax.checkpoint import hf, native
from gemma_jax.errors import ConfigError
from gemma_jax.evals import harness

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
TASKS_DIR = pathlib.Path(lm_eval.__file__).parent / "tasks"

# (our task name, the harness's task file, splits it reads, documents).
ARC = [
  {
    "id": f"q{i}",
    "question": q,
    "choices": {"text": c, "label": ["A", "B", "C", "D"]},
    "answerKey": k,
  }
  for i, (q, c, k) in enumerate(
    [
      ("Which is a fruit?", ["apple", "stone", "car", "cloud"], "A"),
      ("What melts ice?", ["cold", "heat", "dark", "sound"], "B"),
      ("Where do fish live?", ["sky", "desert", "water", "fire"], "C"),
    ]
  )
]
BELEBELE = [
  {
    "flores_passage": p,
    "question": q,
    "mc_answer1": a[0],
    "mc_answer2": a[1],
    "mc_answer3": a[2],
    "mc_answer4": a[3],
    "correct_answer_num": n,
  }
  for p, q, a, n in [
    (
      "The cat sat on the mat all day.",
      "Where did the cat sit?",
      ["on the mat", "in a tree", "on a car", "in the sea"],
      "1",
    ),
    (
      "Rain fell in the morning, then the sun came out.",
      "What came after the rain?",
      ["snow", "the sun", "wind", "night"],
      "2",
    ),
  ]
]
GSM8K_TRAIN = [
  {
    "question": f"Tom has {a} apples and buys {b} more. How many now?",
    "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}",
  }
  for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9)]
]
GSM8K_TEST = [
  {
    "question": "Ann has 3 pens and gets 2. How many pens?",
    "answer": "3 + 2 = 5\n#### 5",
  },
  {
    "question": "A box holds 10 eggs; 4 break. How many left?",
    "answer": "#### 6",
  },
]
HELLASWAG = [
  {
    "ind": i,
    "activity_label": label,
    "ctx_a": a,
    "ctx_b": b,
    "ctx": a + " " + b,
    "endings": endings,
    "source_id": "x",
    "split": "val",
    "split_type": "indomain",
    "label": str(gold),
  }
  for i, (label, a, b, endings, gold) in enumerate(
    [
      (
        "Cooking",
        "A man puts a pan on the stove.",
        "he",
        ["adds oil and eggs.", "[title] sings.", "flies away.", "sleeps."],
        0,
      ),
      (
        "Running",
        "A woman ties her shoes.",
        "she",
        ["eats a car.", "runs down the road.", "melts.", "reads a cloud."],
        1,
      ),
    ]
  )
]
MMLU = [
  {
    "question": q,
    "subject": "anatomy",
    "choices": c,
    "answer": k,
  }
  for q, c, k in [
    ("The heart pumps", ["blood", "air", "bone", "light"], 0),
    ("Lungs take in", ["water", "air", "stone", "sand"], 1),
    ("The skull protects the", ["foot", "hand", "brain", "knee"], 2),
  ]
]
TRUTHFULQA = [
  {
    "question": q,
    "mc1_targets": {"choices": c1, "labels": [1] + [0] * (len(c1) - 1)},
    "mc2_targets": {"choices": c2, "labels": l2},
  }
  for q, c1, c2, l2 in [
    (
      "What happens if you eat seeds?",
      ["Nothing much happens.", "A tree grows in you.", "You fly."],
      ["Nothing happens.", "You digest them.", "A tree grows."],
      [1, 1, 0],
    ),
    (
      "Is the earth flat?",
      ["No, it is round.", "Yes, it is flat."],
      ["No.", "It is round.", "Yes.", "It is a disc."],
      [1, 1, 0, 0],
    ),
  ]
]
WINOGRANDE = [
  {
    "sentence": s,
    "option1": o1,
    "option2": o2,
    "answer": a,
  }
  for s, o1, o2, a in [
    (
      "The ball did not fit in the box because _ was too big.",
      "the ball",
      "the box",
      "1",
    ),
    (
      "Sam gave Tim a gift because _ was kind.",
      "Sam",
      "Tim",
      "1",
    ),
  ]
]

# Perplexity over whole documents (loglikelihood_rolling).
WIKITEXT = [
  {
    "page": " = Cats = \n\n Cats sleep a lot . They like the sun and warm "
    "places , and they hunt mice at night . \n" * 3
  },
  {"page": " = Rain = \n\n Rain falls from clouds @-@ mostly in spring . \n"},
]

# task -> (harness yaml, {split: documents})
TASKS = {
  "arc": (
    "arc/arc_easy.yaml",
    dict.fromkeys(("train", "validation", "test"), ARC),
  ),
  "belebele": ("belebele/belebele_lit_Latn.yaml", {"test": BELEBELE}),
  "gsm8k": ("gsm8k/gsm8k.yaml", {"train": GSM8K_TRAIN, "test": GSM8K_TEST}),
  "hellaswag": (
    "hellaswag/hellaswag.yaml",
    {"train": HELLASWAG, "validation": HELLASWAG},
  ),
  "mmlu": ("mmlu/default/mmlu_anatomy.yaml", {"dev": MMLU, "test": MMLU}),
  "truthfulqa_mc1": (
    "truthfulqa/truthfulqa_mc1.yaml",
    {"validation": TRUTHFULQA},
  ),
  "truthfulqa_mc2": (
    "truthfulqa/truthfulqa_mc2.yaml",
    {"validation": TRUTHFULQA},
  ),
  "winogrande": (
    "winogrande/default.yaml",
    {"train": WINOGRANDE, "validation": WINOGRANDE},
  ),
  "wikitext": (
    "wikitext/wikitext.yaml",
    dict.fromkeys(("train", "validation", "test"), WIKITEXT),
  ),
}


def write_tasks(root: pathlib.Path) -> pathlib.Path:
  """One `local_<name>` task YAML per format: the harness's own task file
  (include:) over local JSON-lines files (dataset_path: json)."""
  root.mkdir(parents=True, exist_ok=True)
  for name, (yaml_file, splits) in TASKS.items():
    files = {}
    for split, docs in splits.items():
      path = root / f"{name}_{split}.jsonl"
      path.write_text("".join(json.dumps(d) + "\n" for d in docs))
      files[split] = str(path)
    config = {
      "include": str(TASKS_DIR / yaml_file),
      "task": f"local_{name}",
      "dataset_path": "json",
      "dataset_name": None,
      "dataset_kwargs": {"data_files": files},
    }
    # The harness's YAML loader reads JSON (a YAML subset).
    (root / f"local_{name}.yaml").write_text(json.dumps(config, indent=1))
  return root


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
