"""`gemma-jax data prepare --beam OPTIONS`: the same preparation as an Apache
Beam pipeline (DirectRunner here, Dataflow at scale; docs/data.md).

The pipeline runs the two passes of data/prepare_files.py as Beam steps:

  Create(units) -> Tokenize (one unit per element, reshuffled over workers)
    -> ToList -> Layout (one element: every unit's plan)
    -> Write (one unit's shards per element) -> ToList -> Finish

so it writes the same shards, lengths files and metadata as one process.
The work directory and `data_dir` must be storage every worker reaches
(gs:// on Dataflow); the tokenizer too (it is read once per worker).
Needs the `beam` extra (apache-beam).
"""

import contextlib
import json
import os
import shlex

from etils import epath

from gemma_jax import fileio
from gemma_jax.data import arrayrecord, formats, prepare, prepare_files
from gemma_jax.errors import ConfigError, DataError

_TOKENIZERS: dict = {}


def _tokenizer(path: str):
  from gemma_jax.tokenizer import Tokenizer

  if path not in _TOKENIZERS:
    local = path
    if not fileio.is_local(path):  # SentencePiece reads local files
      local = os.path.join(
        epath.Path(os.environ.get("TMPDIR", "/tmp")), os.path.basename(path)
      )
      epath.Path(path).copy(local, overwrite=True)
    _TOKENIZERS[path] = Tokenizer.load(local)
  return _TOKENIZERS[path]


def _tokenize(unit, options, tokenizer_path, work_dir):
  """Pass 1 of one unit; its summary (the arrays stay in the work dir,
  hashes travel only for dedup), so that the one worker that gathers every
  unit holds ~16 bytes a document with --dedup, and nothing per document
  without."""
  result = prepare_files.tokenize_unit(
    unit, options, _tokenizer(tokenizer_path), work_dir
  )
  return result.summary(with_hashes=options.dedup)


def _plan_writes(results, options, fingerprint, key, warn):
  """Every unit's pass-2 plan, and the metadata (carried by unit 0)."""
  results = sorted(results, key=lambda r: r.unit.index)
  for r in results:
    report = formats.DecodeReport(**r.report)
    if report.undecodable_bytes:
      (warn or formats.warn)(report.line())
  meta = prepare_files.assemble_metadata(results, options, fingerprint, key)
  plan = prepare_files.layout(results, options)
  return [
    (r, lay, meta if i == 0 else None)
    for i, (r, lay) in enumerate(zip(results, plan))
  ]


def _write(item, name, dataset_dir, work_dir):
  result, lay, meta = item
  written = prepare_files.write_unit(name, dataset_dir, work_dir, result, lay)
  return result.unit.index, written, meta


def _finish(written, dataset_dir, name):
  written = sorted(written, key=lambda w: w[0])
  meta = written[0][2]
  prepare_files.finish(dataset_dir, name, meta, [w for _, w, _ in written])


def default_work_dir(name: str, data_dir: str) -> str:
  """Beside the dataset on gs:// (every Dataflow worker reaches it), else
  the local default of prepare_files."""
  if fileio.is_local(data_dir):
    return prepare_files.default_work_dir(name, data_dir)
  return os.path.join(data_dir, f".{name}.work")


def prepare_with_beam(
  name: str,
  data_dir: str,
  inputs,
  tokenizer_path: str,
  options: prepare_files.Options | None = None,
  beam_options: str = "",
  work_dir: str | None = None,
  overwrite: bool = False,
  warn=None,
) -> dict:
  """`prepare_files.prepare_files`, run by Beam with `beam_options` (a
  command line of Beam pipeline options; empty: DirectRunner)."""
  try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
  except ImportError:
    raise ConfigError(
      "--beam needs Apache Beam: pip install 'gemma-jax[beam]' (Dataflow: "
      "'apache-beam[gcp]')"
    ) from None
  options = options or prepare_files.Options()
  prepare.check_name(name)
  data_dir = fileio.absolute(data_dir)
  fileio.check_remote(data_dir, "--data-dir")
  tokenizer = _tokenizer(tokenizer_path)
  units = prepare_files.plan(inputs, name)
  key = prepare_files.inputs_key(units, options, tokenizer.fingerprint)
  existing = prepare.existing_metadata(name, data_dir)
  if existing is not None and not overwrite:
    if existing.get("inputs_key") == key:
      return existing
    raise DataError(
      f"dataset {name!r} already exists in {data_dir} with other input "
      f"files or options; pass --overwrite to replace it, or choose another "
      f"--name"
    )
  work_dir = os.fspath(work_dir or default_work_dir(name, data_dir))
  epath.Path(work_dir).mkdir(parents=True, exist_ok=True)
  # Written beside the dataset and moved into place once complete (on
  # gs://, which has no rename, copied on the server): a failed run leaves
  # no partial dataset and keeps the one it would have replaced.
  final = epath.Path(data_dir) / name / arrayrecord.VERSION
  if fileio.is_local(data_dir):
    final.parent.mkdir(parents=True, exist_ok=True)
    dataset_dir = fileio.fresh_temporary_sibling(final)
  else:
    dataset_dir = fileio.temporary_sibling(final)
    fileio.remove_tree(dataset_dir)
  out = os.fspath(dataset_dir)
  fp = tokenizer.fingerprint
  try:
    with beam.Pipeline(options=PipelineOptions(shlex.split(beam_options))) as p:
      _ = (
        p
        | "Units" >> beam.Create(units)
        | "SpreadUnits" >> beam.Reshuffle()
        | "Tokenize" >> beam.Map(_tokenize, options, tokenizer_path, work_dir)
        | "GatherUnits" >> beam.combiners.ToList()
        | "Layout" >> beam.FlatMap(_plan_writes, options, fp, key, warn)
        | "SpreadWrites" >> beam.Reshuffle()
        | "Write" >> beam.Map(_write, name, out, work_dir)
        | "GatherWrites" >> beam.combiners.ToList()
        | "Finish" >> beam.Map(_finish, out, name)
      )
    meta = json.loads((epath.Path(dataset_dir) / "metadata.json").read_text())
  except BaseException:
    fileio.remove_tree(dataset_dir)
    if fileio.is_local(data_dir):
      with contextlib.suppress(OSError):  # only if we made it, empty
        final.parent.rmdir()
    raise
  fileio.replace_directory(dataset_dir, final)
  fileio.remove_tree(work_dir)
  return meta
