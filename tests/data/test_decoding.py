"""Honest text decoding: bytes that are not UTF-8 are counted, reported and
refused unless a policy says otherwise; data prepare can repair mojibake
and normalise, counting what it changed."""

import json

import pytest
import tensorflow_datasets as tfds

from gemma_jax import cli, configlib
from gemma_jax.data import DataConfig
from gemma_jax.data.sources import DecodePolicy, open_documents, read_text_files
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.tokenizer import Tokenizer

FRENCH = "Voilà une phrase en français, très jolie."       # 3 non-ASCII
JAPANESE = "日本語のテキストです。"


@pytest.fixture
def files(tmp_path):
  (tmp_path / "latin1.txt").write_bytes(FRENCH.encode("latin-1"))
  (tmp_path / "sjis.txt").write_bytes(JAPANESE.encode("shift_jis"))
  (tmp_path / "good.txt").write_text("all fine here")
  (tmp_path / "mixed.jsonl").write_bytes(
      b'{"text": "clean line"}\n{"text": "caf\xe9"}\n{"text": "ok"}\n')
  return tmp_path


def test_undecodable_bytes_are_refused_by_default_naming_file_and_count(
    files):
  with pytest.raises(DataError, match=r"latin1.txt: 3 of 41 bytes are not "
                     r"UTF-8 \(first at byte 4\).*on_decode_error"):
    read_text_files([str(files / "latin1.txt")], "text")
  with pytest.raises(DataError, match=r"sjis.txt: \d+ of 22 bytes"):
    read_text_files([str(files / "sjis.txt")], "text")
  with pytest.raises(DataError, match=r"mixed.jsonl: 1 of \d+ bytes .*first "
                     r"at byte 36"):
    read_text_files([str(files / "mixed.jsonl")], "text")


def test_skip_document_drops_only_the_documents_holding_them(files):
  warnings, reports = [], []
  texts = read_text_files([str(files / "*.txt"), str(files / "*.jsonl")],
                          "text", "s", DecodePolicy("skip_document"),
                          warn=warnings.append, reports=reports)
  assert texts == ["all fine here", "clean line", "ok"]
  assert [(r.path.rsplit("/", 1)[1], r.undecodable_bytes,
           r.skipped_documents) for r in reports] == [
               ("latin1.txt", 3, 1), ("sjis.txt", reports[1].undecodable_bytes,
                                      1), ("mixed.jsonl", 1, 1)]
  assert len(warnings) == 3 and "1 documents skipped" in warnings[2]


def test_replace_and_a_threshold(files):
  warnings = []
  texts = read_text_files([str(files / "latin1.txt")], "text", "s",
                          DecodePolicy("replace"), warn=warnings.append)
  assert texts == ["Voil\ufffd une phrase en fran\ufffdais, tr\ufffds jolie."]
  assert warnings == [f"{files}/latin1.txt: 3 of 41 bytes are not UTF-8; 1 "
                      f"documents with U+FFFD in their place"]
  # error with a threshold: 3/41 = 7.3% passes 10%, not 5%.
  assert read_text_files([str(files / "latin1.txt")], "text", "s",
                         DecodePolicy("error", 0.10), warn=lambda m: None)
  with pytest.raises(DataError):
    read_text_files([str(files / "latin1.txt")], "text", "s",
                    DecodePolicy("error", 0.05))


def test_the_policy_is_a_source_key(files, tokenizer_path):
  make = lambda **kw: configlib.from_dict(DataConfig, {"sources": {"s": {
      "kind": "files", "paths": [str(files / "*.txt")], **kw}}},
      "data").sources["s"]
  tok = Tokenizer.load(tokenizer_path)
  with pytest.raises(DataError, match="latin1.txt"):
    open_documents("s", make(), tok, "train")
  assert len(open_documents("s", make(on_decode_error="skip_document"), tok,
                            "train")) == 1
  with pytest.raises(ConfigError, match="on_decode_error: 'ignore'"):
    make(on_decode_error="ignore")
  with pytest.raises(ConfigError, match="max_undecodable_fraction"):
    make(max_undecodable_fraction=2.0)


def _prepare(tmp_path, tokenizer_path, *extra, inputs=("in.jsonl",)):
  argv = ["data", "prepare", "--name", "web", "--data-dir",
          str(tmp_path / "tfds"), "--tokenizer", tokenizer_path]
  for name in inputs:
    argv += ["--input", str(tmp_path / name)]
  return cli.main(argv + list(extra))


def test_prepare_repairs_mojibake_normalises_and_counts(tmp_path,
                                                        tokenizer_path,
                                                        capsys):
  mojibake = JAPANESE.encode("utf-8").decode("latin-1")   # the "ã®" pattern
  docs = [mojibake, "cafÃ© au lait", "ﬁne ｶﾀｶﾅ", "plain text"]
  (tmp_path / "in.jsonl").write_text(
      "".join(json.dumps({"text": t}) + "\n" for t in docs))
  assert _prepare(tmp_path, tokenizer_path, "--fix-mojibake", "--normalize",
                  "NFKC") == 0
  assert "mojibake_fixed_documents 2, NFKC_changed_documents 1" in \
      capsys.readouterr().out
  builder = tfds.builder("web", data_dir=str(tmp_path / "tfds"))
  meta = builder.info.metadata
  assert meta["cleaning"] == {"documents": 4, "mojibake_fixed_documents": 2,
                              "NFKC_changed_documents": 1}
  assert meta["options"]["fix_mojibake"] and meta["decoding"][
      "undecodable_bytes"] == 0
  tok = Tokenizer.load(tokenizer_path)
  source = builder.as_data_source("train")
  assert tok.decode(source[0]["tokens"]) == JAPANESE
  assert tok.decode(source[2]["tokens"]) == "fine カタカナ"


def test_prepare_refuses_other_input_under_an_existing_name(
    tmp_path, tokenizer_path, capsys):
  (tmp_path / "in.jsonl").write_text('{"text": "first input"}\n')
  (tmp_path / "other.jsonl").write_text('{"text": "second input"}\n'
                                        '{"text": "and more"}\n')
  assert _prepare(tmp_path, tokenizer_path) == 0
  assert _prepare(tmp_path, tokenizer_path) == 0      # same input: kept
  capsys.readouterr()
  assert _prepare(tmp_path, tokenizer_path, inputs=["other.jsonl"]) == 1
  err = capsys.readouterr().err
  assert "already exists" in err and "train: 1 documents there, train: 2 " \
      "documents now); pass --overwrite" in err
  # A cleaning option changes the input too.
  assert _prepare(tmp_path, tokenizer_path, "--normalize", "NFC") == 1
  assert _prepare(tmp_path, tokenizer_path, "--overwrite",
                  inputs=["other.jsonl"]) == 0
  assert "web/train: 2 documents" in capsys.readouterr().out


def test_tfds_text_features_follow_the_same_policy():
  from gemma_jax.data.sources import _tfds_texts
  source = [{"text": b"clean"}, {"text": "caf\xe9".encode("latin-1")},
            {"text": "already str"}]
  with pytest.raises(DataError, match=r"web \(x:train\): 1 of 9 bytes .*"
                     r"first at byte 3 of document 1"):
    _tfds_texts(source, "text", DecodePolicy(), "web (x:train)")
  assert _tfds_texts(source, "text", DecodePolicy("skip_document"),
                     "web") == ["clean", "already str"]
