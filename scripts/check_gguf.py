"""Checks `gemma-jax convert --to gguf` against llama.cpp itself.

    pip install -e '.[llama-cpp,hf]'   # builds llama.cpp (minutes)
    python scripts/check_gguf.py ckpt/ --tokenizer tok.model \\
        --llama-cpp-src llama.cpp/ --out check/

For a native checkpoint and its SentencePiece model, in --out:

  1. exports our GGUF files (f32 f16 bf16 q8_0 q4_0) and the HF directory;
  2. with --llama-cpp-src (a llama.cpp source tree, e.g. vendor/llama.cpp
     of the llama-cpp-python source distribution): runs llama.cpp's own
     convert_hf_to_gguf.py on the HF directory for f32 f16 bf16 q8_0, and
     compares every tensor (type, shape, bytes) and every metadata value it
     writes with ours (`compare_files`; EXPECTED_KEY_DIFFERENCES lists the
     keys that may differ, and why);
  3. loads each file in llama.cpp (llama-cpp-python), checks that its
     tokenisation of a unicode prompt equals SentencePiece's, and measures
     max |logit difference| against our forward pass (`gemma-jax score`'s
     numbers) and against llama.cpp on its converter's file.

Prints one JSON object; exits 1 if a check fails. The bounds are those
docs/quantization.md reports as measured.

Held-out perplexity, measured by llama.cpp on the exported files and by our
forward pass on the same tokens (windows of --window tokens, BOS first, of
the default corpus' held-out documents; --windows per source):

    python scripts/check_gguf.py --tokenizer tok.model --out ppl/ \
        --perplexity "float32=runs/tiny/params@f32" \
        --perplexity "Q4_0 PTQ=runs/tiny/params@q4_0" \
        --perplexity "Q4_0 QAT=runs/tiny-qat/params@q4_0"

The largest logit differences per type on the random model of the
llama_cpp tests (`random_model`; weight seeds 0..N-1, 3 token sequences
each), from which tests/checkpoint/test_gguf_llama_cpp.py's bounds come:

    python scripts/check_gguf.py --bounds 5 --out bounds/
"""

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT = "Grüße, 世界! naïve café — ∑ x² ≤ 3.5 🙂\n\tdef f(x): return x"
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
TYPES = (*CONVERTER_TYPES, "q4_0")
# Keys of llama.cpp's converter that we write differently, on purpose:
#   general.* naming fields: derived from the directory name there;
#   the CodeGemma special tokens (prefix/suffix/middle/fsep/eot ids), which
#   its Gemma 1 converter writes for every model ("TODO: these special
#   tokens should be exported only for the CodeGemma family").
# Keys we add (not in its files): sliding_window_pattern (one bool per
# layer, where llama.cpp otherwise assumes Gemma's default pattern),
# rope.freq_base / freq_base_swa (its defaults, written out), name and
# quantization_version.
EXPECTED_KEY_DIFFERENCES = (
  "general.name",
  "general.basename",
  "general.size_label",
  "general.finetune",
  "tokenizer.ggml.prefix_token_id",
  "tokenizer.ggml.suffix_token_id",
  "tokenizer.ggml.middle_token_id",
  "tokenizer.ggml.fsep_token_id",
  "tokenizer.ggml.eot_token_id",
)


# The llama_cpp tests' model: a random tiny Gemma 2 like the issue's scale
# measurement (d_model 128, 4 layers, window 16, soft-caps 50/30), with a
# 512-piece vocabulary (gemma_jax.data.testing.tiny_tokenizer's) and
# weights N(0, RANDOM_SCALE^2).
RANDOM_SCALE = 0.1


def random_model():
  from gemma_jax.model.config import PRESETS

  return dataclasses.replace(
    PRESETS["tiny-gemma2"], vocab_size=512, sliding_window=16
  )


def qat_model(cfg, kind: str):
  """`cfg` as a QAT model whose forward quantizes every matrix as `kind`
  (q8_0/q4_0), as a float model's post-training export does."""
  from gemma_jax.model.quant import GGML_SCHEMES, GROUPS, QuantConfig

  bits = GGML_SCHEMES[kind][0]
  return dataclasses.replace(
    cfg, quant=QuantConfig(bits=bits, scheme=kind, targets=GROUPS)
  )


def export(checkpoint, out, tokenizer, kind=None) -> None:
  """`gemma-jax convert --to gguf` of `checkpoint` (its default type if
  `kind` is None)."""
  from gemma_jax import cli

  argv = ["convert", "--from", "native", "--to", "gguf", "--force"]
  argv += ["--tokenizer", str(tokenizer)]
  argv += ["--gguf-type", kind] if kind else []
  if cli.main([*argv, str(checkpoint), str(out)]):
    raise SystemExit(f"convert --to gguf {checkpoint} failed")


def measure_bounds(seeds: int, out) -> dict:
  """{type: [max |llama.cpp - our forward| per (weight seed, tokens)]} on
  `random_model()`: every type of the float model against its float
  forward, and 'qat_q8_0'/'qat_q4_0', the export of the same weights as a
  QAT model against its QAT forward."""
  from gemma_jax.checkpoint import native
  from gemma_jax.checkpoint.testing import random_params
  from gemma_jax.data.testing import tiny_tokenizer

  cfg = random_model()
  tok = tiny_tokenizer(os.path.join(out, "tokenizer.model"))
  diffs: dict = {k: [] for k in (*TYPES, "qat_q8_0", "qat_q4_0")}
  for seed in range(seeds):
    params = random_params(cfg, seed=seed, scale=RANDOM_SCALE)
    runs = {}
    native.save(os.path.join(out, f"{seed}-float"), params, cfg, force=True)
    for kind in TYPES:
      path = os.path.join(out, f"{seed}-{kind}.gguf")
      export(os.path.join(out, f"{seed}-float"), path, tok, kind)
      runs[kind] = (llama(path), cfg)
    for kind in ("q8_0", "q4_0"):
      qat = qat_model(cfg, kind)
      native.save(
        os.path.join(out, f"{seed}-qat-{kind}"), params, qat, force=True
      )
      path = os.path.join(out, f"{seed}-qat-{kind}.gguf")
      export(os.path.join(out, f"{seed}-qat-{kind}"), path, tok)
      runs[f"qat_{kind}"] = (llama(path), qat)
    for token_seed in range(3):
      rng = np.random.default_rng(token_seed)
      tokens = [2, *rng.integers(4, cfg.vocab_size, 47)]
      for name, (model, model_cfg) in runs.items():
        ours = our_logits(params, model_cfg, tokens)
        theirs = llama_logits(model, tokens)
        diffs[name].append(float(np.abs(theirs - ours).max()))
  return diffs


def read_gguf(path):
  """({key: value}, {tensor name: (type name, shape, bytes)})."""
  import gguf

  reader = gguf.GGUFReader(str(path))
  kv = {k: f.contents() for k, f in reader.fields.items() if f.types}
  tensors = {
    t.name: (t.tensor_type.name, [int(x) for x in t.shape], bytes(t.data))
    for t in reader.tensors
  }
  return kv, tensors


def compare_files(ours, theirs) -> list[str]:
  """Differences between two GGUF files, one line each: tensors (names,
  types, shapes, bytes) and every key of `theirs` (values), less
  EXPECTED_KEY_DIFFERENCES."""
  kv_a, t_a = read_gguf(ours)
  kv_b, t_b = read_gguf(theirs)
  out = []
  for name in sorted(set(t_a) ^ set(t_b)):
    out.append(f"tensor {name} only in {'ours' if name in t_a else 'theirs'}")
  for name in sorted(set(t_a) & set(t_b)):
    (ta, sa, ba), (tb, sb, bb) = t_a[name], t_b[name]
    if (ta, sa) != (tb, sb):
      out.append(f"tensor {name}: ours {ta} {sa}, theirs {tb} {sb}")
    elif ba != bb:
      out.append(f"tensor {name}: same type and shape, different bytes")
  for key, value in sorted(kv_b.items()):
    if key.startswith("GGUF.") or key in EXPECTED_KEY_DIFFERENCES:
      continue  # GGUF.*: the reader's counts, not keys
    if key.startswith("general.") and (
      key not in ("general.architecture", "general.file_type")
    ):
      continue
    if key not in kv_a:
      out.append(f"key {key} only in theirs ({_short(value)})")
    elif not _same(kv_a[key], value):
      out.append(f"key {key}: ours {_short(kv_a[key])}, theirs {_short(value)}")
  return out


def _same(a, b) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    return bool(np.float32(a) == np.float32(b))
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  return a == b


def _short(value) -> str:
  text = repr(value)
  return text if len(text) < 60 else text[:57] + "..."


def converter_file(hf_dir, out, outtype, llama_src) -> None:
  """llama.cpp's convert_hf_to_gguf.py on `hf_dir`."""
  env = dict(os.environ, PYTHONPATH=os.path.join(llama_src, "gguf-py"))
  script = os.path.join(llama_src, "convert_hf_to_gguf.py")
  cmd = [sys.executable, script, str(hf_dir), "--outfile", str(out)]
  subprocess.run(
    [*cmd, "--outtype", outtype], env=env, check=True, capture_output=True
  )


def llama(
  path, n_ctx: int = 512, f32_cache: bool = True, threads: int | None = None
):
  """A llama_cpp.Llama on `path` that keeps every position's logits; an
  f32 KV cache unless f32_cache is False (llama.cpp's default is f16);
  `threads` CPU threads (None: llama.cpp's default)."""
  import llama_cpp

  options: dict = dict(type_k=0, type_v=0) if f32_cache else {}
  if threads:
    options.update(n_threads=threads, n_threads_batch=threads)
  return llama_cpp.Llama(
    model_path=str(path),
    n_ctx=n_ctx,
    n_batch=n_ctx,
    n_ubatch=n_ctx,
    logits_all=True,
    verbose=False,
    seed=0,
    **options,
  )


def llama_logits(model, tokens) -> np.ndarray:
  """[T, V] float32 logits of llama.cpp for `tokens` (one sequence)."""
  model.reset()
  model.eval(list(map(int, tokens)))
  return np.array(model.scores[: len(tokens)], np.float32)


def our_logits(params, cfg, tokens) -> np.ndarray:
  """[T, V] logits of our forward pass (float32 compute) for one sequence,
  or [B, T, V] for a batch of equal-length sequences."""
  import jax.numpy as jnp

  tokens = np.asarray(tokens)
  apply = _forward(dataclasses.replace(cfg, dtype="float32"))
  logits = apply(params, jnp.asarray(tokens.reshape(-1, tokens.shape[-1])))
  return np.asarray(logits, np.float32).reshape(*tokens.shape, -1)


@functools.cache
def _forward(cfg):
  import jax

  from gemma_jax.model import Transformer

  return jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))


def tokenization_matches(model, tokenizer, text=PROMPT) -> bool:
  ours = [int(x) for x in tokenizer.encode(text)]
  theirs = model.tokenize(text.encode(), add_bos=False, special=False)
  return ours == list(theirs)


def heldout_windows(tokenizer, per_source: int, length: int) -> dict:
  """{source: [[BOS, ...] of `length` tokens]} from the default corpus'
  held-out documents (consecutive windows of each document, in order)."""
  from gemma_jax.data import corpus
  from gemma_jax.tokenizer import BOS_ID

  out = {}
  for source, splits in corpus.corpus_texts().items():
    windows: list[list[int]] = []
    for doc in splits["eval"]:
      ids = [int(i) for i in tokenizer.encode(doc)]
      for start in range(0, len(ids) - length + 2, length - 1):
        windows.append([BOS_ID, *ids[start : start + length - 1]])
        if len(windows) == per_source:
          break
      if len(windows) == per_source:
        break
    out[source] = windows
  return out


def nll(logits: np.ndarray, window) -> np.ndarray:
  """Negative log-likelihood of window[1:] under logits[:-1]."""
  x = logits[:-1].astype(np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  logz = np.log(np.exp(x).sum(axis=-1))
  targets = np.asarray(window[1:])
  return logz - x[np.arange(len(targets)), targets]


def perplexity_rows(args) -> dict:
  """{label: {runtime: {source: loss}, ...}} for --perplexity rows."""
  from gemma_jax.checkpoint import gguf, native
  from gemma_jax.model.quant import GGML_SCHEMES, GROUPS, QuantConfig
  from gemma_jax.tokenizer import Tokenizer

  tokenizer = Tokenizer.load(args.tokenizer)
  windows = heldout_windows(tokenizer, args.windows, args.window)
  rows = {}
  for k, row in enumerate(args.perplexity):
    label, spec = row.split("=", 1)
    path, _, kind = spec.partition("@")
    kind, _, groups = kind.partition(":")
    params, cfg = native.load(path)
    kind = kind or gguf.default_type(cfg)
    if groups and (cfg.quant is not None or kind not in GGML_SCHEMES):
      raise SystemExit(f"{row}: :GROUPS is for q8_0/q4_0 of a float model")
    if kind in GGML_SCHEMES and cfg.quant is None:
      # Post-training quantization of GROUPS (default every matrix): the
      # float weights saved as a model that quantizes them, so that the
      # export and our forward both quantize exactly those groups.
      targets = tuple(groups.split(",")) if groups else GROUPS
      cfg = dataclasses.replace(
        cfg,
        quant=QuantConfig(
          bits=GGML_SCHEMES[kind][0], scheme=kind, targets=targets
        ),
      )
      path = os.path.join(args.out, f"ppl-{k}-ptq")
      native.save(path, params, cfg, force=True)
    out = os.path.join(args.out, f"ppl-{k}-{kind}.gguf")
    export(path, out, args.tokenizer, kind)
    result: dict = {"ours": {}}
    for source, ws in windows.items():
      logits = our_logits(params, cfg, ws)  # [windows, T, V]
      parts = [nll(x, w) for x, w in zip(logits, ws)]
      result["ours"][source] = float(np.concatenate(parts).mean())
    if not args.ours_only:
      model = llama(out, n_ctx=args.window, threads=args.threads)
      result["llama.cpp"] = {}
      for source, ws in windows.items():
        parts = [nll(llama_logits(model, w), w) for w in ws]
        result["llama.cpp"][source] = float(np.concatenate(parts).mean())
    result["tokens"] = {
      s: len(ws) * (args.window - 1) for s, ws in windows.items()
    }
    rows[label] = result
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "checkpoint", nargs="?", help="native checkpoint directory"
  )
  parser.add_argument("--tokenizer")
  parser.add_argument("--out", required=True, help="work directory")
  parser.add_argument(
    "--llama-cpp-src",
    help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/)",
  )
  parser.add_argument("--tokens", type=int, default=64)
  parser.add_argument("--types", default=",".join(TYPES))
  parser.add_argument(
    "--perplexity",
    action="append",
    default=[],
    metavar="LABEL=CKPT@TYPE[:GROUPS]",
    help="held-out loss of CKPT exported as TYPE (default: its QAT scheme "
    "or f32), by llama.cpp and by our forward; q8_0/q4_0 of a float model "
    "quantize GROUPS (e.g. attn,mlp; default every matrix)",
  )
  parser.add_argument(
    "--bounds",
    type=int,
    metavar="SEEDS",
    help="largest logit differences per type on the llama_cpp tests' "
    "random model, over SEEDS weight seeds",
  )
  parser.add_argument(
    "--ours-only",
    action="store_true",
    help="--perplexity: our forward's losses only (no llama.cpp)",
  )
  parser.add_argument(
    "--threads", type=int, help="llama.cpp's CPU threads (--perplexity)"
  )
  parser.add_argument("--windows", type=int, default=16)
  parser.add_argument("--window", type=int, default=128)
  args = parser.parse_args(argv)
  if args.bounds:
    os.makedirs(args.out, exist_ok=True)
    diffs = measure_bounds(args.bounds, args.out)
    print(json.dumps({k: {"max": max(v), "all": v} for k, v in diffs.items()}))
    return 0
  if args.tokenizer is None:
    parser.error("--tokenizer is required (except with --bounds)")
  if args.perplexity:
    os.makedirs(args.out, exist_ok=True)
    rows = perplexity_rows(args)
    print(json.dumps(rows, indent=2))
    print(
      "| model | runtime | "
      + " | ".join(rows[next(iter(rows))]["ours"])
      + " | mean |"
    )
    for label, result in rows.items():
      for runtime in ("llama.cpp", "ours")[args.ours_only :]:
        losses = list(result[runtime].values())
        cells = " | ".join(f"{x:.4f}" for x in losses)
        mean = sum(losses) / len(losses)
        print(f"| {label} | {runtime} | {cells} | {mean:.4f} |")
    return 0
  if args.checkpoint is None:
    parser.error("give a checkpoint, or --perplexity rows")

  from gemma_jax import cli
  from gemma_jax.checkpoint import native
  from gemma_jax.tokenizer import Tokenizer

  os.makedirs(args.out, exist_ok=True)
  params, cfg = native.load(args.checkpoint)
  tokenizer = Tokenizer.load(args.tokenizer)
  common = ["--from", "native", "--tokenizer", args.tokenizer, "--force"]
  hf_dir = os.path.join(args.out, "hf")
  if cli.main(["convert", *common, "--to", "hf", args.checkpoint, hf_dir]):
    return 1
  rng = np.random.default_rng(0)
  tokens = [2, *rng.integers(4, cfg.vocab_size, args.tokens - 1)]
  reference = our_logits(params, cfg, tokens)
  report: dict = {
    "model": cfg.name,
    "max_abs_logit": float(np.abs(reference).max()),
    "types": {},
  }
  failed = False
  for kind in args.types.split(","):
    ours = os.path.join(args.out, f"ours-{kind}.gguf")
    argv_ = ["convert", *common, "--to", "gguf", "--gguf-type", kind]
    if cli.main([*argv_, args.checkpoint, ours]):
      return 1
    row: dict = {}
    model = llama(ours)
    row["tokenization_matches"] = tokenization_matches(model, tokenizer)
    failed |= not row["tokenization_matches"]
    mine = llama_logits(model, tokens)
    row["vs_ours_f32_cache"] = float(np.abs(mine - reference).max())
    del model
    row["vs_ours_f16_cache"] = float(
      np.abs(
        llama_logits(llama(ours, f32_cache=False), tokens) - reference
      ).max()
    )
    if args.llama_cpp_src and kind in CONVERTER_TYPES:
      theirs = os.path.join(args.out, f"llama-cpp-{kind}.gguf")
      converter_file(hf_dir, theirs, kind, args.llama_cpp_src)
      row["file_differences"] = compare_files(ours, theirs)
      failed |= bool(row["file_differences"])
      other = llama_logits(llama(theirs), tokens)
      row["vs_converter_file"] = float(np.abs(mine - other).max())
      failed |= row["vs_converter_file"] != 0.0
    report["types"][kind] = row
  print(json.dumps(report, indent=2))
  return int(failed)


if __name__ == "__main__":
  sys.exit(main())
