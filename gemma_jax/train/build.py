"""Builds what the trainer runs from a RunConfig: mesh, data, step functions.

The trainer sees one `Components` object; this module is the only place
that knows the data pipeline's and the train step's APIs.
"""

import dataclasses
from collections.abc import Callable

import jax

from gemma_jax.data import build_pipeline, check_resume
from gemma_jax.sharding.mesh import make_mesh
from gemma_jax.train import flops, step as step_lib


@dataclasses.dataclass
class Components:
  cfg: object
  mesh: jax.sharding.Mesh
  pipe: object
  eval_step: Callable           # (params, batch) -> {"loss_sum", "tokens"}
  source_names: tuple[str, ...]
  tokens_per_step: int          # positions per global batch (B * T)
  flops_per_token: float        # model FLOPs per trained token (fwd + bwd)
  check_data_resume: Callable = check_resume

  def put(self, batch: dict) -> dict:
    """Process-local numpy rows -> global arrays sharded over the batch."""
    return step_lib.device_batch(
        batch, step_lib.batch_sharding(self.cfg, self.mesh))

  def init_state(self):
    state = step_lib.init_train_state(self.cfg, self.mesh,
                                      self.cfg.train.seed)
    if self.cfg.checkpoint.init_from:
      state = self._with_params_from(state, self.cfg.checkpoint.init_from)
    return state

  def _with_params_from(self, state, directory):
    from gemma_jax.checkpoint import native
    shardings = jax.tree.map(lambda x: x.sharding, state.params)
    params, _ = native.load(directory, shardings=shardings)
    return state.replace(params=params)

  def abstract_state(self):
    """ShapeDtypeStructs of the state with this mesh's shardings."""
    return step_lib.abstract_train_state(self.cfg, self.mesh)

  def compile_train_step(self, state, batch):
    fn = step_lib.make_train_step(self.cfg, self.mesh,
                                  len(self.source_names))
    return fn.lower(state, batch).compile()


def build(cfg) -> Components:
  mesh = make_mesh(cfg.mesh)
  pipe = build_pipeline(cfg.data, global_batch=cfg.train.batch_size,
                        process_index=jax.process_index(),
                        process_count=jax.process_count(),
                        vocab_size=cfg.model.vocab_size)
  names = tuple(pipe.source_names)
  eval_step = step_lib.make_eval_step(cfg, mesh, len(names))
  seq_len = cfg.data.seq_len
  return Components(
      cfg=cfg, mesh=mesh, pipe=pipe, eval_step=eval_step,
      source_names=names, tokens_per_step=cfg.train.batch_size * seq_len,
      flops_per_token=float(flops.model_flops_per_token(cfg.model, seq_len)))
