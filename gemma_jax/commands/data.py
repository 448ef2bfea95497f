"""`gemma-jax data prepare|build-default|show`: datasets for training."""

HELP = "tokenize text into tfds ArrayRecord datasets; build the default corpus"


def add_arguments(parser):
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
  prep = sub.add_parser(
    "prepare",
    help="tokenize text files once into a "
    "tensorflow-datasets ArrayRecord dataset",
  )
  prep.add_argument(
    "--input",
    action="append",
    required=True,
    help="files or globs, local or gs://: .jsonl (also .gz, .zst) one "
    "document per line, .parquet and Hugging Face datasets directories "
    "(save_to_disk) one per row, else one per file (.txt, .txt.gz); "
    "repeatable",
  )
  prep.add_argument(
    "--name", required=True, help="dataset name (lower_snake_case)"
  )
  prep.add_argument("--data-dir", required=True, help="tfds data_dir")
  prep.add_argument("--tokenizer", required=True, help="tokenizer.model")
  prep.add_argument(
    "--eval-fraction",
    type=float,
    default=0.0,
    help="hold out this share of documents as split 'eval'",
  )
  prep.add_argument(
    "--text-key",
    default="text",
    help="JSON field or parquet/Arrow column holding the text",
  )
  prep.add_argument(
    "--workers",
    type=int,
    default=1,
    help="processes tokenizing input files in parallel (the output is the "
    "same for any number)",
  )
  prep.add_argument(
    "--dedup",
    action="store_true",
    help="drop exact repeats of a document (by a hash of its text); the "
    "count removed is reported",
  )
  prep.add_argument(
    "--beam",
    metavar="OPTIONS",
    default=None,
    help="run as an Apache Beam pipeline with these pipeline options, "
    "e.g. --beam='--runner=DataflowRunner --project=P --region=R "
    "--temp_location=gs://B/tmp' ('' runs Beam's DirectRunner here); "
    "needs the beam extra; the output is the same as without",
  )
  prep.add_argument(
    "--work-dir",
    default=None,
    help="where finished input files are kept until the dataset is "
    "complete, so that a killed prepare resumes (default: "
    "~/.cache/gemma_jax/prepare/NAME-HASH)",
  )
  prep.add_argument(
    "--overwrite",
    action="store_true",
    help="replace a dataset of this name made from other input",
  )
  prep.add_argument(
    "--on-decode-error",
    default="error",
    choices=("error", "skip_document", "replace"),
    help="bytes that are not UTF-8: refuse the file "
    "(default), drop the document, or replace them",
  )
  prep.add_argument(
    "--max-undecodable-fraction",
    type=float,
    default=0.0,
    help="with --on-decode-error error: refuse a file only "
    "above this share of undecodable bytes (default 0)",
  )
  prep.add_argument(
    "--fix-mojibake",
    action="store_true",
    help="repair UTF-8 text once decoded as cp1252/Latin-1 "
    "(ftfy); counted in the metadata",
  )
  prep.add_argument(
    "--normalize",
    choices=("NFC", "NFKC"),
    default=None,
    help="Unicode normalization; counted in the metadata",
  )
  default = sub.add_parser(
    "build-default",
    help="build the embedded default "
    "corpus (stdlib prose and code, generated math) "
    "and its tokenizer; cached",
  )
  default.add_argument(
    "--out", default=None, help="folder (default: ~/.cache/gemma_jax/corpus)"
  )
  default.add_argument("--vocab-size", type=int, default=2048)
  default.add_argument("--force", action="store_true", help="rebuild")
  show = sub.add_parser(
    "show", help="decode the first rows of a run config's data pipeline"
  )
  show.add_argument("--config", required=True)
  show.add_argument("--step", type=int, default=0)
  show.add_argument("--rows", type=int, default=4)
  show.add_argument("overrides", nargs="*", help="key.path=value")


def main(args) -> int:
  return {"prepare": _prepare, "build-default": _build_default, "show": _show}[
    args.action
  ](args)


def _prepare(args) -> int:
  from gemma_jax.data import prepare_files
  from gemma_jax.tokenizer import Tokenizer

  options = prepare_files.Options(
    text_key=args.text_key,
    on_decode_error=args.on_decode_error,
    max_undecodable_fraction=args.max_undecodable_fraction,
    fix_mojibake=args.fix_mojibake,
    normalize=args.normalize,
    eval_fraction=args.eval_fraction,
    dedup=args.dedup,
  )
  if args.beam is not None:
    from gemma_jax.data import beam

    meta = beam.prepare_with_beam(
      args.name,
      args.data_dir,
      args.input,
      args.tokenizer,
      options,
      beam_options=args.beam,
      work_dir=args.work_dir,
      overwrite=args.overwrite,
    )
  else:
    meta = prepare_files.prepare_files(
      args.name,
      args.data_dir,
      args.input,
      Tokenizer.load(args.tokenizer),
      options,
      workers=args.workers,
      work_dir=args.work_dir,
      overwrite=args.overwrite,
    )
  for split in ("train", "eval"):
    if split in meta:
      m = meta[split]
      print(
        f"{args.name}/{split}: {m['num_docs']} documents, "
        f"{m['num_tokens']} tokens"
      )
  changed = {
    k: v for k, v in meta.get("cleaning", {}).items() if k != "documents" and v
  }
  if changed:
    print("cleaning: " + ", ".join(f"{k} {v}" for k, v in changed.items()))
  if meta.get("dedup", {}).get("enabled"):
    print(
      f"dedup: {meta['dedup']['removed_documents']} repeated documents removed"
    )
  print(f"tokenizer fingerprint {meta['tokenizer_fingerprint']}")
  return 0


def _build_default(args) -> int:
  import yaml

  from gemma_jax.data import corpus

  cfg = corpus.build_default_corpus(
    args.out or corpus.DEFAULT_DIR, vocab_size=args.vocab_size, force=args.force
  )
  print(yaml.safe_dump({"data": cfg}, sort_keys=False), end="")
  return 0


def _show(args) -> int:
  from gemma_jax.data import pipeline_for
  from gemma_jax.train.config import load_config

  cfg = load_config(args.config, args.overrides)
  # The whole global batch, as one process would read it.
  pipe = pipeline_for(cfg, shard_index=0, shard_count=1)
  batch = pipe.batch(args.step)
  for i in range(min(args.rows, len(batch["source"]))):
    name = pipe.source_names[batch["source"][i]]
    text = pipe.tokenizer.decode(batch["inputs"][i])
    print(f"--- row {i} ({name}, {batch['loss_mask'][i].sum()} targets)")
    print(text)
  return 0
