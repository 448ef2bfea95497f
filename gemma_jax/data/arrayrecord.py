"""A tfds ArrayRecord dataset written shard by shard, without a builder.

tfds reads a dataset directory `<data_dir>/<name>/<version>/` holding
`dataset_info.json` (splits and the records in each shard), `features.json`
and the shards, `<name>-<split>.array_record-<i>-of-<n>` (5 digits each),
records written with `group_size:1` for random access (tfds'
`ArrayRecordFileAdapter`). Writing the shards ourselves lets separate
processes (or Beam workers) each write their own; `write_info` is called once
all are there. `tfds.builder(name, data_dir=...).as_data_source(split)` reads
the result like a dataset a `GeneratorBasedBuilder` wrote.
"""

import os
import shutil
import tempfile

import numpy as np
from etils import epath

VERSION = "1.0.0"
TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
DESCRIPTION = "Documents tokenized by gemma-jax data prepare."


def features():
  import tensorflow_datasets as tfds

  return tfds.features.FeaturesDict(
    {"tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)}
  )


def shard_name(name: str, split: str, index: int, count: int) -> str:
  return f"{name}-{split}.array_record-{index:05d}-of-{count:05d}"


def write_shard(path, docs, serialize) -> int:
  """Writes the int32 arrays `docs` as one shard at `path` (local or
  gs://: array_record writes local files, so a remote shard is written
  locally, then copied); returns its size in bytes."""
  from array_record.python.array_record_module import ArrayRecordWriter

  path = epath.Path(path)
  if "://" not in os.fspath(path):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = ArrayRecordWriter(os.fspath(tmp), "group_size:1")
    for doc in docs:
      writer.write(serialize({"tokens": doc}))
    writer.close()
    os.replace(tmp, path)
    return os.path.getsize(path)
  with tempfile.TemporaryDirectory(prefix="gemma-jax-shard-") as local:
    size = write_shard(os.path.join(local, path.name), docs, serialize)
    with (
      open(os.path.join(local, path.name), "rb") as src,
      path.open("wb") as dst,
    ):
      shutil.copyfileobj(src, dst, 16 << 20)
  return size


def write_info(
  dataset_dir,
  name: str,
  shards: dict[str, list[tuple[int, int]]],
  metadata: dict,
) -> None:
  """Writes dataset_info.json and features.json into `dataset_dir`, the
  version directory; `shards` is {split: [(records, bytes) per shard]}."""
  import tensorflow_datasets as tfds

  info = tfds.core.DatasetInfo(
    builder=tfds.core.dataset_info.DatasetIdentity(
      name=name,
      version=tfds.core.Version(VERSION),
      data_dir=os.fspath(dataset_dir),
      module_name="gemma_jax.data.prepare",
    ),
    description=DESCRIPTION,
    features=features(),
    metadata=tfds.core.MetadataDict(metadata),
    disable_shuffling=True,
  )
  info.set_file_format("array_record")
  info.set_splits(
    tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(
          name=split,
          shard_lengths=[n for n, _ in parts],
          num_bytes=sum(b for _, b in parts),
          filename_template=tfds.core.ShardedFileTemplate(
            data_dir=epath.Path(dataset_dir),
            template=TEMPLATE,
            dataset_name=name,
            split=split,
            filetype_suffix="array_record",
          ),
        )
        for split, parts in shards.items()
      ]
    )
  )
  info.write_to_directory(dataset_dir)
