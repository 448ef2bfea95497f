"""gemma_jax as an lm-evaluation-harness model, registered as `gemma_jax`.

    gemma-jax lm-eval --model gemma_jax \\
        --model_args checkpoint=DIR[,config=...,dtype=...,mesh=...] \\
        --tasks arc_easy

    import lm_eval, gemma_jax.evals.harness
    lm_eval.simple_evaluate(model="gemma_jax", model_args="checkpoint=DIR", ...)
    lm_eval.simple_evaluate(model=GemmaJaxLM(params=p, model_config=c,
                                             tokenizer=tok), ...)

Importing this module registers the model (lm_eval.api.registry); the
harness's own command line cannot find a model defined in another package,
hence `gemma-jax lm-eval` (gemma_jax/commands/lm_eval.py).

It scores exactly what the harness's HF model (lm_eval/models/huggingface.py,
HFLM, lm-eval 0.4.x) scores on the same checkpoint exported to Hugging Face:

* Tokens: TemplateLM's `_encode_pair` (the context's trailing spaces move to
  the continuation; the whole text is encoded and split at the context's
  length) with a tokenizer that adds bos as Gemma's HF tokenizer does
  (add_bos_token true); an empty context is [bos].
* A request longer than max_length + 1 tokens loses tokens from the left;
  max_length defaults to 8192, the max_position_embeddings of our HF exports
  (HFLM reads it from config.json).
* loglikelihood_rolling: the harness's rolling windows over the bos-prefixed
  text (get_rolling_token_windows + make_disjoint_window, prefix bos).
* generate_until: the prompt with bos, keeping its last max_length -
  max_gen_toks tokens; up to max_gen_toks new tokens (greedy unless
  do_sample / temperature > 0); the text decoded without special tokens and
  cut at each stop string ('until', plus "<eos>"). A batch decodes 16 steps
  at a time and stops once every row has eos or a stop string
  (evals/decoding.py), as HFLM's stopping criteria stop its batch.

Batches hold requests of similar length; a batch's width is the next power of
two (at least 16), so a whole run compiles a handful of shapes. Rows are
split over the mesh's batch axes (data parallel) and params are sharded as
in training (gemma_jax.sharding rules; `mesh=` picks the axis sizes). On
several processes each is the harness's rank 0 of 1 and scores every
request over the global mesh (GemmaTokens.rank).
"""

import dataclasses
import functools
import logging
import os
import typing
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from gemma_jax.errors import ConfigError
from gemma_jax.evals import decoding
from gemma_jax.model import ModelConfig, Transformer, preset
from gemma_jax.model.config import DType
from gemma_jax.sharding import mesh as mesh_lib
from gemma_jax.sharding import rules
from gemma_jax.sharding.config import MeshConfig
from gemma_jax.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

log = logging.getLogger(__name__)

# max_position_embeddings of our HF exports (checkpoint/hf_config.to_hf),
# which HFLM takes as its max_length.
DEFAULT_MAX_LENGTH = 8192
# HFLM.max_gen_toks: new tokens when a task's generation_kwargs name none.
DEFAULT_MAX_GEN_TOKS = 256
MIN_WIDTH = 16
BOS_TEXT, EOS_TEXT = "<bos>", "<eos>"


def bucket(n: int, cap: int | None = None) -> int:
  """The next power of two >= n (at least MIN_WIDTH), at most cap."""
  width = max(MIN_WIDTH, 1 << max(0, n - 1).bit_length())
  return width if cap is None else min(width, max(cap, n))


def parse_mesh(spec: str | None) -> MeshConfig:
  """`DATAxFSDPxTENSOR` (one may be -1) -> MeshConfig; None: all devices
  data parallel."""
  if not spec:
    return MeshConfig()
  parts = str(spec).split("x")
  try:
    data, fsdp, tensor = (int(p) for p in parts)
  except ValueError:
    raise ConfigError(
      f"model_args mesh={spec!r}: expected DATAxFSDPxTENSOR, e.g. -1x1x2"
    ) from None
  return MeshConfig(ici_data=data, ici_fsdp=fsdp, ici_tensor=tensor)


def mesh_devices(cfg: MeshConfig) -> list:
  """All devices, or the first ones when the sizes (none -1) ask for fewer:
  `mesh=1x1x1` runs on one device."""
  sizes = (cfg.ici_data, cfg.ici_fsdp, cfg.ici_tensor)
  devices = jax.devices()
  if -1 in sizes:
    return devices
  return devices[: sizes[0] * sizes[1] * sizes[2]]


def _model_config(config: str | None) -> ModelConfig | None:
  """A preset name or a run config YAML (its `model`)."""
  if not config:
    return None
  if config.endswith((".yaml", ".yml")):
    from gemma_jax.train.config import load_config

    return load_config(config).model
  return preset(config)


def _with_dtype(cfg: ModelConfig, dtype: str | None) -> ModelConfig:
  """The config with params and compute in `dtype` (None: as it is)."""
  if not dtype:
    return cfg
  valid = typing.get_args(DType)
  if dtype not in valid:
    raise ConfigError(
      f"model_args dtype={dtype!r}; valid choices: {', '.join(valid)}"
    )
  kind = typing.cast(DType, dtype)
  return dataclasses.replace(cfg, dtype=kind, param_dtype=kind)


def stored_config(path: str, config: str | None) -> ModelConfig:
  """The model a checkpoint holds: its own config (native, HF), or `config`
  (needed for an official Kaggle checkpoint, which carries none)."""
  from gemma_jax.checkpoint import formats, hf, native

  fmt = formats.detect(path)
  given = _model_config(config)
  if fmt == "native":
    return given or native.load_config(path)
  if fmt == "hf":
    return hf.load_config(path, given)
  if given is None:
    raise ConfigError(
      f"{path}: an official (Kaggle) checkpoint has no config; name its "
      f"model with model_args config=PRESET (e.g. gemma2-2b) or a run config"
    )
  return given


def param_shardings(cfg: ModelConfig, mesh, mesh_cfg: MeshConfig):
  """NamedShardings of the params, by the training sharding rules."""
  boxed = jax.eval_shape(
    lambda key, t: Transformer(cfg).init(key, t)["params"],
    jax.ShapeDtypeStruct((2,), jnp.uint32),
    jax.ShapeDtypeStruct((1, 8), jnp.int32),
  )
  specs, _ = rules.mesh_specs(boxed, mesh, mesh_cfg)
  return rules.named(mesh, specs)


def _find_tokenizer(checkpoint: str | None, tokenizer) -> Tokenizer:
  if isinstance(tokenizer, Tokenizer):
    return tokenizer
  if tokenizer:
    return Tokenizer.load(tokenizer)
  if checkpoint and os.path.exists(os.path.join(checkpoint, "tokenizer.model")):
    return Tokenizer.load(os.path.join(checkpoint, "tokenizer.model"))
  raise ConfigError(
    "gemma_jax: no tokenizer; give model_args tokenizer=PATH (a "
    "SentencePiece tokenizer.model), or keep one in the checkpoint directory"
  )


def _as_bool(value) -> bool:
  if isinstance(value, str):
    return value.strip().lower() in ("1", "true", "yes")
  return bool(value)


@functools.partial(jax.jit, static_argnames=("cfg",))
def token_logprobs(params, inputs, targets, mask, *, cfg: ModelConfig):
  """(inputs, targets, mask) [B, T] -> (log p(target), whether the target is
  the argmax) [B, T]; 0 / False at mask 0. Module level, so every model
  object of one config shares its compiled shapes."""
  # Padding (mask 0) is segment 0, which no real token attends to.
  logits = Transformer(cfg).apply({"params": params}, inputs, None, mask)
  logits = jnp.asarray(logits, jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  logp = picked - jax.nn.logsumexp(logits, axis=-1)
  greedy = jnp.argmax(logits, axis=-1) == targets
  return jnp.where(mask == 1, logp, 0.0), greedy & (mask == 1)


class GemmaTokens(TemplateLM):
  """Gemma's tokenization as the harness's HF model applies it (see the
  module docstring), without a model: GemmaJaxLM's base, and on its own
  (RequestTokens) what turns the harness's requests into token ids for
  other uses (a Fisher's rows of gold answers)."""

  def __init__(
    self,
    tokenizer: Tokenizer,
    max_length: int | str = DEFAULT_MAX_LENGTH,
    max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
  ):
    super().__init__()
    self.tok = tokenizer
    self._max_length = int(max_length)
    self._max_gen_toks = int(max_gen_toks)

  # Every process is the harness's rank 0 of 1. With world_size > 1 the
  # harness (lm_eval 0.4.13 evaluator.evaluate) gives each rank every
  # world_size-th document, pads the ranks' request counts with torch
  # collectives (all_gather on lm.device) and returns results on rank 0
  # only. Scoring here is SPMD: every process builds each batch whole and
  # runs the same jitted calls over the global mesh, rows split over the
  # devices (data parallel), so every process must hold every request, in
  # the same order; it then has the whole results too (only process 0
  # writes, commands/lm_eval.py and forgetting.py).
  @property
  def rank(self) -> int:
    return 0

  @property
  def world_size(self) -> int:
    return 1

  # What the harness asks of a TemplateLM.
  @property
  def eot_token_id(self) -> int:
    return EOS_ID

  @property
  def prefix_token_id(self) -> int:
    return BOS_ID  # HFLM: the tokenizer's bos where it has one

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  def tok_encode(
    self, string: str, add_special_tokens: bool | None = None, **kwargs
  ) -> list[int]:
    """Gemma's HF tokenizer: bos first unless add_special_tokens=False; a
    text that already starts with "<bos>" gets no second one (HFLM)."""
    add_bos = add_special_tokens is not False
    if add_special_tokens is None and string.startswith(BOS_TEXT):
      return [BOS_ID, *self.tok.encode(string[len(BOS_TEXT) :]).tolist()]
    return self.tok.encode(string, add_bos=add_bos).tolist()

  def tok_decode(self, tokens) -> str:
    # skip_special_tokens: pad, eos and bos decode to nothing.
    return self.tok.decode([t for t in tokens if t not in (PAD_ID, EOS_ID)])

  def _window(self, context: Sequence[int], continuation: Sequence[int]):
    """HFLM: (ctx + cont)[-(max_length + 1):], scored on len(cont)."""
    if not continuation:
      raise ConfigError("gemma_jax: a continuation encodes to no tokens")
    if len(continuation) > self.max_length:
      raise ConfigError(
        f"gemma_jax: a continuation of {len(continuation)} tokens does not "
        f"fit max_length {self.max_length}"
      )
    whole = (*context, *continuation)
    return whole[-(self.max_length + 1) :], len(continuation)


class RequestTokens(GemmaTokens):
  """Answers nothing (log-likelihood 0, not greedy; empty text) and keeps
  the token ids of the last loglikelihood call: `tokens(pairs)` gives
  what TemplateLM.loglikelihood makes of (context, continuation) pairs,
  cut to max_length + 1 as the model would see them (the rows of a
  Fisher on gold answers, drivers/fisher_data.py)."""

  def tokens(self, pairs) -> list[tuple[tuple[int, ...], int, int]]:
    """[(context, continuation)] -> [(window, continuation length,
    tokens cut from the left)]."""
    from lm_eval.api.instance import Instance

    self.loglikelihood(
      [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
      disable_tqdm=True,
    )
    return self.seen

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_):
    self.seen = []
    for _, ctx, cont in requests:
      window, n = self._window(ctx, cont)
      self.seen.append((window, n, len(ctx) + len(cont) - len(window)))
    return [(0.0, False)] * len(requests)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    return [0.0] * len(requests)

  def generate_until(self, requests, disable_tqdm: bool = False):
    return [""] * len(requests)


@register_model("gemma_jax")
class GemmaJaxLM(GemmaTokens):
  """lm_eval LM over a gemma_jax model; see the module docstring.

  From a checkpoint (what `--model_args` gives):
    checkpoint  native, Hugging Face or Kaggle checkpoint directory
    config      a preset name or run config YAML (needed for Kaggle ones)
    dtype       params and compute dtype (float32, bfloat16); default: the
                config's
    mesh        DATAxFSDPxTENSOR device counts (default: all data parallel)
    tokenizer   SentencePiece model (default: DIR/tokenizer.model)
    max_length  tokens per scored request (default 8192, as HFLM)
    seed        sampling seed for do_sample requests (default 1234)
  From live params (a running trainer's): params=, model_config=,
  tokenizer= a Tokenizer, and optionally mesh= a jax Mesh with
  mesh_config= its MeshConfig (params are then used as they are placed).
  batch_size: requests per forward pass (rounded up to the batch shards).
  """

  def __init__(
    self,
    checkpoint: str | None = None,
    config: str | None = None,
    dtype: str | None = None,
    mesh: Any = None,
    tokenizer: Any = None,
    batch_size: int | str = 8,
    max_length: int | str = DEFAULT_MAX_LENGTH,
    max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
    seed: int | str = 1234,
    *,
    params=None,
    model_config: ModelConfig | None = None,
    mesh_config: MeshConfig | None = None,
    **unused,
  ):
    unused.pop("device", None)  # the harness's torch device: not ours
    unused.pop("max_batch_size", None)
    if unused:
      raise ConfigError(
        f"gemma_jax: unknown model_args {sorted(unused)}; valid: checkpoint, "
        f"config, dtype, mesh, tokenizer, max_length, max_gen_toks, seed"
      )
    if str(batch_size).startswith("auto"):
      batch_size = 8
    if isinstance(mesh, jax.sharding.Mesh):
      self.mesh, self.mesh_config = mesh, mesh_config or MeshConfig()
    else:
      self.mesh_config = parse_mesh(mesh)
      self.mesh = mesh_lib.make_mesh(
        self.mesh_config, mesh_devices(self.mesh_config)
      )
    if params is None:
      if not checkpoint:
        raise ConfigError(
          "gemma_jax: give model_args checkpoint=DIR (or params= and "
          "model_config= from Python)"
        )
      params, model_config = self._load(checkpoint, config, dtype)
    elif model_config is None:
      raise ConfigError("gemma_jax: params= needs model_config=")
    else:
      model_config = _with_dtype(model_config, dtype)
    assert model_config is not None
    self.cfg = model_config
    self.params = params
    super().__init__(
      _find_tokenizer(checkpoint, tokenizer), max_length, max_gen_toks
    )
    self.tok.check_vocab(self.cfg.vocab_size)
    self.seed = int(seed)
    spec = rules.batch_spec(self.mesh_config)
    self.rows = NamedSharding(self.mesh, spec)
    shards = 1
    for a in rules.axes_of(spec[0]):
      shards *= self.mesh.shape[a]
    self._batch_size = -(-int(batch_size) // shards) * shards
    self.decoder = decoding.ChunkedDecoder(self.cfg)

  # Loading.
  def _load(self, checkpoint: str, config, dtype):
    from gemma_jax.checkpoint import formats

    cfg = _with_dtype(stored_config(checkpoint, config), dtype)
    shardings = param_shardings(cfg, self.mesh, self.mesh_config)
    params = formats.load(
      checkpoint, cfg, shardings=shardings, dtype=cfg.param_dtype
    )
    return params, cfg

  @property
  def batch_size(self) -> int:
    return self._batch_size

  # Scoring.
  def _put(self, x: np.ndarray) -> jax.Array:
    """A batch every process holds whole, placed row-sharded."""
    return jax.make_array_from_callback(
      x.shape, self.rows, lambda index: x[index]
    )

  def _logprobs(self, inputs, targets, mask):
    """(log p(target), target is the argmax) [B, T] as numpy, every
    process holding all rows."""
    with rules.sharding_context(self.mesh, self.mesh_config):
      out = token_logprobs(
        self.params,
        self._put(inputs),
        self._put(targets),
        self._put(mask),
        cfg=self.cfg,
      )
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    logp, greedy = jax.device_get(out)
    return np.asarray(logp, np.float64), np.asarray(greedy)

  def _score_windows(
    self, windows: Sequence[tuple[tuple[int, ...], int]]
  ) -> list[tuple[float, bool]]:
    """(tokens the model sees, continuation length) -> (summed log-prob,
    every continuation token is the argmax); identical windows scored once,
    longest first, in power-of-two widths."""
    unique = sorted(set(windows), key=lambda w: (-len(w[0]), w[0]))
    found: dict[tuple[tuple[int, ...], int], tuple[float, bool]] = {}
    b = self._batch_size
    for start in range(0, len(unique), b):
      chunk = unique[start : start + b]
      t = bucket(len(chunk[0][0]) - 1)
      inputs = np.full((b, t), PAD_ID, np.int32)
      targets = np.full((b, t), PAD_ID, np.int32)
      mask = np.zeros((b, t), np.int32)
      for i, (w, _) in enumerate(chunk):
        n = len(w) - 1
        inputs[i, :n], targets[i, :n], mask[i, :n] = w[:-1], w[1:], 1
      out, greedy = self._logprobs(inputs, targets, mask)
      for i, (w, n_cont) in enumerate(chunk):
        n = len(w) - 1
        found[(w, n_cont)] = (
          float(out[i, n - n_cont : n].sum()),
          bool(greedy[i, n - n_cont : n].all()),
        )
    return [found[w] for w in windows]

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_):
    windows = [self._window(ctx, cont) for _, ctx, cont in requests]
    results = self._score_windows(windows)
    for (key, _, _), answer in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    windows, counts = [], []
    for (string,) in [r.args for r in requests]:
      pairs = [
        lm_utils.make_disjoint_window(w)
        for w in lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string),
          prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length,
          context_len=1,
        )
      ]
      windows += [self._window(ctx, cont) for ctx, cont in pairs]
      counts.append(len(pairs))
    scores = self._score_windows(windows)
    out, k = [], 0
    for request, n in zip(requests, counts):
      total = sum(s for s, _ in scores[k : k + n])
      k += n
      out.append(total)
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return out

  # Generation.
  def generate_until(self, requests, disable_tqdm: bool = False):
    from lm_eval.models.utils import (
      handle_stop_sequences,
      normalize_gen_kwargs,
      postprocess_generated_text,
    )

    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
      groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
    out = [""] * len(requests)
    for indices in groups.values():
      gen_kwargs = requests[indices[0]].args[1]
      kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
      until = handle_stop_sequences(kw.pop("until", None), eos=EOS_TEXT)
      max_new = int(kw.pop("max_gen_toks"))
      keep = self.max_length - max_new
      if keep <= 0:
        raise ConfigError(
          f"gemma_jax: max_gen_toks ({max_new}) must be less than max_length "
          f"({self.max_length})"
        )
      prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in indices]
      texts = self._generate(prompts, max_new, kw, until)
      for i, text in zip(indices, texts):
        text = postprocess_generated_text(text, until, None)
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

  def _generate(
    self, prompts: list[list[int]], max_new: int, kw: dict, until=()
  ) -> list[str]:
    """Texts of up to max_new tokens after each prompt, stopping at eos.
    A batch stops early once every row has eos or one of `until` in its
    text (HFLM's stopping criteria); the text is cut at `until` later."""
    unknown = sorted(set(kw) - {"do_sample", "temperature", "top_k", "top_p"})
    if unknown:
      raise ConfigError(
        f"gemma_jax: generation kwargs {unknown} are not supported; "
        f"valid: until, max_gen_toks, do_sample, temperature, top_k, top_p"
      )
    do_sample = _as_bool(kw.get("do_sample", False))
    temperature = float(kw.get("temperature", 0.0)) if do_sample else 0.0
    if do_sample and temperature == 0.0:
      temperature = 1.0  # transformers' default when sampling
    top_k = kw.get("top_k")
    top_p = kw.get("top_p")
    stops = [s for s in until if s]

    def done_fn(row: Sequence[int]) -> bool:
      text = self.tok_decode(row)
      return any(s in text for s in stops)

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [""] * len(prompts)
    b = self._batch_size
    for n, start in enumerate(range(0, len(order), b)):
      rows = order[start : start + b]
      # Every batch is [b, power of two]: one compile per width; filler
      # rows are a lone bos (rows never attend to each other).
      width = bucket(len(prompts[rows[0]]))
      tokens = np.full((b, width), PAD_ID, np.int32)
      lengths = np.ones((b,), np.int32)
      tokens[:, 0] = BOS_ID
      for r, i in enumerate(rows):
        tokens[r, : len(prompts[i])] = prompts[i]
        lengths[r] = len(prompts[i])
      with rules.sharding_context(self.mesh, self.mesh_config):
        new = self.decoder.generate(
          self.params,
          self._put(tokens),
          self._put(lengths),
          jax.random.key(self.seed + n),
          max_new=max_new,
          eos_id=EOS_ID,
          temperature=temperature,
          top_k=None if top_k is None else int(top_k),
          top_p=None if top_p is None else float(top_p),
          done_fn=done_fn,
          active=[r < len(rows) for r in range(b)],
        )
      for r, i in enumerate(rows):
        row = new[r, :max_new].tolist()
        if EOS_ID in row:
          row = row[: row.index(EOS_ID)]
        texts[i] = self.tok_decode(row)
    return texts
