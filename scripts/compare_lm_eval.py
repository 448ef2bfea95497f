"""Item-by-item comparison of gemma_jax.evals with lm-evaluation-harness.

A tiny Gemma 2 (random init, or --checkpoint) is exported to Hugging Face
with its tokenizer (`gemma-jax convert --to hf --tokenizer`) and scored by
the harness's `hf` model, unchanged, on small local task files written here
(ARC in the AI2 layout, MMLU csv files, HellaSwag, GSM8K and a generic
jsonl), through task YAMLs that `include:` the harness's own arc_easy,
mmlu default, hellaswag and gsm8k configs and only point them at the local
files (`dataset_path: json`). The same files go through our readers and
scoring on the native checkpoint. For every document the script compares
the prompt, each choice's log-likelihood, and the acc / acc_norm /
acc_bytes predictions (generation: the text and both filters' answers).

This script installs nothing. The harness runs under --harness-python, a
Python with lm-eval, torch and transformers, e.g. a separate venv:

    python3.11 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install /opt/wheels/torch-2.13.0+cpu-*.whl \\
        "lm-eval[hf]==0.4.13" sentencepiece
    python scripts/compare_lm_eval.py \\
        --harness-python /tmp/lmeval-venv/bin/python

Runs, all offline: 0-shot; 3-shot (ARC and HellaSwag shots by the seeded
random sampler, MMLU the first 3 dev questions); 3-shot with max_length 160
(most requests cut from the left); GSM8K at its default 5 shots with max_length
512 (prompts cut to 256 tokens). Exit status 1 if a prompt differs, a
prediction differs, or a log-likelihood differs by more than --atol.
"""

import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np

from gemma_jax import cli
from gemma_jax.checkpoint import native
from gemma_jax.data import corpus, testing
from gemma_jax.evals import evaluate, generation, scoring, synthetic, tasks
from gemma_jax.model import preset
from gemma_jax.tokenizer import Tokenizer

SUBJECTS = ("elementary_mathematics", "high_school_computer_science")

DRIVER = textwrap.dedent('''
    import json, sys
    import lm_eval
    from lm_eval.tasks import TaskManager
    spec = json.load(open(sys.argv[1]))
    keep = ("doc_id", "arguments", "resps", "filtered_resps", "filter", "acc",
            "acc_norm", "acc_bytes", "exact_match")
    out = {"version": lm_eval.__version__}
    for run in spec["runs"]:
      res = lm_eval.simple_evaluate(
          model="hf", model_args={"pretrained": spec["model"],
                                  "dtype": "float32",
                                  "max_length": run["max_length"]},
          tasks=run["tasks"], num_fewshot=run["num_fewshot"], batch_size=4,
          device="cpu", log_samples=True,
          task_manager=TaskManager(include_path=spec["include_path"]))
      out[run["name"]] = {
          "results": res["results"],
          "samples": {t: [{k: s[k] for k in keep if k in s} for s in ss]
                      for t, ss in res["samples"].items()}}
    json.dump(out, open(sys.argv[2], "w"), default=str)
''')


def make_model(workdir: pathlib.Path):
  """A random-init tiny-gemma2 (vocab = a small Gemma-style tokenizer)."""
  import jax
  import jax.numpy as jnp
  from flax.linen import meta
  from gemma_jax.model import Transformer
  tok_path = testing.tiny_tokenizer(workdir / "tokenizer.model")
  cfg = preset("tiny-gemma2", vocab_size=Tokenizer.load(tok_path).vocab_size)
  params = Transformer(cfg).init(jax.random.key(0),
                                 jnp.zeros((1, 8), jnp.int32))["params"]
  native.save(workdir / "native", meta.unbox(params), cfg, force=True)
  return workdir / "native", tok_path


def _number_choices(rng, answer: int) -> list[str]:
  out = [answer]
  while len(out) < 4:
    c = answer + int(rng.integers(-30, 31))
    if c not in out:
      out.append(c)
  rng.shuffle(out)
  return [str(c) for c in out]


def _arith_mc(n: int, seed: int):
  """(question, 4 choices, gold index) arithmetic items."""
  rng = np.random.default_rng(seed)
  items = []
  for row in synthetic.arithmetic(n, seed):
    expr = row["context"][len("Question: Compute "):].split(".\n")[0]
    answer = int(row["answer"].rsplit(" ", 1)[1])
    choices = _number_choices(rng, answer)
    items.append((f"What is {expr}?", choices, choices.index(str(answer))))
  return items


def _jsonl(path, rows):
  synthetic.write_jsonl(path, rows)
  return str(path)


def write_arc(d: pathlib.Path):
  """AI2 layout for our reader, the HF dataset layout for the harness."""
  files = {}
  for split, n, seed in (("train", 20, 1), ("test", 30, 2)):
    ai2, hf = [], []
    for i, (q, choices, gold) in enumerate(_arith_mc(n, seed)):
      labels = list("ABCD") if i % 3 else list("1234")
      pairs = [{"label": l, "text": t} for l, t in zip(labels, choices)]
      ai2.append({"id": f"{split}{i}", "answerKey": labels[gold],
                  "question": {"stem": q, "choices": pairs}})
      hf.append({"id": f"{split}{i}", "question": q, "answerKey": labels[gold],
                 "choices": {"text": choices, "label": labels}})
    files[f"arc_{split}"] = _jsonl(d / f"ARC-Local-{split}.jsonl", ai2)
    files[f"arc_{split}_hf"] = _jsonl(d / f"arc_{split}_hf.jsonl", hf)
  return files


def write_mmlu(d: pathlib.Path, code_items):
  """data/{dev,test}/<subject>_<split>.csv for us; jsonl for the harness."""
  files = {}
  sources = {SUBJECTS[0]: [(q, c, g) for q, c, g in _arith_mc(20, 3)],
             SUBJECTS[1]: [("Which line comes next?\n" + it["context"].rstrip(),
                            it["choices"], it["gold"]) for it in code_items]}
  for subject, items in sources.items():
    for split, rows in (("dev", items[:5]), ("test", items[5:20])):
      path = d / "mmlu" / split / f"{subject}_{split}.csv"
      path.parent.mkdir(parents=True, exist_ok=True)
      with open(path, "w", newline="") as f:
        csv.writer(f).writerows([q, *c, "ABCD"[g]] for q, c, g in rows)
      files[f"{subject}_{split}_hf"] = _jsonl(
          d / f"mmlu_{subject}_{split}.jsonl",
          [{"question": q, "subject": subject, "choices": c, "answer": g}
           for q, c, g in rows])
  files["mmlu_dir"] = str(d / "mmlu")
  return files


def write_hellaswag(d: pathlib.Path, prose_items):
  """HellaSwag rows with the WikiHow artifacts the harness cleans up."""
  files = {}
  for split, items in (("train", prose_items[:10]),
                       ("val", prose_items[10:30])):
    rows = []
    for i, it in enumerate(items):
      words = it["context"].split()
      half = len(words) // 2
      endings = [c + (" [title] Next step." if i % 4 == 0 and k == 1 else "")
                 for k, c in enumerate(it["choices"])]
      rows.append({"ind": i, "activity_label": "Reading docs",
                   "ctx_a": " ".join(words[:half]) + (" [header]" if i % 5 == 0
                                                     else ""),
                   "ctx_b": " ".join(words[half:]).lower(),
                   "endings": endings, "label": it["gold"],
                   "split": split})
    files[f"hellaswag_{split}"] = _jsonl(d / f"hellaswag_{split}.jsonl", rows)
  return files


def write_gsm8k(d: pathlib.Path):
  files = {}
  for split, n, seed in (("train", 30, 5), ("test", 20, 6)):
    rows = [{"question": r["context"][len("Question: "):-len("\nAnswer:")],
             "answer": r["answer"]} for r in synthetic.arithmetic(n, seed)]
    files[f"gsm8k_{split}"] = _jsonl(d / f"gsm8k_{split}.jsonl", rows)
  return files


def write_files(d: pathlib.Path) -> dict:
  d.mkdir(parents=True, exist_ok=True)
  paths = corpus.stdlib_files(600_000)
  code = [pathlib.Path(p).read_text(encoding="utf-8", errors="replace")
          for p in paths]
  prose = [corpus.module_docstrings(t) for t in code]
  code_items = synthetic.code_next(code, 60, seed=7)
  files = {"code_test": _jsonl(d / "code_next.jsonl", code_items[:30]),
           "code_train": _jsonl(d / "code_next_shots.jsonl",
                                code_items[30:])}
  files.update(write_arc(d))
  files.update(write_mmlu(d, code_items[30:]))
  files.update(write_hellaswag(d, synthetic.prose_next(prose, 30, seed=8)))
  files.update(write_gsm8k(d))
  return files


def _yaml(path, text):
  path.write_text(textwrap.dedent(text).lstrip())


def write_yamls(d: pathlib.Path, files: dict, harness_tasks: str) -> None:
  """Local tasks that include the harness's own YAMLs (local keys win)."""
  d.mkdir(parents=True, exist_ok=True)
  t = harness_tasks
  _yaml(d / "local_arc.yaml", f"""
      include: {t}/arc/arc_easy.yaml
      task: local_arc
      tag: []
      dataset_path: json
      dataset_name: null
      dataset_kwargs:
        data_files: {{train: {files['arc_train_hf']},
                     validation: {files['arc_test_hf']},
                     test: {files['arc_test_hf']}}}
      """)
  for s in SUBJECTS:
    desc = tasks.mmlu_description(s)
    _yaml(d / f"local_mmlu_{s}.yaml", f"""
        include: {t}/mmlu/default/_default_template_yaml
        task: local_mmlu_{s}
        dataset_path: json
        dataset_kwargs:
          data_files: {{dev: {files[f'{s}_dev_hf']},
                       test: {files[f'{s}_test_hf']}}}
        description: {json.dumps(desc)}
        """)
  _yaml(d / "local_hellaswag.yaml", f"""
      include: {t}/hellaswag/hellaswag.yaml
      task: local_hellaswag
      tag: []
      dataset_path: json
      dataset_name: null
      dataset_kwargs:
        data_files: {{train: {files['hellaswag_train']},
                     validation: {files['hellaswag_val']}}}
      """)
  _yaml(d / "local_gsm8k.yaml", f"""
      include: {t}/gsm8k/gsm8k.yaml
      task: local_gsm8k
      tag: []
      dataset_path: json
      dataset_name: null
      dataset_kwargs:
        data_files: {{train: {files['gsm8k_train']},
                     test: {files['gsm8k_test']}}}
      """)
  _yaml(d / "local_code.yaml", f"""
      task: local_code
      dataset_path: json
      dataset_kwargs:
        data_files: {{train: {files['code_train']},
                     test: {files['code_test']}}}
      output_type: multiple_choice
      training_split: train
      test_split: test
      doc_to_text: context
      doc_to_choice: choices
      doc_to_target: gold
      metric_list:
        - {{metric: acc, aggregation: mean, higher_is_better: true}}
        - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
        - {{metric: acc_bytes, aggregation: mean, higher_is_better: true}}
      """)


MC_TASKS = ["local_arc", *(f"local_mmlu_{s}" for s in SUBJECTS),
            "local_hellaswag", "local_code"]
RUNS = [
    {"name": "0-shot", "tasks": MC_TASKS, "num_fewshot": None,
     "max_length": 512},
    {"name": "3-shot", "tasks": MC_TASKS, "num_fewshot": 3,
     "max_length": 512},
    {"name": "3-shot, max_length 160", "tasks": MC_TASKS, "num_fewshot": 3,
     "max_length": 160},
    {"name": "gsm8k 5-shot", "tasks": ["local_gsm8k"], "num_fewshot": None,
     "max_length": 512},
]


def our_tasks(files: dict, num_fewshot) -> dict[str, tasks.Task]:
  out = {"local_arc": tasks.arc(files["arc_test"], files["arc_train"],
                                num_fewshot=num_fewshot),
         "local_hellaswag": tasks.hellaswag(files["hellaswag_val"],
                                            files["hellaswag_train"],
                                            num_fewshot=num_fewshot),
         "local_code": tasks.multiple_choice(files["code_test"],
                                             files["code_train"],
                                             num_fewshot=num_fewshot),
         "local_gsm8k": tasks.gsm8k(files["gsm8k_test"], files["gsm8k_train"],
                                    num_fewshot=num_fewshot)}
  for t in tasks.mmlu(files["mmlu_dir"], num_fewshot=num_fewshot):
    out["local_" + t.name] = t
  return out


def compare_mc(task, ours, theirs, atol):
  """Per-document comparison of one multiple-choice task."""
  theirs = sorted(theirs, key=lambda s: s["doc_id"])
  stats = {"docs": len(ours), "prompts_equal": 0, "max_abs_dll": 0.0,
           "pred_disagree": {"acc": 0, "acc_norm": 0, "acc_bytes": 0},
           "metric_disagree": 0}
  assert len(theirs) == len(ours), (task, len(theirs), len(ours))
  for mine, s in zip(ours, theirs):
    args = s["arguments"]
    ctxs = {a[0] for a in args}
    conts = [a[1] for a in args]
    stats["prompts_equal"] += int(ctxs == {mine["context"]} and conts == [
        " " + c for c in mine["choices"]])
    lls = np.array([r[0][0] for r in s["resps"]], np.float64)
    d = np.abs(lls - np.array(mine["loglikelihoods"]))
    stats["max_abs_dll"] = max(stats["max_abs_dll"], float(d.max()))
    ref = scoring.choice_metrics(lls, mine["choices"], mine["gold"])
    for m in stats["pred_disagree"]:
      key = {"acc": "pred", "acc_norm": "pred_norm",
             "acc_bytes": "pred_bytes"}[m]
      stats["pred_disagree"][m] += int(ref[key] != mine[key])
      if m in s and s[m] != mine[m]:
        stats["metric_disagree"] += 1
  stats["ok"] = (stats["prompts_equal"] == stats["docs"]
                 and stats["max_abs_dll"] <= atol
                 and not any(stats["pred_disagree"].values())
                 and not stats["metric_disagree"])
  return stats


def compare_gen(ours, theirs):
  by_filter = {}
  for s in theirs:
    by_filter.setdefault(s["filter"], {})[s["doc_id"]] = s
  stats = {"docs": len(ours), "prompts_equal": 0, "generations_equal": 0,
           "answers_equal": 0, "exact_match_equal": 0}
  for i, mine in enumerate(ours):
    strict, flexible = by_filter["strict-match"][i], \
        by_filter["flexible-extract"][i]
    stats["prompts_equal"] += int(strict["arguments"][0][0] == mine["context"])
    stats["generations_equal"] += int(strict["resps"][0][0] ==
                                      mine["generation"])
    stats["answers_equal"] += int(
        strict["filtered_resps"][0] == mine["strict-match"]
        and flexible["filtered_resps"][0] == mine["flexible-extract"])
    stats["exact_match_equal"] += int(
        strict["exact_match"] == mine["exact_match,strict-match"]
        and flexible["exact_match"] == mine["exact_match,flexible-extract"])
  stats["ok"] = all(stats[k] == stats["docs"] for k in stats if k != "docs")
  return stats


def run_harness(args, work: pathlib.Path, ckpt, tok_path, files) -> None:
  """Exports the model with its tokenizer and runs the harness on `files`."""
  assert cli.main(["convert", "--from", "native", "--to", "hf", "--force",
                   "--tokenizer", str(tok_path), str(ckpt),
                   str(work / "hf")]) == 0
  harness_tasks = subprocess.run(
      [args.harness_python, "-c", "import lm_eval.tasks, os; print(os.path."
       "dirname(lm_eval.tasks.__file__))"], check=True, capture_output=True,
      text=True).stdout.strip()
  write_yamls(work / "tasks", files, harness_tasks)
  spec = {"model": str(work / "hf"), "include_path": str(work / "tasks"),
          "runs": RUNS}
  (work / "spec.json").write_text(json.dumps(spec))
  (work / "driver.py").write_text(DRIVER)
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  subprocess.run([args.harness_python, str(work / "driver.py"),
                  str(work / "spec.json"), str(work / "harness.json")],
                 check=True, env=env)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--harness-python", default=sys.executable,
                      help="a Python with lm-eval[hf] installed")
  parser.add_argument("--workdir", default="/tmp/compare_lm_eval")
  parser.add_argument("--checkpoint", help="native checkpoint (default: a "
                      "random-init tiny-gemma2); needs --tokenizer")
  parser.add_argument("--tokenizer", help="SentencePiece model")
  parser.add_argument("--atol", type=float, default=1e-3,
                      help="largest |Δ log-likelihood| accepted (nats)")
  parser.add_argument("--reuse", action="store_true",
                      help="keep WORKDIR's model, files and harness results "
                      "from an earlier run with the same runs; rescore ours")
  args = parser.parse_args(argv)
  work = pathlib.Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  spec_path, out_path = work / "spec.json", work / "harness.json"
  reuse = args.reuse and out_path.exists() and spec_path.exists() and \
      json.loads(spec_path.read_text())["runs"] == RUNS
  if args.checkpoint:
    ckpt, tok_path = pathlib.Path(args.checkpoint), args.tokenizer
  elif reuse:
    ckpt, tok_path = work / "native", str(work / "tokenizer.model")
  else:
    ckpt, tok_path = make_model(work)
  files = write_files(work / "data")     # deterministic
  if not reuse:
    run_harness(args, work, ckpt, tok_path, files)
  harness = json.loads(out_path.read_text())

  params, cfg = native.load(ckpt)
  tok = Tokenizer.load(tok_path)
  report, ok = {"lm_eval": harness["version"]}, True
  for run in RUNS:
    ll = scoring.make_loglikelihood_fn(params, cfg, tok, batch_size=8,
                                       seq_len=run["max_length"])
    gen = generation.make_generate_fn(params, cfg, tok, batch_size=4,
                                      max_length=run["max_length"])
    mine = our_tasks(files, run["num_fewshot"])
    for name in run["tasks"]:
      _, items = evaluate.evaluate_task(mine[name], ll, gen)
      theirs = harness[run["name"]]["samples"][name]
      stats = (compare_mc(name, items, theirs, args.atol)
               if mine[name].kind == "multiple_choice"
               else compare_gen(items, theirs))
      report[f"{run['name']} / {name}"] = stats
      ok &= stats["ok"]
      print(f"{run['name']:>24} {name:<40} {json.dumps(stats)}", flush=True)
  (work / "report.json").write_text(json.dumps(report, indent=1))
  mc = [v for k, v in report.items() if isinstance(v, dict)
        and "max_abs_dll" in v]
  print(f"lm-eval {harness['version']}: max |Δ loglikelihood| "
        f"{max(v['max_abs_dll'] for v in mc):.2e} over "
        f"{sum(v['docs'] for v in mc)} documents; every prediction agrees: "
        f"{all(not any(v['pred_disagree'].values()) for v in mc)}; "
        f"all checks pass: {ok}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
