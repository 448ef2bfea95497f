"""Tiny local copies of benchmarks in each task's own format, for tests.

    write_tasks(root)  # root/local_<name>.yaml + root/<name>_<split>.jsonl
    TaskManager(include_path=str(root), include_defaults=False)

Each `local_<name>` task is the harness's own task file (`include:`) over
local JSON-lines files (`dataset_path: json`, `dataset_kwargs.data_files`):
the offline recipe of docs/evaluation.md, on a few documents each.
"""

import json
import pathlib


def harness_tasks_dir() -> pathlib.Path:
  """The harness's own task YAMLs (lm_eval/tasks)."""
  import lm_eval

  return pathlib.Path(lm_eval.__file__).parent / "tasks"


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
TASKS: dict[str, tuple[str, dict[str, list[dict]]]] = {
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
      "include": str(harness_tasks_dir() / yaml_file),
      "task": f"local_{name}",
      "dataset_path": "json",
      "dataset_name": None,
      "dataset_kwargs": {"data_files": files},
    }
    # The harness's YAML loader reads JSON (a YAML subset).
    (root / f"local_{name}.yaml").write_text(json.dumps(config, indent=1))
  return root
