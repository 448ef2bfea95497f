"""Pipeline: exact resume, realized shares, process shards, eval, bad input."""

import dataclasses

import numpy as np
import pytest

from gemma_jax import configlib
from gemma_jax.data import DataConfig, StageConfig, build_pipeline, check_resume
from gemma_jax.errors import ConfigError, DataError

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "source")


def assert_batches_equal(x, y):
  assert set(x) == set(KEYS) == set(y)
  for k in KEYS:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_format(make_config):
  pipe = build_pipeline(make_config(), global_batch=8)
  assert pipe.source_names == ("a", "b", "c")
  batch = pipe.batch(0)
  for k in KEYS[:-1]:
    assert batch[k].shape == (8, 32) and batch[k].dtype == np.int32, k
  assert batch["source"].shape == (8,) and batch["source"].dtype == np.int32


def test_resumed_stream_equals_uninterrupted_stream(make_config):
  """Stages switch at step 20; resume at random steps and across it."""
  cfg = make_config()
  uninterrupted = build_pipeline(cfg, 8).iterate(0)
  stream = [next(uninterrupted)[1] for _ in range(40)]
  rng = np.random.default_rng(0)
  for start in [19, 20, 21, *rng.integers(0, 38, size=3)]:
    resumed = build_pipeline(cfg, 8).iterate(int(start))
    for step in range(int(start), min(int(start) + 3, 40)):
      got_step, batch = next(resumed)
      assert got_step == step
      assert_batches_equal(batch, stream[step])


def test_realized_shares_match_targets_in_each_stage(make_config):
  cfg = make_config(
    stages=[
      {"start_step": 0, "weights": {"a": 0.5, "b": 0.3, "c": 0.2}},
      {"start_step": 64, "weights": {"a": 0.1, "b": 0.2, "c": 0.7}},
    ]
  )
  pipe = build_pipeline(cfg, global_batch=16)
  for first, last in [(0, 64), (64, 128)]:
    tokens = sum(pipe.source_tokens(pipe.batch(s)) for s in range(first, last))
    target = pipe.target_shares(first)
    realized = tokens / tokens.sum()
    np.testing.assert_allclose(realized, list(target.values()), atol=0.01)


def test_data_shards_union_to_the_single_process_batch(make_config):
  cfg = make_config()
  single = build_pipeline(cfg, global_batch=8)
  for count in (2, 4):
    shards = [
      build_pipeline(cfg, 8, shard_index=p, shard_count=count)
      for p in range(count)
    ]
    for step in (0, 19, 20, 33):
      parts = [s.batch(step) for s in shards]
      assert parts[0]["inputs"].shape == (8 // count, 32)
      union = {k: np.concatenate([p[k] for p in parts]) for k in KEYS}
      assert_batches_equal(union, single.batch(step))


def test_eval_batches_cover_the_held_out_split_once(make_config):
  pipe = build_pipeline(make_config(), global_batch=4)
  batches = list(pipe.eval_batches("a", 1000))
  rows = pipe._eval_rows["a"]
  assert len(batches) == -(-rows.rows_per_epoch // 4)
  assert all((b["source"] == 0).all() for b in batches)
  counted = sum(int(b["loss_mask"].sum()) for b in batches)
  docs = rows.docs
  assert counted == docs.num_tokens + len(docs)  # every token + eos, once
  assert len(list(pipe.eval_batches("a", 2))) == 2
  assert pipe.eval_sources == ("a",)
  assert list(pipe.eval_batches("b", 1)) == []  # no held-out data
  with pytest.raises(ConfigError, match="'zzz' is not one of a, b, c"):
    next(pipe.eval_batches("zzz", 1))


def test_later_stages_may_change_on_resume_past_ones_may_not(make_config):
  cfg = make_config()
  pipe = build_pipeline(cfg, 8)
  edited = dataclasses.replace(
    cfg, stages=(*cfg.stages, StageConfig(30, {"a": 1.0}))
  )
  new = build_pipeline(edited, 8)
  check_resume(pipe.describe(), new.describe(), step=25)
  for step in (24, 25, 29):
    assert_batches_equal(new.batch(step), pipe.batch(step))
  assert (new.batch(30)["source"] == 0).all()
  with pytest.raises(ConfigError, match="stages starting at or before step 35"):
    check_resume(pipe.describe(), new.describe(), step=35)
  past = dataclasses.replace(
    cfg, stages=(cfg.stages[0], StageConfig(20, {"a": 1.0, "b": 1.0}))
  )
  with pytest.raises(ConfigError, match="cannot be edited on resume"):
    check_resume(pipe.describe(), build_pipeline(past, 8).describe(), 25)
  with pytest.raises(ConfigError, match="data.seq_len changed from 32 to 16"):
    check_resume(
      pipe.describe(), build_pipeline(make_config(seq_len=16), 8).describe(), 5
    )
  with pytest.raises(ConfigError, match="train.batch_size changed"):
    check_resume(pipe.describe(), build_pipeline(cfg, 16).describe(), 5)
  # A checkpoint from the block-mixing version drew other rows.
  old = {**pipe.describe(), "block_size": 256}
  del old["mixing"]
  with pytest.raises(
    ConfigError,
    match="mixed in blocks of data.block_size "
    "rows, this version mixes exactly per batch",
  ):
    check_resume(old, pipe.describe(), 5)


def test_describe_is_json_and_names_tokenizer_and_stages(make_config):
  import json

  desc = build_pipeline(make_config(), 8).describe()
  assert json.loads(json.dumps(desc)) == desc
  assert len(desc["tokenizer"]["fingerprint"]) == 64
  assert [s["start_step"] for s in desc["stages"]] == [0, 20]
  assert desc["sources"]["a"]["num_docs"] == 120


def test_bad_input_is_a_clear_error(make_config, tmp_path, tokenizer_path):
  with pytest.raises(DataError, match="no file matches"):
    build_pipeline(
      make_config(
        sources={
          "f": {"kind": "files", "paths": [str(tmp_path / "missing*.txt")]}
        },
        stages=[],
      ),
      8,
    )
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(DataError, match="'f' is empty"):
    build_pipeline(
      make_config(
        sources={
          "f": {"kind": "files", "paths": [str(tmp_path / "empty.txt")]}
        },
        stages=[],
      ),
      8,
    )
  with pytest.raises(DataError, match="tfds dataset 'nope' not found"):
    build_pipeline(
      make_config(
        sources={
          "t": {"kind": "tfds", "name": "nope", "data_dir": str(tmp_path)}
        },
        stages=[],
      ),
      8,
    )
  with pytest.raises(ConfigError, match="model.vocab_size is 256"):
    build_pipeline(make_config(), 8, vocab_size=256)
  with pytest.raises(DataError, match="tokenizer file not found"):
    build_pipeline(make_config(tokenizer=str(tmp_path / "x.model")), 8)
  with pytest.raises(
    ConfigError, match="multiple of the number of data shards"
  ):
    build_pipeline(make_config(), 6, shard_index=0, shard_count=4)


def test_files_sources_read_text_and_jsonl(make_config, tmp_path):
  (tmp_path / "one.txt").write_text("a whole file is one document")
  (tmp_path / "many.jsonl").write_text(
    '{"text": "first line"}\n\n{"text": "second line"}\n'
  )
  cfg = make_config(
    sources={
      "f": {
        "kind": "files",
        "paths": [str(tmp_path / "*.txt"), str(tmp_path / "*.jsonl")],
      }
    },
    stages=[],
  )
  pipe = build_pipeline(cfg, 2)
  assert pipe.describe()["sources"]["f"]["num_docs"] == 3
  (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
  with pytest.raises(
    DataError,
    match=r"bad.jsonl:1: not a JSON object "
    "with a 'text' field",
  ):
    build_pipeline(
      make_config(
        sources={
          "f": {"kind": "files", "paths": [str(tmp_path / "bad.jsonl")]}
        },
        stages=[],
      ),
      2,
    )


@pytest.mark.slow
def test_worker_processes_yield_the_same_batches(corpus_config):
  cfg = configlib.from_dict(
    DataConfig, {**corpus_config, "num_workers": 2}, "data"
  )
  pipe = build_pipeline(cfg, 8)
  stream = pipe.iterate(7)
  try:
    for step in range(7, 11):
      got, batch = next(stream)
      assert got == step
      assert_batches_equal(batch, pipe.batch(step))
  finally:
    stream.close()


def test_resume_may_add_a_source_for_a_later_stage(make_config):
  cfg = make_config()
  old = build_pipeline(cfg, 8)
  sources = {
    **configlib.to_dict(cfg)["sources"],
    "d": {"kind": "memory", "texts": ["delta " * 30] * 10},
  }
  stages = [
    *configlib.to_dict(cfg)["stages"],
    {"start_step": 30, "weights": {"d": 1.0}},
  ]
  new = build_pipeline(make_config(sources=sources, stages=stages), 8)
  check_resume(old.describe(), new.describe(), step=25)
  for step in (0, 21, 29):
    assert_batches_equal(new.batch(step), old.batch(step))
  assert (new.batch(30)["source"] == 3).all()
  reordered = dict(reversed(list(sources.items())))
  with pytest.raises(ConfigError, match="must keep their names and order"):
    check_resume(
      old.describe(),
      build_pipeline(
        make_config(sources=reordered, stages=stages), 8
      ).describe(),
      25,
    )
  check_resume({}, new.describe(), 25)  # nothing recorded: nothing to check


def test_missing_held_out_split_fails_at_build(corpus_config):
  sources = {**corpus_config["sources"]}
  sources["math"] = {**sources["math"], "eval_split": "validation"}
  cfg = configlib.from_dict(
    DataConfig, {**corpus_config, "sources": sources}, "data"
  )
  with pytest.raises(ConfigError, match="has no split 'validation'"):
    build_pipeline(cfg, 8)


def test_pipeline_for_a_run_config_is_its_data_batch_and_vocab(make_config):
  from gemma_jax.data import pipeline_for
  from gemma_jax.model import preset
  from gemma_jax.train.config import RunConfig, TrainConfig

  data = make_config()
  run = RunConfig(
    model=preset("tiny-gemma", vocab_size=512),
    data=data,
    train=TrainConfig(batch_size=8),
  )
  # One process (this test's JAX): the whole batch.
  assert_batches_equal(
    pipeline_for(run).batch(3), build_pipeline(data, 8).batch(3)
  )
  shard = pipeline_for(run, shard_index=1, shard_count=2)
  assert_batches_equal(
    shard.batch(3),
    build_pipeline(data, 8, shard_index=1, shard_count=2).batch(3),
  )
  small = dataclasses.replace(run, model=preset("tiny-gemma", vocab_size=256))
  with pytest.raises(ConfigError, match="model.vocab_size is 256"):
    pipeline_for(small)
