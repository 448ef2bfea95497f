"""Where the benchmark train step's time goes, op by op (XLA CPU).

    python scripts/profile_step.py --shape 8x512 [--spec model.remat_policy=dots
        model.attention_impl=xla] [--hlo /tmp/step.hlo]

Builds the step of scripts/bench_vs_hf.py (same model, same batch, same
variant syntax), prints compile time and the compiler's memory analysis,
then traces `--steps` steps with jax.profiler and attributes every executed
HLO instruction (the CPU runtime's thunk events) to a category read from the
compiled HLO:

  matmul        a dot, or a fusion around one (YNNPACK / oneDNN included);
  stack/slice   dynamic-update-slice (the layer scan writing its stacked
                per-layer residuals; reading them back is fused into the
                consumers);
  copy/layout   copy, transpose, and fusions whose root is one;
  reduce        fusions with a reduce (softmax sums, norms, gradients of
                broadcasts);
  elementwise   other loop fusions (tanh, exp, masks, adds);
  other         everything else (concatenate, gather, scatter, ...).

Container instructions (while, conditional, call) are not counted: their
bodies are. Ops overlap (the CPU runtime runs independent thunks at once, each
on fewer threads), so summed op time overstates what an op costs; shares are
of wall time instead: every moment of the trace is split evenly between the
ops running then, and moments with none are `idle`. Forward, backward and the
optimizer update are told apart by the JAX op name (`transpose(` = backward,
`jvp(` = forward, neither = the update and the rest of the step).
"""

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

_INSTR = re.compile(
  r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+(?:\{[^}]*\})?) "
  r"([\w\-]+)\("
)
_CONTAINERS = {"while", "conditional", "call", "cond"}


def parse_hlo(text: str):
  """({instruction: (opcode, shape, called computation, op_name)},
  {computation: [body lines]})."""
  instrs, comps, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if m:
      current = m.group(1)
      continue
    if current:
      comps[current].append(line)
    m = _INSTR.match(line)
    if m:
      name, shape, opcode = m.groups()
      calls = re.search(r"calls=%([\w.\-]+)", line)
      op_name = re.search(r'op_name="([^"]*)"', line)
      instrs[name] = (
        opcode,
        shape,
        calls and calls.group(1),
        op_name.group(1) if op_name else "",
      )
  return instrs, comps


def category(name, instrs, comps) -> str:
  opcode, _, calls, _ = instrs.get(name, ("?", "", None, ""))
  if opcode in _CONTAINERS or name.split(".")[0] in _CONTAINERS:
    return "container"
  if opcode in ("dot", "custom-call") or name.startswith(("ynn", "onednn")):
    return "matmul"
  if opcode in ("dynamic-update-slice", "dynamic-slice"):
    return "stack/slice"
  if opcode in ("copy", "transpose"):
    return "copy/layout"
  if opcode == "fusion" and calls:
    body = "\n".join(comps.get(calls, []))
    if re.search(r" dot\(", body):
      return "matmul"
    if "dynamic-update-slice(" in body:
      return "stack/slice"
    root = [l for l in comps.get(calls, []) if "ROOT" in l]
    if root and re.search(r" (copy|transpose)\(", root[0]):
      return "copy/layout"
    if " reduce(" in body:
      return "reduce"
    return "elementwise"
  return "other"


def op_events(trace_dir: str, async_ops=frozenset()):
  """[(start us, duration us, hlo_op)] of the executed ops in the trace.

  A plain `dot` runs asynchronously on Eigen's thread pool: its event `X`
  covers only the launch, and the executor records `end: X` when it sees
  the dot done, so for the ops in `async_ops` the duration runs from the
  launch to that marker. (Other ops' `end:` markers can come much later
  than the op, e.g. at the end of a loop body: they are not used.)
  """
  path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
  with gzip.open(path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  events = sorted(
    (e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"]
  )
  launched = collections.defaultdict(list)  # op -> [index in out]
  out = []
  for e in events:
    name, end = e["name"], e["ts"] + e.get("dur", 0.0)
    if name.startswith("end: "):
      pending = launched.get(name[5:]) if name[5:] in async_ops else None
      if pending:
        i = pending.pop(0)
        start, _, op = out[i]
        out[i] = (start, end - start, op)
    elif e.get("args", {}).get("hlo_op"):
      launched[e["args"]["hlo_op"]].append(len(out))
      out.append((e["ts"], e.get("dur", 0.0), e["args"]["hlo_op"]))
  return out


def wall_shares(events):
  """({hlo_op: wall us}, idle us): each moment of the trace is split evenly
  between the ops running then, so overlapping ops share it and the shares
  add up to the traced wall time; `idle` is the time no op ran (dispatch,
  host work, waiting)."""
  edges = sorted(
    [(t, 1, op) for t, d, op in events]
    + [(t + d, -1, op) for t, d, op in events]
  )
  running: collections.Counter = collections.Counter()
  share: collections.Counter = collections.Counter()
  idle, last = 0.0, edges[0][0] if edges else 0.0
  for t, delta, op in edges:
    n = sum(running.values())
    if n:
      for name, k in running.items():
        share[name] += (t - last) * k / n
    else:
      idle += t - last
    running[op] += delta
    if not running[op]:
      del running[op]
    last = t
  return share, idle


def main(argv=None):
  import bench_vs_hf
  import jax

  from gemma_jax.checkpoint import hf

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="8x512")
  p.add_argument("--spec", nargs="*", default=[])
  p.add_argument("--steps", type=int, default=2, help="traced steps")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--hlo", help="write the compiled HLO text here")
  p.add_argument("--trace", help="keep the trace in this folder (TensorBoard)")
  a = p.parse_args(argv)
  batch, seq = map(int, a.shape.split("x"))

  cfg = bench_vs_hf.run_config(batch, seq, a.spec)
  with tempfile.TemporaryDirectory() as tmp:
    bench_vs_hf.export_weights(f"{tmp}/hf")
    params, _ = hf.load(f"{tmp}/hf", cfg.model)
  program, state = bench_vs_hf.ours_program(cfg, params)
  data = [
    program.put(b)
    for b in bench_vs_hf.batches(batch, seq, cfg.model.vocab_size, False)
  ]
  t = time.perf_counter()
  lowered = program.lower_train_step()
  compiled = lowered.compile()
  print(f"compile {time.perf_counter() - t:.1f} s (lower + compile)")
  mem = compiled.memory_analysis()
  for k in ("argument", "output", "temp", "generated_code"):
    v = getattr(mem, f"{k}_size_in_bytes", None)
    if v is not None:
      print(f"  {k:<15} {v / 2**30:8.3f} GiB")
  text = compiled.as_text()
  if a.hlo:
    pathlib.Path(a.hlo).write_text(text)
  instrs, comps = parse_hlo(text)

  for i in range(a.warmup):
    state, m = compiled(state, data[i % 2], program.frozen)
  float(m["loss"])
  with tempfile.TemporaryDirectory() as tmp:
    trace = a.trace or tmp
    jax.profiler.start_trace(trace, create_perfetto_trace=True)
    t = time.perf_counter()
    for i in range(a.steps):
      state, m = compiled(state, data[i % 2], program.frozen)
      float(m["loss"])
    wall = (time.perf_counter() - t) / a.steps
    jax.profiler.stop_trace()
    dots = frozenset(op for op, v in instrs.items() if v[0] == "dot")
    events = [
      e
      for e in op_events(trace, dots)
      if category(e[2], instrs, comps) != "container"
    ]
  summed: collections.Counter = collections.Counter()
  for _, d, op in events:
    summed[op] += d
  wall_us, idle = wall_shares(events)

  def phase(op):
    op_name = instrs.get(op, ("", "", "", ""))[3]
    if "transpose(" in op_name:
      return "bwd"
    return "fwd" if "jvp(" in op_name else "update"

  phases = ("fwd", "bwd", "update")
  by_cat: collections.Counter = collections.Counter()
  by_phase: collections.Counter = collections.Counter()
  summed_cat: collections.Counter = collections.Counter()
  for op, us in wall_us.items():
    cat = category(op, instrs, comps)
    by_cat[cat] += us
    by_phase[(cat, phase(op))] += us
    summed_cat[cat] += summed[op]
  by_cat["idle"] = idle
  total = sum(by_cat.values())
  per_step = lambda us: us / 1e6 / a.steps
  print(
    f"\nstep wall {wall:.2f} s; traced {per_step(total):.2f} s per step, "
    f"summed op time {per_step(sum(summed.values())):.2f} s ({a.steps} "
    "traced steps)\nwall shares: each moment split between the ops running "
    "then; idle = no op running"
  )
  print(
    f"{'category':<14}{'share':>8}{'s/step':>9}"
    + "".join(f"{p:>8}" for p in phases)
    + f"{'summed':>9}"
  )
  for cat, us in by_cat.most_common():
    print(
      f"{cat:<14}{us / total:8.1%}{per_step(us):9.2f}"
      + "".join(f"{per_step(by_phase[(cat, p)]):8.2f}" for p in phases)
      + f"{per_step(summed_cat[cat]):9.2f}"
    )
  print(
    f"\ntop {a.top} instructions (wall s/step, share, summed s/step, shape, op)"
  )
  for op, us in wall_us.most_common(a.top):
    _, shape, _, op_name = instrs.get(op, ("", "?", "", ""))
    print(
      f"{per_step(us):7.3f} {us / total:6.1%} {per_step(summed[op]):7.3f} "
      f"{category(op, instrs, comps):<12}{phase(op):<7}"
      f"{op:<28} {shape[:40]:<40} {op_name[-70:]}"
    )


if __name__ == "__main__":
  from gemma_jax.hugepages import reexec_with_hugepages

  reexec_with_hugepages()  # as `gemma-jax` runs (gemma_jax/hugepages.py)
  main()
