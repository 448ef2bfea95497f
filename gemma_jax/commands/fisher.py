"""`gemma-jax fisher`: the diagonal empirical Fisher of a checkpoint.

    # on old-domain data: 1024 rows of each of two sources of the run config
    gemma-jax fisher configs/cpt/tiny-cpt.yaml --source prose --source code \\
        --sequences 1024 --out runs/fisher
    # on benchmark gold answers, as the published EWC recipe (MMLU, groups
    # of 4: the batch_mean estimator): lm-evaluation-harness's own tasks
    gemma-jax fisher CONFIG --tasks mmlu --num-fewshot 0 \\
        --estimator batch_mean --batch-size 4 --out fisher/mmlu

--tasks takes what `gemma-jax report` takes (the harness's task and group
names, glob patterns, task YAML files; --include-path for local copies of
the datasets, --limit documents per task, --num-fewshot, --seed); each
document's row is its gold answer given the harness's prompt
(gemma_jax/drivers/fisher_data.py).

The checkpoint is --params (default: the config's checkpoint.init_from),
in any format `train` starts from; the mesh is the config's. Writes an
orbax checkpoint and fisher.json (model shape, base checkpoint and its
fingerprint, data, N, estimator, statistics) to --out, prints progress with
an ETA, then statistics: mean F per parameter kind and layer and the share
of the total in the top 1% of entries. Run the same command on every host
of a multi-host job: each process reads its own rows. With --topology it
only compiles the step for a Cloud TPU topology and prints its peak memory
per device (no data, no checkpoint needed). docs/continual.md.
"""

import json
import os

from gemma_jax import commands
from gemma_jax.commands import (
  add_harness_tasks,
  add_overrides,
  nonnegative_int,
  positive_int,
)

HELP = "estimate the diagonal Fisher of a checkpoint (for EWC)"


def add_arguments(parser):
  parser.add_argument("config", help="run config YAML (model, mesh, data)")
  parser.add_argument(
    "--out", help="output directory (required unless --topology)"
  )
  parser.add_argument(
    "--params",
    default=None,
    help="checkpoint to measure (default: checkpoint.init_from)",
  )
  parser.add_argument(
    "--params-format",
    default="auto",
    choices=("auto", "native", "hf", "kaggle", "run"),
  )
  data = parser.add_mutually_exclusive_group()
  data.add_argument(
    "--source",
    action="append",
    help="a data source of the config (repeatable: rows of each in turn)",
  )
  add_harness_tasks(
    parser,
    "lm-evaluation-harness tasks, groups or task YAML files, comma "
    "separated: the gold answers' log-likelihood",
    data,
  )
  parser.add_argument(
    "--sequences",
    type=positive_int,
    default=None,
    help="rows of each --source (required)",
  )
  parser.add_argument(
    "--split",
    default="train",
    choices=("train", "eval"),
    help="split of --source",
  )
  parser.add_argument(
    "--first-row",
    type=nonnegative_int,
    default=0,
    help="first row of --source's packed stream",
  )
  parser.add_argument(
    "--estimator", default="per_example", choices=("per_example", "batch_mean")
  )
  parser.add_argument(
    "--batch-size",
    type=positive_int,
    default=None,
    help="batch_mean: rows per squared mean gradient "
    "(default 4, as the published recipe)",
  )
  parser.add_argument(
    "--rows-per-vmap",
    type=positive_int,
    default=1,
    help="units per device per vmap; memory grows with "
    "it (that many float32 gradient trees)",
  )
  parser.add_argument(
    "--grad-dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="dtype of each unit's gradient (bfloat16 halves "
    "its memory; squares are summed in float32)",
  )
  parser.add_argument(
    "--units-per-step",
    type=positive_int,
    default=None,
    help="units per compiled step (default: batch shards x --rows-per-vmap)",
  )
  add_overrides(parser)
  parser.add_argument(
    "--force", action="store_true", help="replace --out if it exists"
  )
  parser.add_argument(
    "--json", action="store_true", help="print the metadata as one JSON object"
  )
  parser.add_argument(
    "--topology",
    default=None,
    help="only compile the step for this Cloud TPU "
    "topology (e.g. v5e:16x16; needs libtpu) and "
    "print its peak memory per device",
  )


def _rows(args, cfg):
  """(rows, what they were read from beyond rows.describe())."""
  from gemma_jax.drivers import fisher_data
  from gemma_jax.errors import ConfigError

  opts = commands.harness_options(args)  # the harness's flags need --tasks
  if opts is not None:
    return _task_rows(args, opts, cfg)
  if args.sequences is None:
    raise ConfigError("--source needs --sequences (how many rows)")
  if len(set(args.source)) != len(args.source):
    raise ConfigError(f"--source: a source is given twice: {args.source}")
  parts = [
    fisher_data.SourceRows(
      cfg.data, name, args.sequences, args.split, args.first_row
    )
    for name in args.source
  ]
  return parts[0] if len(parts) == 1 else fisher_data.MixedRows(parts), {}


def _task_rows(args, opts, cfg):
  """GoldRows of the harness's tasks, and the data they were read from."""
  import hashlib

  from gemma_jax.drivers import fisher_data
  from gemma_jax.errors import ConfigError
  from gemma_jax.evals import benchmarks
  from gemma_jax.tokenizer import Tokenizer

  if args.sequences is not None:
    raise ConfigError(
      "--sequences is for --source; with --tasks give --limit "
      "(documents per task)"
    )
  manager = benchmarks.task_manager(opts)
  files = benchmarks.check_tasks(opts.task_names(), manager)
  tokenizer = Tokenizer.load(cfg.data.tokenizer)
  tokenizer.check_vocab(cfg.model.vocab_size)
  rows = fisher_data.GoldRows(
    benchmarks.gold_requests(opts, manager), tokenizer, cfg.data.seq_len
  )

  def sha256(path):
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()

  return rows, {
    "harness": {
      "tasks": list(opts.tasks),
      "include_path": list(opts.include_path),
      "limit": opts.limit,
      "num_fewshot": opts.num_fewshot,
      "seed": list(opts.seeds),
    },
    "data_files": [{"path": p, "sha256": sha256(p)} for p in files],
  }


def _print_stats(meta):
  s = meta["stats"]
  print(
    f"Fisher of {meta['base']['path']} ({meta['estimator']['name']}, "
    f"N = {meta['num_examples']} {meta['units']}): {s['entries']} "
    f"entries, mean {s['mean']:.4g}, top 1% of entries hold "
    f"{s['top1pct_share']:.1%} of the total"
  )
  for kind, k in s["per_kind"].items():
    layers = k.get("per_layer")
    text = " ".join(f"{v:.3g}" for v in layers) if layers else ""
    print(
      f"  {kind:<34} mean {k['mean']:.4g}"
      + (f"  per layer: {text}" if text else "")
    )
  print(f"{meta['seconds']:.1f} s; written to {meta['out']}")


def _estimator(args):
  from gemma_jax.drivers import fisher
  from gemma_jax.errors import ConfigError

  if args.batch_size is not None and args.estimator == "per_example":
    raise ConfigError("--batch-size is for --estimator batch_mean")
  return fisher.Estimator(
    args.estimator,
    args.batch_size or (4 if args.estimator == "batch_mean" else 1),
  )


def compile_only(args, cfg) -> int:
  """--topology: the step's compiled memory on a TPU topology."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import gemma_jax.features  # noqa: F401  (registers them with the core)
  from gemma_jax import hardware
  from gemma_jax.drivers import fisher
  from gemma_jax.sharding.mesh import make_mesh
  from gemma_jax.train import aot
  from gemma_jax.train.program import TrainProgram

  chip, _ = hardware.parse_topology(args.topology)
  program = TrainProgram(
    cfg, make_mesh(cfg.mesh, aot.topology_devices(args.topology))
  )
  fprog = fisher.FisherProgram(
    program,
    _estimator(args),
    args.units_per_step,
    args.rows_per_vmap,
    args.grad_dtype,
  )
  report = {
    "topology": args.topology,
    "mesh": dict(program.mesh.shape),
    "units_per_step": fprog.units_per_step,
    "rows_per_vmap": args.rows_per_vmap,
    "grad_dtype": args.grad_dtype,
    "hbm_bytes_per_device": chip.hbm_bytes,
  }
  _, fit = aot.fit_report(
    lambda: fprog.lower(program.abstract_state.params, cfg.data.seq_len),
    chip,
  )
  report |= fit
  print(json.dumps(report))
  return 0 if report["fits"] else 1


def main(args) -> int:
  from gemma_jax import distributed, fileio
  from gemma_jax.errors import ConfigError
  from gemma_jax.train.config import load_config

  cfg = load_config(args.config, args.overrides)
  if args.topology:
    return compile_only(args, cfg)
  if not args.out or not (args.source or args.tasks):
    raise ConfigError("give --out and one of --source or --tasks")
  distributed.initialize_runtime(cfg.runtime)
  import jax

  import gemma_jax.features  # noqa: F401  (registers them with the core)
  from gemma_jax.checkpoint import fisher as fisher_store
  from gemma_jax.checkpoint import preflight, publish
  from gemma_jax.drivers import fisher, fisher_data
  from gemma_jax.features import ewc
  from gemma_jax.sharding.data_shards import data_shard
  from gemma_jax.train import metrics, start
  from gemma_jax.train.program import TrainProgram

  path = args.params or cfg.checkpoint.init_from
  if not path:
    raise ConfigError(
      "give --params, or set checkpoint.init_from in the "
      "config: the checkpoint whose Fisher to estimate"
    )
  estimator = _estimator(args)
  from etils import epath

  if args.params_format != "run":
    preflight.check_params_source(
      path, cfg.model, args.params_format, "--params"
    )

  fileio.check_remote(args.out, "--out")
  if epath.Path(args.out).exists() and not args.force:
    raise ConfigError(
      f"--out {args.out} already exists; pass --force to replace it"
    )
  rows, read = _rows(args, cfg)
  data = {**rows.describe(), **read}
  program = TrainProgram(cfg)
  fprog = fisher.FisherProgram(
    program, estimator, args.units_per_step, args.rows_per_vmap, args.grad_dtype
  )
  params = start.load_params(path, args.params_format, program)
  publish.check_finite(params, args.out, source=path)
  steps = fisher_data.num_steps(
    rows, estimator.rows_per_unit, fprog.units_per_step
  )
  batches = fisher_data.unit_batches(
    rows,
    estimator.rows_per_unit,
    fprog.units_per_step,
    # Processes whose devices hold the same units read the same ones.
    *data_shard(fprog.unit_sharding, fprog.units_per_step),
  )
  progress = metrics.ProgressLine(steps, jax.process_index() == 0)
  values, info = fisher.estimate(
    fprog, params, batches, steps, progress=progress
  )
  stats = fisher.summary(values)
  meta = {
    "base": {
      "path": str(path),
      "format": args.params_format,
      "fingerprint": ewc.fingerprint_of(path),
    },
    "data": data,
    "estimator": {"name": estimator.name, "batch_size": estimator.batch_size},
    "num_examples": rows.num_rows,
    "units": "rows" if estimator.name == "per_example" else "groups",
    "num_units": info["units"],
    "accumulation": "float32",
    "grad_dtype": args.grad_dtype,
    "mean_loglik_per_unit": info["mean_loglik"],
    "seconds": info["seconds"],
    "mesh": dict(program.mesh.shape),
    "stats": stats,
  }
  fisher_store.save(args.out, values, cfg.model, meta, force=args.force)
  meta["out"] = args.out
  if jax.process_index() == 0:
    if args.json:
      print(json.dumps(meta))
    else:
      _print_stats(meta)
  return 0
