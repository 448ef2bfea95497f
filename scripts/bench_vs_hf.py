"""Train-step speed against Hugging Face transformers on the same model.

    pip install /opt/wheels/torch-2.13.0+cpu-*.whl transformers  # `hf` extra
    python scripts/bench_vs_hf.py                          # both shapes
    python scripts/bench_vs_hf.py --paired --shape 8x512 --steps 6 \
        --ours new: --ours old:model.attention_impl=xla,\
model.fused_mlp=false,model.loss_chunk=0

The model is a Gemma 2-shaped one small enough for a CPU: d_model 512,
8 layers, 8 query / 4 kv heads of 64, MLP 2048, vocabulary 8192, local
(window 256) and global layers alternating, soft-caps 50 / 30, sandwich
norms, float32. Our params are initialised, exported with our converter
(gemma_jax.checkpoint.hf.save) and loaded by transformers'
Gemma2ForCausalLM (eager attention), so both frameworks start from the same
weights. Both train with AdamW (same lr, betas, eps, weight decay on every
tensor but the norm scales, global-norm clipping) on the same batches.

Every measurement runs in its own subprocess, so the peak resident memory
(ru_maxrss) is that framework's alone. For each shape and repeat, HF runs
first, then each `--ours` variant on one-document rows (no packing: segment
ids all 1) and on packed rows (several documents a row, positions restarting
at each), interleaved so that the machine's noise hits all of them alike.
Before timing, the first-step losses of HF and ours on one-document rows must
agree within 1e-4: both do the same work.

An `--ours LABEL:SPEC` variant is ours with SPEC, comma-separated items:
  KEY=VALUE     a run-config override (e.g. model.remat_policy=dots,
                model.attention_impl=xla, model.fused_mlp=false,
                model.loss_chunk=0);
  env:NAME=VAL  an environment variable of the subprocess (XLA_FLAGS, ...).

Ours runs as `gemma-jax` does, with glibc's huge-page tunable
(gemma_jax.hugepages; `env:GEMMA_JAX_HUGEPAGES=0` runs it without). HF
runs as transformers does, without; `--hf-env NAME=VAL` gives it an
environment variable too (e.g. the same tunable, for the comparison of
the two with the same allocator setting).

Printed per run: tokens/s (from the median timed step), model FLOP/s
(gemma_jax.train.metrics), MFU against the machine's float32 matmul peak
(the best of a timed jnp.dot and torch.matmul chain), peak RSS, our step's
compile time, and ours/HF ratios.
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
MODEL = {
  "num_layers": 8,
  "d_model": 512,
  "mlp_dim": 2048,
  "num_heads": 8,
  "num_kv_heads": 4,
  "head_dim": 64,
  "vocab_size": 8192,
  "attention_pattern": "[local,global]",
  "sliding_window": 256,
  "attn_logit_softcap": 50.0,
  "final_logit_softcap": 30.0,
  "sandwich_norms": True,
  "dtype": "float32",
  "param_dtype": "float32",
}
OPTIMIZER = {
  "learning_rate": 3e-4,
  "schedule": "constant",
  "b1": 0.9,
  "b2": 0.95,
  "eps": 1e-8,
  "weight_decay": 0.1,
  "grad_clip_norm": 1.0,
}
LOSS_TOLERANCE = 1e-4
SEED = 0


# Batches: the same numpy rows in both frameworks.


def batches(
  batch: int, seq_len: int, vocab: int, packed: bool, count: int = 2
) -> list[dict]:
  """`count` batches of int32 [B, T] rows (source [B]), seeded."""
  rng = np.random.default_rng(SEED)
  out = []
  for _ in range(count):
    tokens = rng.integers(4, vocab, size=(batch, seq_len + 1), dtype=np.int32)
    segments = np.ones((batch, seq_len), np.int32)
    positions = np.broadcast_to(
      np.arange(seq_len, dtype=np.int32), (batch, seq_len)
    ).copy()
    if packed:
      for row in range(batch):
        segments[row], positions[row] = _packed_row(rng, seq_len)
    out.append(
      {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segments,
        "positions": positions,
        "loss_mask": np.ones((batch, seq_len), np.int32),
        "source": np.zeros((batch,), np.int32),
      }
    )
  return out


def _packed_row(rng, seq_len: int):
  """Segment ids 1, 2, ... of documents of seq_len/8..seq_len/2 tokens and
  positions restarting at 0 in each."""
  segments = np.empty(seq_len, np.int32)
  positions = np.empty(seq_len, np.int32)
  start, doc = 0, 1
  while start < seq_len:
    n = min(int(rng.integers(seq_len // 8, seq_len // 2 + 1)), seq_len - start)
    segments[start : start + n] = doc
    positions[start : start + n] = np.arange(n)
    start, doc = start + n, doc + 1
  return segments, positions


# Workers: one framework, one shape, one subprocess.


def run_config(batch: int, seq_len: int, overrides=()):
  from gemma_jax.train.config import load_config

  # YAML reads 1e-08 as a string: floats go as 1.0000000000e-08.
  text = lambda v: f"{v:.10e}" if isinstance(v, float) else v
  sets = [f"model.{k}={text(v)}" for k, v in MODEL.items()]
  sets += [f"optimizer.{k}={text(v)}" for k, v in OPTIMIZER.items()]
  return load_config(
    None,
    [
      "model.preset=tiny-gemma2",
      "model.name=bench",
      *sets,
      f"train.batch_size={batch}",
      f"data.seq_len={seq_len}",
      "train.steps=1000",
      f"train.seed={SEED}",
      *overrides,
    ],
  )


def ours_program(cfg, params):
  """(program, state): our TrainProgram and a step-0 state holding `params`
  (the only glue to our train-step API)."""
  import jax

  from gemma_jax.train.program import TrainProgram

  program = TrainProgram(cfg)
  params = jax.tree.map(
    lambda s, x: jax.device_put(np.asarray(x, s.dtype), s.sharding),
    program.abstract_state.params,
    params,
  )
  return program, program.init_state(params=params)


def export_weights(directory: str) -> None:
  """Initialises our model (seed SEED) and writes it as an HF directory."""
  import jax
  from flax import linen as nn

  from gemma_jax.checkpoint import hf
  from gemma_jax.model import Transformer

  cfg = run_config(1, 8).model
  params = nn.unbox(
    jax.jit(Transformer(cfg).init)(
      jax.random.PRNGKey(SEED), np.zeros((1, 8), np.int32)
    )["params"]
  )
  hf.save(directory, jax.device_get(params), cfg, force=True)


def _timed(step_fn, n: int) -> tuple[list[float], list[float]]:
  """Wall seconds and CPU seconds (all threads of this process) per step."""
  times, cpu = [], []
  for i in range(n):
    t, c = time.perf_counter(), time.process_time()
    step_fn(i)
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return times, cpu


def build_ours(a):
  """(one step: i -> loss, info) for our train step."""
  import bench_train
  import jax

  from gemma_jax.checkpoint import hf
  from gemma_jax.train import metrics

  cfg = run_config(a.batch, a.seq_len, a.spec)
  params, _ = hf.load(a.weights, cfg.model)
  program, state = ours_program(cfg, params)
  data = [
    program.put(b)
    for b in batches(a.batch, a.seq_len, cfg.model.vocab_size, a.packed)
  ]
  t = time.perf_counter()
  compiled = program.lower_train_step().compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()

  def one(i):
    nonlocal state
    state, m = compiled(state, data[i % 2], program.frozen)
    return float(m["loss"])  # a host sync: honest step times

  info = {
    "framework": "ours",
    "compile_s": compile_s,
    "flops_per_token": metrics.model_flops_per_token(cfg.model, a.seq_len),
    "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
  }
  peak = lambda: bench_train.measured_matmul_peak(
    jax.local_devices()[0], n=2048
  )[0]
  return one, info, peak


def build_hf(a):
  """(one step: i -> loss, info) for transformers' Gemma 2 in torch."""
  import torch
  import transformers

  from gemma_jax.train import metrics

  cfg = run_config(a.batch, a.seq_len)
  model = transformers.Gemma2ForCausalLM.from_pretrained(
    a.weights, attn_implementation="eager", dtype=torch.float32
  )
  model.train()
  named = list(model.named_parameters())
  opt = torch.optim.AdamW(
    [
      {
        "params": [p for n, p in named if "norm" not in n],
        "weight_decay": OPTIMIZER["weight_decay"],
      },
      {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0},
    ],
    lr=OPTIMIZER["learning_rate"],
    betas=(OPTIMIZER["b1"], OPTIMIZER["b2"]),
    eps=OPTIMIZER["eps"],
  )
  data = [
    {k: torch.from_numpy(v.astype(np.int64)) for k, v in b.items()}
    for b in batches(a.batch, a.seq_len, cfg.model.vocab_size, False)
  ]

  def one(i):
    b = data[i % 2]
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=b["inputs"], use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(
      logits.float().reshape(-1, logits.shape[-1]), b["targets"].reshape(-1)
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(
      model.parameters(), OPTIMIZER["grad_clip_norm"]
    )
    opt.step()
    return float(loss)

  info = {
    "framework": "hf",
    "compile_s": 0.0,
    "flops_per_token": metrics.model_flops_per_token(cfg.model, a.seq_len),
    "threads": torch.get_num_threads(),
  }
  return one, info, _torch_matmul_peak


def _torch_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  import torch

  a = torch.ones(n, n) / n
  b = torch.ones(n, n)
  best = float("inf")
  for _ in range(repeats + 1):
    t = time.perf_counter()
    x = a
    for _ in range(4):
      x = x @ b
    best = min(best, time.perf_counter() - t)
  return 4 * 2 * n**3 / best


def worker(argv) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--framework", choices=("ours", "hf", "export"))
  p.add_argument("--weights")
  p.add_argument("--batch", type=int)
  p.add_argument("--seq-len", type=int)
  p.add_argument("--steps", type=int)
  p.add_argument("--warmup", type=int)
  p.add_argument("--packed", action="store_true")
  p.add_argument(
    "--serve",
    action="store_true",
    help="after warm-up, one step per 'STEP' line on stdin",
  )
  p.add_argument("--spec", nargs="*", default=[])
  a = p.parse_args(argv)
  sys.path.insert(0, str(HERE))
  if a.framework == "export":
    export_weights(a.weights)
    return
  one, out, peak = (build_ours if a.framework == "ours" else build_hf)(a)
  losses = []
  step = lambda i: losses.append(one(i))
  _timed(step, a.warmup)
  if a.serve:
    print(f"READY {losses[0] if losses else 'nan'}", flush=True)
    times, cpu = [], []
    for line in sys.stdin:
      if line.strip() != "STEP":
        break
      n = a.warmup + len(times)
      t, c = _timed(lambda _, n=n: step(n), 1)
      times += t
      cpu += c
      print(f"DONE {t[0]} {c[0]}", flush=True)
  else:
    times, cpu = _timed(lambda i: step(a.warmup + i), a.steps)
  out.update(
    times=times,
    cpu_times=cpu,
    losses=losses,
    matmul_peak=peak(),
    max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  )
  print("RESULT " + json.dumps(out), flush=True)


# The driver.


def _env(env_items=()) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  env["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(HERE.parent), env.get("PYTHONPATH")])
  )
  for item in env_items:
    name, _, value = item.partition("=")
    env[name] = value
  return env


def _ours_env(env_items) -> list[str]:
  """Ours as `gemma-jax` runs it: with the huge-page tunable, unless the
  variant sets GLIBC_TUNABLES or GEMMA_JAX_HUGEPAGES itself."""
  from gemma_jax import hugepages

  names = {item.partition("=")[0] for item in env_items}
  if names & {"GLIBC_TUNABLES", "GEMMA_JAX_HUGEPAGES"}:
    return list(env_items)
  env = hugepages.env_with_hugepages({})
  return (
    [f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']}", *env_items]
    if env
    else list(env_items)
  )


def _command(args, cpus):
  # taskset: both XLA's and torch's thread pools size themselves to the
  # CPUs a process may run on.
  pin = ["taskset", "-c", cpus] if cpus else []
  return [*pin, sys.executable, __file__, "--worker", *args]


def _spawn(
  args: list[str], env_items=(), cpus: str | None = None
) -> dict | None:
  proc = subprocess.run(
    _command(args, cpus), env=_env(env_items), capture_output=True, text=True
  )
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT ") :])
  sys.stderr.write(proc.stderr[-4000:])
  return None


class _Server:
  """A worker in --serve mode: warmed up, then one step per request."""

  def __init__(self, args, env_items=(), cpus=None):
    self._err = tempfile.TemporaryFile("w+")  # noqa: SIM115 (held open)
    self._proc = subprocess.Popen(
      _command([*args, "--serve"], cpus),
      env=_env(env_items),
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self._err,
      text=True,
    )

  def _line(self) -> str:
    line = self._proc.stdout.readline()
    if not line:
      self._err.seek(0)
      raise RuntimeError("worker died:\n" + self._err.read()[-4000:])
    return line

  def ready(self) -> float:
    """Waits for the warm-up; returns the first (warm-up) step's loss."""
    while not (line := self._line()).startswith("READY"):
      pass
    return float(line.split()[1])

  def step(self) -> tuple[float, float]:
    self._proc.stdin.write("STEP\n")
    self._proc.stdin.flush()
    while not (line := self._line()).startswith("DONE "):
      pass
    wall, cpu = map(float, line.split()[1:])
    return wall, cpu

  def end(self) -> dict:
    self._proc.stdin.write("END\n")
    self._proc.stdin.flush()
    while not (line := self._line()).startswith("RESULT "):
      pass
    self._proc.wait()
    return json.loads(line[len("RESULT ") :])


def _paired(hf_args, runs, steps, cpus, done=None, hf_env=()):
  """HF and each ours run alive together, stepping in turn (HF first on
  even steps, ours first on odd ones), so both see the same load.

  runs: [(worker args, env items, key)]. Returns (HF's result, [(key, ours
  result with the partner's step times)]); done(key, result) is also
  called as each ours run ends (a long run killed midway keeps those).
  """
  hf = _Server(hf_args, hf_env, cpus=cpus)
  hf_first_loss = hf.ready()
  out = []
  for args, env, key in runs:
    try:
      ours = _Server(args, env, cpus)
      ours.ready()
      mine, theirs = [], []
      for i in range(steps):
        for srv in (hf, ours) if i % 2 == 0 else (ours, hf):
          (theirs if srv is hf else mine).append(srv.step())
      r = ours.end()
    except RuntimeError as e:
      print(f"{key} FAILED: {e}", file=sys.stderr)
      continue
    r.update(
      partner_times=[w for w, _ in theirs],
      partner_cpu_times=[c for _, c in theirs],
      partner_first_loss=hf_first_loss,
    )
    out.append((key, r))
    if done:
      done(key, r)
  return hf.end(), out


def _variant(text: str) -> tuple[str, list[str], list[str]]:
  label, _, spec = text.partition(":")
  items = [s for s in spec.split(",") if s]
  env = [s[4:] for s in items if s.startswith("env:")]
  return label, [s for s in items if not s.startswith("env:")], env


def _summary(r: dict, tokens: int, peak: float) -> dict:
  tps = tokens / statistics.median(r["times"])
  return {
    "tok_s": tps,
    "tok_cpu_s": tokens / statistics.median(r["cpu_times"]),
    "gflop_s": r["flops_per_token"] * tps / 1e9,
    "mfu": r["flops_per_token"] * tps / peak,
    "rss_gb": r["max_rss_bytes"] / 1e9,
    "compile_s": r["compile_s"],
  }


def _ratios(r: dict, hf: dict | None, key: str) -> list[float]:
  """ours/HF speed ratios: per step pair when paired, else per repeat."""
  partner = r.get("partner_" + key)
  if partner:
    return [p / x for p, x in zip(partner, r[key])]
  if hf:
    return [statistics.median(hf[key]) / statistics.median(r[key])]
  return []


def _range(xs, fmt="{:.0f}"):
  xs = [x for x in xs if x is not None]
  if not xs:
    return "-"
  lo, hi = min(xs), max(xs)
  return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--shape",
    action="append",
    default=[],
    help="BATCHxSEQ_LEN (default: 8x512 and 32x128)",
  )
  p.add_argument(
    "--ours",
    action="append",
    default=[],
    help="LABEL:SPEC variant of ours (default base:)",
  )
  p.add_argument("--steps", type=int, default=3, help="timed steps")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument(
    "--packed",
    action="append",
    default=[],
    metavar="LABEL",
    help="run only these variants on packed rows too (default: all)",
  )
  p.add_argument(
    "--no-packed", action="store_true", help="skip ours on packed rows"
  )
  p.add_argument("--no-hf", action="store_true", help="skip transformers")
  p.add_argument(
    "--hf-env",
    action="append",
    default=[],
    metavar="NAME=VAL",
    help="an environment variable of the HF worker",
  )
  p.add_argument(
    "--cpus",
    help="run every worker on these CPUs only "
    "(taskset list, e.g. 0: one thread each, no spin-waiting, "
    "so CPU time measures work on a shared machine)",
  )
  p.add_argument(
    "--paired",
    action="store_true",
    help="keep HF running beside each of ours and alternate "
    "their steps (both in memory at once)",
  )
  p.add_argument("--json", help="also write every result to this file")
  p.add_argument("--report", help="only print the table of a --json file")
  a = p.parse_args(argv)
  if a.report:
    results = json.loads(pathlib.Path(a.report).read_text())
    report(
      results, list(dict.fromkeys((r["batch"], r["seq_len"]) for r in results))
    )
    return
  shapes = [
    tuple(map(int, s.split("x"))) for s in a.shape or ("8x512", "32x128")
  ]
  variants = [
    (label, spec, _ours_env(env))
    for label, spec, env in map(_variant, a.ours or ["base:"])
  ]

  results = []

  def record(r, label, packed, rep, batch, seq):
    print(
      f"[repeat {rep} {batch}x{seq} {label}] "
      + (
        "FAILED"
        if r is None
        else f"median step {statistics.median(r['times']):.2f}s "
        f"first loss {r['losses'][0]:.6f}"
      ),
      flush=True,
    )
    if r is not None:
      results.append(
        dict(r, label=label, packed=packed, rep=rep, batch=batch, seq_len=seq)
      )
      if a.json:  # after every run: a killed run keeps its results
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1))

  with tempfile.TemporaryDirectory() as tmp:
    weights = os.path.join(tmp, "hf")
    _spawn(["--framework", "export", "--weights", weights])
    for rep in range(a.repeats):
      for batch, seq in shapes:

        def args_of(fw, packed=False, spec=(), batch=batch, seq=seq):
          return (
            [
              "--framework",
              fw,
              "--weights",
              weights,
              "--batch",
              str(batch),
              "--seq-len",
              str(seq),
              "--steps",
              str(a.steps),
              "--warmup",
              str(a.warmup),
            ]
            + (["--packed"] if packed else [])
            + (["--spec", *spec] if spec else [])
          )

        ours = []  # (label, packed, spec, env)
        for label, spec, env in variants:
          ours.append((label, False, spec, env))
          if not a.no_packed and (not a.packed or label in a.packed):
            ours.append((label + "/packed", True, spec, env))
        where = (rep, batch, seq)
        if a.paired:
          hf_r, _ = _paired(
            args_of("hf"),
            [(args_of("ours", p, s), e, (l, p)) for l, p, s, e in ours],
            a.steps,
            a.cpus,
            done=lambda key, r, where=where: record(r, *key, *where),
            hf_env=a.hf_env,
          )
          record(hf_r, "hf", False, *where)
          continue
        if not a.no_hf:
          record(_spawn(args_of("hf"), a.hf_env, a.cpus), "hf", False, *where)
        for label, packed, spec, env in ours:
          record(
            _spawn(args_of("ours", packed, spec), env, a.cpus),
            label,
            packed,
            *where,
          )
  report(results, shapes)


def report(results: list[dict], shapes) -> None:
  peaks = {
    fw: max(
      (r["matmul_peak"] for r in results if r["framework"] == fw), default=0.0
    )
    for fw in ("ours", "hf")
  }
  peak = max(peaks.values())
  print(
    f"\nmachine float32 matmul peak: {peak / 1e9:.0f} GFLOP/s (best "
    f"2048^3 chain: jnp.dot {peaks['ours'] / 1e9:.0f}, torch.matmul "
    f"{peaks['hf'] / 1e9:.0f})"
  )
  print(
    "ranges over repeats; x HF: ours/HF tokens/s, per step pair when "
    "paired (median in brackets)"
  )
  for batch, seq in shapes:
    rows = [r for r in results if (r["batch"], r["seq_len"]) == (batch, seq)]
    hf = {r["rep"]: r for r in rows if r["label"] == "hf"}
    print(f"\n{batch} x {seq}")
    print(
      f"{'run':<16}{'tok/s':>10}{'GFLOP/s':>9}{'MFU':>12}{'RSS GB':>11}"
      f"{'compile s':>10}{'x HF':>17}{'tok/CPU-s':>11}{'x HF':>17}"
      "  loss check"
    )
    for label in dict.fromkeys(r["label"] for r in rows):
      mine = [r for r in rows if r["label"] == label]
      s = [_summary(r, batch * seq, peak) for r in mine]
      col = lambda k, f="{:.0f}", s=s: _range([x[k] for x in s], f)
      cells = []
      for key in ("times", "cpu_times"):
        ratio = [q for r in mine for q in _ratios(r, hf.get(r["rep"]), key)]
        cells.append(
          f"{_range(ratio, '{:.2f}')} [{statistics.median(ratio):.2f}]"
          if ratio and label != "hf"
          else ""
        )
      check = ""
      if label != "hf" and not mine[0]["packed"]:
        diffs = [
          abs(
            r["losses"][0]
            - (
              hf[r["rep"]]["losses"][0]
              if r["rep"] in hf
              else r["partner_first_loss"]
            )
          )
          for r in mine
          if r["rep"] in hf or "partner_first_loss" in r
        ]
        if diffs:
          check = f"|dloss| {max(diffs):.1e} " + (
            "ok" if max(diffs) <= LOSS_TOLERANCE else "MISMATCH"
          )
      print(
        f"{label:<16}{col('tok_s'):>10}{col('gflop_s', '{:.1f}'):>9}"
        f"{col('mfu', '{:.1%}'):>12}{col('rss_gb', '{:.2f}'):>11}"
        f"{col('compile_s', '{:.1f}'):>10}{cells[0]:>17}"
        f"{col('tok_cpu_s'):>11}{cells[1]:>17}  {check}"
      )


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--worker":
    worker(sys.argv[2:])
  else:
    main()
