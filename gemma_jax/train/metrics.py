"""Training metrics: JSONL, TensorBoard event files and a console line.

`DIR/metrics.jsonl` holds one JSON object per logged training step and
`DIR/eval.jsonl` one per evaluation; both carry `step`. TensorBoard files go
to `DIR/tensorboard/` (written with tensorboardX: no TensorFlow needed).
Only process 0 writes; other processes get a writer that does nothing.

Keys of a training record (see README "Metrics"):
  step, loss, loss/<source>, share/<source>, grad_norm, learning_rate,
  tokens, tokens_per_sec, step_time_s, mfu, skipped, loss/<term> for each
  extra objective term (e.g. loss/ewc, loss/distill), and (added by the
  trainer) skipped_total, elapsed_s

Also here: the analytic FLOPs behind `mfu` (`model_flops_per_token`) and the
held-out evaluation behind eval.jsonl (`evaluate`, `eval_record`).
"""

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import IO

import jax
import numpy as np
from etils import epath

from gemma_jax import fileio
from gemma_jax.errors import TrainingStopped
from gemma_jax.model.config import ModelConfig

FLUSH_ENV = "GEMMA_JAX_REMOTE_FLUSH_S"
DEFAULT_REMOTE_FLUSH_S = 30.0


def mfu(
  flops_per_token: float,
  tokens_per_sec: float,
  num_devices: int,
  peak_per_device: float | None,
):
  """Model FLOPs utilisation, or None when the peak is unknown."""
  if not peak_per_device or not tokens_per_sec:
    return None
  return flops_per_token * tokens_per_sec / (peak_per_device * num_devices)


def _finite_or_none(v):
  # JSON has no NaN/inf; a non-finite value is written as null.
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch whenever it is installed, only so that it can
  also take torch tensors; we log Python floats. With torch installed (the
  `hf` extra) that import costs 2-3 s of CPU in every training process, so
  it is made to fail while tensorboardX loads (`None` in sys.modules makes
  `import torch` raise ImportError, which tensorboardX catches) and is
  allowed again after.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Appends records to `<workdir>/<name>.jsonl` and TensorBoard.

  Locally each record is appended and flushed at once. An object store
  (gs://) has no append: there the records of each file are kept in memory
  and `flush()` rewrites the whole object; `write` flushes at most every
  `flush_every_s` seconds (GEMMA_JAX_REMOTE_FLUSH_S, default 30), and the
  trainer flushes before every checkpoint, so that every record up to a
  checkpoint is stored once the checkpoint is. TensorBoard events go to a
  local temporary directory there, and `flush()` uploads its files to
  `<workdir>/tensorboard/`.
  """

  def __init__(
    self,
    workdir: str,
    enabled: bool = True,
    tensorboard: bool = True,
    guard=None,
    flush_every_s: float | None = None,
  ):
    """`guard(what)` is called before every write and may raise to stop it
    (the trainer's workdir lease: another run must not be clobbered)."""
    self.enabled = enabled
    self.remote = not fileio.is_local(workdir)
    self._guard = guard or (lambda what: None)
    self._workdir = str(workdir)
    self._files: dict[str, IO[str]] = {}  # local: open files
    self._lines: dict[str, list[str]] = {}  # remote: each file's lines
    self._dirty: set[str] = set()
    self._flush_every = flush_every_s or _flush_every_s()
    self._last_flush = time.monotonic()
    self._tb = None
    self._tb_local = None  # remote: where TensorBoard writes first
    if enabled and tensorboard:
      SummaryWriter = _summary_writer_class()
      self._tb_dir = os.path.join(self._workdir, "tensorboard")
      if self.remote:
        self._tb_local = tempfile.mkdtemp(prefix="gemma-jax-tensorboard-")
      self._tb = SummaryWriter(self._tb_local or self._tb_dir)

  def _path(self, name: str) -> str:
    return os.path.join(self._workdir, f"{name}.jsonl")

  def truncate_after(self, step: int) -> None:
    """Drops records past `step`: a resumed run rewrites what a killed run
    logged after its last checkpoint (and mends a torn last line)."""
    if not self.enabled:
      return
    for name in ("metrics", "eval"):
      path = self._path(name)
      if not epath.Path(path).exists():
        continue
      self._guard(f"{name}.jsonl")
      bad: list[tuple[int, str]] = []
      kept = [
        json.dumps(r) + "\n"
        for r in read_jsonl(path, bad)
        if r.get("step", 0) <= step
      ]
      keep_aside(path, bad)
      if self.remote:
        self._lines[name] = kept
      fileio.atomic_write(path, "".join(kept))

  def write(self, record: dict, name: str = "metrics"):
    """Writes one record; must have an integer `step`."""
    if not self.enabled:
      return
    self._guard(f"{name}.jsonl")
    clean = {k: _finite_or_none(v) for k, v in record.items()}
    line = json.dumps(clean) + "\n"
    if self.remote:
      self._remote_lines(name).append(line)
      self._dirty.add(name)
    else:
      with fileio.naming(self._path(name)):
        if name not in self._files:
          # Kept open between writes; close() closes it.
          self._files[name] = open(self._path(name), "a")  # noqa: SIM115
        self._files[name].write(line)
        self._files[name].flush()
    if self._tb is not None:
      step = record["step"]
      prefix = "" if name == "metrics" else f"{name}/"
      with fileio.naming(self._tb_dir):
        for k, v in record.items():
          if k != "step" and isinstance(v, (int, float)) and v is not None:
            self._tb.add_scalar(prefix + k, v, step)
    if self.remote and (
      time.monotonic() - self._last_flush >= self._flush_every
    ):
      self.flush()

  def _remote_lines(self, name: str) -> list[str]:
    """The lines of a remote file, read once (an earlier run's records)."""
    if name not in self._lines:
      try:
        text = epath.Path(self._path(name)).read_text()
      except FileNotFoundError:
        text = ""
      self._lines[name] = text.splitlines(keepends=True)
    return self._lines[name]

  def flush(self) -> None:
    """Stores everything written so far (see class docstring)."""
    if not self.enabled:
      return
    self._last_flush = time.monotonic()
    for name in sorted(self._dirty):
      self._guard(f"{name}.jsonl")
      fileio.atomic_write(self._path(name), "".join(self._lines[name]))
    self._dirty = set()
    if self._tb is not None:
      with fileio.naming(self._tb_dir):
        self._tb.flush()
      self._upload_tensorboard()

  def _upload_tensorboard(self) -> None:
    if self._tb_local is None:
      return
    self._guard("tensorboard events")
    for name in sorted(os.listdir(self._tb_local)):
      with open(os.path.join(self._tb_local, name), "rb") as f:
        fileio.atomic_write(os.path.join(self._tb_dir, name), f.read())

  def close(self):
    """Flushes and closes; a guard that refuses (the lease is lost) drops
    what is not yet stored instead of writing it."""
    try:
      if self._tb is not None:
        with fileio.naming(self._tb_dir):
          self._tb.close()
      self.flush()
    except TrainingStopped:
      pass
    finally:
      files, self._files = self._files, {}
      for name, f in files.items():
        with fileio.naming(self._path(name)):
          f.close()
      self._tb = None
      if self._tb_local is not None:
        shutil.rmtree(self._tb_local, ignore_errors=True)
        self._tb_local = None


def _flush_every_s() -> float:
  return fileio.seconds_env(FLUSH_ENV, DEFAULT_REMOTE_FLUSH_S)


def read_jsonl(path: str, bad: list | None = None) -> list[dict]:
  """Records of a metrics file. A line that is not a JSON object (a torn
  last line of a killed writer, or damage) is skipped, and appended to
  `bad` as (line number, text) when given."""
  try:
    raw = epath.Path(path).read_bytes()
  except FileNotFoundError:
    return []
  records = []
  # surrogateescape: damaged bytes survive into `bad`, and back to a file.
  text = raw.decode("utf-8", "surrogateescape")
  for number, line in enumerate(text.splitlines(), 1):
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise ValueError("not an object")
      records.append(record)
    except ValueError:
      if bad is not None and line.strip():
        bad.append((number, line))
  return records


def keep_aside(path: str, bad: list[tuple[int, str]]) -> None:
  """Appends the `bad` lines of metrics file `path` to `path`.corrupt, and
  says so in one line: a damaged record is kept, not dropped."""
  if not bad:
    return
  aside = epath.Path(path + ".corrupt")
  old = aside.read_bytes() if aside.exists() else b""
  lines = "".join(line + "\n" for _, line in bad)
  fileio.atomic_write(aside, old + lines.encode("utf-8", "surrogateescape"))
  print(
    f"gemma-jax: warning: {path}: {len(bad)} line(s) are not JSON records "
    f"(first: line {bad[0][0]}); kept aside in {aside}",
    file=sys.stderr,
    flush=True,
  )


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLine:
  """`step 120/1000 | loss 3.412 | 5.1k tok/s | ETA 2:31` on the console."""

  def __init__(self, total_steps: int, enabled: bool = True, stream=None):
    self.total = total_steps
    self.enabled = enabled
    self.stream = stream or sys.stdout

  def update(
    self,
    step: int,
    loss: float,
    tokens_per_sec: float,
    steps_per_sec: float,
    extra: str = "",
  ):
    if not self.enabled:
      return
    eta = (
      (self.total - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
    )
    eta_text = format_duration(eta) if math.isfinite(eta) else "?"
    line = (
      f"step {step}/{self.total} | loss {loss:.4f} | "
      f"{_si(tokens_per_sec)} tok/s | ETA {eta_text}"
    )
    if extra:
      line += f" | {extra}"
    print(line, file=self.stream, flush=True)


def _si(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}"


class Stopwatch:
  """Wall time between log points, for tokens/s and step time."""

  def __init__(self):
    self.start = self.last = time.perf_counter()

  def lap(self) -> float:
    now = time.perf_counter()
    dt, self.last = now - self.last, now
    return dt

  def elapsed(self) -> float:
    return time.perf_counter() - self.start


def train_record(
  step: int,
  values: list[dict],
  seconds: float,
  source_names,
  tokens_per_step: int,
  flops_per_token: float,
  num_devices: int,
  peak: float | None,
) -> dict:
  """One metrics.jsonl record from the host copies of per-step metrics.

  Losses are means over the steps since the last log (exactly the step's
  loss when logging every step); tokens_per_sec counts every position of
  the batch (what the devices compute); `tokens` counts target tokens.
  """
  n = len(values)
  mean = lambda key: float(np.mean([v[key] for v in values]))
  src_loss = np.sum([v["source_loss_sum"] for v in values], axis=0)
  src_tokens = np.sum([v["source_tokens"] for v in values], axis=0)
  total_src = float(src_tokens.sum())
  tokens_per_sec = tokens_per_step * n / seconds if seconds > 0 else 0.0
  record = {
    "step": step,
    "loss": mean("loss"),
    "grad_norm": mean("grad_norm"),
    "learning_rate": float(values[-1]["learning_rate"]),
    "tokens": int(np.sum([v["tokens"] for v in values])),
    "tokens_per_sec": tokens_per_sec,
    "step_time_s": seconds / n,
    "mfu": mfu(flops_per_token, tokens_per_sec, num_devices, peak),
    "skipped": int(np.sum([v["skipped"] for v in values])),
  }
  # Extra objective terms (loss/distill, loss/ewc, ...), per target token.
  for key in values[0]:
    if key.startswith("loss/"):
      record[key] = mean(key)
  for i, name in enumerate(source_names):
    t = float(src_tokens[i])
    record[f"loss/{name}"] = float(src_loss[i]) / t if t else None
    record[f"share/{name}"] = t / total_src if total_src else 0.0
  return record


# Analytic FLOPs.
#
# Analytic training FLOPs of a Gemma model, for MFU and to check the compiler.
#
# Counts matmuls only (2 FLOPs per multiply-add), forward + backward = 3x the
# forward, no rematerialisation (the MFU convention: recomputation is not
# useful work). Attention is counted causally: query i of a layer with window
# W sees min(i + 1, W) keys, so sliding-window layers cost less than global.


def mean_keys_per_query(seq_len: int, window: int = 0) -> float:
  """Average number of keys a causal query attends to (window 0: global)."""
  w = window or seq_len
  if w >= seq_len:
    return (seq_len + 1) / 2
  # Positions 0..w-1 see 1..w keys, the remaining seq_len - w see w each.
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def matmul_params(cfg: ModelConfig) -> int:
  """Weights used in a matmul per token: all layers + the output projection."""
  d, h, f = cfg.d_model, cfg.head_dim, cfg.mlp_dim
  attn = (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * d * h
  return cfg.num_layers * (attn + 3 * d * f) + cfg.vocab_size * d


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 * matmul params + causal attention."""
  attn = sum(
    12 * cfg.num_heads * cfg.head_dim * mean_keys_per_query(seq_len, w)
    for w in cfg.layer_windows
  )
  return 6 * matmul_params(cfg) + attn


# Held-out evaluation per data source: loss (nats/token) and perplexity.
def evaluate(program, params, pipe, num_batches: int) -> dict[str, dict]:
  """Mean held-out loss of each source over `num_batches` batches.

  Args:
    program: the run's TrainProgram (its compiled eval step and batch
      placement).
    params: the model parameters (sharded like `program.param_shardings`).
    pipe: the data pipeline; `pipe.eval_batches(source, n)` yields numpy
      batches of one source.
    num_batches: batches per source.

  Returns:
    {source: {"loss", "perplexity", "tokens"}}; sources without held-out
    tokens are left out. One host sync per source.
  """
  results = {}
  for name in pipe.source_names:
    outs = [
      program.eval_step(params, program.put(batch))
      for batch in pipe.eval_batches(name, num_batches)
    ]
    if not outs:
      continue
    outs = jax.device_get(outs)
    loss_sum = float(np.sum([o["loss_sum"] for o in outs]))
    tokens = float(np.sum([o["tokens"] for o in outs]))
    if tokens == 0:
      continue
    loss = loss_sum / tokens
    results[name] = {
      "loss": loss,
      "perplexity": math.exp(min(loss, 700.0)),
      "tokens": int(tokens),
    }
  return results


def eval_record(step: int, results: dict[str, dict]) -> dict:
  """Flat record for eval.jsonl: eval/<source>/{loss,perplexity,tokens}."""
  record = {"step": step}
  for name, r in results.items():
    for key, value in r.items():
      record[f"eval/{name}/{key}"] = value
  return record
