"""`gemma-jax launch`: train on Cloud TPU (queued resources) or GKE.

    gemma-jax launch create CONFIG --name N --zone Z --tpu v5e:16x16
        [--slices 2] [--spot | --reserved]
    gemma-jax launch run CONFIG --name N --zone Z --tpu v5e:16x16
        --workdir gs://B/R [--set k=v]
    gemma-jax launch watch CONFIG --name N --zone Z --tpu v5e:16x16
        --workdir gs://B/R --spot
    gemma-jax launch status|logs|stop|delete --name N --zone Z [--slices 2]
    gemma-jax launch gke CONFIG --tpu v5e:16x16 --name W --image IMG
        --workdir gs://B/R [--pathways] [--format jobset|xpk]

`create` requests a queued resource whose accelerator type and runtime
version follow from --tpu (GENERATION:SHAPE in chips, as `gemma-jax compile
--topology` takes it, or a generation alone when the mesh fixes the chip
count); `run` ships this checkout and the config to every worker and starts
the same `gemma-jax train` on every host; `watch` creates, runs, and on
preemption deletes, re-queues and runs again (the trainer resumes from the
workdir's last checkpoint). The config's mesh is checked against the slices
before anything is requested, and gcloud (on PATH, logged in) before any
gcloud call. --dry-run prints the commands instead. Details: docs/launch.md.
"""

import os
import sys

from gemma_jax.commands import add_overrides

HELP = "create Cloud TPU capacity and train on it (queued resources, GKE)"

_CAPACITY_COMMANDS = ("create", "run", "watch")


def _common(p, config: bool, tpu_required: bool):
  if config:
    p.add_argument("config", help="run config YAML")
    add_overrides(p)
  p.add_argument(
    "--name",
    required=True,
    help="queued resource name (nodes NAME or NAME-0..N-1)",
  )
  p.add_argument(
    "--tpu",
    required=tpu_required,
    default=None,
    help="GENERATION:SHAPE in chips (v5e:16x16, v4:8x16x32, "
    "v5p:8x24x32, v6e:8x16) or a generation (v5e)",
  )
  p.add_argument(
    "--slices",
    type=int,
    default=1,
    help="slices (multislice over the data-centre network)",
  )
  p.add_argument(
    "--dry-run",
    action="store_true",
    help="print the commands instead of running them",
  )


def _gcloud_place(p):
  p.add_argument("--zone", required=True, help="e.g. us-west4-a")
  p.add_argument(
    "--project", default=None, help="Google Cloud project (default: gcloud's)"
  )


def _training(p):
  p.add_argument(
    "--workdir", required=True, help="gs:// run directory shared by every host"
  )
  p.add_argument(
    "--steps",
    type=int,
    default=None,
    help="train to this step (passed to gemma-jax train)",
  )
  p.add_argument(
    "--log-dir",
    default=None,
    help="local folder for the code archive and logs "
    "(default runs/launch/NAME)",
  )


def add_arguments(parser):
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
  for name, text in (
    ("create", "request a queued resource"),
    ("run", "ship the code and start training everywhere"),
    ("watch", "create, run, and re-queue on preemption"),
  ):
    p = sub.add_parser(name, help=text)
    _common(p, config=True, tpu_required=True)
    _gcloud_place(p)
    if name != "run":
      group = p.add_mutually_exclusive_group()
      group.add_argument(
        "--spot",
        action="store_true",
        help="spot capacity (preemptible, cheaper)",
      )
      group.add_argument(
        "--reserved",
        action="store_true",
        help="capacity from the project's reservation",
      )
    if name != "create":
      _training(p)
    if name == "watch":
      p.add_argument("--poll-s", type=float, default=60.0)
      p.add_argument(
        "--max-retries",
        type=int,
        default=5,
        help="re-queues and restarts before giving up",
      )
      p.add_argument(
        "--backoff-s",
        type=float,
        default=60.0,
        help="first wait before a retry; doubles, up to 30 min",
      )
  for name, text in (
    ("status", "queued resource state and training state"),
    ("logs", "copy every worker's log to a local folder"),
    ("stop", "SIGTERM training: it saves and exits"),
    ("delete", "delete the queued resource and its VMs"),
  ):
    p = sub.add_parser(name, help=text)
    _common(p, config=False, tpu_required=False)
    _gcloud_place(p)
    if name == "logs":
      p.add_argument(
        "--out", default=None, help="folder (default runs/launch/NAME/logs)"
      )
      p.add_argument(
        "--follow", action="store_true", help="tail -f one worker's log instead"
      )
      p.add_argument("--slice", type=int, default=0)
      p.add_argument("--worker", type=int, default=0)
  p = sub.add_parser("gke", help="render an xpk command or JobSet manifest")
  _common(p, config=True, tpu_required=True)
  p.add_argument("--workdir", required=True, help="gs:// run directory")
  p.add_argument("--steps", type=int, default=None)
  p.add_argument(
    "--image",
    required=True,
    help="container image with this checkout and gemma-jax[tpu]",
  )
  p.add_argument(
    "--cluster", default=None, help="xpk: the cluster (default CLUSTER)"
  )
  p.add_argument(
    "--pathways", action="store_true", help="single controller through Pathways"
  )
  p.add_argument(
    "--spot",
    action="store_true",
    help="spot node pools (JobSet selector, xpk --spot)",
  )
  p.add_argument(
    "--priority",
    default=None,
    choices=["very-low", "low", "medium", "high", "very-high"],
    help="PriorityClass (xpk clusters define these)",
  )
  p.add_argument(
    "--max-restarts",
    type=int,
    default=None,
    help="restarts on failure or preemption, each resuming from the last "
    "checkpoint (default 0; with --spot 10)",
  )
  p.add_argument("--queue", default=None, help="JobSet: Kueue LocalQueue name")
  p.add_argument("--format", choices=["xpk", "jobset"], default="jobset")
  p.add_argument("--zone", default=None, help="xpk: the cluster's zone")
  p.add_argument("--project", default=None, help="xpk: the project")


def _train_args(args) -> list[str]:
  out = []
  for o in getattr(args, "overrides", []):
    out += ["--set", o]
  if getattr(args, "steps", None) is not None:
    out += ["--steps", str(args.steps)]
  return out


def _checked_tpu(args):
  """The slice, with the config's mesh checked against it (ConfigError)."""
  from gemma_jax.launch import slices
  from gemma_jax.train.config import load_config

  cfg = load_config(args.config, args.overrides)
  tpu = slices.parse_tpu(args.tpu, cfg.mesh)
  slices.check_mesh(cfg.mesh, tpu, args.slices, what=args.config)
  return tpu, cfg


def _target(args, tpu=None):
  from gemma_jax.launch import slices
  from gemma_jax.launch import tpu as tpu_lib

  if tpu is None and args.tpu:
    tpu = slices.parse_tpu(args.tpu) if ":" in args.tpu else None
  capacity = (
    "spot"
    if getattr(args, "spot", False)
    else "reserved"
    if getattr(args, "reserved", False)
    else "on-demand"
  )
  return tpu_lib.Target(
    args.name, args.zone, tpu, args.slices, args.project, capacity
  )


def main(args) -> int:
  if args.action == "gke":
    return _gke(args)
  from gemma_jax.errors import ConfigError
  from gemma_jax.launch import gcloud, slices
  from gemma_jax.launch import tpu as tpu_lib
  from gemma_jax.launch import watch as watch_lib

  tpu = None
  if args.action in _CAPACITY_COMMANDS:
    tpu, _ = _checked_tpu(args)
    if args.action != "create" and not args.workdir.startswith("gs://"):
      raise ConfigError(
        f"--workdir {args.workdir!r}: every host must see "
        f"the same checkpoints; use a gs:// path"
      )
  t = _target(args, tpu)
  if args.dry_run and t.tpu is not None:  # a real run lets gcloud judge
    slices.check_zone(
      t.tpu,
      t.zone,
      "pick one of those, or run without --dry-run (gcloud knows zones "
      "added since)",
    )
  run = gcloud.Shell(dry_run=args.dry_run)
  if not args.dry_run:
    gcloud.preflight(run)
  log_dir = getattr(args, "log_dir", None) or os.path.join(
    "runs", "launch", t.name
  )
  if not args.dry_run and args.action in ("run", "watch", "logs"):
    os.makedirs(log_dir, exist_ok=True)

  def start():
    tpu_lib.ship_and_start(
      t, args.config, args.workdir, _train_args(args), run, log_dir
    )

  if args.action == "create":
    argv = tpu_lib.create_command(t)
    gcloud.check(run(argv), argv)
  elif args.action == "run":
    start()
  elif args.action == "watch":
    if args.dry_run:  # one round: what watch issues, in order
      run(tpu_lib.create_command(t))
      run(tpu_lib.describe_command(t))
      start()
      return 0
    policy = watch_lib.WatchPolicy(
      args.poll_s, args.max_retries, args.backoff_s
    )
    if tpu_lib.state(t, run) == tpu_lib.MISSING:
      argv = tpu_lib.create_command(t)
      gcloud.check(run(argv), argv)
    return watch_lib.watch(t, start, run, policy)
  elif args.action == "status":
    if args.dry_run:
      run(tpu_lib.describe_command(t))
      tpu_lib.training_status(t, run)
      return 0
    state = tpu_lib.state(t, run)
    print(f"queued resource {t.name}: {state}")
    if state == "ACTIVE":
      print(f"training (slice 0, worker 0): {tpu_lib.training_status(t, run)}")
  elif args.action == "logs":
    if args.follow:
      node = t.nodes[args.slice]
      argv = tpu_lib.ssh_command(
        t,
        node,
        f"tail -n 100 -F {tpu_lib.REMOTE_RUN}/train.log",
        worker=args.worker,
      )
      return run(argv).returncode
    out = args.out or os.path.join(log_dir, "logs")
    if not args.dry_run:
      os.makedirs(out, exist_ok=True)
    for path in tpu_lib.fetch_logs(t, run, out):
      print(path)
  elif args.action == "stop":
    for node in t.nodes:
      argv = tpu_lib.ssh_command(t, node, tpu_lib.REMOTE_STOP)
      gcloud.check(run(argv), argv)
  elif args.action == "delete":
    argv = tpu_lib.delete_command(t)
    gcloud.check(run(argv), argv)
  return 0


def _gke_flags(args, tpu) -> None:
  """ConfigError for a flag the chosen format cannot carry (never dropped
  without a word), a negative --max-restarts, or an undocumented zone."""
  from gemma_jax.errors import ConfigError
  from gemma_jax.launch import slices

  if args.max_restarts is not None and args.max_restarts < 0:
    raise ConfigError(
      f"--max-restarts {args.max_restarts}: must be >= 0 (0: no restart)"
    )
  if args.format == "jobset":
    given = [
      f"--{k}" for k in ("cluster", "zone", "project") if getattr(args, k)
    ]
    if given:
      raise ConfigError(
        f"{', '.join(given)}: a JobSet manifest carries no "
        f"{'/'.join(g[2:] for g in given)} (kubectl applies it to its "
        f"current cluster); drop {' '.join(given)}, or render the xpk "
        f"command (--format xpk)"
      )
  elif args.zone:
    slices.check_zone(
      tpu,
      args.zone,
      f"give the zone of a cluster with {tpu.generation} node pools",
    )


def _gke(args) -> int:
  import yaml

  from gemma_jax.launch import gcloud, gke

  tpu, cfg = _checked_tpu(args)
  _gke_flags(args, tpu)
  runtime = getattr(cfg, "runtime", None)
  pathways = args.pathways or bool(runtime and runtime.pathways)
  w = gke.Workload(
    args.name,
    tpu,
    args.image,
    args.config,
    args.workdir,
    args.slices,
    tuple(_train_args(args)),
    pathways,
    args.spot,
    args.priority,
    args.max_restarts,
    args.queue,
  )
  if args.format == "xpk":
    cluster = args.cluster or "CLUSTER"
    print(gcloud.show(gke.xpk_command(w, cluster, args.zone, args.project)))
  else:
    sys.stdout.write(yaml.safe_dump(gke.jobset(w), sort_keys=False))
  return 0
