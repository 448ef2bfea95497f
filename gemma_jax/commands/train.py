"""`gemma-jax train CONFIG --workdir DIR`: train, evaluate, checkpoint, resume.

Run the same command on every host of a multi-host job. Re-running it with
the same workdir resumes from the latest checkpoint. SIGTERM finishes the
current step, saves and exits 0.
"""

HELP = "train (or resume) a model from a YAML run config"


def add_arguments(parser):
  parser.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
  parser.add_argument("--workdir", required=True,
                      help="run directory: checkpoints, metrics, exports")
  parser.add_argument("--steps", type=int, default=None,
                      help="train to this step (overrides train.steps)")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE",
                      help="override a config key, e.g. --set train.log_every=1")


def load_run_config(args):
  from gemma_jax.config import load_config
  overrides = list(args.overrides)
  if args.steps is not None:
    overrides.append(f"train.steps={args.steps}")
  return load_config(args.config, overrides)


def print_samples(trainer, cfg) -> None:
  """Greedy continuations of train.sample_prompts with the final params."""
  import jax
  from gemma_jax.model import sampler
  from gemma_jax.tokenizer import Tokenizer
  if not cfg.train.sample_prompts or not cfg.data.tokenizer:
    return
  tok = Tokenizer.load(cfg.data.tokenizer)
  prompts = [tok.encode(p, add_bos=True).tolist()
             for p in cfg.train.sample_prompts]
  with trainer.parts.mesh:
    outs = sampler.generate(trainer.state.params, cfg.model, prompts,
                            cfg.train.sample_tokens)
  if jax.process_index() == 0:
    for text, out in zip(cfg.train.sample_prompts, outs):
      print(f"sample: {text!r} -> {tok.decode(out)!r}")


def main(args) -> int:
  import os
  import sys

  # jax.distributed must start before anything touches the devices.
  from gemma_jax.train import trainer as trainer_lib
  cfg = load_run_config(args)        # bad config: fails before any device work
  trainer_lib.initialize_distributed()
  import jax

  trainer = trainer_lib.Trainer(cfg, args.workdir)
  try:
    summary = trainer.run()
  except trainer_lib.TrainingStopped as e:
    print(f"gemma-jax train: stopped: {e}", file=sys.stderr)
    return 1
  if summary["preempted"]:
    return 0
  if cfg.checkpoint.export_params:
    from gemma_jax.checkpoint import native
    path = os.path.join(trainer.workdir, "params")
    native.save(path, trainer.state.params, cfg.model, force=True)
    if jax.process_index() == 0:
      print(f"params exported to {path}")
  print_samples(trainer, cfg)
  return 0
