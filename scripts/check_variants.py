"""Checks that prototype patches (scripts/bench_variants.py) keep numerics.

    python scripts/check_variants.py flash128 geglu ce1024

With the named patches applied together, against the unpatched code in the
same process:
  1. HF parity: logits and per-token losses on every committed parity
     fixture (tests/fixtures/parity) within 3e-4 of HF's float32 logits;
  2. on the benchmark model (2 rows x 512 tokens, one one-document row and
     one packed row): loss, and the largest gradient difference relative to
     the largest gradient, per parameter;
  3. determinism: two train steps from the same state on the same batch give
     bitwise-equal params and metrics.
"""

import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
FIXTURES = HERE.parent / "tests" / "fixtures" / "parity"
TOLERANCE = 3e-4


def fixture_outputs(step_lib):
  """{name: (hf logits, our logits, our token losses, mask)}."""
  from gemma_jax.checkpoint import testing, hf
  from gemma_jax.model import Transformer
  out = {}
  for path in sorted(FIXTURES.glob("*.npz")):
    with tempfile.TemporaryDirectory() as tmp:
      data, _ = testing.write_hf_dir(path, pathlib.Path(tmp) / "hf")
      params, cfg = hf.load(pathlib.Path(tmp) / "hf")
    tokens, mask = data["tokens"], data["mask"].astype(np.int32)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    positions = positions.astype(np.int32)
    model = Transformer(cfg)
    with jax.default_matmul_precision("highest"):
      logits = jax.jit(model.apply)({"params": params}, tokens, positions,
                                    mask)
      mb = {"inputs": tokens, "targets": np.roll(tokens, -1, 1),
            "positions": positions, "segment_ids": mask, "loss_mask": mask}
      ce, _ = jax.jit(lambda p, mb: step_lib._token_losses(
          model, p, mb, 0.0))(params, mb)
    out[path.stem] = (data["logits"], np.asarray(logits), np.asarray(ce),
                      mask.astype(bool))
  return out


def bench_outputs(step_lib):
  """(loss, grads) of the benchmark model on 2 x 512 rows, and a train
  step run twice."""
  import bench_vs_hf
  cfg = bench_vs_hf.run_config(2, 512)
  one_doc = bench_vs_hf.batches(2, 512, cfg.model.vocab_size, False, 1)[0]
  packed = bench_vs_hf.batches(2, 512, cfg.model.vocab_size, True, 1)[0]
  batch = {k: np.concatenate([one_doc[k][:1], packed[k][1:]])
           for k in one_doc}
  from gemma_jax.sharding.mesh import make_mesh
  mesh = make_mesh(cfg.mesh)
  state = step_lib.init_train_state(cfg, mesh, 0)
  params = state.params

  def loss(p):
    (aux, _), tokens = step_lib._sums(cfg, p, batch, 1, False)
    return aux["ce"] / tokens
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  step = step_lib.make_train_step(cfg, mesh, 1)
  runs = []
  for _ in range(2):
    fresh = jax.tree.map(jnp.copy, state)
    new, metrics = step(fresh, batch)
    runs.append(jax.device_get((new.params, metrics)))
  return float(value), jax.device_get(grads), runs


def main(names):
  from gemma_jax.train import step as step_lib
  import bench_variants
  before_fix = fixture_outputs(step_lib)
  before_bench = bench_outputs(step_lib)
  for name in names:
    bench_variants.apply(name)
  after_fix = fixture_outputs(step_lib)
  loss, grads, runs = bench_outputs(step_lib)
  ok = True
  for name, (hf_logits, logits, ce, mask) in after_fix.items():
    d_hf = np.abs(logits[mask] - hf_logits[mask]).max()
    d_ce = np.abs(ce - before_fix[name][2]).max()
    print(f"{name}: |logits - HF| {d_hf:.2e}, |token loss - unpatched| "
          f"{d_ce:.2e}")
    ok &= d_hf <= TOLERANCE and d_ce <= TOLERANCE
  print(f"bench model loss {loss:.7f} (unpatched {before_bench[0]:.7f})")
  worst = 0.0
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    ref = _at(before_bench[1], path)
    rel = float(np.abs(g - ref).max() / max(np.abs(ref).max(), 1e-30))
    worst = max(worst, rel)
    print(f"  grad {jax.tree_util.keystr(path):<45} max rel diff {rel:.1e}")
  ok &= abs(loss - before_bench[0]) <= 1e-5 and worst <= 1e-3
  same = all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])))
  print(f"two identical steps bitwise equal: {same}")
  ok &= same
  print("OK" if ok else "FAILED")
  return 0 if ok else 1


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
