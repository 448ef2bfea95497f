"""`data prepare` on files: the same bytes from 1 or N processes, after a
kill, and with exact deduplication."""

import gzip
import hashlib
import json
import os

import numpy as np
import pytest

from gemma_jax import cli
from gemma_jax.data import SourceConfig, prepare_files, testing
from gemma_jax.data.sources import open_documents
from gemma_jax.errors import DataError
from gemma_jax.tokenizer import Tokenizer

TEXTS = testing.sample_texts(60, seed=11)


def write_inputs(d) -> list[str]:
  """Five files of three formats; the last repeats two documents. Written
  once: a rewritten file (a new mtime) is new input."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  globs = [str(d / "*.jsonl"), str(d / "*.jsonl.gz"), str(d / "*.parquet")]
  if d.exists():
    return globs
  d.mkdir(parents=True)
  parts = np.array_split(np.arange(len(TEXTS)), 4)
  lines = lambda idx: "".join(
    json.dumps({"text": TEXTS[i]}) + "\n" for i in idx
  )
  (d / "a.jsonl").write_text(lines(parts[0]))
  (d / "b.jsonl.gz").write_bytes(gzip.compress(lines(parts[1]).encode()))
  pq.write_table(
    pa.table({"text": [TEXTS[i] for i in parts[2]]}),
    d / "c.parquet",
    row_group_size=4,
  )
  (d / "d.jsonl").write_text(lines(parts[3]))
  (d / "e.jsonl").write_text(lines([0, 5]))  # repeats
  return globs


def digest(path) -> dict:
  out = {}
  for d, _, files in os.walk(path):
    for f in files:
      full = os.path.join(d, f)
      with open(full, "rb") as fh:
        out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def documents(data_dir, tok, split="train"):
  cfg = SourceConfig(name="web", data_dir=str(data_dir), eval_split="eval")
  docs = open_documents("web", cfg, tok, split)
  return [tuple(docs.doc(i)) for i in range(len(docs))], docs


def prepare(tmp_path, tok, out, **kw):
  options = prepare_files.Options(
    eval_fraction=kw.pop("eval_fraction", 0.1), dedup=kw.pop("dedup", False)
  )
  return prepare_files.prepare_files(
    "web",
    str(tmp_path / out),
    write_inputs(tmp_path / "in"),
    tok,
    options,
    work_dir=str(tmp_path / f"{out}-work"),
    **kw,
  )


def test_documents_counts_and_held_out_as_split_held_out(
  tokenizer_path, tmp_path
):
  tok = Tokenizer.load(tokenizer_path)
  meta = prepare(tmp_path, tok, "one")
  # The documents in input order (files sorted within each glob).
  parts = np.array_split(np.arange(60), 4)
  order = [*parts[0], *parts[3], 0, 5, *parts[1], *parts[2]]
  held = [i for j, i in enumerate(order) if j % 10 == 0]
  train = [i for j, i in enumerate(order) if j % 10]
  got, docs = documents(tmp_path / "one", tok)
  assert got == [tuple(tok.encode(TEXTS[i])) for i in train]
  got_eval, _ = documents(tmp_path / "one", tok, "eval")
  assert got_eval == [tuple(tok.encode(TEXTS[i])) for i in held]
  assert meta["train"] == {
    "num_docs": len(train),
    "num_tokens": int(docs.lengths.sum()),
  }
  assert meta["tokenizer_fingerprint"] == tok.fingerprint == docs.fingerprint
  assert meta["dedup"] == {"enabled": False, "removed_documents": 0}
  # One train shard per input file, in input order.
  shards = sorted(
    f for f in os.listdir(tmp_path / "one" / "web" / "1.0.0") if "-train." in f
  )
  assert shards == [
    f"web-train.array_record-{i:05d}-of-00005" for i in range(5)
  ]
  assert not (tmp_path / "one-work").exists()  # removed once complete


def test_dedup_removes_exact_repeats_and_counts_them(tokenizer_path, tmp_path):
  tok = Tokenizer.load(tokenizer_path)
  meta = prepare(tmp_path, tok, "dd", dedup=True, eval_fraction=0)
  assert meta["dedup"] == {"enabled": True, "removed_documents": 2}
  got, _ = documents(tmp_path / "dd", tok)
  assert len(got) == 60 and len(set(got)) == 60


def test_a_failed_prepare_resumes_from_finished_files(
  tokenizer_path, tmp_path, monkeypatch
):
  tok = Tokenizer.load(tokenizer_path)
  prepare(tmp_path, tok, "clean")
  real = prepare_files.tokenize_unit
  calls = []

  def dies_at_the_third_file(unit, *a):
    calls.append(unit.index)
    if unit.index == 2:
      raise KeyboardInterrupt  # killed while tokenizing it
    return real(unit, *a)

  monkeypatch.setattr(prepare_files, "tokenize_unit", dies_at_the_third_file)
  with pytest.raises(KeyboardInterrupt):
    prepare(tmp_path, tok, "resumed")
  assert not (tmp_path / "resumed").exists()
  work = sorted(os.listdir(tmp_path / "resumed-work"))
  assert [w for w in work if w.endswith(".json")] == [
    "unit-000000.json",
    "unit-000001.json",
  ]
  monkeypatch.setattr(prepare_files, "tokenize_unit", real)
  reused = []
  load = prepare_files.load_tokenized

  def spy(*a):
    r = load(*a)
    reused.append(r is not None)
    return r

  monkeypatch.setattr(prepare_files, "load_tokenized", spy)
  prepare(tmp_path, tok, "resumed")
  assert reused == [True, True, False, False, False]
  assert digest(tmp_path / "resumed") == digest(tmp_path / "clean")


def test_same_input_again_is_kept_other_options_refused(
  tokenizer_path, tmp_path
):
  tok = Tokenizer.load(tokenizer_path)
  first = prepare(tmp_path, tok, "x")
  before = digest(tmp_path / "x")
  assert prepare(tmp_path, tok, "x") == first
  assert digest(tmp_path / "x") == before
  with pytest.raises(DataError, match="already exists .* with different input"):
    prepare(tmp_path, tok, "x", dedup=True)
  assert digest(tmp_path / "x") == before
  prepare(tmp_path, tok, "x", dedup=True, overwrite=True)
  assert digest(tmp_path / "x") != before


@pytest.mark.slow
def test_two_workers_write_what_one_process_writes(
  tokenizer_path, tmp_path, capsys
):
  inputs = write_inputs(tmp_path / "in")
  out = {}
  for workers in (1, 2):
    argv = ["data", "prepare", "--name", "web", "--tokenizer", tokenizer_path]
    argv += ["--data-dir", str(tmp_path / f"w{workers}"), "--dedup"]
    argv += ["--eval-fraction", "0.1", "--workers", str(workers)]
    argv += ["--work-dir", str(tmp_path / f"work{workers}")]
    for pattern in inputs:
      argv += ["--input", pattern]
    assert cli.main(argv) == 0
    out[workers] = capsys.readouterr().out
  assert "dedup: 2 repeated documents removed" in out[1]
  assert out[1] == out[2]
  assert digest(tmp_path / "w1") == digest(tmp_path / "w2")


@pytest.mark.slow
def test_beam_direct_runner_writes_what_one_process_writes(
  tokenizer_path, tmp_path, capsys
):
  pytest.importorskip("apache_beam")
  inputs = write_inputs(tmp_path / "in")
  out = {}
  for how in ("one", "beam"):
    argv = ["data", "prepare", "--name", "web", "--tokenizer", tokenizer_path]
    argv += ["--data-dir", str(tmp_path / how), "--dedup"]
    argv += ["--eval-fraction", "0.1", "--work-dir", str(tmp_path / f"{how}-w")]
    if how == "beam":
      argv += ["--beam=--runner=DirectRunner"]
    for pattern in inputs:
      argv += ["--input", pattern]
    assert cli.main(argv) == 0
    out[how] = capsys.readouterr().out
  assert "dedup: 2 repeated documents removed" in out["one"]
  assert out["one"] == out["beam"]
  assert digest(tmp_path / "one") == digest(tmp_path / "beam")
  assert not (tmp_path / "beam-w").exists()


@pytest.mark.slow
def test_sigkilled_prepare_restarts_without_losing_or_repeating(
  tokenizer_path, tmp_path
):
  import signal
  import subprocess
  import sys
  import time

  tok = Tokenizer.load(tokenizer_path)
  prepare(tmp_path, tok, "clean")
  # A prepare slowed down after each file, killed once two are finished.
  script = (
    "import sys, time\n"
    "from gemma_jax import cli\n"
    "from gemma_jax.data import prepare_files as pf\n"
    "real = pf.tokenize_unit\n"
    "def slow(*a):\n"
    "  r = real(*a)\n"
    "  time.sleep(1)\n"
    "  return r\n"
    "pf.tokenize_unit = slow\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
  )
  work = tmp_path / "killed-work"
  argv = ["data", "prepare", "--name", "web", "--tokenizer", tokenizer_path]
  argv += ["--data-dir", str(tmp_path / "killed"), "--work-dir", str(work)]
  argv += ["--eval-fraction", "0.1"]
  for pattern in write_inputs(tmp_path / "in"):
    argv += ["--input", pattern]
  proc = subprocess.Popen(
    [sys.executable, "-c", script, *argv],
    cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
  )
  deadline = time.time() + 120
  while len(list(work.glob("unit-*.json"))) < 2:
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "killed" / "web" / "1.0.0").exists()
  finished = len(list(work.glob("unit-*.json")))
  assert 2 <= finished < 5
  # Started again: the finished files are reused, and the dataset is the
  # one an uninterrupted prepare wrote.
  assert cli.main(argv) == 0
  assert digest(tmp_path / "killed") == digest(tmp_path / "clean")


@pytest.mark.slow
def test_beam_reads_and_writes_gs_like_dataflow_workers(
  tokenizer_path, tmp_path, gcs_bucket
):
  """Inputs, work dir and dataset on gs:// (the emulator), as on Dataflow:
  the dataset holds what one local process writes."""
  pytest.importorskip("apache_beam")
  from etils import epath

  from gemma_jax.data import beam

  tok = Tokenizer.load(tokenizer_path)
  local = write_inputs(tmp_path / "in")
  for path in (tmp_path / "in").iterdir():
    epath.Path(f"{gcs_bucket}/in/{path.name}").write_bytes(path.read_bytes())
  remote = [p.replace(str(tmp_path / "in"), f"{gcs_bucket}/in") for p in local]
  options = prepare_files.Options(eval_fraction=0.1, dedup=True)
  meta = beam.prepare_with_beam(
    "web", f"{gcs_bucket}/tfds", remote, tokenizer_path, options, ""
  )
  ref = prepare_files.prepare_files(
    "web",
    str(tmp_path / "ref"),
    local,
    tok,
    options,
    work_dir=str(tmp_path / "w"),
  )
  for split in ("train", "eval"):
    assert meta[split] == ref[split]
    got, _ = documents(f"{gcs_bucket}/tfds", tok, split)
    want, _ = documents(tmp_path / "ref", tok, split)
    assert got == want
  assert meta["dedup"] == {"enabled": True, "removed_documents": 2}
  assert not epath.Path(f"{gcs_bucket}/tfds/.web.work").exists()


def test_a_dataset_prepared_from_memory_is_not_compared_but_refused(
  tokenizer_path, tmp_path
):
  from gemma_jax.data import prepare as memory

  tok = Tokenizer.load(tokenizer_path)
  memory.prepare_dataset("web", str(tmp_path / "x"), {"train": TEXTS}, tok)
  before = digest(tmp_path / "x")
  with pytest.raises(DataError, match="prepared from texts in memory or by"):
    prepare(tmp_path, tok, "x")
  assert digest(tmp_path / "x") == before
  assert not (tmp_path / "x-work").exists()  # refused before any work
  prepare(tmp_path, tok, "x", overwrite=True)


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["workers", "beam"])
def test_a_bad_file_is_the_same_one_line_from_every_runner(
  tokenizer_path, tmp_path, capsys, runner
):
  """A truncated .jsonl.gz among good files: from worker processes and from
  Beam the error is the one line one process gives, and no dataset is
  written."""
  import re
  import shutil

  if runner == "beam":
    pytest.importorskip("apache_beam")
  write_inputs(tmp_path / "in")
  shutil.copytree(tmp_path / "in", tmp_path / "bad")
  data = (tmp_path / "bad" / "b.jsonl.gz").read_bytes()
  (tmp_path / "bad" / "b.jsonl.gz").write_bytes(data[: len(data) // 2])
  argv = ["data", "prepare", "--name", "web", "--tokenizer", tokenizer_path]
  argv += ["--data-dir", str(tmp_path / "out"), "--eval-fraction", "0.1"]
  argv += ["--work-dir", str(tmp_path / "work")]
  argv += (
    ["--workers", "2"]
    if runner == "workers"
    else ["--beam=--runner=DirectRunner"]
  )
  for pattern in ("*.jsonl", "*.jsonl.gz", "*.parquet"):
    argv += ["--input", str(tmp_path / "bad" / pattern)]
  capsys.readouterr()
  code = cli.main(argv)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 1 and len(lines) == 1, err
  assert re.search(
    r"^gemma-jax data: error: .*b.jsonl.gz: the gzip stream is truncated",
    lines[0],
  ), lines[0]
  assert not (tmp_path / "out" / "web").exists()  # nor a staging folder


@pytest.mark.slow
def test_a_failed_beam_run_on_gs_keeps_the_dataset_it_would_replace(
  tokenizer_path, tmp_path, gcs_bucket
):
  """--overwrite on gs://, and the new input has a truncated file: the
  dataset there reads as before (Beam writes beside it, then copies)."""
  pytest.importorskip("apache_beam")
  from etils import epath

  from gemma_jax.data import beam

  tok = Tokenizer.load(tokenizer_path)
  data_dir = f"{gcs_bucket}/tfds"
  options = prepare_files.Options(eval_fraction=0.1)
  good = write_inputs(tmp_path / "in")
  prepare_files.prepare_files(
    "web", data_dir, good, tok, options, work_dir=str(tmp_path / "w")
  )
  before, _ = documents(data_dir, tok)
  bad = tmp_path / "bad"
  bad.mkdir()
  data = gzip.compress(b'{"text": "a document"}\n' * 200)
  (bad / "x.jsonl.gz").write_bytes(data[: len(data) // 2])
  with pytest.raises(DataError, match="x.jsonl.gz: the gzip stream is trunc"):
    beam.prepare_with_beam(
      "web",
      data_dir,
      [*good, str(bad / "*.jsonl.gz")],
      tokenizer_path,
      options,
      "",
      work_dir=str(tmp_path / "bw"),
      overwrite=True,
    )
  assert documents(data_dir, tok)[0] == before
  assert not epath.Path(f"{data_dir}/web/.1.0.0.tmp").exists()
