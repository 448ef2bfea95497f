"""Documents of the files corpora ship in, streamed, local or on gs://.

    for path in expand_inputs(["gs://bkt/fineweb/*.parquet"], "web"):
      for text in iter_documents(path, "text", DecodePolicy(), report): ...

One document per
  line       .jsonl, and JSON lines compressed: .jsonl.gz, .jsonl.zst,
             .json.gz, .json.zst (Dolma ships .json.gz): an object with
             field `text_key`
  row        .parquet (FineWeb, SlimPajama, the Stack): column `text_key`,
             read one row group at a time (`ParquetFile.iter_batches`)
  row        .arrow: a Hugging Face `datasets` Arrow file (`save_to_disk`
             writes the Arrow IPC stream format), read batch by batch
  file       anything else: .txt, and .txt.gz / .txt.zst decompressed
A directory that `datasets.Dataset.save_to_disk` wrote (its state.json
lists its Arrow files) stands for its Arrow files, in that order.

Text decoding: every byte that is not UTF-8 is counted, never silently
replaced. `on_decode_error` (a source's key; `--on-decode-error` of the
commands that read files) says what happens to a document holding some:
  error          refuse the file when more than `max_undecodable_fraction`
                 of its bytes are undecodable (default 0: any); below it,
                 replace them with U+FFFD and report the count
  skip_document  drop such documents (a line or row, or a whole file)
  replace        replace them with U+FFFD
A file's bytes are those of its text: decompressed, and for parquet and
Arrow files the bytes of the text column's values.
"""

import contextlib
import dataclasses
import glob
import gzip
import io
import json
import os
import re
import sys
import zlib
from collections.abc import Iterator

from etils import epath

from gemma_jax import fileio
from gemma_jax.errors import ConfigError, DataError

DECODE_POLICIES = ("error", "skip_document", "replace")
# Undecodable bytes come out of "surrogateescape" as lone surrogates.
_ESCAPED = re.compile("[\udc80-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_GLOB_CHARS = re.compile(r"[*?\[]")
# Rows per Arrow batch read from a parquet row group: bounds memory for a
# row group of any size (FineWeb's hold ~1 GB of text).
PARQUET_BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class DecodePolicy:
  on_error: str = "error"
  max_fraction: float = 0.0

  def __post_init__(self):
    if self.on_error not in DECODE_POLICIES:
      raise ConfigError(
        f"on_decode_error: {self.on_error!r} is not a valid "
        f"choice; valid choices: "
        f"{', '.join(map(repr, DECODE_POLICIES))}"
      )
    if not 0 <= self.max_fraction <= 1:
      raise ConfigError(
        f"max_undecodable_fraction must be in [0, 1], got {self.max_fraction}"
      )


DEFAULT_POLICY = DecodePolicy()


def decode_policy(cfg) -> DecodePolicy:
  """The DecodePolicy of a SourceConfig."""
  return DecodePolicy(
    getattr(cfg, "on_decode_error", "error"),
    getattr(cfg, "max_undecodable_fraction", 0.0),
  )


@dataclasses.dataclass
class DecodeReport:
  """What decoding one file found."""

  path: str
  bytes: int = 0
  undecodable_bytes: int = 0
  documents: int = 0
  skipped_documents: int = 0
  replaced_documents: int = 0
  first_offset: int | str | None = None  # of the first undecodable byte

  def keep(self, bad: int, policy: DecodePolicy) -> bool:
    """Counts one document holding `bad` undecodable bytes; whether
    `policy` keeps it (with U+FFFD in their place)."""
    self.documents += 1
    if bad and policy.on_error == "skip_document":
      self.skipped_documents += 1
      return False
    self.replaced_documents += int(bad > 0)
    return True

  def line(self) -> str:
    what = (
      f"{self.skipped_documents} documents skipped"
      if self.skipped_documents
      else f"{self.replaced_documents} documents with U+FFFD in their place"
    )
    return (
      f"{self.path}: {self.undecodable_bytes} of {self.bytes} bytes are "
      f"not UTF-8; {what}"
    )


def decode(raw: bytes) -> tuple[str, int]:
  """(text with undecodable bytes as lone surrogates, their count)."""
  try:
    return raw.decode("utf-8"), 0  # the common case, at C speed
  except UnicodeDecodeError:
    text = raw.decode("utf-8", "surrogateescape")
    return text, len(_ESCAPED.findall(text))


def clean(text: str) -> str:
  """Lone surrogates (undecodable bytes, or JSON escapes of them) ->
  U+FFFD, which the tokenizer can encode."""
  return _SURROGATE.sub("\ufffd", text)


def first_bad(raw: bytes) -> int:
  try:
    raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return e.start
  return -1


def refuse(report: DecodeReport, policy: DecodePolicy, where: str):
  if policy.on_error != "error" or not report.undecodable_bytes:
    return
  if report.undecodable_bytes > policy.max_fraction * report.bytes:
    raise DataError(
      f"{where}: {report.undecodable_bytes} of {report.bytes} bytes are not "
      f"UTF-8 (first at byte {report.first_offset}); convert the file to "
      f"UTF-8, or set on_decode_error: skip_document or replace (or raise "
      f"max_undecodable_fraction)"
    )


def warn(message: str) -> None:
  print(f"gemma-jax: warning: {message}", file=sys.stderr, flush=True)


# --- Finding the files of an input.


def expand_inputs(globs, name: str = "") -> list[str]:
  """The files of `globs` (local or gs://), each glob's sorted; a Hugging
  Face `datasets` directory becomes its Arrow files."""
  paths: list[str] = []
  for pattern in globs:
    pattern = os.fspath(pattern)
    found = _glob(pattern)
    if not found:
      raise DataError(f"data source {name!r}: no file matches {pattern!r}")
    files: list[str] = []
    for path in found:
      p = epath.Path(path)
      if not p.is_dir():
        files.append(path)
      elif (p / "state.json").exists() or (p / "dataset_dict.json").exists():
        files += hf_dataset_files(path)
    if not files:
      raise DataError(
        f"data source {name!r}: {pattern!r} matches only "
        f"directories; give files, a glob of files, or a directory that "
        f"Hugging Face datasets' save_to_disk wrote"
      )
    paths += files
  return paths


def _glob(pattern: str) -> list[str]:
  if fileio.is_local(pattern):
    return sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
  fileio.check_remote(pattern, f"input {pattern}")
  parts = pattern.split("/")
  first = next(
    (i for i, part in enumerate(parts) if _GLOB_CHARS.search(part)), None
  )
  if first is None:
    return [pattern] if epath.Path(pattern).exists() else []
  base = epath.Path("/".join(parts[:first]))
  if not base.exists():
    return []
  return sorted(os.fspath(p) for p in base.glob("/".join(parts[first:])))


def hf_dataset_files(directory: str) -> list[str]:
  """The Arrow files of a `Dataset.save_to_disk` directory, in order."""
  d = epath.Path(directory)
  if (d / "dataset_dict.json").exists():
    splits = json.loads((d / "dataset_dict.json").read_text()).get("splits")
    raise DataError(
      f"{directory} is a Hugging Face DatasetDict (splits: "
      f"{', '.join(splits or [])}); give one split's directory, e.g. "
      f"{directory}/{(splits or ['train'])[0]}"
    )
  try:
    state = json.loads((d / "state.json").read_text())
    names = [f["filename"] for f in state["_data_files"]]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise DataError(
      f"{directory}/state.json: not the state of a Hugging Face dataset "
      f"saved with save_to_disk (no _data_files list: {e})"
    ) from None
  return [os.fspath(d / n) for n in names]


# --- Reading documents.


def file_format(path: str) -> str:
  """'jsonl', 'parquet', 'arrow' or 'text' (one document per file)."""
  name = os.path.basename(path)
  for suffix in (".gz", ".zst", ".zstd"):
    name = name.removesuffix(suffix)
  if name.endswith(".parquet"):
    return "parquet"
  if name.endswith(".arrow"):
    return "arrow"
  compressed = name != os.path.basename(path)
  if name.endswith(".jsonl") or (compressed and name.endswith(".json")):
    return "jsonl"
  return "text"


def iter_documents(
  path: str,
  text_key: str,
  policy: DecodePolicy,
  report: DecodeReport,
) -> Iterator[str]:
  """The documents of one file, decoded under `policy` (counted in
  `report`); streamed: a line, a batch of rows, or the file at a time."""
  kind = file_format(path)
  try:
    if kind == "parquet":
      yield from _parquet_documents(path, text_key, policy, report)
    elif kind == "arrow":
      yield from _arrow_documents(path, text_key, policy, report)
    else:
      with _open(path) as f:
        if kind == "jsonl":
          yield from _jsonl_documents(f, path, text_key, policy, report)
        else:
          raw = f.read()
          report.bytes = len(raw)
          text, bad = decode(raw)
          report.undecodable_bytes = bad
          report.first_offset = first_bad(raw) if bad else None
          refuse(report, policy, path)
          if report.keep(bad, policy):
            yield clean(text)
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise DataError(
      f"{path}: the gzip stream is truncated or corrupt ({e}); download or "
      f"write the file again"
    ) from None
  except OSError as e:
    if type(e).__name__ == "ZstdError" or "zstd" in str(e).lower():
      raise DataError(
        f"{path}: the zstd stream is truncated or corrupt ({e}); download "
        f"or write the file again"
      ) from None
    raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None


@contextlib.contextmanager
def _open(path: str):
  """A binary stream of the file's bytes, decompressed (.gz, .zst)."""
  with epath.Path(path).open("rb") as raw:
    if path.endswith(".gz"):
      with gzip.GzipFile(fileobj=raw) as f:
        yield f
    elif path.endswith((".zst", ".zstd")):
      with io.BufferedReader(_ZstdStream(raw), 1 << 20) as f:
        yield f
    else:
      yield raw


class _ZstdStream(io.RawIOBase):
  """Decompressed bytes of a zstd file of one or more frames (`zstd -c a
  b`), failing on a frame cut short (zstandard's stream reader returns
  what it has and stops)."""

  def __init__(self, raw):
    import zstandard

    self._zstd = zstandard
    self._raw = raw
    self._dobj = zstandard.ZstdDecompressor().decompressobj()
    self._in_frame = False  # input fed to a frame that has not ended
    self._pending = b""

  def readable(self):
    return True

  def readinto(self, b):
    while not self._pending:
      chunk = self._raw.read(1 << 20)
      if not chunk:
        if self._in_frame:
          raise OSError("zstd: the stream ends in the middle of a frame")
        return 0
      self._pending = self._feed(chunk)
    n = min(len(b), len(self._pending))
    b[:n] = self._pending[:n]
    self._pending = self._pending[n:]
    return n

  def _feed(self, chunk: bytes) -> bytes:
    out = []
    while chunk:
      try:
        out.append(self._dobj.decompress(chunk))
      except self._zstd.ZstdError as e:
        raise OSError(f"zstd: {e}") from None
      self._in_frame = not self._dobj.eof
      chunk = self._dobj.unused_data if self._dobj.eof else b""
      if self._dobj.eof:
        self._dobj = self._zstd.ZstdDecompressor().decompressobj()
    return b"".join(out)


def _jsonl_documents(f, path, text_key, policy, report):
  offset = 0
  for lineno, line in enumerate(f, 1):
    start, offset = offset, offset + len(line)
    line = line.removesuffix(b"\n")
    if not line.strip():
      continue
    text, bad = decode(line)
    report.undecodable_bytes += bad
    if bad and report.first_offset is None:
      report.first_offset = start + first_bad(line)
    try:
      value = json.loads(text)[text_key]
      if not isinstance(value, str):
        raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
      raise DataError(
        f"{path}:{lineno}: not a JSON object with a {text_key!r} field"
      ) from None
    if report.keep(bad, policy):
      yield clean(value)
  report.bytes = offset
  refuse(report, policy, path)


def _text_column(schema, text_key: str, path: str):
  """Checks that `schema` has a text column `text_key`."""
  import pyarrow as pa

  if text_key not in schema.names:
    raise DataError(
      f"{path}: no column {text_key!r} (columns: "
      f"{', '.join(schema.names)}); set --text-key (a source's text_key) to "
      f"the column that holds the text"
    )
  kind = schema.field(text_key).type
  if not (
    pa.types.is_string(kind)
    or pa.types.is_large_string(kind)
    or pa.types.is_binary(kind)
    or pa.types.is_large_binary(kind)
  ):
    raise DataError(
      f"{path}: column {text_key!r} holds {kind}, not text; set --text-key "
      f"(a source's text_key) to the column that holds the text"
    )


def _column_documents(column, row, path, text_key, policy, report):
  """The documents of one Arrow column chunk, whose first row is `row`."""
  import pyarrow as pa

  if column.null_count:
    first = column.is_null().to_pylist().index(True)
    raise DataError(
      f"{path}: row {row + first}: column {text_key!r} is null; drop such "
      f"rows, or set --text-key to a column without nulls"
    )
  binary = pa.large_binary() if "large" in str(column.type) else pa.binary()
  for i, raw in enumerate(column.cast(binary).to_pylist()):
    text, bad = decode(raw)
    if bad:
      report.undecodable_bytes += bad
      if report.first_offset is None:
        report.first_offset = f"{first_bad(raw)} of row {row + i}"
    report.bytes += len(raw)
    if report.keep(bad, policy):
      yield clean(text)


def _parquet_documents(path, text_key, policy, report):
  import pyarrow as pa
  import pyarrow.parquet as pq

  with epath.Path(path).open("rb") as f:
    try:
      pf = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as e:
      raise DataError(
        f"{path}: not a parquet file ({_first_line(e)}); give .parquet "
        f"files, or name the file by its format (.jsonl, .txt, ...)"
      ) from None
    _text_column(pf.schema_arrow, text_key, path)
    row = 0
    batches = pf.iter_batches(PARQUET_BATCH_ROWS, columns=[text_key])
    while True:
      try:
        batch = next(batches, None)
      except (pa.ArrowInvalid, OSError) as e:
        raise DataError(
          f"{path}: damaged after row {row} ({_first_line(e)}); download "
          f"or write the file again"
        ) from None
      if batch is None:
        break
      yield from _column_documents(
        batch.column(0), row, path, text_key, policy, report
      )
      row += batch.num_rows
  refuse(report, policy, path)


def _arrow_documents(path, text_key, policy, report):
  import pyarrow as pa

  with epath.Path(path).open("rb") as f:
    try:
      reader = pa.ipc.open_stream(f)
    except (pa.ArrowInvalid, OSError) as e:
      raise DataError(
        f"{path}: not an Arrow stream file as Hugging Face datasets writes "
        f"({_first_line(e)})"
      ) from None
    _text_column(reader.schema, text_key, path)
    row = 0
    while True:
      try:
        batch = reader.read_next_batch()
      except StopIteration:
        break
      except (pa.ArrowInvalid, OSError) as e:
        raise DataError(
          f"{path}: truncated or damaged after row {row} "
          f"({_first_line(e)}); download or write the file again"
        ) from None
      yield from _column_documents(
        batch.column(text_key), row, path, text_key, policy, report
      )
      row += batch.num_rows
  refuse(report, policy, path)


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_documents(
  globs,
  text_key: str,
  name: str = "",
  policy: DecodePolicy = DEFAULT_POLICY,
  warn=None,
  reports: list[DecodeReport] | None = None,
) -> list[str]:
  """The documents of every file of `globs`, in order (see module doc).

  Each file holding undecodable bytes gets one `warn` line (default:
  stderr) and a DecodeReport appended to `reports`.
  """
  warn = warn or globals()["warn"]
  texts: list[str] = []
  for path in expand_inputs(globs, name):
    report = DecodeReport(path)
    texts += iter_documents(path, text_key, policy, report)
    if report.undecodable_bytes:
      warn(report.line())
      if reports is not None:
        reports.append(report)
  return texts
