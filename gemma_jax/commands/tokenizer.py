"""`gemma-jax tokenizer train|info`: Gemma-style SentencePiece tokenizers."""

HELP = "train a small Gemma-style SentencePiece tokenizer, or show one"


def add_arguments(parser):
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
  train = sub.add_parser(
    "train",
    help="train a BPE tokenizer with Gemma's "
    "settings (byte fallback, split digits, ...)",
  )
  train.add_argument(
    "--input",
    action="append",
    required=True,
    help="text files or globs (.jsonl: one document per line); repeatable",
  )
  train.add_argument("--vocab-size", type=int, required=True)
  train.add_argument("--out", required=True, help="path of tokenizer.model")
  train.add_argument(
    "--text-key", default="text", help="field of a JSON line (default: text)"
  )
  info = sub.add_parser(
    "info", help="vocabulary size, special ids and fingerprint of a tokenizer"
  )
  info.add_argument("path")


def main(args) -> int:
  from gemma_jax.data.sources import read_text_files
  from gemma_jax.tokenizer import Tokenizer, train_tokenizer

  if args.action == "train":
    texts = read_text_files(args.input, args.text_key, "--input")
    tok = train_tokenizer(texts, args.vocab_size, args.out)
  else:
    tok = Tokenizer.load(args.path)
  print(
    f"{tok.path}: {tok.vocab_size} pieces, pad 0 eos 1 bos 2 unk 3, "
    f"fingerprint {tok.fingerprint}"
  )
  return 0
