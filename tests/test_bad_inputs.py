"""Bad inputs and faults, through the real CLI: each case asserts the exit
code, exactly one line on stderr naming the problem, and that nothing was
lost (the trained run, its checkpoints, metrics and export are unchanged; no
output was created)."""

import errno
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from gemma_jax import cli
from gemma_jax.train.testing import tiny_config_dict

pytestmark = pytest.mark.slow


class Ctx:
  """A tiny trained run and helpers shared by every case."""

  def __init__(self, root, tok):
    self.root, self.tok = root, tok
    self.n = 0

  def path(self, name):
    self.n += 1
    return str(self.root / f"{self.n}-{name}")

  def config(self, edit=None, raw=None):
    """Writes a run config (the trained run's, edited) and returns its path."""
    path = self.path("cfg.yaml")
    if raw is not None:
      mode = "wb" if isinstance(raw, bytes) else "w"
      with open(path, mode) as f:
        f.write(raw)
      return path
    d = run_config(self.tok)
    if edit:
      edit(d)
    with open(path, "w") as f:
      yaml.safe_dump(d, f, sort_keys=False)
    return path

  def copy_run(self):
    dst = self.path("run")
    shutil.copytree(self.workdir, dst)
    return dst

  def copy_export(self):
    dst = self.path("params")
    shutil.copytree(os.path.join(self.workdir, "params"), dst)
    return dst


def run_config(tok):
  # The train section of tests/train/test_trainer.py: compiled once.
  d = tiny_config_dict(tok, steps=4)
  d["train"].update(eval_every=2)
  d["checkpoint"].update(save_every=2, keep=2, export_params=True)
  return d


def digest(path) -> dict | None:
  """{relative path: sha256} of every file under `path` (None if absent)."""
  if not os.path.exists(path):
    return None
  if os.path.isfile(path):
    return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
  out = {}
  for d, _, files in os.walk(path):
    for f in files:
      full = os.path.join(d, f)
      out[os.path.relpath(full, path)] = hashlib.sha256(
        open(full, "rb").read()
      ).hexdigest()
  return out


@pytest.fixture(scope="module")
def ctx(tiny_tokenizer, compile_cache, tmp_path_factory):
  c = Ctx(tmp_path_factory.mktemp("bad"), tiny_tokenizer)
  c.workdir = str(c.root / "trained")
  assert cli.main(["train", c.config(), "--workdir", c.workdir]) == 0
  return c


def expect_one_line(capsys, argv, code, pattern, protect=()):
  """Runs the CLI; checks the exit code, one stderr line matching
  `pattern`, and that every path in `protect` is unchanged."""
  before = {p: digest(p) for p in protect}
  capsys.readouterr()
  rc = cli.main([str(a) for a in argv])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == code, err
  assert len(lines) == 1, err
  assert lines[0].startswith(f"gemma-jax {argv[0]}: error: "), lines[0]
  assert re.search(pattern, lines[0]), lines[0]
  assert "Traceback" not in err
  for p in protect:
    assert digest(p) == before[p], f"{p} changed"
  return lines[0]


def set_lr(value):
  return lambda d: d["optimizer"].update(learning_rate=value)


# (id, build(ctx) -> (argv, protected paths), exit code, pattern). Cases
# that train on ctx.workdir expect it unchanged.
def train_on_trained(edit=None, *extra):
  def build(c):
    return (
      ["train", c.config(edit), "--workdir", c.workdir, *extra],
      [c.workdir],
    )

  return build


def train_fresh(edit=None, raw=None, *extra):
  def build(c):
    work = c.path("fresh")
    return (["train", c.config(edit, raw), "--workdir", work, *extra], [work])

  return build


def latin1_source(c):
  bad = c.path("latin1.txt")
  with open(bad, "wb") as f:
    f.write("Voilà une phrase en français, très jolie.".encode("latin-1"))
  return bad


def garbage_file(c, name, size=4096):
  path = c.path(name)
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(size))
  return path


def files_source(path_fn):
  def build(c):
    path = path_fn(c)

    def edit(d):
      d["data"]["sources"]["prose"] = {"kind": "files", "paths": [path]}

    work = c.path("fresh")
    return ["train", c.config(edit), "--workdir", work], [work]

  return build


CASES = [
  # Configs: every mistake fails at load, before any device work.
  (
    "config_is_a_directory",
    lambda c: (["train", str(c.root), "--workdir", c.path("w")], []),
    2,
    r"config file .* is a directory",
  ),
  (
    "config_missing",
    lambda c: (["train", c.path("none.yaml"), "--workdir", c.path("w")], []),
    2,
    r"config file not found",
  ),
  (
    "config_binary_garbage",
    lambda c: (
      ["train", garbage_file(c, "g.yaml"), "--workdir", c.path("w")],
      [],
    ),
    2,
    r"not UTF-8 text|not valid YAML",
  ),
  (
    "config_invalid_yaml",
    train_fresh(raw="model: [unclosed\n"),
    2,
    r"not valid YAML",
  ),
  (
    "config_top_level_list",
    train_fresh(raw="- a\n- b\n"),
    2,
    r"top level must be a mapping",
  ),
  (
    "learning_rate_nan",
    train_on_trained(set_lr(float("nan"))),
    2,
    r"optimizer.learning_rate: must be a finite number",
  ),
  (
    "learning_rate_inf",
    train_on_trained(set_lr(float("inf"))),
    2,
    r"optimizer.learning_rate: must be a finite number",
  ),
  (
    "learning_rate_negative",
    train_on_trained(set_lr(-1e-3)),
    2,
    r"optimizer.learning_rate must be >= 0",
  ),
  (
    "z_loss_nan",
    train_on_trained(lambda d: d["train"].update(z_loss=float("nan"))),
    2,
    r"train.z_loss: must be a finite number",
  ),
  (
    "learning_rate_not_a_number",
    train_on_trained(set_lr("fast")),
    2,
    r"optimizer.learning_rate: expected a number, got 'fast'",
  ),
  (
    "steps_float",
    train_on_trained(lambda d: d["train"].update(steps=1.5)),
    2,
    r"train.steps: expected an integer",
  ),
  (
    "unknown_key",
    train_on_trained(lambda d: d["train"].update(stepz=3)),
    2,
    r"unknown key 'train.stepz'",
  ),
  (
    "negative_steps_flag",
    lambda c: (
      ["train", c.config(), "--workdir", c.workdir, "--steps", "-1"],
      [c.workdir],
    ),
    2,
    r"train.steps must be >= 0",
  ),
  (
    "malformed_override",
    lambda c: (
      ["train", c.config(), "--workdir", c.workdir, "--set", "train.steps"],
      [c.workdir],
    ),
    2,
    r"not of the form key.path=value",
  ),
  (
    "batch_not_divisible_by_data_parallel",
    train_fresh(lambda d: d["train"].update(batch_size=4)),
    2,
    r"train.batch_size: 4 rows .* divisible by 8",
  ),
  (
    "microbatches_do_not_divide",
    train_fresh(lambda d: d["train"].update(microbatches=3)),
    2,
    r"train.batch_size \(8\) must be divisible by train.microbatches",
  ),
  (
    "stage_weight_for_unknown_source",
    train_fresh(lambda d: d["data"]["stages"][0]["weights"].update(poetry=1)),
    2,
    r"unknown source 'poetry'",
  ),
  (
    "decode_policy_typo",
    train_fresh(
      lambda d: d["data"]["sources"]["prose"].update(on_decode_error="ignore")
    ),
    2,
    r"on_decode_error: 'ignore'",
  ),
  # Data and tokenizer files.
  (
    "tokenizer_is_a_directory",
    train_fresh(lambda d: d["data"].update(tokenizer="/tmp")),
    1,
    r"/tmp: Is a directory",
  ),
  (
    "tokenizer_garbage",
    lambda c: train_fresh(
      lambda d: d["data"].update(tokenizer=garbage_file(c, "t.model"))
    )(c),
    1,
    r"is not a SentencePiece model",
  ),
  (
    "tokenizer_missing",
    train_fresh(lambda d: d["data"].update(tokenizer="/nonexistent/tok.model")),
    1,
    r"tokenizer file not found",
  ),
  (
    "files_source_matches_nothing",
    files_source(lambda c: c.path("none-*.txt")),
    1,
    r"no file matches",
  ),
  (
    "files_source_latin1",
    files_source(latin1_source),
    1,
    r"latin1.txt: 3 of \d+ bytes are not UTF-8 .*on_decode_error",
  ),
  (
    "files_source_binary_garbage",
    files_source(lambda c: garbage_file(c, "g.txt")),
    1,
    r"g.txt: \d+ of 4096 bytes are not UTF-8",
  ),
  (
    "files_source_only_directories",
    files_source(lambda c: str(c.root)),
    1,
    r"matches only directories",
  ),
  # Multi-host environment.
  (
    "jax_num_processes_not_a_number",
    "env:JAX_NUM_PROCESSES=two,"
    "JAX_PROCESS_ID=0,JAX_COORDINATOR_ADDRESS=127.0.0.1:1234",
    2,
    r"JAX_NUM_PROCESSES='two': expected an integer",
  ),
  (
    "jax_process_id_without_coordinator",
    "env:JAX_PROCESS_ID=1",
    2,
    r"JAX_COORDINATOR_ADDRESS is not set",
  ),
  # Workdirs.
  (
    "workdir_is_a_file",
    lambda c: (["train", c.config(), "--workdir", c.tok], [c.tok]),
    2,
    r"exists and is not a directory",
  ),
  (
    "checkpoints_is_a_file",
    "checkpoints_file",
    2,
    r"checkpoint directory .*checkpoints exists and is not a directory",
  ),
  (
    "checkpoints_read_only",
    "checkpoints_read_only",
    2,
    r"checkpoint directory .*checkpoints is not writable \(Read-only",
  ),
  (
    "workdir_held_by_another_process",
    "live_lease",
    1,
    r"in use by another trainer \(pid \d+ on "
    + re.escape(socket.gethostname())
    + r", heartbeat \d+ s ago; lease .*LOCK, "
    r"stale once its heartbeat is 120 s old\); wait for it to end, stop "
    r"it, or choose another --workdir",
  ),
  (
    "from_step_without_checkpoint",
    train_on_trained(None, "--from-step", "3"),
    2,
    r"--from-step 3: no checkpoint at that step .*steps: 2, 4",
  ),
  (
    "resume_with_another_model",
    train_on_trained(lambda d: d["model"].update(d_model=48)),
    2,
    r"checkpoint at step 4 was trained with a different model",
  ),
  (
    "resume_past_train_steps",
    train_on_trained(lambda d: d["train"].update(steps=2)),
    2,
    r"past train.steps=2",
  ),
  # Params to start from.
  (
    "init_from_another_model_size",
    "init_from_other_size",
    2,
    r"checkpoint.init_from: .* holds another model \(d_model 32 there, "
    r"48 here",
  ),
  (
    "init_from_missing",
    train_fresh(
      lambda d: d["checkpoint"].update(init_from="/nonexistent/params")
    ),
    1,
    r"/nonexistent/params: no such checkpoint directory",
  ),
  (
    "init_from_damaged_export",
    "init_from_damaged",
    1,
    r"is damaged: .*export or convert it again",
  ),
  # Read-only commands.
  (
    "eval_step_missing",
    lambda c: (["eval", "--workdir", c.workdir, "--step", "3"], [c.workdir]),
    1,
    r"no checkpoint at step 3 in .*steps: 2, 4",
  ),
  (
    "eval_mistyped_workdir",
    lambda c: (["eval", "--workdir", c.workdir + "x"], [c.workdir + "x"]),
    2,
    r"--workdir .*trainedx is not a directory",
  ),
  (
    "eval_damaged_export",
    lambda c: (
      [
        "eval",
        os.path.join(c.workdir, "config.yaml"),
        "--params",
        damage(c.copy_export(), "data"),
      ],
      [c.workdir],
    ),
    1,
    r"is damaged: array",
  ),
  (
    "eval_export_truncated_config",
    lambda c: (
      [
        "eval",
        os.path.join(c.workdir, "config.yaml"),
        "--params",
        damage(c.copy_export(), "model_config.json"),
      ],
      [c.workdir],
    ),
    1,
    r"model_config.json is damaged: not valid JSON",
  ),
  (
    "plot_mistyped_workdir",
    lambda c: (["plot", c.workdir + "y"], [c.workdir + "y"]),
    2,
    r"no metrics.jsonl or eval.jsonl",
  ),
  (
    "sample_random_directory",
    lambda c: (
      [
        "sample",
        "--checkpoint",
        str(c.root),
        "--tokenizer",
        c.tok,
        "--prompt",
        "a",
      ],
      [],
    ),
    1,
    r"is not a native gemma_jax checkpoint",
  ),
  (
    "score_damaged_export",
    lambda c: (
      [
        "score",
        "--checkpoint",
        damage(c.copy_export(), "_METADATA"),
        "--text",
        "a",
        "--tokenizer",
        c.tok,
        "--out",
        str(c.root / "never.npz"),
      ],
      [str(c.root / "never.npz")],
    ),
    1,
    r"is damaged: params/_METADATA is not valid",
  ),
  (
    "data_show_config_is_a_directory",
    lambda c: (["data", "show", "--config", str(c.root)], []),
    2,
    r"is a directory",
  ),
  (
    "tokenizer_info_on_a_directory",
    lambda c: (["tokenizer", "info", str(c.root)], []),
    1,
    r"Is a directory",
  ),
  # Conversions from bad sources.
  (
    "convert_garbage_safetensors",
    "garbage_safetensors",
    1,
    r"is not a readable hf checkpoint",
  ),
  (
    "convert_truncated_safetensors",
    "truncated_safetensors",
    1,
    r"is not a readable hf checkpoint",
  ),
  (
    "convert_random_directory_as_official_flax",
    lambda c: (
      [
        "convert",
        "--from",
        "kaggle",
        "--to",
        "native",
        "--model",
        "tiny-gemma2",
        str(c.root),
        c.path("out"),
      ],
      [],
    ),
    1,
    r"is not a readable kaggle checkpoint \(No structure could be "
    r"identified",
  ),
  (
    "convert_source_is_a_file",
    lambda c: (
      ["convert", "--from", "native", "--to", "hf", c.tok, c.path("out")],
      [],
    ),
    1,
    r"is a file; --from native takes",
  ),
  (
    "merge_input_not_a_checkpoint",
    lambda c: (
      ["merge", str(c.root), str(c.root), "--out", c.path("merged")],
      [],
    ),
    1,
    r"not a native gemma_jax checkpoint",
  ),
  # Datasets.
  (
    "prepare_latin1_input",
    "prepare_latin1",
    1,
    r"latin1.txt: 3 of \d+ bytes are not UTF-8",
  ),
  (
    "prepare_existing_name_other_input",
    "prepare_other_input",
    1,
    r"already exists .* with different input .*--overwrite",
  ),
  # Faults while writing.
  (
    "disk_full_at_checkpoint_save",
    "disk_full_checkpoint",
    1,
    r"No space left on device \(free some space",
  ),
  ("disk_full_at_export", "disk_full_export", 1, r"No space left on device"),
]


def damage(path, what):
  """Damages an export (or a checkpoint's state dir): `data` truncates its
  largest array data file; a file name truncates that file."""
  if what == "data":
    files = [
      os.path.join(d, f)
      for d, _, fs in os.walk(path)
      for f in fs
      if os.sep + "d" + os.sep in os.path.join(d, f)
    ]
    target = max(files, key=os.path.getsize)
  else:
    target = next(
      os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f == what
    )
  with open(target, "r+b") as f:
    f.truncate(os.path.getsize(target) // 2)
  return path


def special(name, c, monkeypatch):
  """Cases that need more than a config edit."""
  if name.startswith("env:"):
    for item in name[4:].split(","):
      key, value = item.split("=")
      monkeypatch.setenv(key, value)
    return ["train", c.config(), "--workdir", c.workdir], [c.workdir]
  if name == "checkpoints_file":
    work = c.path("w")
    os.makedirs(work)
    open(os.path.join(work, "checkpoints"), "w").close()
    return ["train", c.config(), "--workdir", work], [work]
  if name == "checkpoints_read_only":
    work = c.copy_run()
    real = os.path.join(work, "checkpoints")
    from etils import epath

    original = epath.Path.write_text

    def read_only(self, *a, **k):
      if str(self.parent) == real:
        raise OSError(errno.EROFS, "Read-only file system", str(self))
      return original(self, *a, **k)

    monkeypatch.setattr(epath.Path, "write_text", read_only, raising=False)
    monkeypatch.setattr(type(epath.Path(real)), "write_text", read_only)
    return ["train", c.config(), "--workdir", work], [work]
  if name == "live_lease":
    # Another process holds the workdir (its lease, as a trainer takes it).
    work = c.copy_run()
    holder = subprocess.Popen(
      [
        sys.executable,
        "-c",
        "import sys, time; from gemma_jax.checkpoint.lease "
        "import WorkdirLease; WorkdirLease(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(120)",
        work,
      ],
      cwd=pathlib.Path(__file__).parent.parent,
      stdout=subprocess.PIPE,
      text=True,
    )
    assert holder.stdout.readline() == "held\n"
    monkeypatch.setattr(c, "_holder", holder, raising=False)
    monkeypatch.setattr(c, "_holder_pid", holder.pid, raising=False)
    return ["train", c.config(), "--workdir", work], [work]
  if name == "init_from_other_size":
    export = os.path.join(c.workdir, "params")

    def edit(d):
      d["model"]["d_model"] = 48
      d["checkpoint"]["init_from"] = export

    return (["train", c.config(edit), "--workdir", c.path("w")], [c.workdir])
  if name == "init_from_damaged":
    export = damage(c.copy_export(), "data")
    return (
      [
        "train",
        c.config(lambda d: d["checkpoint"].update(init_from=export)),
        "--workdir",
        c.path("w"),
      ],
      [c.workdir],
    )
  if name in ("garbage_safetensors", "truncated_safetensors"):
    from gemma_jax.checkpoint.testing import write_hf_dir

    src = c.path("hf")
    write_hf_dir(
      pathlib.Path(__file__).parent
      / "fixtures"
      / "parity"
      / "gemma2_gqa_window.npz",
      pathlib.Path(src),
    )
    weights = os.path.join(src, "model.safetensors")
    if name == "garbage_safetensors":
      with open(weights, "wb") as f:
        f.write(np.random.default_rng(1).bytes(1000))
    else:
      with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    out = c.path("out")
    return ["convert", "--from", "hf", "--to", "native", src, out], [out]
  if name == "prepare_latin1":
    data_dir = c.path("tfds")
    return (
      [
        "data",
        "prepare",
        "--input",
        latin1_source(c),
        "--name",
        "x",
        "--data-dir",
        data_dir,
        "--tokenizer",
        c.tok,
      ],
      [data_dir],
    )
  if name == "prepare_other_input":
    data_dir = c.path("tfds")
    first, second = c.path("a.txt"), c.path("b.txt")
    open(first, "w").write("the first input, one document.")
    open(second, "w").write("another input altogether.")
    base = [
      "data",
      "prepare",
      "--name",
      "x",
      "--data-dir",
      data_dir,
      "--tokenizer",
      c.tok,
    ]
    assert cli.main(base + ["--input", first]) == 0
    assert cli.main(base + ["--input", first]) == 0  # same input: fine
    return base + ["--input", second], [data_dir]
  if name in ("disk_full_checkpoint", "disk_full_export"):
    # The run resumes from checkpoint 2 (4 removed) and the write at step 4
    # finds the disk full: checkpoint 2 and the earlier export stay whole.
    import orbax.checkpoint as ocp

    work = c.copy_run()
    shutil.rmtree(os.path.join(work, "checkpoints", "4"))

    def full(self, *a, **k):
      raise OSError(errno.ENOSPC, "No space left on device", work)

    if name == "disk_full_checkpoint":
      monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    else:
      monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", full)
    return ["train", c.config(), "--workdir", work], [
      os.path.join(work, "checkpoints", "2"),
      os.path.join(work, "params"),
    ]
  raise KeyError(name)


@pytest.mark.parametrize(
  "name, build, code, pattern", CASES, ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_and_loses_nothing(
  ctx, capsys, monkeypatch, name, build, code, pattern
):
  argv, protect = (
    special(build, ctx, monkeypatch) if isinstance(build, str) else build(ctx)
  )
  try:
    expect_one_line(capsys, argv, code, pattern, protect)
  finally:
    holder = getattr(ctx, "_holder", None)
    if holder is not None:
      holder.kill()
      holder.wait()
  # The shared run is never left locked.
  assert not os.path.exists(os.path.join(ctx.workdir, "LOCK"))


def test_at_least_forty_cases():
  assert len(CASES) >= 40


# Round 3 (issue 20): no command writes a non-finite tensor or accepts a
# non-finite number; what can be checked before the compile is; every
# failure is one line. Each case: (id, build(ctx) -> (argv, protected
# paths), exit code, pattern); outputs are protected while absent, so a
# case that wrote one fails.
def export(c):
  return os.path.join(c.workdir, "params")


def nan_export(c):
  """A copy of the export whose embedding holds a NaN, written with orbax
  directly (every writer of this package refuses one)."""
  if getattr(c, "_nan_export", None) is None:
    import orbax.checkpoint as ocp

    from gemma_jax.checkpoint import native

    params, _ = native.load(export(c))
    params["embedder"]["embedding"][3, 1] = np.nan
    path = c.path("nan-params")
    os.makedirs(path)
    shutil.copy(os.path.join(export(c), native.CONFIG_FILE), path)
    with ocp.PyTreeCheckpointer() as ckptr:
      ckptr.save(os.path.join(path, native.PARAMS_DIR), params)
    c._nan_export = path
  return c._nan_export


def hf_export(c):
  """The export converted to a Hugging Face directory (once)."""
  if getattr(c, "_hf_export", None) is None:
    c._hf_export = c.path("hf")
    argv = ["convert", "--from", "native", "--to", "hf", export(c)]
    assert cli.main([*argv, c._hf_export]) == 0
  return c._hf_export


def hf_copy(c, damage_weights=None):
  """A copy of hf_export; `damage_weights(path)` edits its safetensors."""
  path = c.path("hf-copy")
  shutil.copytree(hf_export(c), path)
  if damage_weights is not None:
    damage_weights(os.path.join(path, "model.safetensors"))
  return path


def garbage_weights(path):
  with open(path, "wb") as f:
    f.write(np.random.default_rng(2).bytes(1000))


def truncated_weights(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def sharded_without_a_shard(path):
  """The single file named as the second of two shards by an index."""
  directory = os.path.dirname(path)
  name = "model-00001-of-00002.safetensors"
  os.rename(path, os.path.join(directory, name))
  from gemma_jax.checkpoint import safetensors_io

  names = safetensors_io.shapes(os.path.join(directory, name))
  weight_map = dict.fromkeys(names, name)
  weight_map[next(iter(names))] = "model-00002-of-00002.safetensors"
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


def half_written_export(c):
  """An export whose model_config.json (written last) is missing."""
  path = c.copy_export()
  os.remove(os.path.join(path, "model_config.json"))
  return path


def init_from(path_fn, *extra_edits):
  def build(c):
    path = path_fn(c)

    def edit(d):
      d["checkpoint"]["init_from"] = path
      for e in extra_edits:
        e(d)

    work = c.path("w")
    return ["train", c.config(edit), "--workdir", work], [work, c.workdir]

  return build


def with_base(c):
  return [export(c), export(c), "--base", export(c)]


def merge_argv(*flags, inputs=None, out_name="merged"):
  def build(c):
    out = c.path(out_name)
    srcs = inputs(c) if inputs else [export(c), export(c)]
    return ["merge", *srcs, *flags, "--out", out], [out, export(c)]

  return build


def sample_argv(*flags):
  def build(c):
    return (
      [
        "sample",
        "--checkpoint",
        export(c),
        "--tokenizer",
        c.tok,
        "--prompt",
        "the",
        *flags,
      ],
      [export(c)],
    )

  return build


def fisher_argv(*flags, params=None):
  def build(c):
    out = c.path("fisher")
    argv = ["fisher", c.config(), "--params", (params or export)(c)]
    return [*argv, *flags, "--out", out], [out]

  return build


def score_argv(*flags, checkpoint=export):
  def build(c):
    out = c.path("scores.npz")
    argv = ["score", "--checkpoint", checkpoint(c), "--tokenizer", c.tok]
    return [*argv, *flags, "--out", out], [out]

  return build


def local_task(c, data=None, raw=None):
  """A folder with one harness task, `mc`, over a local JSON-lines file
  (the offline recipe of docs/evaluation.md): `raw` bytes written to it,
  or `data` naming a file that is not written."""
  folder = c.path("tasks")
  os.makedirs(folder)
  path = data or os.path.join(folder, "task.jsonl")
  if raw is not None:
    with open(path, "wb") as f:
      f.write(raw)
  config = {
    "task": "mc",
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": path}},
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "{{context}}",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{gold}}",
  }
  with open(os.path.join(folder, "mc.yaml"), "w") as f:
    json.dump(config, f)
  return folder


def latin1_task(c):
  line = '{"context": "Où est-il ?", "choices": ["là", "ici"], "gold": 0}\n'
  return local_task(c, raw=line.encode("latin-1"))


def fisher_tasks(folder_fn):
  """`gemma-jax fisher --tasks mc --include-path folder_fn(c)`."""

  def build(c):
    return fisher_argv("--tasks", "mc", "--include-path", folder_fn(c))(c)

  return build


def with_distill_dump(path_fn):
  """Trains with distill.dump = path_fn(c) (offline distillation)."""

  def build(c):
    dump = path_fn(c)

    def edit(d):
      d["distill"] = {"dump": dump, "topk": 4}

    # The dump is read once the workdir is taken (its lease): the workdir
    # may be created, but nothing is written into it.
    work = c.path("w")
    return ["train", c.config(edit), "--workdir", work], [dump], [work]

  return build


ROUND3_CASES = [
  # Numbers on the command line: finite and in range, at parse time.
  (
    "merge_weights_nan",
    merge_argv("--weights", "nan", "1"),
    2,
    r"argument --weights: must be a finite number, got 'nan'",
  ),
  (
    "merge_weights_nan_with_base",
    lambda c: merge_argv(
      "--weights", "nan", inputs=lambda c: [export(c), "--base", export(c)]
    )(c),
    2,
    r"argument --weights: must be a finite number, got 'nan'",
  ),
  (
    "merge_weights_inf",
    merge_argv("--weights", "inf", "-inf", "--normalize"),
    2,
    r"argument --weights: must be a finite number, got 'inf'",
  ),
  (
    "merge_weights_not_a_number",
    merge_argv("--weights", "half", "0.5"),
    2,
    r"argument --weights: expected a number, got 'half'",
  ),
  (
    "merge_slerp_t_nan",
    lambda c: merge_argv(
      "--method",
      "slerp",
      "--t",
      "nan",
      inputs=with_base,
    )(c),
    2,
    r"argument --t: must be a finite number, got 'nan'",
  ),
  (
    "merge_slerp_t_above_one",
    lambda c: merge_argv(
      "--method",
      "slerp",
      "--t",
      "1.5",
      inputs=with_base,
    )(c),
    2,
    r"--t must be in \[0, 1\], got 1.5",
  ),
  (
    "merge_eta_nan",
    lambda c: merge_argv(
      "--eta",
      "nan",
      inputs=with_base,
    )(c),
    2,
    r"argument --eta: must be a finite number, got 'nan'",
  ),
  (
    "fisher_batch_size_zero",
    fisher_argv("--estimator", "batch_mean", "--batch-size", "0"),
    2,
    r"argument --batch-size: must be >= 1, got 0",
  ),
  (
    "fisher_sequences_negative",
    fisher_argv("--source", "prose", "--sequences", "-4"),
    2,
    r"argument --sequences: must be >= 1, got -4",
  ),
  (
    "fisher_rows_per_vmap_float",
    fisher_argv("--source", "prose", "--rows-per-vmap", "1.5"),
    2,
    r"argument --rows-per-vmap: expected an integer, got '1.5'",
  ),
  (
    "report_batch_size_zero",
    lambda c: (
      [
        "report",
        c.config(),
        "--checkpoint",
        f"base={export(c)}",
        "--out",
        c.path("report"),
        "--batch-size",
        "0",
      ],
      [],
    ),
    2,
    r"argument --batch-size: must be >= 1, got 0",
  ),
  (
    "report_max_length_zero",
    lambda c: (
      [
        "report",
        c.config(),
        "--checkpoint",
        f"base={export(c)}",
        "--out",
        c.path("report"),
        "--max-length",
        "0",
      ],
      [],
    ),
    2,
    r"argument --max-length: must be >= 1, got 0",
  ),
  (
    "score_batch_size_zero",
    score_argv("--text", "a b", "--batch-size", "0"),
    2,
    r"argument --batch-size: must be >= 1, got 0",
  ),
  (
    "eval_batches_zero",
    lambda c: (["eval", "--workdir", c.workdir, "--batches", "0"], []),
    2,
    r"argument --batches: must be >= 1, got 0",
  ),
  (
    "sample_top_k_zero",
    sample_argv("--top-k", "0"),
    2,
    r"argument --top-k: must be >= 1, got 0",
  ),
  (
    "sample_top_k_above_vocab",
    sample_argv("--top-k", "100000"),
    2,
    r"--top-k 100000 is more than the vocabulary of .*params \(512 tokens\)",
  ),
  (
    "sample_top_p_zero",
    sample_argv("--temperature", "1", "--top-p", "0"),
    2,
    r"argument --top-p: must be > 0.0, got 0",
  ),
  (
    "sample_temperature_nan",
    sample_argv("--temperature", "nan"),
    2,
    r"argument --temperature: must be a finite number, got 'nan'",
  ),
  (
    "sample_max_new_tokens_zero",
    sample_argv("--max-new-tokens", "0"),
    2,
    r"argument --max-new-tokens: must be >= 1, got 0",
  ),
  (
    "quantize_block_size_zero",
    lambda c: (
      ["quantize", export(c), c.path("q"), "--block-size", "0"],
      [export(c)],
    ),
    2,
    r"--block-size must be positive",
  ),
  (
    "distill_topk_above_vocab",
    lambda c: (
      [
        "train",
        c.config(
          lambda d: d.update(distill={"dump": c.path("dump"), "topk": 1000})
        ),
        "--workdir",
        c.path("w"),
      ],
      [],
    ),
    2,
    r"distill.topk \(1000\) must be <= model.vocab_size \(512\)",
  ),
  (
    "optimizer_b2_one",
    train_on_trained(lambda d: d["optimizer"].update(b2=1.0)),
    2,
    r"optimizer.b2 must be in \[0, 1\), got 1.0",
  ),
  (
    "optimizer_min_lr_ratio_above_one",
    train_on_trained(lambda d: d["optimizer"].update(min_lr_ratio=1.5)),
    2,
    r"optimizer.min_lr_ratio must be in \[0, 1\], got 1.5",
  ),
  (
    "train_z_loss_negative",
    train_on_trained(lambda d: d["train"].update(z_loss=-1e-4)),
    2,
    r"train.z_loss must be >= 0, got -0.0001",
  ),
  (
    "score_empty_text",
    score_argv("--text", ""),
    2,
    r"--text '' \(text 1\) has no token to score",
  ),
  # Tensors: never written when they hold NaN or inf; one line naming the
  # tensor and the input it came from.
  (
    "merge_input_holds_nan",
    merge_argv(inputs=lambda c: [export(c), nan_export(c)]),
    1,
    r"not writing .*merged: tensor embedder/embedding of .*nan-params "
    r"holds NaN or inf; nothing was written",
  ),
  (
    "merge_base_holds_nan",
    merge_argv(
      "--weights",
      "0.5",
      inputs=lambda c: [export(c), "--base", nan_export(c)],
    ),
    1,
    r"tensor embedder/embedding of .*nan-params holds NaN or inf",
  ),
  (
    "merge_to_hf_input_holds_nan",
    merge_argv("--to", "hf", inputs=lambda c: [nan_export(c), export(c)]),
    1,
    r"tensor embedder/embedding of .*nan-params holds NaN or inf",
  ),
  (
    "quantize_source_holds_nan",
    lambda c: (["quantize", nan_export(c), c.path("q")], [c.path("q") + "x"]),
    1,
    r"not writing .*q: tensor embedder/embedding of .*nan-params holds "
    r"NaN or inf",
  ),
  (
    "convert_to_hf_source_holds_nan",
    lambda c: (
      ["convert", "--from", "native", "--to", "hf", nan_export(c), c.path("o")],
      [],
    ),
    1,
    r"not writing .*o: tensor embedder/embedding holds NaN or inf",
  ),
  (
    "score_checkpoint_holds_nan",
    score_argv("--text", "the cat sat", checkpoint=nan_export),
    1,
    r"not writing .*scores.npz: tensor \w+ of .*nan-params holds NaN or inf",
  ),
  (
    "fisher_params_hold_nan",
    fisher_argv("--source", "prose", "--sequences", "2", params=nan_export),
    1,
    r"not writing .*fisher: tensor embedder/embedding of .*nan-params holds "
    r"NaN or inf",
  ),
  # Inputs checked before the compile, in the words `convert` uses.
  (
    "init_from_garbage_safetensors",
    init_from(lambda c: hf_copy(c, garbage_weights)),
    1,
    r"checkpoint.init_from: .*hf-copy is not a readable hf checkpoint "
    r"\(SafetensorError: .*\); check the path, or export or convert it again",
  ),
  (
    "init_from_truncated_safetensors",
    init_from(lambda c: hf_copy(c, truncated_weights)),
    1,
    r"checkpoint.init_from: .*hf-copy is not a readable hf checkpoint",
  ),
  (
    "init_from_hf_shard_missing",
    init_from(lambda c: hf_copy(c, sharded_without_a_shard)),
    1,
    r"hf-copy is incomplete: model-00002-of-00002.safetensors, named in "
    r"model.safetensors.index.json, is missing",
  ),
  (
    "init_from_half_written_export",
    init_from(half_written_export),
    1,
    r"params is incomplete: model_config.json is missing \(the write of it "
    r"was cut short\); export or convert it again",
  ),
  (
    "init_from_interrupted_export",
    init_from(
      lambda c: (
        os.makedirs(os.path.join(c.root, ".gone.tmp"), exist_ok=True),
        str(c.root / "gone"),
      )[1]
    ),
    1,
    r"gone: no such checkpoint directory; a write of it was interrupted "
    r"\(.gone.tmp is left\)",
  ),
  (
    "teacher_garbage_safetensors",
    lambda c: (
      [
        "train",
        c.config(
          lambda d: d.update(
            distill={"teacher": hf_copy(c, garbage_weights), "topk": 4}
          )
        ),
        "--workdir",
        c.path("w"),
      ],
      [],
    ),
    1,
    r"distill.teacher: .*hf-copy is not a readable hf checkpoint",
  ),
  (
    "fisher_of_another_model",
    "fisher_other_model",
    1,
    r"continual.fisher .* is the Fisher of another model shape: parameter "
    r"embedder/embedding",
  ),
  (
    "fisher_metadata_garbage",
    "fisher_garbage_meta",
    1,
    r"continual.fisher: .* is not a readable Fisher checkpoint "
    r"\(JSONDecodeError",
  ),
  (
    "distill_dump_record_file_truncated",
    with_distill_dump(lambda c: damaged_dump(c, "truncate")),
    1,
    r"distill.dump: .*array_record is damaged \(.*\); remove it and run "
    r"`gemma-jax distill dump` again",
  ),
  (
    "distill_dump_record_file_missing",
    with_distill_dump(lambda c: damaged_dump(c, "remove")),
    1,
    r"distill.dump .* is incomplete: steps-.*array_record is missing",
  ),
  (
    "distill_dump_manifest_garbage",
    with_distill_dump(lambda c: damaged_dump(c, "manifest")),
    1,
    r"distill.dump .*: .*dump.json is damaged: not valid JSON",
  ),
  (
    "task_file_latin1",
    fisher_tasks(latin1_task),
    1,
    r"task mc: data file .*task.jsonl: 2 of \d+ bytes are not UTF-8 "
    r"\(first at byte \d+\); convert the file to UTF-8",
  ),
  (
    "task_file_missing",
    fisher_tasks(lambda c: local_task(c, data=c.path("gone.jsonl"))),
    1,
    r"task mc: data file .*gone.jsonl does not exist "
    r"\(dataset_kwargs.data_files of its YAML\)",
  ),
  # Damaged files: one line naming the file, no traceback or asyncio noise.
  (
    "eval_half_written_export",
    lambda c: (
      [
        "eval",
        os.path.join(c.workdir, "config.yaml"),
        "--params",
        half_written_export(c),
      ],
      [c.workdir],
    ),
    1,
    r"params is incomplete: model_config.json is missing",
  ),
  (
    "convert_half_written_export",
    lambda c: (
      [
        "convert",
        "--from",
        "native",
        "--to",
        "hf",
        half_written_export(c),
        c.path("o"),
      ],
      [],
    ),
    1,
    r"is incomplete: model_config.json is missing",
  ),
  (
    "eval_checkpoint_truncated",
    "checkpoint_truncated",
    1,
    r"checkpoint .*/4 is damaged: array [\w.]+: Encountered error while "
    r"reading array index",
  ),
]


def damaged_dump(c, how):
  """A copy of the run's distillation dump (written once, the trained
  export as its teacher), damaged: `truncate` a record file, `remove` one,
  or garble the `manifest`."""
  if getattr(c, "_dump", None) is None:
    c._dump = c.path("dump")
    cfg = c.config(
      lambda d: d.update(distill={"teacher": export(c), "topk": 4})
    )
    argv = ["distill", "dump", cfg, "--out", c._dump, "--steps-per-file", "2"]
    assert cli.main(argv) == 0
  path = c.path("dump-copy")
  shutil.copytree(c._dump, path)
  files = sorted(f for f in os.listdir(path) if f.endswith(".array_record"))
  target = os.path.join(path, files[-1])
  if how == "truncate":
    with open(target, "r+b") as f:
      f.truncate(os.path.getsize(target) // 2)
  elif how == "remove":
    os.remove(target)
  else:
    with open(os.path.join(path, "dump.json"), "w") as f:
      f.write("{not json")
  return path


def round3_special(name, c):
  if name in ("fisher_other_model", "fisher_garbage_meta"):
    from gemma_jax.checkpoint import fisher as fisher_store
    from gemma_jax.checkpoint import layout
    from gemma_jax.train.config import load_config

    other = load_config(c.config(lambda d: d["model"].update(d_model=48)))
    tree = layout.unflatten(
      {
        p: np.ones(s, np.float32)
        for p, s in layout.param_shapes(other.model).items()
      }
    )
    path = c.path("fisher")
    fisher_store.save(path, tree, other.model, {})
    if name == "fisher_garbage_meta":
      with open(os.path.join(path, fisher_store.META_FILE), "w") as f:
        f.write("{garbage")

    def edit(d):
      d["checkpoint"]["init_from"] = export(c)
      d["continual"] = {"ewc_lambda": 1.0, "fisher": path}

    work = c.path("w")
    return ["train", c.config(edit), "--workdir", work], [work, path]
  if name == "checkpoint_truncated":
    work = c.copy_run()
    damage(os.path.join(work, "checkpoints", "4"), "data")
    return ["eval", "--workdir", work, "--step", "4"], [work]
  raise KeyError(name)


@pytest.mark.parametrize(
  "name, build, code, pattern",
  ROUND3_CASES,
  ids=[c[0] for c in ROUND3_CASES],
)
def test_round3_bad_input_is_one_line_and_writes_nothing(
  ctx, capsys, name, build, code, pattern
):
  argv, protect, *empty = (
    round3_special(build, ctx) if isinstance(build, str) else build(ctx)
  )
  expect_one_line(capsys, argv, code, pattern, protect)
  for path in empty[0] if empty else ():
    assert not digest(path), f"{path} was written"
  assert not os.path.exists(os.path.join(ctx.workdir, "LOCK"))


def test_round3_has_at_least_forty_cases():
  assert len(ROUND3_CASES) >= 40


# gs:// paths other than --workdir: checked in seconds too (the env
# helpers are defined with the --workdir cases below).
ROUND3_GCS_CASES = [
  (
    "init_from",
    lambda c: [
      "train",
      c.config(lambda d: d["checkpoint"].update(init_from="gs://b/params")),
      "--workdir",
      c.path("w"),
    ],
    r"checkpoint.init_from gs://b/params: cannot reach Cloud Storage",
  ),
  (
    "teacher",
    lambda c: [
      "train",
      c.config(lambda d: d.update(distill={"teacher": "gs://b/t", "topk": 4})),
      "--workdir",
      c.path("w"),
    ],
    r"distill.teacher gs://b/t: cannot reach Cloud Storage",
  ),
  (
    "fisher_out",
    lambda c: [
      "fisher",
      c.config(),
      "--params",
      export(c),
      "--source",
      "prose",
      "--sequences",
      "2",
      "--out",
      "gs://b/fisher",
    ],
    r"--out gs://b/fisher: cannot reach Cloud Storage",
  ),
  (
    "distill_dump_out",
    lambda c: [
      "distill",
      "dump",
      c.config(lambda d: d.update(distill={"teacher": export(c), "topk": 4})),
      "--out",
      "gs://b/dump",
    ],
    r"--out gs://b/dump: cannot reach Cloud Storage",
  ),
  (
    "quantize_out",
    lambda c: ["quantize", export(c), "gs://b/q", "--block-size", "channel"],
    r"output gs://b/q: cannot reach Cloud Storage",
  ),
  (
    "merge_input",
    lambda c: ["merge", export(c), "gs://b/a", "--out", c.path("m")],
    r"checkpoint gs://b/a: cannot reach Cloud Storage",
  ),
  (
    "score_checkpoint",
    lambda c: [
      "score",
      "--checkpoint",
      "gs://b/ckpt",
      "--text",
      "a",
      "--tokenizer",
      c.tok,
      "--out",
      c.path("s.npz"),
    ],
    r"checkpoint gs://b/ckpt: cannot reach Cloud Storage",
  ),
]


@pytest.mark.parametrize(
  "name, argv, pattern",
  ROUND3_GCS_CASES,
  ids=[c[0] for c in ROUND3_GCS_CASES],
)
def test_round3_a_gs_path_that_cannot_work_fails_in_seconds(
  ctx, capsys, monkeypatch, tmp_path, name, argv, pattern
):
  import time

  _closed_port_env(monkeypatch, tmp_path)
  start = time.monotonic()
  expect_one_line(capsys, argv(ctx), 1, pattern)
  assert time.monotonic() - start < 30


@pytest.fixture
def small_disk(tmp_path):
  """A 2 MB tmpfs (mounting needs root; skipped without)."""
  path = tmp_path / "small-disk"
  path.mkdir()
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(path)],
    capture_output=True,
  )
  if mounted.returncode != 0:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  yield path
  subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk, leave_kb: int) -> None:
  """Fills `disk` so that about `leave_kb` KiB stay free."""
  free_kb = shutil.disk_usage(disk).free // 1024
  with open(disk / "filler", "wb") as f:
    f.write(b"\0" * max(free_kb - leave_kb, 0) * 1024)


def test_disk_full_at_a_real_checkpoint_save_is_one_line(
  ctx, capsys, small_disk, monkeypatch
):
  # A real full disk, not a patched error: tensorstore reports it as
  # RESOURCE_EXHAUSTED from orbax's background threads. The final save
  # fails, then the export; the line is the save's, raised while the
  # trainer closes, and the rest of closing still runs (the metrics are
  # closed, the lease is given back).
  from gemma_jax.train import metrics

  closed = []
  real_close = metrics.MetricsWriter.close
  monkeypatch.setattr(
    metrics.MetricsWriter,
    "close",
    lambda self: (closed.append(True), real_close(self))[-1],
  )
  work = small_disk / "run"
  shutil.copytree(
    ctx.workdir, work, ignore=lambda d, names: ["4"] * d.endswith("checkpoints")
  )
  fill(small_disk, leave_kb=300)  # a checkpoint takes about 530 KiB
  line = expect_one_line(
    capsys,
    ["train", ctx.config(), "--workdir", work],
    1,
    r"checkpoint .*/checkpoints/4 was not saved: .*: No space left on "
    r"device \(free some space and rerun; completed checkpoints and exports "
    r"are kept whole\)",
    [work / "checkpoints" / "2"],
  )
  assert "RESOURCE_EXHAUSTED" not in line
  assert closed == [True]
  assert not (work / "LOCK").exists()


def test_a_failed_background_save_is_reported_with_its_step(
  ctx, capsys, small_disk
):
  # Saves every 4 steps until the disk is full (a checkpoint takes about
  # 530 KiB): the failure names the step whose save failed, and the run
  # stops there, long before its end. Only the checkpoints are on the
  # small disk (a symlink), so that no metrics write can fail first
  # (that case names its file: test_metrics). The learning-rate schedule stays
  # ctx's (it decays over train.steps, a constant of the compiled step):
  # the step is ctx's compiled program, loaded, not compiled again.
  def edit(d):
    d["train"].update(steps=16, eval_every=0)
    d["optimizer"].update(decay_steps=run_config(ctx.tok)["train"]["steps"])
    d["checkpoint"].update(save_every=4, keep=10, export_params=False)

  work = pathlib.Path(ctx.path("run"))
  work.mkdir()
  (work / "checkpoints").symlink_to(small_disk)
  fill(small_disk, leave_kb=900)
  line = expect_one_line(
    capsys,
    ["train", ctx.config(edit), "--workdir", work],
    1,
    r"checkpoint .*/checkpoints/\d+ was not saved: .*No space left on device",
  )
  failed = int(re.search(r"checkpoints/(\d+) was not saved", line)[1])
  saved = [int(n) for n in os.listdir(work / "checkpoints") if n.isdigit()]
  assert all(s < failed for s in saved), (saved, failed)
  steps = [r["step"] for r in read_records(work / "metrics.jsonl")]
  assert max(steps) < 16


def test_an_error_while_closing_does_not_hide_the_failure(
  ctx, capsys, monkeypatch
):
  # On a full disk a failed background save is reported first, and the
  # TensorBoard writer's flush then fails too while the trainer closes
  # (seen in CI): the one line is still the save's, the lease is still
  # given back, and the metrics files are still closed.
  from gemma_jax.train import checkpointing, metrics

  work = pathlib.Path(ctx.path("run"))
  calls = {"n": 0}

  def check(self):
    calls["n"] += 1
    if calls["n"] == 3:
      full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      raise checkpointing.save_failed(self.directory, 2, full)

  closed = {}
  real_close = metrics.MetricsWriter.close

  def close(self):
    real_close(self)
    closed["metrics"] = True
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(checkpointing.Checkpointer, "check", check)
  monkeypatch.setattr(metrics.MetricsWriter, "close", close)
  expect_one_line(
    capsys,
    ["train", ctx.config(), "--workdir", work],
    1,
    r"checkpoint .*/checkpoints/2 was not saved: .*No space left on device",
  )
  assert closed == {"metrics": True}
  assert not (work / "LOCK").exists()


def read_records(path):
  from gemma_jax.train.metrics import read_jsonl

  return read_jsonl(str(path))


def test_a_damaged_lock_is_taken_over_as_torn(ctx, capsys):
  work = ctx.copy_run()
  with open(os.path.join(work, "LOCK"), "wb") as f:
    f.write(np.random.default_rng(3).bytes(64))
  # Older than a lease being written (lease.TORN_AFTER_S): a dead writer's.
  os.utime(os.path.join(work, "LOCK"), (time.time() - 3600,) * 2)
  capsys.readouterr()
  assert cli.main(["train", ctx.config(), "--workdir", work]) == 0
  err = capsys.readouterr().err
  assert "Traceback" not in err and "UnicodeDecodeError" not in err
  assert "torn, unreadable lease" in err
  assert not os.path.exists(os.path.join(work, "LOCK"))


def test_a_garbage_metrics_line_is_kept_aside_not_dropped(ctx, capsys):
  work = ctx.copy_run()
  metrics = os.path.join(work, "metrics.jsonl")
  lines = open(metrics, "rb").read().splitlines(keepends=True)
  garbage = b"\xff\xfe not a record\n"
  with open(metrics, "wb") as f:
    f.writelines([lines[0], garbage, *lines[1:]])
  capsys.readouterr()
  assert cli.main(["train", ctx.config(), "--workdir", work]) == 0
  err = capsys.readouterr().err
  assert re.search(
    r"metrics.jsonl: 1 line\(s\) are not JSON records \(first: line 2\); "
    r"kept aside in .*metrics.jsonl.corrupt",
    err,
  ), err
  assert open(metrics + ".corrupt", "rb").read() == garbage
  assert open(metrics, "rb").read().splitlines(keepends=True) == lines


# gs:// paths that cannot work: one line within seconds, never a hang on
# the clients' own retries (a minute and more).
def _closed_port_env(monkeypatch, tmp_path):
  del tmp_path
  from gemma_jax import fileio

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  for key, value in fileio.emulator_env(f"http://127.0.0.1:{port}").items():
    monkeypatch.setenv(key, value)


def _no_credentials_env(monkeypatch, tmp_path):
  from gemma_jax import fileio

  for key in fileio.emulator_env("x"):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setenv(
    "GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json")
  )


GCS_CASES = [
  (
    "train_endpoint_unreachable",
    _closed_port_env,
    lambda c: ["train", c.config(), "--workdir", "gs://b/run"],
    1,
    r"--workdir gs://b/run: cannot reach Cloud Storage at 127\.0\.0\.1:\d+ "
    r"\(Connection refused\) within 10 s",
  ),
  (
    "train_no_credentials",
    _no_credentials_env,
    lambda c: ["train", c.config(), "--workdir", "gs://b/run"],
    2,
    r"--workdir gs://b/run: no Google Cloud credentials on this machine",
  ),
  (
    "train_no_such_bucket",
    "emulator",
    lambda c: ["train", c.config(), "--workdir", "gs://no-such-bucket/run"],
    2,
    r"there is no bucket gs://no-such-bucket",
  ),
  (
    "eval_endpoint_unreachable",
    _closed_port_env,
    lambda c: ["eval", "--workdir", "gs://b/run"],
    1,
    r"--workdir gs://b/run: cannot reach Cloud Storage",
  ),
  (
    "prepare_endpoint_unreachable",
    _closed_port_env,
    lambda c: [
      "data",
      "prepare",
      "--input",
      c.config(),
      "--name",
      "x",
      "--data-dir",
      "gs://b/tfds",
      "--tokenizer",
      c.tok,
    ],
    1,
    r"--data-dir gs://b/tfds: cannot reach Cloud Storage",
  ),
]


@pytest.mark.parametrize(
  "name, env, argv, code, pattern", GCS_CASES, ids=[c[0] for c in GCS_CASES]
)
def test_a_gs_path_that_cannot_work_fails_in_seconds(
  ctx, capsys, monkeypatch, tmp_path, request, name, env, argv, code, pattern
):
  import time

  if env == "emulator":
    request.getfixturevalue("gcs_bucket")
  else:
    env(monkeypatch, tmp_path)
  start = time.monotonic()
  expect_one_line(capsys, argv(ctx), code, pattern)
  assert time.monotonic() - start < 30


# --- launch ---
# `gemma-jax launch` refuses what the real tools (gcloud, Cloud TPU, xpk,
# the JobSet API) would reject, before any gcloud call: exit 2, one line
# naming the flag and the fix, no command printed, nothing written (no log
# folder, no runs/launch/NAME), and gcloud never run (it is not on PATH).

LAUNCH_PODS = pathlib.Path(__file__).parent.parent / "configs" / "pods"


def launch_argv(action, config, tpu, *extra, zone="us-east5-a"):
  where = () if action == "gke" else ("--zone", zone)
  gke = ("--image", "img:1", "--workdir", "gs://b/r") if action == "gke" else ()
  work = ("--workdir", "gs://b/r", "--log-dir", "logs")
  return [
    "launch",
    action,
    str(LAUNCH_PODS / config),
    *("--name", "x", "--tpu", tpu, *where, *gke),
    *(work if action in ("run", "watch") else ()),
    *extra,
  ]


V5P, V4, V5E = "gemma2-27b-v5p.yaml", "gemma2-9b-v4.yaml", "gemma-7b-v5e.yaml"
# (id, argv, pattern): Cloud TPU shapes (cloud.google.com/tpu/docs/v4, /v5p,
# /v5e, /v6e), zones (/regions-zones), xpk's and JobSet's flags.
LAUNCH_CASES = [
  (
    "launch_v5p_beyond_96_cubes",
    launch_argv("create", V5P, "v5p:16x24x32"),
    r"^--tpu 'v5p:16x24x32': v5p slices are .* at most 6144 chips "
    r"\(96 cubes\); 12288 chips is more than one slice \(--slices N\); "
    r"nearest: v5p:8x24x32",
  ),
  (
    "launch_v5p_axes_out_of_order",
    launch_argv("create", V5P, "v5p:32x24x8", "--dry-run"),
    r"^--tpu 'v5p:32x24x8': .*A <= B <= C.*; nearest: v5p:8x24x32",
  ),
  (
    "launch_v4_not_whole_cubes",
    launch_argv("create", V4, "v4:8x16x30", zone="us-central2-b"),
    r"^--tpu 'v4:8x16x30': .*each a multiple of 4.*; nearest: v4:8x16x32",
  ),
  (
    "launch_v5e_bigger_than_a_pod",
    launch_argv("create", V5E, "v5e:32x32", zone="us-west4-a"),
    r"^--tpu 'v5e:32x32': v5e slices are one of 2x2, .* 16x16; 1024 chips "
    r"is more than one slice \(--slices N\); nearest: v5e:16x16",
  ),
  (
    "launch_v5e_axes_swapped",
    launch_argv("gke", V5E, "v5e:16x8"),
    r"^--tpu 'v5e:16x8': v5e slices are one of .*; nearest: v5e:8x16",
  ),
  (
    "launch_v6e_single_chip",
    launch_argv("create", V5E, "v6e:1x1", zone="us-east5-a"),
    r"^--tpu 'v6e:1x1': .*a single chip cannot be compiled for.*; "
    r"nearest: v6e:2x2",
  ),
  (
    "launch_accelerator_type_as_tpu",
    launch_argv("create", V5P, "v5p-12288"),
    r"^--tpu 'v5p-12288': expected GENERATION:SHAPE such as v5e:16x16 \(the "
    r"accelerator type v5p-12288 is v5p:16x16x24\)",
  ),
  (
    "launch_zone_without_the_generation",
    launch_argv("create", V5P, "v5p:8x24x32", "--dry-run", zone="us-west4-a"),
    r"^--zone 'us-west4-a': Cloud TPU offers v5p in .*us-east5-a.* pick one "
    r"of those, or run without --dry-run",
  ),
  (
    "launch_region_for_zone",
    launch_argv("create", V4, "v4:8x16x32", "--dry-run", zone="us-central2"),
    r"^--zone 'us-central2': Cloud TPU offers v4 in us-central2-b ",
  ),
  (
    "launch_watch_zone_of_another_generation",
    launch_argv("watch", V5E, "v5e:16x16", "--dry-run", zone="us-central2-b"),
    r"^--zone 'us-central2-b': Cloud TPU offers v5e in .*us-west4-a",
  ),
  (
    "launch_run_zone_of_another_generation",
    launch_argv("run", V4, "v4:8x16x32", "--dry-run", zone="us-east5-a"),
    r"^--zone 'us-east5-a': Cloud TPU offers v4 in us-central2-b ",
  ),
  (
    "launch_zero_slices",
    launch_argv("create", V5E, "v5e:16x16", "--slices", "0", zone="us-west4-a"),
    r"^--slices must be >= 1, got 0",
  ),
  (
    "launch_bad_queued_resource_name",
    ["launch", "create", str(LAUNCH_PODS / V5E), "--name", "9x"]
    + ["--zone", "us-west4-a", "--tpu", "v5e:16x16"],
    r"^--name '9x': use letters, digits and '-', starting with a letter",
  ),
  (
    "launch_xpk_queue",
    launch_argv("gke", V5E, "v5e:16x16", "--format", "xpk", "--queue", "q"),
    r"^--queue q: xpk submits to its own Kueue queue \(multislice-queue\) "
    r"and has no flag for another; drop --queue",
  ),
  (
    "launch_jobset_cluster",
    launch_argv("gke", V5E, "v5e:16x16", "--cluster", "c"),
    r"^--cluster: a JobSet manifest carries no cluster .*; drop --cluster, "
    r"or render the xpk command \(--format xpk\)",
  ),
  (
    "launch_negative_max_restarts",
    launch_argv("gke", V5E, "v5e:16x16", "--spot", "--max-restarts", "-1"),
    r"^--max-restarts -1: must be >= 0",
  ),
  (
    "launch_xpk_zone_without_the_generation",
    launch_argv("gke", V5P, "v5p:8x24x32", "--format", "xpk", "--zone", "a-b"),
    r"^--zone 'a-b': Cloud TPU offers v5p in .*; give the zone of a cluster "
    r"with v5p node pools",
  ),
  (
    "launch_gke_v4_axes_out_of_order",
    launch_argv("gke", V4, "v4:32x16x8", "--pathways"),
    r"^--tpu 'v4:32x16x8': .*; nearest: v4:8x16x32",
  ),
]


@pytest.mark.parametrize(
  "name, argv, pattern", LAUNCH_CASES, ids=[c[0] for c in LAUNCH_CASES]
)
def test_a_launch_the_real_tools_would_reject_is_refused_first(
  capsys, monkeypatch, tmp_path, name, argv, pattern
):
  work = tmp_path / "cwd"
  work.mkdir()
  monkeypatch.chdir(work)  # runs/launch/NAME and --log-dir logs land here
  monkeypatch.setenv("PATH", str(tmp_path / "no-gcloud"))
  capsys.readouterr()
  rc = cli.main(argv)
  out, err = capsys.readouterr()
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == 2, err
  assert out == ""  # no command rendered
  assert len(lines) == 1, err
  prefix = "gemma-jax launch: error: "
  assert lines[0].startswith(prefix), lines[0]
  assert re.search(pattern, lines[0][len(prefix) :]), lines[0]
  assert list(work.iterdir()) == []  # nothing written


def test_at_least_twelve_launch_cases():
  assert len(LAUNCH_CASES) >= 12


# --- data formats ---
# `data prepare` on corpora as they ship (parquet, compressed JSON lines,
# Hugging Face datasets): each bad file is one line naming it, and no
# dataset is created.


def _prepare_formats_case(name, c):
  import gzip

  import pyarrow as pa
  import pyarrow.parquet as pq

  d = pathlib.Path(c.path("formats"))
  d.mkdir()
  text_key = "text"
  if name == "parquet_missing_column":
    pq.write_table(pa.table({"body": ["a document"]}), d / "a.parquet")
    inputs = [d / "a.parquet"]
  elif name == "not_parquet":
    (d / "a.parquet").write_text("a text file named like a parquet file")
    inputs = [d / "a.parquet"]
  elif name == "truncated_gzip":
    data = gzip.compress(b'{"text": "a document"}\n' * 200)
    (d / "a.jsonl.gz").write_bytes(data[: len(data) // 2])
    inputs = [d / "a.jsonl.gz"]
  else:  # mixed schemas: the second file has no text column
    pq.write_table(pa.table({"text": ["one", "two"]}), d / "a.parquet")
    pq.write_table(pa.table({"content": ["three"]}), d / "b.parquet")
    inputs = [d / "*.parquet"]
  data_dir = c.path("tfds")
  argv = ["data", "prepare", "--name", "x", "--data-dir", data_dir]
  argv += ["--tokenizer", c.tok, "--text-key", text_key]
  argv += ["--work-dir", c.path("work")]
  for path in inputs:
    argv += ["--input", str(path)]
  return argv, [data_dir]


FORMAT_CASES = [
  (
    "parquet_missing_column",
    r"a.parquet: no column 'text' \(columns: body\); set --text-key",
  ),
  ("not_parquet", r"a.parquet: not a parquet file \("),
  ("truncated_gzip", r"a.jsonl.gz: the gzip stream is truncated or corrupt"),
  ("mixed_schemas", r"b.parquet: no column 'text' \(columns: content\)"),
]


@pytest.mark.parametrize(
  "name, pattern", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES]
)
def test_bad_corpus_file_is_one_line_and_creates_nothing(
  ctx, capsys, name, pattern
):
  argv, protect = _prepare_formats_case(name, ctx)
  expect_one_line(capsys, argv, 1, pattern, protect)
