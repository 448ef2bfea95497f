"""Prepared tfds ArrayRecord sources and the embedded default corpus."""

import json
import os

import numpy as np
import pytest

from gemma_jax import cli, configlib
from gemma_jax.data import DataConfig, build_pipeline, prepare, testing
from gemma_jax.data.sources import open_documents
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.tokenizer import Tokenizer, train_tokenizer


def test_prepared_dataset_round_trips_tokens_and_records_fingerprint(
  tokenizer_path, tmp_path
):
  tok = Tokenizer.load(tokenizer_path)
  texts = testing.sample_texts(30, seed=5)
  splits = prepare.split_held_out(texts, 0.1)
  assert len(splits["eval"]) == 3 and len(splits["train"]) == 27
  meta = prepare.prepare_dataset("round_trip", str(tmp_path), splits, tok)
  assert meta["tokenizer_fingerprint"] == tok.fingerprint
  assert meta["eval"]["num_docs"] == 3
  cfg = configlib.from_dict(
    DataConfig,
    {
      "sources": {
        "t": {
          "name": "round_trip",
          "data_dir": str(tmp_path),
          "eval_split": "eval",
        }
      }
    },
    "data",
  ).sources["t"]
  docs = open_documents("t", cfg, tok, "train")
  assert docs.fingerprint == tok.fingerprint
  for i in (0, 13, 26):  # records keep the order of the lengths file
    np.testing.assert_array_equal(docs.doc(i), tok.encode(splits["train"][i]))
    assert docs.lengths[i] == len(docs.doc(i))
  assert docs.num_tokens == meta["train"]["num_tokens"]
  with pytest.raises(ConfigError, match="has no split 'test'"):
    open_documents(
      "t",
      cfg.__class__(
        name="round_trip", data_dir=str(tmp_path), eval_split="test"
      ),
      tok,
      "eval",
    )


def test_source_prepared_with_another_tokenizer_is_refused(
  corpus_config, tmp_path
):
  other = train_tokenizer(
    testing.sample_texts(80, seed=9), 512, tmp_path / "other.model"
  )
  cfg = configlib.from_dict(
    DataConfig, {**corpus_config, "tokenizer": other.path}, "data"
  )
  with pytest.raises(DataError, match="prepare the source again"):
    build_pipeline(cfg, 8)


def test_default_corpus_has_three_sources_with_held_out_splits(
  corpus_config, tmp_path
):
  cfg = configlib.from_dict(DataConfig, corpus_config, "data")
  pipe = build_pipeline(cfg, 8, vocab_size=512)
  assert pipe.source_names == ("prose", "code", "math")
  batch = pipe.batch(0)
  assert set(batch["source"].tolist()) <= {0, 1, 2}
  for name in pipe.source_names:
    ev = next(pipe.eval_batches(name, 1))
    assert ev["loss_mask"].sum() > 0
  # Held-out documents are not in the training split.
  prose = cfg.sources["prose"]
  train = open_documents("prose", prose, pipe.tokenizer, "train")
  held = open_documents("prose", prose, pipe.tokenizer, "eval")
  train_docs = {tuple(train.doc(i)) for i in range(len(train))}
  assert not any(tuple(held.doc(i)) in train_docs for i in range(len(held)))
  # A second build is a cached no-op.
  out_dir = os.path.dirname(cfg.tokenizer)
  stamp = os.path.getmtime(os.path.join(out_dir, "manifest.json"))
  assert testing.tiny_corpus(out_dir) == corpus_config
  assert os.path.getmtime(os.path.join(out_dir, "manifest.json")) == stamp


def test_cli_prepare_then_train_from_it(tokenizer_path, tmp_path, capsys):
  docs = tmp_path / "docs.jsonl"
  docs.write_text(
    "".join(json.dumps({"text": t}) + "\n" for t in testing.sample_texts(40))
  )
  assert (
    cli.main(
      [
        "data",
        "prepare",
        "--input",
        str(docs),
        "--name",
        "mine",
        "--data-dir",
        str(tmp_path / "tfds"),
        "--tokenizer",
        tokenizer_path,
        "--eval-fraction",
        "0.25",
      ]
    )
    == 0
  )
  assert "mine/eval: 10 documents" in capsys.readouterr().out
  cfg = configlib.from_dict(
    DataConfig,
    {
      "tokenizer": tokenizer_path,
      "seq_len": 16,
      "sources": {
        "mine": {
          "name": "mine",
          "data_dir": str(tmp_path / "tfds"),
          "eval_split": "eval",
        }
      },
    },
    "data",
  )
  assert build_pipeline(cfg, 4).batch(3)["loss_mask"].sum() > 0
  assert (
    cli.main(
      [
        "data",
        "prepare",
        "--input",
        str(tmp_path / "no*.txt"),
        "--name",
        "x",
        "--data-dir",
        str(tmp_path),
        "--tokenizer",
        tokenizer_path,
      ]
    )
    == 1
  )  # no such file
  assert (
    cli.main(
      [
        "data",
        "prepare",
        "--input",
        str(docs),
        "--name",
        "Bad-Name",
        "--data-dir",
        str(tmp_path),
        "--tokenizer",
        tokenizer_path,
      ]
    )
    == 2
  )


def test_foreign_tfds_dataset_with_a_text_feature_is_tokenized_on_open(
  tokenizer_path, tmp_path
):
  import tensorflow_datasets as tfds

  texts = testing.sample_texts(12, seed=3)

  class PlainText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"body": tfds.features.Text()}),
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, t in enumerate(texts):
        yield i, {"body": t}

  PlainText.name = "plain_text"
  tfds.disable_progress_bar()
  PlainText(
    data_dir=str(tmp_path), file_format="array_record"
  ).download_and_prepare()
  tok = Tokenizer.load(tokenizer_path)
  source = {"name": "plain_text", "data_dir": str(tmp_path), "text_key": "body"}
  cfg = configlib.from_dict(
    DataConfig, {"tokenizer": tokenizer_path, "sources": {"p": source}}, "data"
  )
  docs = open_documents("p", cfg.sources["p"], tok, "train")
  np.testing.assert_array_equal(docs.doc(5), tok.encode(texts[5]))
  with pytest.raises(
    ConfigError, match="neither a 'tokens' nor a 'text' feature; features: body"
  ):
    build_pipeline(
      configlib.from_dict(
        DataConfig,
        {
          "tokenizer": tokenizer_path,
          "sources": {"p": {**source, "text_key": "text"}},
        },
        "data",
      ),
      2,
    )


@pytest.mark.slow
def test_prepare_to_gs_and_train_from_it_like_from_disk(
  tokenizer_path, tmp_path, gcs_bucket, capsys
):
  """`data prepare --data-dir gs://...` writes locally, then uploads; the
  pipeline reads the ArrayRecord files on gs:// (array_record's own GCS
  client) into the same batches as a local copy."""
  from etils import epath

  docs = tmp_path / "docs.jsonl"
  docs.write_text(
    "".join(
      json.dumps({"text": t}) + "\n" for t in testing.sample_texts(40, seed=7)
    )
  )
  args = [
    "data",
    "prepare",
    "--input",
    str(docs),
    "--name",
    "web",
    "--tokenizer",
    tokenizer_path,
    "--eval-fraction",
    "0.1",
  ]
  for data_dir in (f"{gcs_bucket}/tfds", str(tmp_path / "tfds")):
    assert cli.main([*args, "--data-dir", data_dir]) == 0
  uploaded = sorted(
    p.name for p in epath.Path(f"{gcs_bucket}/tfds/web/1.0.0").iterdir()
  )
  assert uploaded == sorted(os.listdir(tmp_path / "tfds" / "web" / "1.0.0"))
  # The same input again: found on gs:// and not tokenized again.
  assert cli.main([*args, "--data-dir", f"{gcs_bucket}/tfds"]) == 0
  assert "web/train: 36 documents" in capsys.readouterr().out

  def pipeline(data_dir):
    return build_pipeline(
      configlib.from_dict(
        DataConfig,
        {
          "seq_len": 32,
          "tokenizer": tokenizer_path,
          "sources": {
            "web": {"name": "web", "data_dir": data_dir, "eval_split": "eval"}
          },
        },
        "data",
      ),
      4,
    )

  remote, local = (
    pipeline(f"{gcs_bucket}/tfds"),
    pipeline(str(tmp_path / "tfds")),
  )
  for step in (0, 1, 5):
    for key, value in local.batch(step).items():
      np.testing.assert_array_equal(remote.batch(step)[key], value)
  for key, value in next(local.eval_batches("web", 1)).items():
    np.testing.assert_array_equal(
      next(remote.eval_batches("web", 1))[key], value
    )
