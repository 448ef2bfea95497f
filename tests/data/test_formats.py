"""The formats corpora ship in: parquet, compressed JSON lines, Hugging Face
datasets directories; local and on gs://; and their one-line errors."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gemma_jax.data import build_pipeline, formats, testing
from gemma_jax.data.sources import DecodePolicy, read_text_files
from gemma_jax.errors import DataError

TEXTS = testing.sample_texts(12, seed=3)


def jsonl(texts, key="text") -> bytes:
  return "".join(
    json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)
  ).encode()


def write_parquet(path, texts, key="text", row_group_size=5, binary=False):
  kind = pa.binary() if binary else pa.string()
  table = pa.table(
    {key: pa.array(texts, kind), "id": pa.array(range(len(texts)), pa.int64())}
  )
  pq.write_table(table, path, row_group_size=row_group_size)


def write_hf_dataset(directory, texts, files=2, key="text"):
  """What `datasets.Dataset.save_to_disk` writes: Arrow IPC stream files
  listed in state.json, beside dataset_info.json."""
  os.makedirs(directory, exist_ok=True)
  names = []
  for i, part in enumerate(np.array_split(np.arange(len(texts)), files)):
    name = f"data-{i:05d}-of-{files:05d}.arrow"
    table = pa.table({key: [texts[j] for j in part], "n": list(part)})
    with (
      pa.OSFile(os.path.join(directory, name), "wb") as sink,
      pa.ipc.new_stream(sink, table.schema) as writer,
    ):
      for batch in table.to_batches(max_chunksize=2):
        writer.write_batch(batch)
    names.append({"filename": name})
  with open(os.path.join(directory, "state.json"), "w") as f:
    json.dump({"_data_files": names, "_split": "train"}, f)
  with open(os.path.join(directory, "dataset_info.json"), "w") as f:
    json.dump({"features": {key: {"dtype": "string"}}}, f)


def write_every_format(d) -> dict[str, str]:
  """{format: glob}: TEXTS in each format (txt: one text per file)."""
  os.makedirs(d, exist_ok=True)
  (d / "a.jsonl.gz").write_bytes(gzip.compress(jsonl(TEXTS)))
  (d / "a.jsonl.zst").write_bytes(
    zstandard.ZstdCompressor().compress(jsonl(TEXTS))
  )
  (d / "a.json.gz").write_bytes(gzip.compress(jsonl(TEXTS)))
  write_parquet(d / "a.parquet", TEXTS)
  write_hf_dataset(d / "hf", TEXTS)
  for i, t in enumerate(TEXTS):
    (d / f"t{i:02d}.txt.gz").write_bytes(gzip.compress(t.encode()))
  return {
    "jsonl.gz": str(d / "a.jsonl.gz"),
    "jsonl.zst": str(d / "a.jsonl.zst"),
    "json.gz": str(d / "a.json.gz"),
    "parquet": str(d / "a.parquet"),
    "hf": str(d / "hf"),
    "txt.gz": str(d / "t*.txt.gz"),
  }


def test_every_format_gives_the_same_documents(tmp_path):
  for fmt, pattern in write_every_format(tmp_path).items():
    assert read_text_files([pattern], "text") == TEXTS, fmt


def test_parquet_is_read_a_batch_at_a_time(tmp_path, monkeypatch):
  write_parquet(tmp_path / "a.parquet", TEXTS, row_group_size=4)
  monkeypatch.setattr(formats, "PARQUET_BATCH_ROWS", 3)

  def whole_file(*a, **k):
    raise AssertionError("read the whole file")

  monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
  monkeypatch.setattr(pq, "read_table", whole_file)
  report = formats.DecodeReport("a")
  docs = formats.iter_documents(
    str(tmp_path / "a.parquet"), "text", DecodePolicy(), report
  )
  assert next(docs) == TEXTS[0]
  assert report.documents == 1  # streamed: the rest is not read yet
  assert [TEXTS[0], *docs] == TEXTS
  assert report.bytes == sum(len(t.encode()) for t in TEXTS)


def test_a_files_source_reads_parquet_and_hf_directories(tmp_path, make_config):
  globs = write_every_format(tmp_path)
  cfg = make_config(
    sources={
      "web": {"kind": "files", "paths": [globs["parquet"]]},
      "crawl": {"kind": "files", "paths": [globs["hf"]]},
    },
    stages=[],
  )
  pipe = build_pipeline(cfg, 4)
  assert pipe.batch(0)["loss_mask"].sum() > 0


def test_undecodable_bytes_in_a_binary_column_follow_the_policy(tmp_path):
  texts = [t.encode() for t in TEXTS[:4]]
  texts[2] = "Voilà".encode("latin-1")
  write_parquet(tmp_path / "b.parquet", texts, binary=True)
  path = str(tmp_path / "b.parquet")
  with pytest.raises(
    DataError,
    match=r"b.parquet: 1 of \d+ bytes are not UTF-8 "
    r"\(first at byte 4 of row 2\)",
  ):
    read_text_files([path], "text")
  kept = read_text_files(
    [path], "text", policy=DecodePolicy("skip_document"), warn=lambda m: None
  )
  assert kept == TEXTS[:2] + TEXTS[3:4]


@pytest.mark.parametrize(
  "case, pattern",
  [
    (
      "missing_column",
      r"a.parquet: no column 'body' \(columns: text, id\); set --text-key",
    ),
    ("not_text_column", r"a.parquet: column 'id' holds int64, not text"),
    ("not_parquet", r"junk.parquet: not a parquet file \("),
    ("truncated_gzip", r"a.jsonl.gz: the gzip stream is truncated or corrupt"),
    ("truncated_zstd", r"a.jsonl.zst: the zstd stream is truncated or corrupt"),
    ("mixed_schemas", r"b.parquet: no column 'text' \(columns: body, id\)"),
    ("null_text", r"n.parquet: row 1: column 'text' is null"),
    (
      "dataset_dict",
      r"dd is a Hugging Face DatasetDict \(splits: train, test\); give "
      r"one split's directory, e.g. .*dd/train",
    ),
    (
      "truncated_arrow",
      r"data-00000-of-00002.arrow: truncated or damaged after row",
    ),
  ],
)
def test_bad_files_are_one_line_naming_them(tmp_path, case, pattern):
  write_every_format(tmp_path)
  key = "text"
  if case == "missing_column":
    key, glob = "body", str(tmp_path / "a.parquet")
  elif case == "not_text_column":
    key, glob = "id", str(tmp_path / "a.parquet")
  elif case == "not_parquet":
    (tmp_path / "junk.parquet").write_text("not parquet at all")
    glob = str(tmp_path / "junk.parquet")
  elif case in ("truncated_gzip", "truncated_zstd"):
    name = "a.jsonl.gz" if case == "truncated_gzip" else "a.jsonl.zst"
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    glob = str(tmp_path / name)
  elif case == "mixed_schemas":
    write_parquet(tmp_path / "b.parquet", TEXTS, key="body")
    glob = str(tmp_path / "[ab].parquet")
  elif case == "null_text":
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "n.parquet")
    glob = str(tmp_path / "n.parquet")
  elif case == "dataset_dict":
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(
      json.dumps({"splits": ["train", "test"]})
    )
    glob = str(tmp_path / "dd")
  else:
    arrow = tmp_path / "hf" / "data-00000-of-00002.arrow"
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) - 40])
    glob = str(tmp_path / "hf")
  with pytest.raises(DataError, match=pattern) as e:
    read_text_files([glob], key)
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_every_format_reads_from_gs(gcs_bucket, tmp_path):
  from etils import epath

  local = write_every_format(tmp_path / "local")
  for path in [*tmp_path.joinpath("local").rglob("*")]:
    if path.is_file():
      rel = path.relative_to(tmp_path / "local")
      epath.Path(f"{gcs_bucket}/in/{rel}").parent.mkdir(
        parents=True, exist_ok=True
      )
      epath.Path(f"{gcs_bucket}/in/{rel}").write_bytes(path.read_bytes())
  for fmt, pattern in local.items():
    remote = pattern.replace(str(tmp_path / "local"), f"{gcs_bucket}/in")
    assert read_text_files([remote], "text") == TEXTS, fmt
  with pytest.raises(DataError, match="no file matches"):
    read_text_files([f"{gcs_bucket}/in/*.nothing"], "text")
